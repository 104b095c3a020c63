r"""CLIP / SigLIP: an image tower (ViT) and a text tower (Transformer) trained on
image-caption pairs.

Run (the default: the embedded `digits_captions` pairs, every digit of the digits'
training split (1408; 302 held out for retrieval; the 389 test images are never read)
with a generated caption such as "a bold handwritten seven, leaning right"; about 2 minutes on
2 CPU cores; held-out image->text recall@1 0.24 (CLIP) / 0.08 (SigLIP) against a chance
level of 0.006, see docs/results.md):

  python launch.py pretrain --config configs/clip.py:tiny --workdir runs/clip
  python launch.py pretrain --config configs/clip.py:tiny,sigmoid --workdir runs/siglip

The recipe after the comma picks the loss: `softmax` (CLIP: learned temperature from
1/0.07, capped at 100) or `sigmoid` (SigLIP: learned temperature from 10 and bias from
-10). Presets: `tiny` (CPU), and `ti`, `s`, `b`, `l` image towers with CLIP's text tower
(width 512, 12 layers, 8 heads). Your own pairs: --config.data.files=captions.jsonl
(fields --config.data.image_field / text_field; image paths relative to the file) or a
.tsv of `image<TAB>caption`; a TFDS dataset with --config.data.name.
"""

import ml_collections

from configs import common

SIZES = {'tiny': (128, 2, 4, 256), **common.VIT_SIZES}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
    preset, _, loss = arg.partition(',')
    loss = loss or 'softmax'
    sizes = common.size(SIZES, preset, 'clip')
    if loss not in ('softmax', 'sigmoid'):
        raise ValueError(f'unknown loss {loss!r} for clip; expected softmax or sigmoid')
    tiny = preset == 'tiny'
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'
    c.task = 'clip'
    c.seed = 0

    # Input: image-caption pairs; captions are WordPiece-tokenised ([CLS] ... [SEP]).
    # tiny: the embedded generated pairs, else a TFDS name; data.files: captions .jsonl / .tsv.
    c.data = common.data('digits_captions' if tiny else '', eval_fraction=0.2)
    c.data.image_field = 'image'
    c.data.text_field = 'caption'
    c.data.resize = True
    c.data.seq_len = 16 if tiny else 64
    c.data.vocab_file = ''  # empty: train a WordPiece vocabulary on the captions
    c.data.vocab_sample_bytes = common.VOCAB_SAMPLE_BYTES
    c.data.lowercase = True

    # Model: the image tower is a ViT (model.*), the text tower a pre-LN Transformer
    # (model.text.*); both project linearly into a shared embed_dim space.
    c.model = common.vit_encoder(
        sizes,
        image_size=16 if tiny else 224,
        patch_size=4 if tiny else 16,
        channels=1 if tiny else 3,
    )
    c.model.embed_dim = 64 if tiny else 512
    c.model.text = ml_collections.ConfigDict()  # model.vocab_size: 0, this one's is text's
    c.model.text.vocab_size = 1024 if tiny else 32_000
    c.model.text.hidden_size = 128 if tiny else 512
    c.model.text.num_layers = 2 if tiny else 12
    c.model.text.num_heads = 4 if tiny else 8
    c.model.text.mlp_dim = 256 if tiny else 2048
    c.model.text.max_len = c.data.seq_len
    c.model.text.type_vocab_size = 0
    c.model.text.dropout_rate = 0.0
    c.model.text.activation = 'gelu'
    c.model.text.layer_norm = 'pre'
    c.model.text.layer_norm_eps = 1e-6
    c.model.text.pooling = 'cls'  # cls | mean
    c.model.text.scan_layers = False  # the text tower's layers under nn.scan, likewise
    c.model.text.attention_impl = 'auto'

    # Loss over the global batch. softmax: all-gathered, [n, N] logits per device;
    # sigmoid: a ring of [n, n] blocks, per-device memory independent of the device count.
    c.loss = ml_collections.ConfigDict()
    c.loss.type = loss
    c.loss.init_scale = 1 / 0.07 if loss == 'softmax' else 10.0
    c.loss.init_bias = 0.0 if loss == 'softmax' else -10.0
    c.loss.max_logit_scale = 100.0  # CLIP's cap on exp(logit_scale)
    c.loss.max_abs_logit_bias = 30.0

    c.eval = ml_collections.ConfigDict()
    c.eval.max_pairs = 5000  # held-out pairs in the retrieval eval

    # Optimization: AdamW (b2 0.98 as in CLIP), cosine decay.
    c.batch_size = 128 if tiny else 32_768
    c.total_steps = 600 if tiny else 100_000
    c.warmup_steps = 60 if tiny else 10_000
    c.learning_rate = 1e-3 if tiny else 5e-4
    c.grad_accum_steps = 1
    c.optimizer = common.optimizer(b2=0.98, weight_decay=0.01 if tiny else 0.1, schedule='cosine')

    c.update(
        common.runtime(
            eval_every=100 if tiny else 5000,
            eval_steps=5,
            checkpoint_every=300 if tiny else 5000,
            keep_checkpoints=3,
        )
    )
    return c
