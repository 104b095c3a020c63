"""Encoder features of a text file or of images, from any pretrax workdir with a text or
ViT encoder (pretrained here, fine-tuned, or imported):

  python launch.py embed --workdir WORKDIR --input FILE --output OUT.npy [--features pooled]

Text: one example a line (row i of OUT.npy is line i), tokenized as the run tokenizes
(WORKDIR/vocab.txt, `data.lowercase`): [CLS] ... [SEP], cut and padded to `seq_len`.
Images: a class-per-folder directory (rows in the order the image pipeline reads it:
classes, then files, sorted), a flat folder of images (files sorted), or an .npz; each
image resized to `model.image_size`, pixels scaled to [0, 1] as in training.

Features (float32):
  last_hidden  [N, tokens, hidden]  every token: text padded to seq_len; ViT cls + patches
  pooled       [N, hidden]          the pooler (Dense + tanh on [CLS]) where the encoder has
                                    one, else the representation it is trained to pool
                                    (`model.pooling`: cls / mean for text, cls / gap for ViT)
  mean         [N, hidden]          the mean over the real tokens (text: not padding; ViT:
                                    the patches, without the cls token)
"""

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from core import checkpoint as ckpt_lib
from core.errors import ConfigError, DataError
from core.files import atomic_write
from data import decode, image_sources
from data import text as text_lib
from data.tokenizer import FixedLengthEncoder, WordPiece
from interop import workdir as wd
from models.heads import pool_tokens
from models.vit import pool

FEATURES = ('last_hidden', 'pooled', 'mean')


class Encoder:
    """A workdir's encoder, ready to run: the module, its params, how it tokenizes."""

    def __init__(self, workdir: str, subtree: str = 'backbone', step: int | None = None):
        config = wd.read_config(workdir)
        params = wd.saved_params(wd.checkpoint_path(workdir, step))
        self.params = wd.encoder_subtree(params, subtree)
        self.kind = wd.encoder_kind(self.params, subtree)
        self.model = dict(wd.model_section(config, subtree))
        self.module = wd.encoder_module(self.kind, self.model, 'pooler' in self.params)
        expected = wd.abstract_params(self.module, wd.example_input(self.kind, self.module))
        ckpt_lib.check_same_structure(self.params, expected, f'{workdir} params/{subtree}')
        self.pooler = 'pooler' in self.params
        if self.kind == 'bert':
            lowercase = bool(config.get('data', {}).get('lowercase', True))
            self.wordpiece = WordPiece(os.path.join(workdir, 'vocab.txt'), lowercase)
            self.seq_len = int(config.get('data', {}).get('seq_len', 128))
            self.pooling = self.model.get('pooling', 'cls')
        else:
            self.pooling = self.module.cfg.pooling

    def features_fn(self, features: str):
        """(params, inputs) -> features of one batch; inputs as `tokenize` / images give."""
        if features not in FEATURES:
            raise ConfigError(f'--features={features!r}; expected one of {list(FEATURES)}')
        module, kind, pooling, pooler = self.module, self.kind, self.pooling, self.pooler

        def fn(params, inputs: dict):
            if kind == 'vit':
                args = (inputs['image'],)
            else:
                args = (inputs['input_ids'], inputs['input_mask'], inputs['segment_ids'])
            hidden, state = module.apply({'params': params}, *args, mutable=['intermediates'])
            if features == 'last_hidden':
                return hidden
            if features == 'pooled' and pooler:
                return state['intermediates']['pooled'][0]
            if kind == 'vit':
                if features == 'pooled':
                    return pool(hidden, pooling)
                return jnp.mean(hidden[:, 1:] if pooling == 'cls' else hidden, axis=1)
            return pool_tokens(
                hidden, inputs['input_mask'], pooling if features == 'pooled' else 'mean'
            )

        return fn

    def tokenize(self, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
        """[CLS] ids [SEP] padded with 0: input_ids, input_mask, segment_ids [N, seq_len]."""
        encode = FixedLengthEncoder(self.wordpiece, seq_len)
        ids = np.stack([encode(t) for t in texts]) if texts else np.zeros((0, seq_len), np.int32)
        return {
            'input_ids': ids,
            'input_mask': (ids != self.wordpiece.pad_id).astype(np.int32),
            'segment_ids': np.zeros_like(ids),
        }


class _FlatFolder(Sequence):
    """The image files directly in a folder, sorted by name."""

    def __init__(self, root: str, image_size: int, channels: int):
        self.paths = sorted(
            os.path.join(root, e.name)
            for e in os.scandir(root)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in decode.IMAGE_EXTENSIONS
        )
        self.image_size, self.channels = image_size, channels
        decode.check_image_files(self.paths, f'the folder {root}')  # every file, up front

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        image = decode.read_image_file(path, self.channels)
        return {'image': decode.conform_image(image, self.image_size, self.channels, True, path)}


def image_source(path: str, image_size: int, channels: int) -> Sequence:
    """Images to embed: a class-per-folder directory, a flat folder, or an .npz."""
    if os.path.isdir(path):
        has_classes = any(e.is_dir() and not e.name.startswith('.') for e in os.scandir(path))
        if has_classes:
            return image_sources.FolderImages(path, image_size, channels, resize=True)
        source = _FlatFolder(path, image_size, channels)
        if not len(source):
            raise DataError(
                f'{path} holds no images ({", ".join(decode.IMAGE_EXTENSIONS)}) nor class '
                'folders of them'
            )
        return source
    if path.lower().endswith('.npz') and os.path.isfile(path):
        return image_sources.npz_images(path, image_size, channels, resize=True)
    raise DataError(
        f'{path}: a ViT workdir embeds images; give --input an image folder (flat, or one '
        'folder per class) or an .npz with an `images` array'
    )


def read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f'{path} does not exist; give --input a text file, one example a line')
    lines = text_lib.read_lines(path)  # UTF-8 (a byte-order mark dropped), else a DataError
    if not lines:
        raise DataError(f'{path} is empty; give --input a text file, one example a line')
    return lines


