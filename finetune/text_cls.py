"""Sentence and sentence-pair classification (or regression) with a BERT encoder.

Data (`config.data`): the embedded `pydoc_topics` task (which CPython documentation topic
a paragraph comes from, 13 classes), a prepared TFDS dataset by name (GLUE-style features
`data.text_field`, `data.text_pair_field`, `data.label_field`; splits `data.train_split`,
`data.eval_split`), or local `.tsv` / `.csv` / `.jsonl` files
(`data.files`, `data.eval_files`; columns `data.text_field`, `data.text_pair_field`,
`data.label_field`). Labels are mapped from the training split (WORKDIR/labels.json);
an unknown label at eval is an error.
"""

import ml_collections
import numpy as np
from absl import logging

from core import config as config_lib
from core import flops as flops_lib
from core.errors import DataError
from core.task import Runtime, Task
from data import labelled
from data.text import TfdsText, heldout_indices
from data.tokenizer import WordPiece, make_tokenizer
from finetune import classify
from models.bert import BertConfig
from models.classifier import TextClassifier


def check_config(config: ml_collections.ConfigDict) -> None:
    if not 8 <= config.data.seq_len <= config.model.max_len:
        raise config_lib.ConfigError(
            f'data.seq_len {config.data.seq_len} must be in [8, model.max_len = '
            f'{config.model.max_len}]'
        )
    if config.model.pooling not in ('cls', 'mean'):
        raise config_lib.ConfigError(
            f'model.pooling={config.model.pooling!r}; expected cls or mean'
        )


def encode_pair(wordpiece: WordPiece, text: str, pair: str, seq_len: int) -> dict:
    """[CLS] text [SEP] (pair [SEP]) -> input_ids, input_mask, segment_ids int32 [seq_len];
    the longer text is cut first until both fit (BERT's longest-first truncation)."""
    a = list(wordpiece.encode(text))
    b = list(wordpiece.encode(pair)) if pair else []
    budget = seq_len - 3 if pair else seq_len - 2
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    ids = [wordpiece.cls_id, *a, wordpiece.sep_id]
    segments = [0] * len(ids)
    if pair:
        ids += [*b, wordpiece.sep_id]
        segments += [1] * (len(b) + 1)
    out = {k: np.zeros(seq_len, np.int32) for k in ('input_ids', 'input_mask', 'segment_ids')}
    out['input_ids'][: len(ids)] = ids
    out['input_mask'][: len(ids)] = 1
    out['segment_ids'][: len(ids)] = segments
    return out


def load_examples(config) -> tuple[list[dict], list[dict], str]:
    """(train, eval) labelled examples and where they came from."""
    d = config.data
    if d.files:
        train = labelled.read_labelled_text(
            d.files,
            text_field=d.text_field,
            text_pair_field=d.text_pair_field,
            label_field=d.label_field,
            header=d.header,
        )
        where = d.files
        if d.eval_files:
            return (
                train,
                labelled.read_labelled_text(
                    d.eval_files,
                    text_field=d.text_field,
                    text_pair_field=d.text_pair_field,
                    label_field=d.label_field,
                    header=d.header,
                ),
                where,
            )
        train_idx, eval_idx = heldout_indices(len(train), d.eval_fraction)
        if len(eval_idx) == 0 or len(train_idx) == 0:
            raise DataError(
                f'{where}: {len(train)} examples are too few to hold out eval_fraction='
                f'{d.eval_fraction}; give --config.data.eval_files'
            )
        return [train[i] for i in train_idx], [train[i] for i in eval_idx], where
    if d.name == 'pydoc_topics':
        train, test = labelled.pydoc_topics_task()
        return train, test, 'the embedded pydoc_topics task'
    if not d.name:
        raise config_lib.ConfigError(
            'text classification needs data: the embedded --config.data.name=pydoc_topics, '
            'a prepared TFDS dataset by name, or --config.data.files=train.tsv'
        )
    where = f'TFDS {d.name}'
    train = tfds_examples(d, d.train_split)
    if d.eval_split:
        return train, tfds_examples(d, d.eval_split), where
    train_idx, eval_idx = heldout_indices(len(train), d.eval_fraction)
    return [train[i] for i in train_idx], [train[i] for i in eval_idx], where


