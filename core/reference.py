"""The config reference: the presets of every config file and a one-line meaning for every
config key (MEANINGS), read by `launch.py config` / `launch.py list` and by
scripts/config_reference.py, which writes docs/config.md from the same text.

tests/test_config_reference.py checks that every key of every preset has a meaning here and
that docs/config.md is current; a new config key gets its line in MEANINGS.
"""

import importlib
import importlib.util
import os

import ml_collections

from core.config import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The presets of each config file (the first is get_config()'s default), and what they are.
# get_config is called with each, so a name here that a file does not accept fails.
PRESETS = {
    'bert_mlm': (('tiny', 'small', 'base', 'large'), 'the BERT sizes (common.BERT_SIZES)'),
    'simcse': (('tiny', 'small', 'base', 'large'), 'the BERT sizes of bert_mlm'),
    'vit_simclr': (
        ('tiny', 'ti', 's', 'b', 'l'),
        'ViT sizes (tiny: H128 L4 for a CPU); `,imagenet` after the size: the ImageNet recipe',
    ),
    'vit_mae': (
        ('tiny', 'ti', 's', 'b', 'l'),
        "vit_simclr's ViT sizes; `,imagenet` after the size: MAE's ImageNet recipe",
    ),
    'clip': (
        ('tiny', 'ti', 's', 'b', 'l'),
        'image-tower sizes; `,softmax` (CLIP, default) or `,sigmoid` (SigLIP) picks the loss',
    ),
    'text_cls': (('tiny', 'small', 'base', 'large'), 'the BERT sizes of bert_mlm'),
    'token_cls': (('tiny', 'small', 'base', 'large'), 'the BERT sizes of bert_mlm'),
    'distill': (
        ('tiny', 'small', 'base', 'large', 'mlm_tiny', 'mlm_small', 'mlm_base', 'mlm_large'),
        "the student's BERT sizes, as text_cls; mlm_<size>: MLM distillation (bert_mlm's)",
    ),
    'dapt': (
        ('tiny', 'small', 'base', 'large'),
        'the BERT sizes of bert_mlm (from scratch; init_from adopts the start)',
    ),
    'image_cls': (
        ('tiny', 'ti', 's', 'b', 'l'),
        'the ViT sizes of vit_simclr; `,imagenet` after the size: the ImageNet recipe',
    ),
    'study': (
        ('digits', 'text', 'smoke'),
        'SimCLR -> digits, MLM -> pydoc_topics, a test-sized digits',
    ),
}

# The study config nests whole stage configs; their keys are those files' keys.
NESTED = {'study': ('pretrain', 'finetune', 'mae_pretrain')}

# One line per key: looked up by the full dotted key, then by its shorter suffixes
# (model.text.pooling, text.pooling, pooling), so a leaf entry serves every section where
# the name means the same and a dotted entry overrides it where it does not.
MEANINGS = {
    # --- what the file is
    'stage': 'The `launch.py` stage this file is written for (pretrain | finetune | study); '
    'another `launch.py` stage refuses the file with a message naming the right one',
    'task': 'The task module the stage runs (core/task.py registry): pretrain mlm | simclr | '
    'mae | clip | simcse; finetune text_cls | token_cls | image_cls',
    'seed': 'Seeds parameter init, dropout, the data order and masking, and the validation '
    'split and label subsets of labelled data',
    'task_type': 'classification | regression (a numeric label, scored by pearson)',
    # --- data.*
    'data.name': 'An embedded dataset (e.g. pydoc_stdlib, pydoc_topics, digits, '
    "digits_captions) or a TFDS name; data.files overrides it ('': none)",
    'data.files': 'Local training files (a glob, a directory or an .npz; the kinds: the '
    "config's docstring); overrides data.name",
    'data.eval_files': 'Local validation files; empty: data.eval_split, else eval_fraction '
    'of the training data',
    'data.eval_fraction': 'Part of the training data held out for validation when there is '
    'no eval_files / eval_split (labelled data: per class, chosen by seed)',
    'data.train_split': 'The TFDS split to train on',
    'data.eval_split': "The TFDS split to validate on ('': hold out eval_fraction)",
    'data.test_split': "The TFDS split scored once at the end ('': none, unless test_files)",
    'data.test_files': 'Local test files scored once at the end on the checkpoint '
    "validation picked ('': none; give this or test_split, not both)",
    'data.data_dir': "TFDS data_dir ('': TFDS's default)",
    'data.prefetch': 'Batches the training input pipeline prefetches on a thread (0: none)',
    'data.shards': 'Data shards the training stream is cut into (0: one per process at '
    'the first start); a run resumes on any process count dividing it; changes the order',
    'data.text_field': 'The text column (.tsv/.csv header name or 0-based index) or .jsonl field',
    'data.text_pair_field': "The second text column of sentence-pair tasks ('': single text)",
    'data.label_field': 'The label column / field (or TFDS feature)',
    'data.image_field': 'The images: a TFDS feature, a table column of encoded images, or '
    'the image-path field of a captions .jsonl (paths relative to the file)',
    'data.tokens_field': 'The token-list field of .jsonl sentences',
    'data.tags_field': 'The tag-list field of .jsonl sentences (IOB2 / BIO / IOBES)',
    'data.header': 'tsv/csv: the first row names the columns (false: fields are 0-based indices)',
    'data.vocab_file': "A BERT vocab.txt to tokenize with ('': train a WordPiece vocabulary "
    'of model.vocab_size on the training text, saved in the workdir)',
    'data.vocab_sample_bytes': 'Bytes of training text a trained vocabulary reads: a seeded '
    'sample of the documents, the same for every seed (0: all of it)',
    'data.lowercase': 'Lowercase text before WordPiece (uncased vocabulary)',
    'data.seq_len': 'Tokens per example, [CLS] and [SEP] included; at most model.max_len',
    'data.unlabelled_files': 'More unlabelled text of the task (a glob) the teacher labels '
    'with soft targets; validation and test text in it is dropped',
    'data.task_text': 'The corpus is the training text of the labelled task data.* names '
    '(configs/dapt.py), less its validation split, which is held out',
    'data.max_predictions': 'Most masked positions predicted per sequence (BERT: 20 at seq '
    '128, 80 at 512)',
    'data.mask_prob': 'Fraction of tokens chosen as prediction targets (80% [MASK], 10% '
    'random, 10% kept)',
    'data.whole_word_masking': 'Mask every WordPiece of a chosen word together',
    'data.resize': 'Resize every image to model.image_size (false: sizes must already match)',
    # --- model.* (the shared Transformer)
    'hidden_size': 'Transformer width',
    'num_layers': 'Transformer layers',
    'num_heads': 'Attention heads; must divide hidden_size',
    'mlp_dim': 'Width of the feed-forward block',
    'dropout_rate': "Dropout on the attention and MLP outputs (and BERT's embeddings)",
    'attention_dropout_rate': 'Dropout on attention weights; >0 leaves the fused attention path',
    'activation': 'The MLP activation: gelu | gelu_tanh | relu',
    'layer_norm_eps': 'LayerNorm epsilon (BERT 1e-12, ViT 1e-6)',
    'layer_norm': 'post (BERT: after each residual) | pre (before each block, plus a final '
    'LayerNorm)',
    'remat': 'Rematerialisation: none (keep activations) | dots (keep only matmul outputs) '
    '| full (recompute each layer in the backward pass)',
    'attention_impl': 'auto (cuDNN flash attention on a GPU in bf16/fp16, else xla) | xla '
    '| cudnn (an error off a GPU)',
    'scan_layers': 'Run the layers under nn.scan (stacked params): faster compiles of deep '
    'models; not with lamb / lars',
    'vocab_size': 'Token vocabulary size (0: an image model); a trained vocabulary has this '
    'size, a given vocab.txt must not exceed it',
    'max_len': 'Position embeddings: the longest sequence (0: an image model)',
    'type_vocab_size': 'Segment (token type) embeddings: 2 for sentence pairs, 0: none',
    'model.pooler': "BERT's / HF ViT's Dense + tanh on the [CLS] token "
    '(backbone/pooler), as imported checkpoints have',
    'model.pooling': 'How the encoder output becomes one vector: cls (the [CLS] / class token) '
    '| mean (text: mean over tokens) | gap (ViT: mean over patches) | pooler (text_cls: '
    "BERT's pooler, needs model.pooler)",
    'model.text.pooling': "The text tower's sentence vector: cls | mean",
    'patch_size': 'ViT patch side in pixels; divides image_size (0: a text model)',
    'image_size': 'ViT input side in pixels (0: a text model); a checkpoint of another size '
    'restores with its position table resized',
    'channels': 'Image channels: 1 grayscale | 3 RGB',
    'head_dropout': 'Dropout before the new classification head',
    'zero_init_head': 'Initialise the new head at zero (the first logits are all equal)',
    'teacher': 'The workdir of a finished text_cls run whose soft targets the student learns '
    '(its validation-selected checkpoint, frozen in the step)',
    'distill.temperature': 'T: teacher and student logits are divided by it in the soft term, '
    'which is scaled by T^2',
    'distill.alpha': "The soft term's weight; the labels' is 1 - alpha",
    'distill.cache_teacher': "Compute the teacher's logits of every training example once "
    '(WORKDIR/teacher_logits.npz) instead of in every step; not with hidden_weight',
    'distill.hidden_weight': 'Weight of the hidden-state term: MSE between each student '
    "layer's output and its matched teacher layer's, through a learned projection when the "
    'widths differ (0: off)',
    'distill.unlabelled': 'Also train on the training examples train_examples leaves '
    'unlabelled, on soft targets only',
    'decoder.hidden_size': 'MAE decoder width (pretraining only; dropped after it)',
    'decoder.num_layers': 'MAE decoder Transformer layers (pre-LN)',
    'decoder.num_heads': 'MAE decoder attention heads; must divide decoder.hidden_size',
    'decoder.mlp_dim': 'MAE decoder feed-forward width',
    'mae.mask_ratio': "Fraction of each image's patches hidden from the encoder (drawn per "
    'example on device; every image keeps the same count)',
    'mae.norm_pix_loss': "Predict each masked patch's pixels normalised by that patch's mean "
    'and variance (MAE; false: raw pixels in [0, 1])',
    'proj_hidden': 'Projection MLP hidden width (training only; dropped after pretraining)',
    'proj_dim': 'Projection MLP output width, the space the contrastive loss compares in',
    'proj_layers': 'Layers of the projection MLP',
    'embed_dim': 'Width of the shared image-text space both towers project into',
    'model.text.vocab_size': "The text tower's WordPiece vocabulary size",
    'model.text.max_len': "The text tower's position embeddings (data.seq_len)",
    # --- loss.*
    'loss.temperature': 'Softmax temperature of the NT-Xent loss (SimCLR 0.1 at ImageNet, '
    'SimCSE 0.05)',
    'loss.type': 'softmax (CLIP: all-gathered logits) | sigmoid (SigLIP: a ring of blocks, '
    'per-device memory independent of the device count)',
    'loss.init_scale': 'Initial exp(logit_scale), the learned inverse temperature (CLIP '
    '1/0.07, SigLIP 10)',
    'loss.init_bias': 'Initial learned logit bias (SigLIP -10; unused by softmax)',
    'loss.max_logit_scale': 'Cap on exp(logit_scale) (CLIP: 100)',
    'loss.max_abs_logit_bias': 'The logit bias is clamped to +- this',
    # --- augment.*
    'augment.crop': 'Random resized crop (Inception style), resampled to the image size',
    'augment.crop_scale': "The crop's area fraction of the image (min, max)",
    'augment.crop_ratio': "The crop's aspect ratio w/h range (min, max), log-uniform",
    'augment.flip': 'Horizontal flip with probability 0.5',
    'augment.color_jitter_prob': 'Probability of colour jitter (brightness, contrast, '
    'saturation, hue in a random order)',
    'augment.brightness': 'Brightness jitter strength s: a factor in [max(0, 1-s), 1+s]',
    'augment.contrast': 'Contrast jitter strength, as brightness',
    'augment.saturation': 'Saturation jitter strength, as brightness (RGB only)',
    'augment.hue': 'Hue shift in [-hue, hue] of a full turn (RGB only)',
    'augment.grayscale_prob': 'Probability of converting to grayscale (RGB only)',
    'augment.blur_prob': 'Probability of a Gaussian blur (0: off)',
    'augment.blur_sigma': "The blur's sigma range in pixels at 224; scales with the image size",
    # --- eval.* (pretraining's online evals)
    'eval.knn_k': 'Neighbours of the k-NN eval on frozen features',
    'eval.knn_temperature': 'k-NN votes are weighted by exp(similarity / T)',
    'eval.probe_train_examples': 'Labelled training images the probes fit on (0: all)',
    'eval.probe_l2': 'L2 penalty of the linear probe (0: chosen on a held-out part of its '
    'train split)',
    'eval.few_shot': 'Also a probe on this many labels per class, written as '
    'linear_probe_<k>shot_accuracy (0: off)',
    'eval.topic_probe': "k-NN / linear probe on the pydoc_topics task's training paragraphs",
    'eval.max_pairs': 'Held-out pairs the retrieval eval embeds',
    'eval.metric': "The validation metric that picks the best checkpoint ('': the task's "
    'own: accuracy, pearson for regression, entity_f1 for tags)',
    'eval.evaluate_split': 'What `launch.py evaluate` scores: test | validation',
    # --- optimization
    'total_steps': 'Training steps (may grow on resume; the schedule follows)',
    'batch_size': 'Global batch (all devices and hosts; every micro-batch of a step together)',
    'learning_rate': 'Peak learning rate, after the warmup (0: parameters unchanged)',
    'warmup_steps': 'Steps of linear warmup from 0 to learning_rate',
    'grad_accum_steps': 'Micro-batches per step (each batch_size / grad_accum_steps)',
    'optimizer.name': 'adamw | lamb | lars',
    'optimizer.b1': "Adam's first-moment decay; LARS's momentum",
    'optimizer.b2': "Adam's second-moment decay",
    'optimizer.eps': "Adam's epsilon",
    'optimizer.weight_decay': 'Decoupled weight decay',
    'optimizer.grad_clip_norm': 'Clip the global gradient norm to this (0: off)',
    'optimizer.schedule': 'Decay after the warmup: linear | cosine | constant',
    'optimizer.end_learning_rate': 'The rate the decay ends at',
    'optimizer.trust_coefficient': "LARS's trust coefficient (lars only)",
    # --- runtime
    'precision': 'Compute dtype: float32 | bfloat16 (params stay float32)',
    'parallelism': 'jit (one mesh, the default) | pmap (data parallel)',
    'mesh.data': 'Data-parallel devices of a slice (-1: the rest)',
    'mesh.fsdp': 'Devices params and optimizer state are sharded over (FSDP) in a slice',
    'mesh.tensor': 'Tensor-parallel devices in a slice',
    'mesh.dcn_data': 'Data parallelism across TPU slices / GPU hosts',
    'mesh.dcn_fsdp': 'FSDP across TPU slices / GPU hosts (jit only)',
    'init_from': 'A workdir or checkpoint to start from: the encoder to fine-tune, or a '
    "pretraining to continue ('': from scratch)",
    'train_examples': "Fine-tuning labels: '' all; 10 per class; 0.1 a fraction per class "
    '(chosen by seed, nested)',
    'log_every': 'Steps between train rows in the log and metrics.jsonl',
    'eval_every': 'Steps between evals',
    'eval_steps': 'Batches per eval',
    'checkpoint_every': 'Steps between checkpoints',
    'keep_checkpoints': "Checkpoints kept: the latest N, plus the best by the task's metric",
    'watchdog_secs': 'Exit 124 when no step finishes for this long (0: off)',
    'skip_nonfinite_steps': 'A NaN/Inf loss: 0 stops the run; N > 0 skips such updates and '
    'stops after N in a row',
    'peak_tflops': 'Peak TFLOP/s per device for MFU where the device kind is not known '
    '(0: the built-in table)',
    'loggers': 'Where metrics go, comma-separated: jsonl (required), tensorboard, wandb, mlflow '
    '(docs/outputs.md, Trackers)',
    'overwrite': 'Move a different run in the workdir to previous/<time>/ and start over',
    # --- fine-tuning
    'transfer.freeze_backbone': 'Train only the new head (a linear probe)',
    'transfer.freeze_layers': 'Freeze the embeddings and the first k layers (0: none)',
    'transfer.layer_decay': 'Layer-wise learning-rate decay per layer below the top (1.0: off)',
    'transfer.head_lr_scale': "The new head's learning rate, times the encoder's",
    'transfer.start_defaults': "With init_from, what the start's recipe set (core/recipe.py); "
    "'none': keep this file's values",
    'init_subtree': 'The saved params subtree holding the encoder (image_backbone / '
    "text_backbone: a CLIP run's towers)",
    'early_stopping_patience': 'Evals without a new best before stopping (0: off)',
    # --- study (its own keys; pretrain.* and finetune.* are the named configs' keys)
    'name': "The study's preset name, reported in its summary",
    'label_fractions': 'Label budgets: fractions of each class (1.0: every label)',
    'examples_per_class': 'Label budgets as labels per class; set this or label_fractions',
    'seeds': 'Seeds of each arm and budget (the intervals are over these)',
    'arms': 'Comma-separated: pretrained | scratch | linear_probe | imported | distilled, '
    'domain_adapted (text, with imported) | mae | mae_linear_probe (image studies)',
    'target_accuracy': 'Validation accuracy whose steps-to-target the report counts',
    'probe_learning_rate': "The linear_probe arm's learning rate",
    'learning_rates': 'A grid every arm runs at, validation picks the rate ((): each arm at '
    "its start's own rate)",
    'pretrain_workdir': "An existing pretraining to reuse ('': WORKDIR/pretrain)",
    'imported': "A `launch.py import-hf` workdir: the imported arm's start",
    'mae_pretrain_workdir': "A finished MAE run the mae arms start from ('': WORKDIR/"
    'mae_pretrain, trained with the `mae_pretrain` block)',
}


def entry(key: str) -> str | None:
    """The MEANINGS entry a dotted key takes: the longest suffix of it that has one."""
    parts = key.split('.')
    for i in range(len(parts)):
        if MEANINGS.get('.'.join(parts[i:])):
            return '.'.join(parts[i:])
    return None


def meaning(key: str) -> str:
    found = entry(key)
    return MEANINGS[found] if found else ''


def config_names() -> list[str]:
    """The experiment config files of configs/, sorted."""
    files = os.listdir(os.path.join(ROOT, 'configs'))
    names = {f[:-3] for f in files if f.endswith('.py')} - {'common', '__init__'}
    return sorted(names)


def keys(name: str, preset: str | None = None) -> dict:
    """{dotted key: default} of configs/<name>.py (get_config() without a preset), in the
    file's order; a nested stage config (study's pretrain, finetune) left out."""
    module = importlib.import_module(f'configs.{name}')
    config = module.get_config() if preset is None else module.get_config(preset)
    nested = NESTED.get(name, ())
    return {k: v for k, v in flatten(config).items() if k.split('.')[0] not in nested}


def every_key() -> dict:
    """{config file: the keys of its default and its listed presets}."""
    out = {}
    for name in config_names():
        found = set()
        for preset in (None, *PRESETS.get(name, ((), ''))[0]):
            found |= set(keys(name, preset))
        out[name] = found
    return out


def missing() -> dict:
    """{config file: its keys without a meaning}, files without one left out."""
    out = {name: sorted(k for k in found if not meaning(k)) for name, found in every_key().items()}
    return {name: found for name, found in out.items() if found}


def unused() -> list[str]:
    """The MEANINGS entries no key of any config takes (stale: a key renamed or removed)."""
    taken = {entry(k) for found in every_key().values() for k in found}
    return sorted(set(MEANINGS) - taken)


# --- what `launch.py config`, `launch.py list` and `launch.py STAGE --help` print


def load_file(path: str):
    """The config file at `path` as a module (its code runs: a failure raises)."""
    spec = importlib.util.spec_from_file_location('_pretrax_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_of(name: str) -> str:
    """The stage configs/NAME.py is written for (its `stage` key)."""
    return importlib.import_module(f'configs.{name}').get_config().stage


def summary(module) -> str:
    """The first sentence of a config file's docstring: what the file is for."""
    paragraph = ' '.join((module.__doc__ or '').strip().split('\n\n')[0].split())
    return paragraph.split('. ')[0].rstrip('.') + '.'


def _encoder(m: ml_collections.ConfigDict) -> str:
    size = f'H{m.hidden_size} L{m.num_layers} A{m.num_heads}'
    if m.get('patch_size'):
        return f'ViT {size} patch {m.patch_size} at {m.image_size}px'
    return f'BERT {size} vocab {m.vocab_size}'


def describe(c: ml_collections.ConfigDict) -> str:
    """One line of what a resolved config runs: stage and task, model size, data, length."""
    if c.get('stage') == 'study':
        start, end = c.pretrain, c.finetune
        return (
            f'study: {start.task} {_encoder(start.model)} on {start.data.name} -> '
            f'{end.task} on {end.data.name}; arms {c.arms}; seeds {tuple(c.seeds)}'
        )
    model = _encoder(c.model)
    if c.model.get('text'):
        model += f' + text {_encoder(c.model.text)}'
    data = c.data.get('files') or c.data.get('name') or 'your files (data.files)'
    return (
        f'{c.stage} {c.task} | {model} | data {data} | {c.total_steps} steps x batch {c.batch_size}'
    )


def presets(name: str) -> list[str]:
    """`configs/NAME.py:PRESET  what it runs` for each listed preset of a config file."""
    module = importlib.import_module(f'configs.{name}')
    specs = [f'configs/{name}.py:{p}' for p in PRESETS.get(name, ((), ''))[0]]
    width = max(map(len, specs), default=0)
    return [
        f'{spec:<{width}}  {describe(module.get_config(spec.partition(":")[2]))}' for spec in specs
    ]


def listing() -> str:
    """`launch.py list`: every config file (its docstring's first line, what its presets
    are) and each preset on one line."""
    lines = []
    for name in config_names():
        module = importlib.import_module(f'configs.{name}')
        what = PRESETS.get(name, ((), ''))[1]
        lines += [f'# configs/{name}.py: {summary(module)} Presets: {what}.', *presets(name), '']
    lines.append('Run one: python launch.py STAGE --config configs/NAME.py:PRESET --workdir DIR')
    lines.append('Its keys: python launch.py config configs/NAME.py:PRESET [--config.KEY=VALUE]')
    return '\n'.join(lines) + '\n'


def explain(config: ml_collections.ConfigDict, spec: str) -> str:
    """`launch.py config`: every resolved key of `config`, its value and its meaning."""
    rows = [(k, repr(v), meaning(k)) for k, v in flatten(config).items()]
    key_width = max(len(k) for k, _, _ in rows)
    value_width = min(max(len(v) for _, v, _ in rows), 24)
    lines = [f'# {spec}: {describe(config)}']
    lines += [f'{k:<{key_width}}  {v:<{value_width}}  {m}'.rstrip() for k, v, m in rows]
    lines.append('# override any key with --config.KEY=VALUE; docs/config.md has every default')
    return '\n'.join(lines) + '\n'
