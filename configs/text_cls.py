r"""Text classification (or regression) by fine-tuning a BERT encoder.

Run (the default: the embedded pydoc_topics task, which CPython documentation topic a
paragraph comes from, 13 classes; 899 paragraphs: 631 for training, of which a tenth of
each topic (62) is held out for validation by seed, and 268 for the fixed test split),
from an MLM run and from scratch with the same budget and vocabulary (2-3 minutes each on
2 CPU cores; test accuracy 0.700 from MLM, 0.549 from scratch, means of 3 seeds; docs/results.md):

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm
  python launch.py finetune --config configs/text_cls.py:tiny --workdir runs/cls \
      --config.init_from=runs/mlm
  python launch.py finetune --config configs/text_cls.py:tiny --workdir runs/cls_scratch \
      --config.data.vocab_file=runs/mlm/vocab.txt

The eval rows score the validation split, which picks the best checkpoint (and early
stopping); the run ends by scoring that checkpoint once on the test split (a `test` row,
`test_accuracy` in summary.json). The MLM corpus holds none of the task's paragraphs.

Your own task: --config.data.files=train.tsv --config.data.eval_files=dev.tsv
--config.data.test_files=test.tsv (without eval_files, data.eval_fraction of each class
of train.tsv validates; without test_files there is no test split);
(--config.data.text_field / text_pair_field / label_field name the columns; .csv and
.jsonl too); --config.task_type=regression for a numeric label. Low-label studies:
--config.train_examples=10 (per class) or 0.1 (fraction), chosen by seed, nested.
Transfer modes: --config.transfer.freeze_backbone=true (linear probe),
--config.transfer.freeze_layers=K, --config.transfer.layer_decay=0.8,
--config.transfer.head_lr_scale=10 (the new head's rate, times the encoder's).

With init_from, the optimizer keys below (and the pooling) follow the start, not this
file: the recipe for the adopted encoder's width (core/recipe.py, docs/recipe.md; the
tiny MLM encoder's row is this file's values, an imported MiniLM gets lr 1e-4 with the
head at x10 and its mean pooling). A --config.key on the command line always wins.
"""

import ml_collections

from configs import common


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = 'finetune'
    c.task = 'text_cls'
    c.task_type = 'classification'  # classification | regression
    c.seed = 0

    # Validation (eval rows, best checkpoint, early stopping): eval_files / eval_split, else
    # this part of each class of the training examples, chosen by seed.
    c.data = common.data('pydoc_topics', eval_fraction=0.1)
    c.data.text_field = 'text'
    c.data.text_pair_field = ''  # a second text column: sentence-pair tasks
    c.data.label_field = 'label'
    c.data.header = True  # tsv/csv: a header row names the columns (else 0-based indices)
    c.data.vocab_file = ''  # a BERT vocab.txt; empty: train a WordPiece vocab on the task
    c.data.vocab_sample_bytes = common.VOCAB_SAMPLE_BYTES
    c.data.lowercase = True
    c.data.seq_len = 128
    # Test, scored once at the end on the checkpoint validation picked: local files or a
    # TFDS split (pydoc_topics ships its own 268 paragraphs; '' and '': no test split).
    c.data.test_files = ''
    c.data.test_split = ''

    c.model = encoder(preset)
    c.model.pooling = 'cls'  # cls | mean | pooler (BERT's Dense + tanh on [CLS])

    c.update(common.finetune())  # transfer, init_subtree, eval.metric (configs/common.py)
    c.update(training(preset))  # optimization and runtime (below)
    return c


def encoder(preset: str, config: str = 'text_cls') -> ml_collections.ConfigDict:
    """model.* of a BERT fine-tuned with a new head (configs/token_cls.py takes it too): the
    keys of configs/bert_mlm.py's encoder, so MLM checkpoints fit."""
    m = common.bert_encoder(common.size(common.BERT_SIZES, preset, config))
    # From scratch without a vocab_file, the WordPiece vocabulary is trained on the task's
    # text: 8192 tokens (docs/results.md's from-scratch figures; the MLM preset's 4096 is sized to
    # its corpus). With init_from the start's vocabulary and architecture are adopted.
    m.vocab_size = 8192 if preset == 'tiny' else 30522
    m.dropout_rate = 0.1  # BERT's fine-tuning dropout (the tiny MLM preset has none)
    m.head_dropout = 0.1
    m.zero_init_head = True
    return m


def training(preset: str) -> ml_collections.ConfigDict:
    """The top-level optimization and runtime keys of a BERT fine-tuning, for `c.update`
    (configs/token_cls.py takes them too)."""
    tiny = preset == 'tiny'
    eval_every = 100 if tiny else 500
    s = ml_collections.ConfigDict(sort_keys=False)  # update() adds them in this order
    # AdamW, 10% warmup, linear decay; lr 1e-3 for tiny from scratch (and the tiny MLM
    # encoder), BERT's 3e-5 for the larger presets. With init_from, the start's recipe
    # (core/recipe.py) sets these unless the command line gives them.
    s.batch_size = 32
    s.total_steps = 600 if tiny else 3000
    s.warmup_steps = 60 if tiny else 300
    s.learning_rate = 1e-3 if tiny else 3e-5
    s.grad_accum_steps = 1
    s.optimizer = common.optimizer(weight_decay=0.01, schedule='linear')
    s.update(
        common.runtime(
            eval_every=eval_every,
            eval_steps=20,
            checkpoint_every=eval_every,  # every eval's step is kept if it is the best
            keep_checkpoints=2,
        )
    )
    return s
