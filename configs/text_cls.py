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

from configs import bert_mlm


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    c = bert_mlm.get_config(preset)  # the same encoder keys, so MLM checkpoints fit
    tiny = preset == 'tiny'
    c.stage = 'finetune'
    c.task = 'text_cls'
    c.task_type = 'classification'  # classification | regression

    c.data.name = 'pydoc_topics'
    c.data.text_field = 'text'
    c.data.text_pair_field = ''  # a second text column: sentence-pair tasks
    c.data.label_field = 'label'
    c.data.header = True  # tsv/csv: a header row names the columns (else 0-based indices)
    # Validation (eval rows, best checkpoint, early stopping): eval_files / eval_split, else
    # this part of each class of the training examples, chosen by seed.
    c.data.eval_fraction = 0.1
    # Test, scored once at the end on the checkpoint validation picked: local files or a
    # TFDS split (pydoc_topics ships its own 268 paragraphs; '' and '': no test split).
    c.data.test_files = ''
    c.data.test_split = ''
    c.data.seq_len = 128
    for key in ('max_predictions', 'mask_prob', 'whole_word_masking'):
        del c.data[key]

    # From scratch without a vocab_file, the WordPiece vocabulary is trained on the task's
    # text: 8192 tokens (docs/results.md's from-scratch figures; the MLM preset's 4096 is sized to
    # its corpus). With init_from the start's vocabulary and architecture are adopted.
    c.model.vocab_size = 8192 if tiny else c.model.vocab_size
    c.model.dropout_rate = 0.1  # BERT's fine-tuning dropout (the tiny MLM preset has none)
    c.model.pooling = 'cls'  # cls | mean | pooler (BERT's Dense + tanh on [CLS])
    c.model.head_dropout = 0.1
    c.model.zero_init_head = True

    # Transfer: what of the pretrained encoder trains, and how fast.
    c.transfer = ml_collections.ConfigDict()
    c.transfer.freeze_backbone = False  # linear probe
    c.transfer.freeze_layers = 0  # embeddings + the first k layers frozen
    c.transfer.layer_decay = 1.0  # layer-wise lr decay (1.0: off)
    c.transfer.head_lr_scale = 1.0  # the new head's lr, times the encoder's
    # With init_from, learning_rate, warmup_steps, the schedule, head_lr_scale (and a text
    # start's pooling) follow the start (core/recipe.py, docs/recipe.md) unless given on
    # the command line; the run records what it took here. 'none': this file's values.
    c.transfer.start_defaults = ''

    c.init_from = ''  # a pretraining workdir or checkpoint; empty: from scratch
    c.init_subtree = 'backbone'  # the saved params subtree holding the encoder
    c.train_examples = ''  # '' all; 10 per class; 0.1 a fraction per class

    c.eval = ml_collections.ConfigDict()
    c.eval.metric = ''  # picks the best checkpoint; '' = accuracy (pearson for regression)
    c.eval.evaluate_split = 'test'  # what `launch.py evaluate` scores: test | validation
    c.early_stopping_patience = 0  # evals without a new best before stopping (0: off)

    # AdamW, 10% warmup, linear decay; lr 1e-3 for tiny from scratch (and the tiny MLM
    # encoder), BERT's 3e-5 for the larger presets. With init_from, the start's recipe
    # (core/recipe.py) sets these unless the command line gives them.
    c.batch_size = 32
    c.total_steps = 600 if tiny else 3000
    c.warmup_steps = 60 if tiny else 300
    c.learning_rate = 1e-3 if tiny else 3e-5
    c.optimizer.weight_decay = 0.01
    c.log_every = 50
    c.eval_every = 100 if tiny else 500
    c.checkpoint_every = c.eval_every  # every eval's step is kept if it is the best
    c.keep_checkpoints = 2
    return c
