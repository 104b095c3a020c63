"""Hugging Face checkpoints in and out of pretrax workdirs.

  import_hf(source, workdir)   an HF model directory (config.json, model.safetensors,
                               vocab.txt / tokenizer.json) -> WORKDIR/config.json,
                               checkpoints/0, vocab.txt, import.json
  export_hf(workdir, out)      a pretrax workdir -> a directory `from_pretrained` loads

An imported workdir is what the existing `init_from` paths read: params `backbone/...`
(plus BertForMlm's `mlm_head` / `output_bias` for text), `model.*` of the HF architecture
in config.json, the vocabulary as WORKDIR/vocab.txt. A BERT without an MLM head (BertModel)
gets a freshly initialised one, as `BertForMaskedLM.from_pretrained` would, so continued
pretraining starts from it; import.json records that.

The architecture maps onto model options (post-LN, GELU variant, LayerNorm epsilon, token
types, pooler, ...), never onto special cases: what the options cannot express is refused
with a ConfigError naming the HF key. Weights go through `safetensors.numpy`; no PyTorch.
"""

import json
import os
import shutil
import stat
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import logging
from flax import linen as nn

from core import checkpoint as ckpt_lib
from core import recipe
from core.errors import ConfigError, DataError
from interop import hf_bert, hf_files, hf_vit, outputs
from interop import rules as r
from interop import workdir as wd
from models.bert import BertConfig, MlmHead
from models.encoder import unstack_layers

FAMILIES = {'bert': hf_bert, 'vit': hf_vit}
WEIGHTS = hf_files.WEIGHTS


# --- reading an HF model directory --------------------------------------------------------


def _family(hf: dict, where: str):
    model_type = hf.get('model_type')
    if model_type not in FAMILIES:
        raise ConfigError(
            f'{where}: model_type={model_type!r} ({", ".join(hf.get("architectures") or [])}) '
            f'is not supported; import-hf reads {sorted(FAMILIES)} checkpoints (BERT-family '
            'encoders: BertModel, BertForMaskedLM, MiniLM-style BERTs; ViTModel). RoBERTa-like '
            'models differ (positions offset by the padding index, no token types) and need '
            'their own mapping'
        )
    return FAMILIES[model_type]


# --- the vocabulary -------------------------------------------------------------------------


# --- import ---------------------------------------------------------------------------------


def _stage_config(family, model: dict, workdir: str, tokenizer: dict | None):
    """The pretrax config written as WORKDIR/config.json: the pretraining config of the
    family (configs/bert_mlm.py, configs/vit_simclr.py) with the imported architecture."""
    from configs import bert_mlm, vit_simclr

    if family is hf_bert:
        c = bert_mlm.get_config('base')
        c.data.vocab_file = os.path.abspath(os.path.join(workdir, 'vocab.txt'))
        c.data.lowercase = bool(tokenizer['lowercase'])
        c.data.seq_len = min(c.data.seq_len, model['max_len'])
    else:
        c = vit_simclr.get_config('b')
    with c.model.unlocked():
        for key, value in model.items():
            c.model[key] = value
    return c


def _fresh_mlm_head(model: dict, seed: int = 0) -> dict:
    """BertForMlm's `mlm_head` as initialised there (BERT's init) and a zero output bias."""
    cfg = BertConfig.from_config(model)
    head = MlmHead(cfg.activation, cfg.layer_norm_eps)
    x = np.zeros((1, 1, cfg.hidden_size), np.float32)
    params = jax.jit(lambda k: nn.meta.unbox(head.init(k, x))['params'])(jax.random.key(seed))
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return {'mlm_head': params, 'output_bias': np.zeros(cfg.vocab_size, np.float32)}


def _expected_tree(kind: str, model: dict) -> dict:
    """The parameter shapes of the model an imported workdir is for."""
    from models.bert import BertForMlm

    if kind == 'vit':
        module = wd.encoder_module('vit', model, model['pooler'])
        return {'backbone': wd.abstract_params(module, wd.example_input('vit', module))}
    bert = BertForMlm(BertConfig.from_config(model))
    batch = {k: np.zeros((1, 8), np.int32) for k in ('input_ids', 'input_mask', 'segment_ids')}
    batch['masked_positions'] = np.zeros((1, 2), np.int32)
    return wd.abstract_params(bert, (batch,))


def save_checkpoint(workdir: str, params: dict, config: ml_collections.ConfigDict) -> str:
    """WORKDIR/checkpoints/0 with the state ({'step', 'params'}) and config items that
    core/checkpoint.py reads (`restore_params` restores params only)."""
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'config': ocp.JsonCheckpointHandler(),
        },
    )
    state = {'step': np.zeros((), np.int32), 'params': params}
    manager.save(
        0,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_put(state)),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    return os.path.join(directory, '0')


