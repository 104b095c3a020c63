"""Reading a pretrax workdir as an encoder: its config, its saved parameters, and the
`TextEncoder` / `VisionEncoder` that a parameter subtree is the weights of.

Which encoder a subtree holds is read from the saved parameters (a ViT has
`patch_embed`, a BERT `embeddings`), so any stage's workdir works: MLM, SimCSE and
text classification (text), SimCLR and image classification (ViT), CLIP
(`image_backbone`, `text_backbone`), and workdirs written by `import-hf`.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from core import checkpoint as ckpt_lib
from core.config import read_json
from core.errors import CheckpointError, ConfigError
from models.bert import BertConfig, TextEncoder
from models.vit import VisionEncoder, VitConfig

IMPORT_INFO = 'import.json'  # what `import-hf` wrote: source, architecture, initialised heads


def read_config(workdir: str) -> dict:
    """WORKDIR/config.json (the resolved config of the run, or of the import)."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        raise ConfigError(
            f'{workdir} holds no pretrax run (no config.json); give the workdir of a pretrain '
            'or finetune run, or one written by `launch.py import-hf`'
        )
    return read_json(path)


def import_info(workdir: str) -> dict:
    """WORKDIR/import.json of an imported checkpoint ({} for a run trained here)."""
    path = os.path.join(workdir, IMPORT_INFO)
    return read_json(path) if os.path.isfile(path) else {}


def checkpoint_path(workdir: str, step: int | None) -> str:
    """The checkpoint to read: the latest of WORKDIR, or WORKDIR/checkpoints/<step>."""
    if step is None:
        return workdir
    path = os.path.join(workdir, 'checkpoints', str(step))
    if not os.path.isdir(path):
        kept = ckpt_lib.saved_steps(os.path.join(workdir, 'checkpoints'))
        raise CheckpointError(f'{workdir} has no checkpoint {step}; kept steps: {kept}')
    return path


def saved_params(path: str) -> dict:
    """Every saved parameter of the checkpoint at `path` (a workdir or a step) as NumPy
    arrays, nested as saved: {'backbone': {...}, 'mlm_head': {...}, ...}."""
    meta = ckpt_lib.saved_params_metadata(path)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'Sharding info not provided')
        params, _ = ckpt_lib.restore_params(path, target)
    return jax.tree.map(np.asarray, params)


def encoder_kind(subtree: dict, name: str) -> str:
    """'vit' or 'bert' for a saved encoder subtree."""
    if 'patch_embed' in subtree:
        return 'vit'
    if 'embeddings' in subtree:
        return 'bert'
    raise ConfigError(
        f'params/{name} is not a text or ViT encoder (its keys: {sorted(subtree)}); give '
        '--subtree the encoder (backbone, image_backbone, text_backbone)'
    )


def encoder_subtree(params: dict, name: str) -> dict:
    if name not in params or not isinstance(params[name], dict):
        raise ConfigError(
            f'the checkpoint has no params/{name} (top level: {sorted(params)}); give --subtree '
            'one of the encoders in it (backbone; image_backbone or text_backbone for CLIP)'
        )
    return params[name]


def model_section(config: dict, subtree: str) -> dict:
    """The `model` config of the encoder in `subtree` (CLIP's text tower: model.text)."""
    model = config.get('model', {})
    return model.get('text', {}) if subtree == 'text_backbone' else model


def encoder_module(kind: str, model: dict, pooler: bool) -> TextEncoder | VisionEncoder:
    """The float32 encoder module of a `model` config section. `pooler` comes from the saved
    params, which decide whether there is one."""
    if kind == 'vit':
        return VisionEncoder(VitConfig.from_config(model, pooler=pooler, dtype='float32'))
    cfg = BertConfig.from_config(model)
    return TextEncoder(BertConfig(**{**cfg.__dict__, 'pooler': pooler, 'dtype': 'float32'}))


def example_input(kind: str, module, seq_len: int = 8):
    """A one-example input to initialise `module` with (args of its __call__)."""
    if kind == 'vit':
        c = module.cfg
        return (jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32),)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return ids, jnp.ones_like(ids), ids


def abstract_params(module, inputs) -> dict:
    """The module's parameter shapes (no arrays), for checking a converted tree."""
    return jax.eval_shape(
        lambda r: nn.meta.unbox(module.init(r, *inputs)['params']), jax.random.key(0)
    )
