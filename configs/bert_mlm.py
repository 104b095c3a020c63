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

from configs import common


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    tiny = preset == 'tiny'
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'
    c.task = 'mlm'
    c.seed = 0

    # Input: the corpus (below), masked.
    c.data = corpus()
    c.data.max_predictions = 20  # BERT: 20 at seq 128, 80 at seq 512
    c.data.mask_prob = 0.15
    c.data.whole_word_masking = False

    c.model = encoder(preset)

    # Optimization. BERT: AdamW, beta2 0.999, eps 1e-6, wd 0.01, linear warmup + decay.
    # tiny is sized for a 2-core CPU (about 9 minutes); the others follow BERT's phase-1
    # recipe (batch 256, seq 128, 1M steps in the paper; here 100k as a starting point).
    c.total_steps = 2400 if tiny else 100_000
    c.batch_size = 32 if tiny else 256  # global
    c.learning_rate = 2e-3 if tiny else 1e-4  # small models take a higher lr
    c.warmup_steps = 240 if tiny else 10_000
    c.grad_accum_steps = 1  # micro-batches per step (batch_size is the whole step)
    c.optimizer = common.optimizer(weight_decay=0.01, schedule='linear')

    # Runtime (configs/common.py); init_from continues a pretraining.
    c.update(
        common.runtime(
            eval_every=200 if tiny else 5000,
            eval_steps=20,
            checkpoint_every=400 if tiny else 5000,
            keep_checkpoints=3,
        )
    )
    return c


def corpus() -> ml_collections.ConfigDict:
    """data.* of the pretraining text (configs/simcse.py reads it too). Embedded: CPython
    docs + stdlib docstrings (~1.6 MB), without any paragraph of the pydoc_topics
    classification task, so fine-tuning validates and tests on unseen text. data.files: a
    local glob (.txt/.jsonl/.tsv/.csv)."""
    d = common.data('pydoc_stdlib', eval_fraction=0.05)
    d.text_field = 'text'
    d.label_field = 'label'
    d.vocab_file = ''  # a BERT vocab.txt; empty: train a WordPiece vocab on the corpus
    d.vocab_sample_bytes = common.VOCAB_SAMPLE_BYTES  # the seeded sample it is trained on
    d.lowercase = True
    d.seq_len = 128
    return d


def encoder(preset: str, config: str = 'bert_mlm') -> ml_collections.ConfigDict:
    """model.* of the pretrained BERT (configs/simcse.py's too, so MLM checkpoints fit)."""
    m = common.bert_encoder(common.size(common.BERT_SIZES, preset, config))
    # tiny: 4096, sized to its 1.5 MB corpus (8192 gave 0.02 lower held-out accuracy, 2048
    # 0.01 lower; docs/mlm_tiny.md).
    m.vocab_size = 4096 if preset == 'tiny' else 30522
    # tiny: none. A short run of a small model underfits (its train and held-out accuracy
    # agree), so dropout only slows it (+0.01 held-out accuracy without; Geiping and
    # Goldstein, "Cramming", 2022, found the same). Fine-tuning configs set their own.
    m.dropout_rate = 0.0 if preset == 'tiny' else 0.1
    return m
