"""Token classification (sequence labelling, e.g. named-entity recognition) with a BERT
encoder, from CoNLL-style files (a token and its tag a line, the tag in the last column,
a blank line between sentences) or `.jsonl` with token and tag lists.

Each word's tag sits on its first WordPiece (the others carry no loss); predictions are
read back per word, words cut by truncation count as 'O', and the task metric is entity
F1 (exact chunks, seqeval's default scoring), beside token accuracy.
"""

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from core import config as config_lib
from core.losses import weighted_cross_entropy
from core.task import InitFrom, Runtime, Scorer, Task, compute_dtype
from data import labelled, token_files
from data.tokenizer import make_tokenizer
from finetune import classify
from finetune import metrics as metrics_lib
from models.bert import BertConfig
from models.classifier import TokenClassifier


def check_config(config: ml_collections.ConfigDict) -> None:
    if not 8 <= config.data.seq_len <= config.model.max_len:
        raise config_lib.ConfigError(
            f'data.seq_len {config.data.seq_len} must be in [8, model.max_len = '
            f'{config.model.max_len}]'
        )
    if not config.data.files:
        raise config_lib.ConfigError(
            'token classification reads local files: --config.data.files=train.conll '
            '(CoNLL: a token and its tag a line, blank line between sentences; or .jsonl '
            'with token and tag lists), --config.data.eval_files=dev.conll and '
            '--config.data.test_files=test.conll'
        )
    if config.data.get('test_split'):
        raise config_lib.ConfigError(
            f'data.test_split={config.data.test_split!r} names a TFDS split, and token '
            'classification reads local files; give --config.data.test_files'
        )
    if config.data.get('test_files'):
        labelled.match_files(config.data.test_files)  # there (read at the end of training)


def load_splits(config) -> tuple[list[dict], list[dict], Callable[[], list[dict]] | None]:
    """(training, validation, test loader) sentences: validation from `data.eval_files`,
    else `data.eval_fraction` of the training sentences held out by seed; the test loader
    reads `data.test_files` when called, at the end of training (None without them)."""
    d = config.data
    train = token_files.read_token_files(d.files, d.tokens_field, d.tags_field)
    test = None
    if d.test_files:
        test = lambda: token_files.read_token_files(d.test_files, d.tokens_field, d.tags_field)  # noqa: E731
    if d.eval_files:
        return train, token_files.read_token_files(d.eval_files, d.tokens_field, d.tags_field), test
    train_idx, val_idx = labelled.carve_validation(np.zeros(len(train)), config, False, d.files)
    return [train[i] for i in train_idx], [train[i] for i in val_idx], test


def tags_of_words(logits: np.ndarray, weights: np.ndarray, num_words: int, names) -> list[str]:
    """A sentence's predicted tag per word: the argmax at each first WordPiece (the
    positions of weight 1), 'O' for words truncation cut."""
    first = np.flatnonzero(weights > 0)
    predicted = [names[i] for i in np.argmax(logits[first], axis=-1)]
    return predicted + ['O'] * (num_words - len(predicted))


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    train, evals, load_test = load_splits(config)
    label_map = classify.fit_label_map(
        workdir, sorted({t for s in train for t in s['tags']}), False, runtime
    )
    tokenizer = make_tokenizer(config, workdir, [' '.join(s['tokens']) for s in train])
    seq = config.data.seq_len

    def encode(sentences, where):
        rows = []
        for s in sentences:
            tags = label_map.encode(s['tags'], where=where)
            row = token_files.align_tags(s['tokens'], tags, tokenizer, seq)
            row['label'] = row.pop('labels')
            rows.append(row)
        return rows

    picked = labelled.select_train_examples(
        np.zeros(len(train), np.int32), config.train_examples, config.seed, per_class=False
    )
    train = [train[i] for i in picked]
    train_rows = encode(train, config.data.files)
    eval_rows = encode(evals, 'the validation split')
    eval_words = [len(s['tokens']) for s in evals]
    truncated = sum(r['num_words'] < n for r, n in zip(eval_rows, eval_words))
    logging.info(
        'data: %d train / %d validation sentences, %d tags %s; %d validation sentences '
        'truncated at seq_len %d; %s',
        len(train),
        len(evals),
        label_map.num_classes,
        label_map.classes,
        truncated,
        seq,
        'a test split scored at the end' if load_test else 'no test split',
    )
    for r in train_rows:
        del r['num_words']
    model = TokenClassifier(
        BertConfig.from_config(config.model, dtype=compute_dtype(config)),
        label_map.num_classes,
        config.model.head_dropout,
        config.model.zero_init_head,
    )

    def loss_fn(params, batch, rng, train: bool, rows=None):
        logits = model.apply(
            {'params': params}, batch, not train, rows, rngs={'dropout': rng}
        )  # [batch, length, tags]
        weights = batch['label_weights'].astype(jnp.float32)
        labels = batch['label']
        loss, hits, denominator = weighted_cross_entropy(logits, labels, weights)
        return loss, {'token_accuracy': hits, 'denominator': denominator}

    names = label_map.classes

    def scorer(sentences: list[dict], rows: list[dict]) -> Scorer:
        """Entity F1 and token accuracy of one split, and its per-word predictions."""
        arrays = {
            k: np.stack([np.asarray(r[k]) for r in rows])
            for k in ('input_ids', 'input_mask', 'label', 'label_weights')
        }
        words = [len(s['tokens']) for s in sentences]
        predictor = classify.Predictor(model, lambda b: b, classify.eval_batches(arrays, runtime))

        def predicted_tags(stepper, params) -> list[list[str]]:
            logits = predictor.logits(stepper, params)  # [sentences, length, tags]
            return [
                tags_of_words(logits[i], arrays['label_weights'][i], words[i], names)
                for i in range(len(sentences))
            ]

        def evaluate(stepper, params) -> dict[str, float]:
            predicted = predicted_tags(stepper, params)
            scores = metrics_lib.entity_f1([s['tags'] for s in sentences], predicted)
            hits = sum(p == t for s, ps in zip(sentences, predicted) for p, t in zip(ps, s['tags']))
            return {
                'entity_f1': scores['f1'],
                'entity_precision': scores['precision'],
                'entity_recall': scores['recall'],
                'token_accuracy': hits / max(sum(words), 1),
            }

        def predict(stepper, params) -> list[dict]:
            return [
                {'index': i, 'tokens': s['tokens'], 'tags': s['tags'], 'prediction': p}
                for i, (s, p) in enumerate(zip(sentences, predicted_tags(stepper, params)))
            ]

        return Scorer(evaluate, predict)

    def test() -> Scorer:
        sentences = load_test()
        logging.info('test: %d sentences', len(sentences))
        return scorer(sentences, encode(sentences, 'the test split'))

    val = scorer(evals, eval_rows)
    example = classify.text_example(seq)
    return Task(
        name='token_cls',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(classify.train_dataset(train_rows, config, runtime)),
        evaluate=val.evaluate,
        metric=config.eval.metric or 'entity_f1',
        flops_per_step=classify.encoder_train_flops(config, seq),
        tokens_per_example=seq,
        init_from=InitFrom({'backbone': config.init_subtree}),
        predict=val.predict,
        test=test if load_test is not None else None,
        summary_extras=lambda final: {'train_examples': len(train)},
    )
