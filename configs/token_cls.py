r"""Token classification (sequence labelling such as named-entity recognition) by
fine-tuning a BERT encoder.

  python launch.py finetune --config configs/token_cls.py:tiny --workdir runs/ner \
      --config.data.files=train.conll --config.data.eval_files=dev.conll \
      --config.data.test_files=test.conll --config.init_from=runs/mlm

dev.conll (validation; without it, data.eval_fraction of the training sentences by seed)
gives the eval rows and picks the checkpoint; test.conll is scored once, at the end, on
that checkpoint (no test split without it).

Files: CoNLL style (a token a line, its tag in the last whitespace-separated column, a
blank line between sentences, -DOCSTART- lines skipped) or .jsonl with `data.tokens_field`
and `data.tags_field` lists. Tags in IOB2 / BIO (or IOBES); the metric is entity F1 over
exact chunks (seqeval's default), written as `entity_f1` beside `token_accuracy`.
--config.train_examples=N (or a fraction) takes that many training sentences, by seed.
"""

import ml_collections

from configs import common, text_cls


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = 'finetune'
    c.task = 'token_cls'
    c.seed = 0

    # data.files is required: train.conll / train.jsonl. Validation and test as text_cls.py.
    c.data = common.data('', eval_fraction=0.1)
    c.data.tokens_field = 'tokens'  # .jsonl fields
    c.data.tags_field = 'tags'
    c.data.vocab_file = ''  # a BERT vocab.txt; empty: train a WordPiece vocab on the task
    c.data.vocab_sample_bytes = common.VOCAB_SAMPLE_BYTES
    c.data.lowercase = True
    c.data.seq_len = 128
    c.data.test_files = ''
    c.data.test_split = ''

    c.model = text_cls.encoder(preset, 'token_cls')  # a tag per token: no pooling
    c.update(common.finetune())  # transfer, init_subtree, eval.metric (configs/common.py)

    c.update(text_cls.training(preset))  # text_cls's optimization and cadence
    return c
