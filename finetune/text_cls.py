"""Sentence and sentence-pair classification (or regression) with a BERT encoder.

Data (`config.data`): the embedded `pydoc_topics` task (which CPython documentation topic
a paragraph comes from, 13 classes), a prepared TFDS dataset by name (GLUE-style features
`data.text_field`, `data.text_pair_field`, `data.label_field`; splits `data.train_split`,
`data.eval_split`), or local `.tsv` / `.csv` / `.jsonl` files
(`data.files`; columns `data.text_field`, `data.text_pair_field`, `data.label_field`).

Three splits: training; validation (`data.eval_files` / `data.eval_split`, else
`data.eval_fraction` of each class of the training examples, by seed), which the eval rows
score; test (`data.test_files` / `data.test_split`; pydoc_topics ships a fixed 30%), read
and scored once, after training, on the checkpoint validation selected. Labels are mapped
from the training examples (WORKDIR/labels.json); an unknown label elsewhere is an error.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from core import config as config_lib
from core.task import InitFrom, Runtime, Scorer, Task, compute_dtype
from data import labelled
from data.tokenizer import WordPiece, make_tokenizer
from finetune import classify, distill
from models.bert import BertConfig
from models.classifier import TextClassifier


def check_config(config: ml_collections.ConfigDict) -> None:
    if 'distill' in config:
        if not config.teacher:
            raise config_lib.ConfigError(
                'a distillation run needs its teacher: --config.teacher=WORKDIR, a finished '
                'text_cls run (python launch.py finetune --config configs/text_cls.py ...)'
            )
        distill.check_config(config)
    d = config.data
    if d.get('test_files') or d.get('test_split'):
        if not d.files and d.name == 'pydoc_topics':
            raise config_lib.ConfigError(
                'data.name=pydoc_topics ships its own test split (30% of the paragraphs); '
                'leave data.test_files and data.test_split empty, or give your own data with '
                '--config.data.files'
            )
        if d.files and d.get('test_split'):
            raise config_lib.ConfigError(
                f'data.test_split={d.test_split!r} names a TFDS split, and this run reads '
                'local files; give the test file as --config.data.test_files'
            )
        if d.get('test_files'):
            labelled.match_files(d.test_files)  # there (not read before the end of training)
    if not 8 <= config.data.seq_len <= config.model.max_len:
        raise config_lib.ConfigError(
            f'data.seq_len {config.data.seq_len} must be in [8, model.max_len = '
            f'{config.model.max_len}]'
        )
    if config.model.pooling not in ('cls', 'mean', 'pooler'):
        raise config_lib.ConfigError(
            f'model.pooling={config.model.pooling!r}; expected cls, mean or pooler'
        )
    if config.model.pooling == 'pooler' and not config.model.pooler:
        raise config_lib.ConfigError(
            "model.pooling=pooler reads BERT's pooler, and this encoder has none "
            '(model.pooler=false); use --config.model.pooling=cls or mean'
        )


def follow_start(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """A distilled student reads its teacher's token ids (core/trainer.py follow_start)."""
    if config.get('teacher'):
        distill.adopt_vocabulary(config, distill.teacher_of(config, 'text_cls', workdir))


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


