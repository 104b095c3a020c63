r"""Domain-adaptive pretraining: continue MLM from a general encoder on the text of the task
it will be fine-tuned on, then fine-tune (task-adaptive pretraining, Gururangan et al.,
"Don't Stop Pretraining", 2020).

  python launch.py import-hf --source DIR --workdir runs/minilm      # or an MLM run
  python launch.py pretrain --config configs/dapt.py:tiny --workdir runs/dapt \
      --config.init_from=runs/minilm
  python launch.py finetune --config configs/text_cls.py:tiny --workdir runs/cls_dapt \
      --config.init_from=runs/dapt

The corpus is the training text of the task that data.* describes, read as
configs/text_cls.py reads it (the same keys: the embedded pydoc_topics, or
--config.data.files=train.tsv with text_field / text_pair_field / label_field, or a TFDS
name), less the validation split a fine-tuning run with the same seed carves out of it
(data.eval_fraction of each class, by seed) or data.eval_files. The held-out masked-token
accuracy is scored on that validation text and picks the checkpoint; the test split is
never read, and labels only to carve validation by class. Fine-tune with the same seed and
data keys, so the text the fine-tuning validates on is text this run held out. Every
training example's text is used, whatever label budget the fine-tuning then takes.

With init_from, the encoder's architecture and vocabulary are the start's (an imported
MiniLM: its WordPiece, casing, and a fresh MLM head, BERT's tied decoder over its
embeddings); without, the preset's BERT is trained from scratch on the task's text. The
defaults (100 steps of 32 sequences at lr 1e-4, about 16 passes over the ~200 packed
sequences of pydoc_topics' 569 training paragraphs) are for continuing a pretrained
encoder; they were not tuned. From the imported MiniLM they did not help it on
pydoc_topics (docs/techniques.md: -0.044 test accuracy with 58 labels, -0.012 with all,
intervals across zero).
"""

import ml_collections

from configs import bert_mlm, text_cls


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    c = bert_mlm.get_config(preset)
    c.task_type = 'classification'  # the task's: regression tasks carve validation unsplit

    # The task's data keys (configs/text_cls.py), then MLM's masking.
    task = text_cls.get_config(preset).data
    c.data = ml_collections.ConfigDict(
        {k: v for k, v in task.items() if k not in ('test_files', 'test_split')}
    )
    c.data.task_text = True  # the corpus is the task's training text (data/labelled.py)
    c.data.max_predictions = 20
    c.data.mask_prob = 0.15
    c.data.whole_word_masking = False
    # From scratch, the WordPiece trained on the task's text (as text_cls.py's scratch runs).
    c.model.vocab_size = 8192 if preset == 'tiny' else 30522

    c.total_steps = 100
    c.batch_size = 32
    c.learning_rate = 1e-4
    c.warmup_steps = 10
    c.eval_every = 25
    c.eval_steps = 20
    c.checkpoint_every = 25
    c.keep_checkpoints = 1  # the latest, plus the best on validation
    return c
