"""The blocks every experiment config composes: the encoder size tables, the encoders'
architecture keys, the input plumbing, the optimizer, the runtime and the fine-tuning keys.
Each function returns a fresh ConfigDict of the keys and defaults the configs share; a
config passes or sets its own values on it and never deletes a key.
"""

import ml_collections

# (hidden_size, num_layers, num_heads, mlp_dim) of the standard BERT sizes.
BERT_SIZES = {
    'tiny': (128, 2, 2, 512),
    'small': (512, 4, 8, 2048),
    'base': (768, 12, 12, 3072),
    'large': (1024, 24, 16, 4096),
}

# (hidden_size, num_layers, num_heads, mlp_dim) of the standard ViT sizes (Dosovitskiy et
# al. 2021; Ti and S from DeiT).
VIT_SIZES = {
    'ti': (192, 12, 3, 768),
    's': (384, 12, 6, 1536),
    'b': (768, 12, 12, 3072),
    'l': (1024, 24, 16, 4096),
}


def size(sizes: dict, preset: str, config: str) -> tuple[int, int, int, int]:
    """sizes[preset]; an unknown preset is a ValueError naming those `config` accepts."""
    if preset not in sizes:
        raise ValueError(f'unknown preset {preset!r} for {config}; expected one of {list(sizes)}')
    return sizes[preset]


# A vocabulary trained on the corpus reads a seeded sample of this many bytes of it (all of a
# smaller corpus): ~30 s of WordPiece training on 2 cores, whatever the corpus size
# (data/corpus.py vocab_sample; 0: the whole corpus).
VOCAB_SAMPLE_BYTES = 50_000_000


def data(name: str, *, eval_fraction: float, eval_split: str = '') -> ml_collections.ConfigDict:
    """data.*: where the examples come from (the config adds its fields and lengths)."""
    d = ml_collections.ConfigDict()
    d.name = name  # an embedded dataset or a TFDS name
    d.files = ''  # local files (the kinds: the config's docstring); overrides name
    d.eval_files = ''  # local files for validation; else eval_fraction of the training data
    d.eval_fraction = eval_fraction
    d.train_split = 'train'  # TFDS splits
    d.eval_split = eval_split
    d.data_dir = ''  # TFDS data_dir
    d.prefetch = 2
    # The training stream is cut into this many data shards (0: one per process at the
    # first start). A run can resume on any process count that divides it: set 8 (say) to
    # move a run between 1, 2, 4 and 8 hosts. Changing it changes the data order.
    d.shards = 0
    return d


def _transformer(
    sizes: tuple[int, int, int, int], *, dropout_rate: float, layer_norm_eps: float
) -> ml_collections.ConfigDict:
    """The model.* keys of the shared Transformer (models/encoder.py) both encoders have."""
    hidden, layers, heads, mlp = sizes
    m = ml_collections.ConfigDict()
    m.hidden_size = hidden
    m.num_layers = layers
    m.num_heads = heads
    m.mlp_dim = mlp
    m.dropout_rate = dropout_rate
    m.attention_dropout_rate = 0.0  # >0 leaves the fused attention path
    m.activation = 'gelu'
    m.layer_norm_eps = layer_norm_eps
    m.remat = 'none'  # none | dots | full
    m.attention_impl = 'auto'  # auto: cuDNN flash attention on GPU in bf16, else xla
    m.scan_layers = False  # nn.scan over the layers: faster compiles of deep models
    return m


def bert_encoder(sizes: tuple[int, int, int, int]) -> ml_collections.ConfigDict:
    """model.* of a BERT text encoder of `sizes` (a BERT_SIZES row), post-LN as BERT.
    vocab_size and dropout_rate are BERT-base's; a config sets its own."""
    m = _transformer(sizes, dropout_rate=0.1, layer_norm_eps=1e-12)
    # The WordPiece vocabulary trained on the corpus (or the size of a given vocab.txt,
    # which must not exceed it).
    m.vocab_size = 30522
    m.max_len = 512
    m.type_vocab_size = 2
    m.layer_norm = 'post'  # BERT
    m.pooler = False  # BERT's Dense + tanh on [CLS] (backbone/pooler): imported BERTs
    m.patch_size = 0  # image models only
    m.image_size = 0
    return m


def vit_encoder(
    sizes: tuple[int, int, int, int], *, image_size: int, patch_size: int, channels: int
) -> ml_collections.ConfigDict:
    """model.* of a ViT image encoder of `sizes` (a VIT_SIZES row or a config's own tiny),
    pre-LN, without dropout, on images of `image_size` pixels and `channels`."""
    m = _transformer(sizes, dropout_rate=0.0, layer_norm_eps=1e-6)
    m.image_size = image_size
    m.patch_size = patch_size
    m.channels = channels
    m.pooling = 'cls'  # cls | gap
    m.vocab_size = 0  # text models only
    m.max_len = 0
    return m