def embed(
    workdir: str,
    input_path: str,
    output: str | None = None,
    features: str = 'pooled',
    seq_len: int | None = None,
    batch_size: int = 64,
    subtree: str = 'backbone',
    step: int | None = None,
) -> np.ndarray:
    """The features of every example of `input_path` as float32 [N, ...]; saved to
    `output` (an .npy file, at exactly that path) when given."""
    if batch_size < 1:
        raise ConfigError(f'--batch_size={batch_size} must be positive')
    if output and os.path.isdir(output):
        raise ConfigError(
            f'--output {output} is a directory; give the path of the .npy file to write, e.g. '
            f'{os.path.join(output, "features.npy")}'
        )
    encoder = Encoder(workdir, subtree, step)
    run = jax.jit(encoder.features_fn(features))
    if encoder.kind == 'bert':
        seq_len = seq_len or encoder.seq_len
        max_len = encoder.model['max_len']
        if not 3 <= seq_len <= max_len:
            raise ConfigError(
                f'--seq_len={seq_len} must be in [3, {max_len}] (the position table, model.max_len)'
            )
        arrays = encoder.tokenize(read_lines(input_path), seq_len)
        count = len(arrays['input_ids'])

        def batch_at(start: int) -> dict:
            return {k: v[start : start + batch_size] for k, v in arrays.items()}
    else:
        cfg = encoder.module.cfg
        source = image_source(input_path, cfg.image_size, cfg.channels)
        count = len(source)

        def batch_at(start: int) -> dict:
            stop = min(start + batch_size, count)
            images = np.stack([source[i]['image'] for i in range(start, stop)])
            return {'image': images.astype(np.float32) / 255.0}

    outputs = []
    for start in range(0, count, batch_size):
        batch = batch_at(start)
        rows = len(next(iter(batch.values())))
        padded = {  # one compiled shape for every batch
            k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()
        }
        outputs.append(np.asarray(run(encoder.params, padded))[:rows])
    result = np.concatenate(outputs).astype(np.float32)
    if output:
        # Exactly the path given (np.save would add .npy to a name without it), atomically.
        output = os.path.abspath(output)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with atomic_write(output, 'wb') as f:
            np.save(f, result)
        logging.info(
            'embed: %s features %s of %s -> %s', features, result.shape, input_path, output
        )
    return result
