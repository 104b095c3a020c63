r"""BERT masked-language-model pretraining.

Run (the default: BERT-tiny on the embedded CPython documentation, without the paragraphs
of the pydoc_topics task; on 2 CPU cores about 9 minutes, held-out masked-token accuracy
0.206 against 0.056 for always predicting the most frequent token; docs/results.md and
docs/mlm_tiny.md, which has the runs that chose tiny's vocabulary, dropout, lr and steps):

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm

Presets: tiny (H128 L2 A2), small (H512 L4 A8), base (H768 L12 A12), large (H1024 L24 A16).
Any key can be overridden: --config.model.num_layers=4 --config.data.files='corpus/*.txt'.
On your own corpus: --config.data.files=GLOB (.txt/.jsonl/.tsv/.csv) or
--config.data.name=TFDS_NAME --config.data.data_dir=DIR; bring a BERT vocabulary with
--config.data.vocab_file=vocab.txt (otherwise one is trained and saved in the workdir).
"""

import ml_collections

# (hidden_size, num_layers, num_heads, mlp_dim) of the standard BERT sizes.
SIZES = {
    'tiny': (128, 2, 2, 512),
    'small': (512, 4, 8, 2048),
    'base': (768, 12, 12, 3072),
    'large': (1024, 24, 16, 4096),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    if preset not in SIZES:
        raise ValueError(f'unknown preset {preset!r} for bert_mlm; expected one of {list(SIZES)}')
    hidden, layers, heads, mlp = SIZES[preset]
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'
    c.task = 'mlm'
    c.seed = 0

    # Input.
    c.data = ml_collections.ConfigDict()
    # Embedded: CPython docs + stdlib docstrings (~1.6 MB), without any paragraph of the
    # pydoc_topics classification task, so fine-tuning validates and tests on unseen text.
    c.data.name = 'pydoc_stdlib'
    c.data.files = ''  # local glob (.txt/.jsonl/.tsv/.csv); overrides name
    c.data.eval_files = ''  # local glob for eval; else eval_fraction of the documents
    c.data.eval_fraction = 0.05
    c.data.train_split = 'train'  # TFDS splits
    c.data.eval_split = ''
    c.data.data_dir = ''  # TFDS data_dir
    c.data.text_field = 'text'
    c.data.label_field = 'label'
    c.data.vocab_file = ''  # a BERT vocab.txt; empty: train a WordPiece vocab on the corpus
    c.data.lowercase = True
    c.data.seq_len = 128
    c.data.max_predictions = 20  # BERT: 20 at seq 128, 80 at seq 512
    c.data.mask_prob = 0.15
    c.data.whole_word_masking = False
    c.data.prefetch = 2
    # The training stream is cut into this many data shards (0: one per process at the
    # first start). A run can resume on any process count that divides it: set 8 (say) to
    # move a run between 1, 2, 4 and 8 hosts. Changing it changes the data order.
    c.data.shards = 0

    # Model. vocab_size is the WordPiece vocabulary trained on the corpus (or the size of
    # the given vocab.txt, which must not exceed it).
    c.model = ml_collections.ConfigDict()
    # tiny: 4096, sized to its 1.5 MB corpus (8192 gave 0.02 lower held-out accuracy, 2048
    # 0.01 lower; docs/mlm_tiny.md).
    c.model.vocab_size = 4096 if preset == 'tiny' else 30522
    c.model.hidden_size = hidden
    c.model.num_layers = layers
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.max_len = 512
    c.model.type_vocab_size = 2
    # tiny: none. A short run of a small model underfits (its train and held-out accuracy
    # agree), so dropout only slows it (+0.01 held-out accuracy without; Geiping and
    # Goldstein, "Cramming", 2022, found the same). Fine-tuning configs set their own.
    c.model.dropout_rate = 0.0 if preset == 'tiny' else 0.1
    c.model.attention_dropout_rate = 0.0  # >0 leaves the fused attention path
    c.model.activation = 'gelu'
    c.model.layer_norm = 'post'  # BERT
    c.model.layer_norm_eps = 1e-12
    c.model.pooler = False  # BERT's Dense + tanh on [CLS] (backbone/pooler): imported BERTs
    c.model.remat = 'none'  # none | dots | full
    c.model.attention_impl = 'auto'  # auto: cuDNN flash attention on GPU in bf16, else xla
    c.model.scan_layers = False  # nn.scan over the layers: faster compiles of deep models
    c.model.patch_size = 0  # image models only
    c.model.image_size = 0

    # Optimization. BERT: AdamW, beta2 0.999, eps 1e-6, wd 0.01, linear warmup + decay.
    # tiny is sized for a 2-core CPU (about 9 minutes); the others follow BERT's phase-1
    # recipe (batch 256, seq 128, 1M steps in the paper; here 100k as a starting point).
    c.total_steps = 2400 if preset == 'tiny' else 100_000
    c.batch_size = 32 if preset == 'tiny' else 256  # global
    c.learning_rate = 2e-3 if preset == 'tiny' else 1e-4  # small models take a higher lr
    c.warmup_steps = 240 if preset == 'tiny' else 10_000
    c.grad_accum_steps = 1  # micro-batches per step (batch_size is the whole step)
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = 'adamw'  # adamw | lamb
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.schedule = 'linear'  # linear | cosine | constant
    c.optimizer.end_learning_rate = 0.0

    # Runtime.
    c.precision = 'float32'  # float32 | bfloat16 (compute; params stay float32)
    c.parallelism = 'jit'  # jit (mesh) | pmap (data parallel)
    # Mesh: data/fsdp/tensor size one slice (-1 = the rest of it); dcn_data/dcn_fsdp split
    # data/fsdp across TPU slices or GPU hosts (docs/launching.md).
    c.mesh = ml_collections.ConfigDict(
        {'data': -1, 'fsdp': 1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1}
    )
    c.init_from = ''  # workdir or checkpoint to start from (continued pretraining)
    c.train_examples = ''  # fine-tuning only
    c.log_every = 50
    c.eval_every = 200 if preset == 'tiny' else 5000
    c.eval_steps = 20  # batches per eval
    c.checkpoint_every = 400 if preset == 'tiny' else 5000
    c.keep_checkpoints = 3
    c.watchdog_secs = 0  # 0: off; else exit 124 when no step finishes for this long
    # A NaN/Inf loss: 0 stops the run there (the last good checkpoint is kept); N > 0 skips
    # such updates (params and optimizer state unchanged) and stops after N in a row.
    c.skip_nonfinite_steps = 0
    c.peak_tflops = 0.0  # per device, for MFU where the device kind is not known
    c.overwrite = False
    return c