def optimizer(
    *,
    name: str = 'adamw',
    b2: float = 0.999,
    weight_decay: float,
    grad_clip_norm: float = 1.0,
    schedule: str,
) -> ml_collections.ConfigDict:
    """optimizer.*: the update rule and the shape of the learning-rate schedule (the rate,
    warmup and steps are the config's top-level keys)."""
    o = ml_collections.ConfigDict()
    o.name = name  # adamw | lamb | lars
    o.b1 = 0.9  # LARS: momentum
    o.b2 = b2
    o.eps = 1e-6
    o.weight_decay = weight_decay
    o.grad_clip_norm = grad_clip_norm  # 0: off
    o.schedule = schedule  # linear | cosine | constant (after a linear warmup)
    o.end_learning_rate = 0.0
    return o


def runtime(
    *,
    log_every: int = 50,
    eval_every: int,
    eval_steps: int,
    checkpoint_every: int,
    keep_checkpoints: int,
) -> ml_collections.ConfigDict:
    """The top-level keys of how a run runs, for `c.update(...)`: precision, layout, where
    it starts, how often it logs, evaluates and saves, and what stops it."""
    r = ml_collections.ConfigDict(sort_keys=False)  # update() adds them in this order
    r.precision = 'float32'  # float32 | bfloat16 (compute; params stay float32)
    r.parallelism = 'jit'  # jit (mesh) | pmap (data parallel)
    # Mesh: data/fsdp/tensor size one slice (-1 = the rest of it); dcn_data/dcn_fsdp split
    # data/fsdp across TPU slices or GPU hosts (docs/launching.md).
    r.mesh = ml_collections.ConfigDict(
        {'data': -1, 'fsdp': 1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1}
    )
    # A workdir or checkpoint to start from: the encoder to fine-tune, or a pretraining
    # to continue; '' from scratch.
    r.init_from = ''
    r.train_examples = ''  # fine-tuning: '' all labels; 10 per class; 0.1 a fraction per class
    r.log_every = log_every
    r.eval_every = eval_every
    r.eval_steps = eval_steps  # batches per eval
    r.checkpoint_every = checkpoint_every
    r.keep_checkpoints = keep_checkpoints  # the latest N, plus the best by the task's metric
    r.watchdog_secs = 0  # 0: off; else exit 124 when no step finishes for this long
    # A NaN/Inf loss: 0 stops the run there (the last good checkpoint is kept); N > 0 skips
    # such updates (params and optimizer state unchanged) and stops after N in a row.
    r.skip_nonfinite_steps = 0
    r.peak_tflops = 0.0  # per device, for MFU where the device kind is not known
    # What the metrics go to: jsonl (always), tensorboard, wandb, mlflow (docs/outputs.md)
    r.loggers = 'jsonl,tensorboard'
    r.overwrite = False
    return r


def finetune(*, layer_decay: float = 1.0) -> ml_collections.ConfigDict:
    """The top-level keys of a fine-tuning config, for `c.update(...)`: what of the
    pretrained encoder trains and how fast, and how validation picks the checkpoint."""
    f = ml_collections.ConfigDict(sort_keys=False)  # update() adds them in this order
    f.transfer = ml_collections.ConfigDict()
    f.transfer.freeze_backbone = False  # linear probe
    f.transfer.freeze_layers = 0  # embeddings + the first k layers frozen
    f.transfer.layer_decay = layer_decay  # layer-wise lr decay (1.0: off)
    f.transfer.head_lr_scale = 1.0  # the new head's lr, times the encoder's
    # With init_from, learning_rate, warmup_steps, the schedule, head_lr_scale (and a text
    # start's pooling) follow the start (core/recipe.py, docs/recipe.md) unless given on
    # the command line; the run records what it took here. 'none': this file's values.
    f.transfer.start_defaults = ''
    # The saved params subtree holding the encoder (image_backbone: a CLIP run's image tower).
    f.init_subtree = 'backbone'
    f.eval = ml_collections.ConfigDict()
    # Picks the best checkpoint; '': the task's own (accuracy, pearson for regression,
    # entity_f1 for tags).
    f.eval.metric = ''
    f.eval.evaluate_split = 'test'  # what `launch.py evaluate` scores: test | validation
    f.early_stopping_patience = 0  # evals without a new best before stopping (0: off)
    return f