def make_model(config, num_classes: int) -> TextClassifier:
    return TextClassifier(
        BertConfig.from_config(config.model, dtype=compute_dtype(config)),
        num_classes,
        config.model.pooling,
        config.model.head_dropout,
        config.model.zero_init_head,
    )


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    train, validation, load_test, where = labelled.text_task_splits(config.data)
    regression = config.task_type == 'regression'
    label_map = classify.fit_label_map(workdir, [e['label'] for e in train], regression, runtime)
    train_labels = label_map.encode([e['label'] for e in train], where=where)
    if validation is None:
        train_idx, val_idx = labelled.carve_validation(train_labels, config, not regression, where)
        validation = [train[i] for i in val_idx]
        train, train_labels = [train[i] for i in train_idx], train_labels[train_idx]
    eval_labels = label_map.encode([e['label'] for e in validation], where='the validation split')
    picked = classify.subset(train_labels, config, label_map)
    docs = [e['text'] + ' ' + e['text_pair'] for e in train]
    tokenizer = make_tokenizer(config, workdir, docs)
    seq = config.data.seq_len

    def encode(example: dict, label) -> dict:
        return {
            **encode_pair(tokenizer, example['text'], example['text_pair'], seq),
            'label': label,
        }

    def arrays(examples: list[dict], labels: np.ndarray) -> dict[str, np.ndarray]:
        encoded = [encode(e, y) for e, y in zip(examples, labels)]
        return {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}

    train_examples = [encode(train[i], train_labels[i]) for i in picked]
    teacher = distill.teacher_of(config, 'text_cls', workdir) if config.get('teacher') else None
    if teacher is not None:
        distill.record_teacher(teacher, workdir)
        train_examples = distill.training_examples(
            config, teacher, label_map, train, train_labels, picked, encode
        )
        if config.data.get('unlabelled_files'):
            held_out = validation + (load_test() if load_test else [])
            train_examples += distill.unlabelled_file_examples(
                config,
                encode,
                np.zeros((), train_labels.dtype),
                {distill.normalise(e['text']) for e in held_out},
            )
    logging.info(
        'data: %s, %d train (of %d) / %d validation examples, %s; %s',
        where,
        len(picked),
        len(train),
        len(validation),
        'regression' if regression else f'{label_map.num_classes} classes',
        'a test split scored at the end' if load_test else 'no test split',
    )
    model = make_model(config, label_map.num_classes)
    example = classify.text_example(seq)
    t = config.transfer
    loss_fn = classify.loss_fn_for(model, regression, t.freeze_backbone, lambda b: b)
    init_params = lambda rng: model.init(rng, example)['params']  # noqa: E731
    frozen, extras = None, {}
    flops = classify.encoder_train_flops(config, seq)
    if teacher is not None:
        teacher_model = make_model(
            ml_collections.ConfigDict(
                {'model': teacher.config.model, 'precision': config.precision}
            ),
            label_map.num_classes,
        )
        d = config.distill
        cached = bool(d.get('cache_teacher'))
        hidden = distill.hidden_matching(config, teacher.config)
        if cached:  # the teacher's logits of every training example, once, in the workdir
            logits = distill.cached_teacher_logits(
                teacher, teacher_model, train_examples, config.batch_size, workdir
            )
            for e, row in zip(train_examples, logits, strict=True):
                e[distill.CACHED] = row
        loss_fn = distill.loss_fn_for(
            model, teacher_model, d.temperature, d.alpha, t.freeze_backbone, lambda b: b, hidden
        )
        states = jnp.zeros((1, seq, config.model.hidden_size), jnp.float32)
        init_params = distill.init_with_teacher(
            init_params, teacher_model, example, hidden, states, inside=not cached
        )

        if not cached:
            # The teacher's forward pass runs in every step: a third of its training FLOPs.
            teacher_run = ml_collections.ConfigDict(
                {'model': teacher.config.model, 'batch_size': config.batch_size}
            )
            flops += classify.encoder_train_flops(teacher_run, seq) / 3.0
            frozen = distill.restore_teacher(teacher)
        extras = {
            **distill.summary_extras(teacher, teacher_model, model, example),
            'teacher_cached': cached,
        }
        logging.info('distilling %s (step %d) into this run', teacher.workdir, teacher.step)

    def scorer(examples: list[dict], labels: np.ndarray) -> Scorer:
        batches = classify.eval_batches(arrays(examples, labels), runtime)
        return classify.scorer(classify.Predictor(model, lambda b: b, batches), labels, label_map)

    def test() -> Scorer:
        examples = load_test()
        labels = label_map.encode([e['label'] for e in examples], where='the test split')
        logging.info('test: %d examples', len(examples))
        return scorer(examples, labels)

    val = scorer(validation, eval_labels)
    return Task(
        name='text_cls',
        model=model,
        init_params=init_params,
        loss_fn=loss_fn,
        train_iter=iter(classify.train_dataset(train_examples, config, runtime)),
        evaluate=val.evaluate,
        metric=classify.task_metric(label_map, config),
        flops_per_step=flops,
        tokens_per_example=seq,
        init_from=InitFrom({'backbone': config.init_subtree}),
        predict=val.predict,
        test=test if load_test is not None else None,
        summary_extras=lambda final: {'train_examples': len(picked), **extras},
        frozen=frozen,
    )
