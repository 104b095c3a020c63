"""BERT masked-language modelling as a pretraining task: the corpus, the WordPiece
vocabulary, masking, `BertForMlm` and its masked-token evaluation."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from core import config as config_lib
from core import flops as flops_lib
from core.task import InitFrom, Runtime, Task, compute_dtype
from data import labelled, pipeline, shards, text
from data.tokenizer import make_tokenizer
from finetune import distill
from models.bert import BertConfig, BertForMlm
from pretrain.losses import mlm_loss_fn


def check_config(config: ml_collections.ConfigDict) -> None:
    """MLM-specific checks (after the shared ones), before any data is read."""
    d, m = config.data, config.model
    if d.seq_len > m.max_len:
        raise config_lib.ConfigError(
            f'data.seq_len {d.seq_len} exceeds the position table model.max_len {m.max_len}; '
            'lower data.seq_len or raise model.max_len'
        )
    if d.seq_len < 8:
        raise config_lib.ConfigError(f'data.seq_len {d.seq_len} is too short (minimum 8)')
    if not 0 < d.max_predictions <= d.seq_len - 2:
        raise config_lib.ConfigError(
            f'data.max_predictions {d.max_predictions} must be in [1, seq_len - 2 = '
            f'{d.seq_len - 2}]'
        )
    if not 0.0 < d.mask_prob < 1.0:
        raise config_lib.ConfigError(f'data.mask_prob {d.mask_prob} must be in (0, 1)')
    if 'distill' in config:
        check_distillation(config)


def follow_start(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """MLM distillation (configs/distill.py:mlm_*): the student reads its teacher's token
    ids (core/trainer.py follow_start), and a teacher whose MLM head is untrained is
    refused for its predictions."""
    if not config.get('teacher'):
        return
    teacher = distill.teacher_of(config, 'mlm', workdir)
    distill.adopt_vocabulary(config, teacher)
    if teacher.fresh_head and config.distill.alpha > 0:
        raise config_lib.ConfigError(
            f'the teacher {config.teacher} has an untrained MLM head (import-hf initialised it: '
            'the checkpoint had none), so its masked-token predictions say nothing: distil its '
            'hidden states alone (--config.distill.alpha=0 --config.distill.hidden_weight=1), '
            'or continue its MLM first (configs/dapt.py, or bert_mlm.py with init_from)'
        )


def check_distillation(config: ml_collections.ConfigDict) -> None:
    """The teacher of MLM distillation: given, and with something to learn from it (its
    predictions or its hidden states; whether its MLM head is trained is checked where the
    teacher is read, `follow_start`)."""
    if not config.get('teacher'):
        raise config_lib.ConfigError(
            'MLM distillation needs its teacher: --config.teacher=WORKDIR, a finished MLM run '
            '(python launch.py pretrain --config configs/bert_mlm.py ...) or an import-hf workdir'
        )
    if config.distill.alpha == 0 and config.distill.hidden_weight == 0:
        raise config_lib.ConfigError(
            'distill.alpha=0 and distill.hidden_weight=0 leave nothing of the teacher to learn: '
            'give distill.alpha > 0 (its predictions) or distill.hidden_weight > 0 (its states)'
        )


def make_model(config) -> BertForMlm:
    return BertForMlm(BertConfig.from_config(config.model, dtype=compute_dtype(config)))


def dummy_batch(config, batch: int = 1) -> dict[str, jax.Array]:
    seq, pred = config.data.seq_len, config.data.max_predictions
    return {
        'input_ids': jnp.zeros((batch, seq), jnp.int32),
        'input_mask': jnp.ones((batch, seq), jnp.int32),
        'segment_ids': jnp.zeros((batch, seq), jnp.int32),
        'masked_positions': jnp.zeros((batch, pred), jnp.int32),
        'masked_ids': jnp.zeros((batch, pred), jnp.int32),
        'masked_weights': jnp.zeros((batch, pred), jnp.float32),
    }


def eval_batches(config, eval_docs, tokenizer, spec, per_host_batch: int) -> list[dict]:
    """A fixed list of eval batches (the same every eval): `eval_steps` batches, each host
    reading its own shard of the held-out documents, short ones padded with zero weight."""
    ds = pipeline.mlm_dataset(
        eval_docs,
        tokenizer,
        spec,
        batch_size=per_host_batch,
        seed=config.seed + 1,
        train=False,
        prefetch=0,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    batches = []
    for batch in ds:
        batches.append(pipeline.pad_batch(batch, per_host_batch))
        if len(batches) == config.eval_steps:
            break
    empty = pipeline.pad_batch({k: v[:0] for k, v in batches[0].items()}, per_host_batch)
    while len(batches) < config.eval_steps:  # every host runs the same number of steps
        batches.append(empty)
    return batches


def evaluate(stepper, params, batches, baseline_token: int) -> dict[str, float]:
    totals = None
    for batch in batches:
        sums = stepper.evaluate(params, stepper.put_batch(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    denominator = max(float(totals.pop('denominator')), 1e-8)
    result = {k: float(v) / denominator for k, v in totals.items()}
    # mlm_loss: the masked tokens' cross-entropy, as in every MLM run (a distilled run's
    # label_loss); a distilled run's objective (soft, hard and hidden terms): distill_loss.
    loss = result.pop('loss')
    if 'label_loss' in result:
        result['distill_loss'], loss = loss, result.pop('label_loss')
    result['mlm_loss'] = loss
    # The same baseline on every host's batches, summed over hosts for the global figure.
    hits = sum(
        float(((b['masked_ids'] == baseline_token) * b['masked_weights']).sum()) for b in batches
    )
    weight = sum(float(b['masked_weights'].sum()) for b in batches)
    if jax.process_count() > 1:
        hits, weight = multihost_utils.process_allgather(np.array([hits, weight])).sum(0)
    result['most_frequent_token_accuracy'] = float(hits) / max(float(weight), 1e-8)
    return result


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    if config.data.get('task_text'):  # configs/dapt.py: a labelled task's own text
        train_docs, eval_docs, where = labelled.task_texts(config)
        logging.info('data: the training text of %s; its validation text held out', where)
    else:
        train_docs, eval_docs = text.load_corpus(config.data)
    tokenizer = make_tokenizer(config, workdir, train_docs)
    spec = pipeline.masking_spec(tokenizer, config.data)
    train_ds = shards.training_stream(
        functools.partial(pipeline.mlm_dataset, train_docs, tokenizer, spec),
        config,
        runtime,
    )
    baseline_token = pipeline.most_frequent_token(train_docs, tokenizer)
    evals = eval_batches(config, eval_docs, tokenizer, spec, runtime.per_host_batch)
    logging.info(
        'data: %d train / %d eval documents, vocab %d, most frequent token %r',
        len(train_docs),
        len(eval_docs),
        tokenizer.vocab_size,
        tokenizer.decode([baseline_token]),
    )
    model = make_model(config)
    example = dummy_batch(config)
    m = config.model
    init_params = lambda rng: model.init(rng, example)['params']  # noqa: E731
    loss_fn = mlm_loss_fn(model)
    flops = flops_lib.mlm_train_flops(
        config.batch_size,
        config.data.seq_len,
        config.data.max_predictions,
        m.hidden_size,
        m.num_layers,
        m.mlp_dim,
        m.vocab_size,
    )
    frozen, extras = None, {}
    if config.get('teacher'):
        teacher = distill.teacher_of(config, 'mlm', workdir)
        distill.record_teacher(teacher, workdir)
        teacher_model = make_model(
            ml_collections.ConfigDict(
                {'model': teacher.config.model, 'precision': config.precision}
            )
        )
        d = config.distill
        hidden = distill.hidden_matching(config, teacher.config)
        loss_fn = distill.mlm_loss_fn_for(model, teacher_model, d.temperature, d.alpha, hidden)
        states = jnp.zeros((1, config.data.seq_len, m.hidden_size), jnp.float32)
        init_params = distill.init_with_teacher(init_params, teacher_model, example, hidden, states)

        t = teacher.config.model
        # The teacher's forward pass runs in every step: a third of its training FLOPs.
        flops += (
            flops_lib.mlm_train_flops(
                config.batch_size,
                config.data.seq_len,
                config.data.max_predictions,
                t.hidden_size,
                t.num_layers,
                t.mlp_dim,
                t.vocab_size,
            )
            / 3.0
        )
        frozen = distill.restore_teacher(teacher)
        extras = distill.summary_extras(teacher, teacher_model, model, example)
        logging.info('distilling %s (step %d) into this MLM run', teacher.workdir, teacher.step)
    return Task(
        name='mlm',
        model=model,
        init_params=init_params,
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=lambda stepper, params: evaluate(stepper, params, evals, baseline_token),
        metric='mlm_accuracy',
        flops_per_step=flops,
        tokens_per_example=config.data.seq_len,
        summary_extras=lambda final: {
            'most_frequent_token_accuracy': final['most_frequent_token_accuracy'],
            **extras,
        },
        frozen=frozen,
        # init_from restores the student's params of an MLM run (or of a distilled one's
        # student); a teacher and projection are this run's own.
        init_from=InitFrom(besides=(distill.TEACHER, distill.PROJECTION)),
    )