def tfds_examples(d, split: str) -> list[dict]:
    """A prepared TFDS split (GLUE-style: text, optional pair, label features) read without
    TensorFlow; ClassLabel ids become label strings ('0', '1', ...)."""
    fields = {'text': d.text_field, 'label': d.label_field}
    if d.text_pair_field:
        fields['text_pair'] = d.text_pair_field
    columns = {k: TfdsText(d.name, split, f, d.data_dir) for k, f in fields.items()}
    n = len(columns['text'])
    return [
        {
            'text': columns['text'][i],
            'text_pair': columns['text_pair'][i] if 'text_pair' in columns else '',
            'label': columns['label'][i],
        }
        for i in range(n)
    ]


def make_model(config, num_classes: int) -> TextClassifier:
    dtype = 'bfloat16' if config.precision == 'bfloat16' else 'float32'
    bert = BertConfig.from_config(config.model)
    return TextClassifier(
        BertConfig(**{**bert.__dict__, 'dtype': dtype}),
        num_classes,
        config.model.pooling,
        config.model.head_dropout,
        config.model.zero_init_head,
    )


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    train, evals, where = load_examples(config)
    regression = config.task_type == 'regression'
    label_map = classify.fit_label_map(workdir, [e['label'] for e in train], regression, runtime)
    train_labels = label_map.encode([e['label'] for e in train], where=where)
    eval_labels = label_map.encode([e['label'] for e in evals], where='the eval split')
    picked = classify.subset(train_labels, config, label_map)
    docs = [e['text'] + ' ' + e['text_pair'] for e in train]
    tokenizer = make_tokenizer(config, workdir, docs)
    seq = config.data.seq_len

    def encode(example: dict, label) -> dict:
        return {
            **encode_pair(tokenizer, example['text'], example['text_pair'], seq),
            'label': label,
        }

    train_examples = [encode(train[i], train_labels[i]) for i in picked]
    eval_encoded = [encode(e, y) for e, y in zip(evals, eval_labels)]
    eval_arrays = {k: np.stack([e[k] for e in eval_encoded]) for k in eval_encoded[0]}
    logging.info(
        'data: %s, %d train (of %d) / %d eval examples, %s',
        where,
        len(picked),
        len(train),
        len(evals),
        'regression' if regression else f'{label_map.num_classes} classes',
    )
    model = make_model(config, label_map.num_classes)
    t = config.transfer
    loss_fn = classify.loss_fn_for(model, regression, t.freeze_backbone, lambda b: b)
    predictor = classify.Predictor(model, lambda b: b, classify.eval_batches(eval_arrays, runtime))

    def evaluate(stepper, params) -> dict[str, float]:
        return classify.score(predictor.logits(stepper, params), eval_labels, label_map)

    def predict(stepper, params) -> list[dict]:
        logits = predictor.logits(stepper, params)
        return classify.prediction_rows(logits, eval_labels, label_map)

    example = classify.text_example(seq)
    m = config.model
    return Task(
        name='text_cls',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(
            classify.train_dataset(
                train_examples,
                batch_size=config.batch_size,
                seed=config.seed,
                runtime=runtime,
                prefetch=config.data.prefetch,
            )
        ),
        evaluate=evaluate,
        metric=classify.task_metric(label_map, config),
        flops_per_step=3.0
        * flops_lib.encoder_forward_flops(
            config.batch_size, seq, m.hidden_size, m.num_layers, m.mlp_dim
        ),
        tokens_per_example=seq,
        restore=classify.backbone_restore(config.init_subtree),
        predict=predict,
        summary_extras=lambda final: {'train_examples': len(picked)},
    )