def _bert_params(tensors: dict, prefix: str, model: dict, where: str):
    """(BertForMlm params, the HF tensors used, the subtrees initialised here): the MLM head
    from `cls.predictions.*`, or a fresh one for a checkpoint without (BertModel)."""
    params, used = r.to_pretrax(tensors, hf_bert.encoder_rules(model), prefix, where)
    if not hf_bert.has_mlm_head(tensors):
        return {**params, **_fresh_mlm_head(model)}, used, ['mlm_head', 'output_bias']
    hf_bert.check_tied_decoder(tensors, prefix, where)
    head, head_used = r.to_pretrax(tensors, hf_bert.mlm_rules(), '', where)
    used |= head_used | {n for n in tensors if n.startswith(hf_bert.MLM + 'decoder.')}
    return {**params, **head}, used, []


def _vit_params(tensors: dict, hf: dict, prefix: str, model: dict, directory: str):
    """(VisionEncoder params under `backbone`, the HF tensors used, the input normalisation
    folded into the patch embedding)."""
    where = os.path.join(directory, 'config.json')
    tensors = hf_vit.add_missing_qkv_bias(tensors, hf, prefix, model)
    params, used = r.to_pretrax(tensors, hf_vit.encoder_rules(model), prefix, where)
    processor_file = os.path.join(directory, 'preprocessor_config.json')
    processor = wd.read_json(processor_file) if os.path.isfile(processor_file) else None
    normalisation = hf_vit.input_normalisation(processor, model['channels'])
    normalisation['from'] = 'preprocessor_config.json' if processor else 'default 0.5 / 0.5'
    return hf_vit.fold_normalisation(params, normalisation), used, normalisation


def import_hf(source: str, workdir: str, overwrite: bool = False) -> dict:
    """Writes the HF checkpoint `source` (a directory, an installed package or a model id in
    the local Hugging Face cache: `hf_files.find_model_dir`) as a pretrax workdir; returns
    what import.json records. Everything is read and checked before `workdir` is touched."""
    directory = hf_files.find_model_dir(source)
    for origin in (source, directory) if os.path.isdir(source) else (directory,):
        outputs.check_apart(origin, workdir)
    outputs.check_target(workdir, overwrite, outputs.IMPORT_OUTPUTS, 'import-hf')
    where = os.path.join(directory, 'config.json')
    hf = wd.read_json(where)
    family = _family(hf, where)
    kind = 'vit' if family is hf_vit else 'bert'
    tensors = hf_files.read_safetensors(directory)
    if family is hf_bert:
        tensors = hf_bert.normalise(tensors)
    prefix = family.find_prefix(tensors)
    if prefix is None:
        expected = hf_bert.WORD_EMBEDDINGS if kind == 'bert' else hf_vit.PATCH + '.weight'
        raise DataError(
            f'{directory}/{WEIGHTS}: tensor {expected!r} is missing (also under '
            f'{[p for p in family.PREFIXES if p]}); is this a {hf.get("model_type")} checkpoint?'
        )
    model = family.model_config(hf, tensors, where)
    with tempfile.TemporaryDirectory() as scratch:
        initialised, tokenizer, normalisation = [], None, None
        vocab = os.path.join(scratch, 'vocab.txt')
        if kind == 'bert':
            tokenizer = hf_files.copy_vocab(directory, vocab)
            if tokenizer['vocab_size'] > model['vocab_size']:
                raise DataError(
                    f'{directory}: the vocabulary has {tokenizer["vocab_size"]} tokens but the '
                    f'embedding table {model["vocab_size"]} rows'
                )
            params, used, initialised = _bert_params(tensors, prefix, model, where)
        else:
            params, used, normalisation = _vit_params(tensors, hf, prefix, model, directory)
        ckpt_lib.check_same_structure(params, _expected_tree(kind, model), f'imported from {where}')
        config = _stage_config(family, model, workdir, tokenizer)
        unused = sorted(set(tensors) - used)
        pooling = recipe.sentence_pooling(directory) if kind == 'bert' else None

        with outputs._writing(workdir, outputs.IMPORT_OUTPUTS):
            if kind == 'bert':
                shutil.copyfile(vocab, os.path.join(workdir, 'vocab.txt'))
            with open(os.path.join(workdir, 'config.json'), 'w') as f:
                f.write(config.to_json(indent=2))
            checkpoint = save_checkpoint(workdir, params, config)
            info = {
                'source': directory,
                'requested': source,
                'model_type': hf.get('model_type'),
                'architectures': hf.get('architectures') or [],
                'hf_config': hf,
                'checkpoint': checkpoint,
                'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
                'imported_tensors': len(used),
                'unused_tensors': unused,
                'initialised': initialised,
                'tokenizer': tokenizer,
                'input_normalisation': normalisation,
                # how a sentence-transformers checkpoint pools (None: not one); fine-tuning
                # from this workdir pools the same way (core/recipe.py)
                'pooling': pooling,
                'model': model,
            }
            with open(os.path.join(workdir, wd.IMPORT_INFO), 'w') as f:
                json.dump(info, f, indent=2)
    if unused:
        logging.info('import-hf: tensors not used: %s', ', '.join(unused))
    return info


# --- export ---------------------------------------------------------------------------------


def _write_text_tokenizer(vocab: str, out: str, lowercase: bool, max_len: int) -> None:
    """vocab.txt, tokenizer.json (the same WordPiece tokenizer pretrax runs, with BERT's
    [CLS] ... [SEP] template) and the configs transformers' BertTokenizer reads."""
    from tokenizers import BertWordPieceTokenizer

    shutil.copyfile(vocab, os.path.join(out, 'vocab.txt'))
    BertWordPieceTokenizer(vocab, lowercase=lowercase).save(os.path.join(out, 'tokenizer.json'))
    special = {
        'unk_token': '[UNK]',
        'sep_token': '[SEP]',
        'pad_token': '[PAD]',
        'cls_token': '[CLS]',
        'mask_token': '[MASK]',
    }
    tokenizer_config = {
        'tokenizer_class': 'BertTokenizer',
        'do_lower_case': lowercase,
        'strip_accents': None,
        'tokenize_chinese_chars': True,
        'model_max_length': max_len,
        **special,
    }
    for name, content in (
        ('tokenizer_config.json', tokenizer_config),
        ('special_tokens_map.json', special),
    ):
        with open(os.path.join(out, name), 'w') as f:
            json.dump(content, f, indent=2)


def _save_safetensors(tensors: dict, path: str) -> None:
    """model.safetensors with the mode of every other file written here (0644 under the
    usual umask): safetensors writes through a private temporary file, 0600."""
    with open(path, 'wb'):
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    safetensors.numpy.save_file(tensors, path, metadata={'format': 'pt'})
    os.chmod(path, mode)


def export_hf(
    workdir: str,
    out: str,
    subtree: str = 'backbone',
    step: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Writes the encoder in `subtree` of the workdir's checkpoint (latest, or `step`) as
    an HF model directory; returns its config.json. Text: BertForMaskedLM when the
    checkpoint has a trained MLM head, else BertModel; images: ViTModel."""
    outputs.check_apart(workdir, out)
    outputs.check_target(out, overwrite, outputs.EXPORT_OUTPUTS, 'export-hf')
    config = wd.read_config(workdir)
    params = wd.saved_params(wd.checkpoint_path(workdir, step))
    encoder = unstack_layers(wd.encoder_subtree(params, subtree))  # HF's layout: layer by layer
    kind = wd.encoder_kind(encoder, subtree)
    model = dict(wd.model_section(config, subtree))
    model['pooler'] = 'pooler' in encoder
    if kind == 'vit':
        hf = hf_vit.hf_config(model, model['pooler'])
        tensors = r.to_hf({'backbone': encoder}, hf_vit.encoder_rules(model), '')
    else:
        fresh_head = 'mlm_head' in wd.import_info(workdir).get('initialised', [])
        with_mlm = (
            subtree == 'backbone' and 'mlm_head' in params and 'output_bias' in params
        ) and not fresh_head
        hf = hf_bert.hf_config(model, with_mlm)
        tensors = hf_bert.export_tensors(
            {
                'backbone': encoder,
                **{k: params[k] for k in ('mlm_head', 'output_bias') if with_mlm},
            },
            model,
            with_mlm,
        )
        vocab = os.path.join(workdir, 'vocab.txt')
        if not os.path.isfile(vocab):
            raise DataError(
                f'{workdir} has no vocab.txt; a text workdir keeps its vocabulary there'
            )
    hf['dtype'] = 'float32'
    with outputs._writing(out, outputs.EXPORT_OUTPUTS):
        if kind == 'vit':
            with open(os.path.join(out, 'preprocessor_config.json'), 'w') as f:
                json.dump(hf_vit.preprocessor_config(model), f, indent=2)
        else:
            lowercase = bool(config.get('data', {}).get('lowercase', True))
            _write_text_tokenizer(vocab, out, lowercase, model['max_len'])
        with open(os.path.join(out, 'config.json'), 'w') as f:
            json.dump(hf, f, indent=2)
        _save_safetensors(tensors, os.path.join(out, WEIGHTS))
    return hf
