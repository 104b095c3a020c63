"""MLM pretraining, top to bottom: config -> mesh -> data -> model -> state -> restore ->
loop (log, eval, checkpoint) -> final eval and summary."""

import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from core import checkpoint as ckpt_lib
from core import config as config_lib
from core import flops as flops_lib
from core import metrics as metrics_lib
from core import optim
from core import sharding as sharding_lib
from core import step as step_lib
from core import train_state as state_lib
from core.errors import UserError
from core.watchdog import Watchdog
from data import pipeline, text
from data.tokenizer import WordPiece, train_wordpiece
from models.bert import BertConfig, BertForMlm
from pretrain.losses import mlm_loss_fn


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or Inf; the message gives the step range."""


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_config(config: ml_collections.ConfigDict) -> None:
    """MLM-specific checks (after the shared ones), before any data is read."""
    config_lib.check_common(config)
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


def make_tokenizer(config, workdir: str, train_docs) -> WordPiece:
    """The run's vocabulary, saved as WORKDIR/vocab.txt. In order: the workdir's own (a
    resumed run), `data.vocab_file`, the `init_from` run's, or one trained on the corpus."""
    target = os.path.join(workdir, 'vocab.txt')
    lowercase = config.data.lowercase
    if jax.process_index() == 0 and not os.path.isfile(target):
        init_vocab = os.path.join(config.init_from, 'vocab.txt') if config.init_from else ''
        if config.data.vocab_file:
            WordPiece(config.data.vocab_file, lowercase)  # fails clearly if unusable
            shutil.copyfile(config.data.vocab_file, target)
        elif init_vocab and os.path.isfile(init_vocab):
            shutil.copyfile(init_vocab, target)
        else:
            logging.info('training a %d-token WordPiece vocabulary', config.model.vocab_size)
            train_wordpiece(
                (train_docs[i] for i in range(len(train_docs))),
                config.model.vocab_size,
                target,
                lowercase,
            )
    _sync('vocab')
    tokenizer = WordPiece(target, lowercase)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise config_lib.ConfigError(
            f'the vocabulary {target} has {tokenizer.vocab_size} tokens but model.vocab_size is '
            f'{config.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} '
            '(or larger)'
        )
    return tokenizer


def make_model(config) -> BertForMlm:
    cfg = BertConfig.from_config(config.model)
    dtype = 'bfloat16' if config.precision == 'bfloat16' else 'float32'
    return BertForMlm(BertConfig(**{**cfg.__dict__, 'dtype': dtype}))


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
    result['mlm_loss'] = result.pop('loss')
    # The same baseline on every host's batches, summed over hosts for the global figure.
    hits = sum(
        float(((b['masked_ids'] == baseline_token) * b['masked_weights']).sum()) for b in batches
    )
    weight = sum(float(b['masked_weights'].sum()) for b in batches)
    if jax.process_count() > 1:
        hits, weight = multihost_utils.process_allgather(np.array([hits, weight])).sum(0)
    result['most_frequent_token_accuracy'] = float(hits) / max(float(weight), 1e-8)
    return result


def _read_summary(workdir: str) -> dict:
    path = os.path.join(workdir, 'summary.json')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) MLM pretraining in `workdir`; returns the summary."""
    started = time.time()
    check_config(config)
    is_main = jax.process_index() == 0

    # Mesh and step wrapping.
    if config.parallelism == 'pmap':
        if config.mesh.fsdp != 1 or config.mesh.tensor != 1:
            raise config_lib.ConfigError(
                'parallelism=pmap is data parallel only; set mesh.fsdp=1 and mesh.tensor=1, '
                'or use parallelism=jit for fsdp/tensor sharding'
            )
        mesh = sharding_lib.make_mesh(devices=jax.local_devices()[:1])  # state built here
        batch_shards = jax.device_count()
    else:
        try:
            mesh = sharding_lib.mesh_from_config(config)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from e
        batch_shards = sharding_lib.batch_shards(mesh)
    config_lib.check_batch_layout(config, jax.device_count(), batch_shards, jax.process_count())
    config_lib.prepare_workdir(config, workdir, is_main)
    _sync('workdir')

    # Data.
    train_docs, eval_docs = text.load_corpus(config.data)
    tokenizer = make_tokenizer(config, workdir, train_docs)
    spec = pipeline.masking_spec(tokenizer, config.data)
    per_host_batch = config.batch_size // jax.process_count()
    train_ds = pipeline.mlm_dataset(
        train_docs,
        tokenizer,
        spec,
        batch_size=per_host_batch,
        seed=config.seed,
        prefetch=config.data.prefetch,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    train_iter = iter(train_ds)
    baseline_token = pipeline.most_frequent_token(train_docs, tokenizer)
    evals = eval_batches(config, eval_docs, tokenizer, spec, per_host_batch)
    logging.info(
        'data: %d train / %d eval documents, vocab %d, most frequent token %r',
        len(train_docs),
        len(eval_docs),
        tokenizer.vocab_size,
        tokenizer.decode([baseline_token]),
    )

    # Model, optimizer and state.
    model = make_model(config)
    tx, schedule = optim.make_optimizer(config)
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    example = dummy_batch(config)

    def init_params(r):
        return model.init(r, example)['params']

    loss_fn = mlm_loss_fn(model)
    shardings = state_lib.state_shardings(init_params, tx, mesh, init_rng)
    if config.parallelism == 'pmap':
        stepper = step_lib.PmapStepper(loss_fn, tx, schedule, config.grad_accum_steps)
    else:
        stepper = step_lib.JitStepper(
            mesh, shardings, loss_fn, tx, schedule, config.grad_accum_steps
        )

    # How the run starts, in order: this workdir's own checkpoint (resume); else init_from
    # (continued pretraining, params only); else from scratch.
    checkpointer = ckpt_lib.Checkpointer(
        workdir, every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    start_step = checkpointer.latest_step()
    if start_step is not None:
        abstract = state_lib.abstract_state(init_params, tx, mesh, init_rng)
        state = checkpointer.restore(start_step, abstract, train_iter)
        writer.truncate_after(start_step)
        logging.info('resumed from %s/%d', checkpointer.directory, start_step)
    else:
        start_step = 0
        state, _ = state_lib.create_sharded_state(init_params, tx, mesh, init_rng)
        if config.init_from:
            abstract = state_lib.abstract_state(init_params, tx, mesh, init_rng)
            params, from_step = ckpt_lib.restore_params(config.init_from, abstract.params)
            state = state.replace(params=params)
            logging.info('initialised params from %s (step %d)', config.init_from, from_step)
    num_params = state_lib.count_params(state.params)
    logging.info(
        'model: %.2fM parameters; mesh %s; %s over %d devices, %d processes',
        num_params / 1e6,
        dict(mesh.shape),
        config.parallelism,
        jax.device_count(),
        jax.process_count(),
    )
    if start_step >= config.total_steps:
        logging.info('the run in %s is already complete (step %d)', workdir, start_step)
        checkpointer.close()
        return _read_summary(workdir)
    state = stepper.put_state(state)

    m = config.model
    flops_per_step = flops_lib.mlm_train_flops(
        config.batch_size,
        config.data.seq_len,
        config.data.max_predictions,
        m.hidden_size,
        m.num_layers,
        m.mlp_dim,
        m.vocab_size,
    )
    peak = flops_lib.peak_flops_per_device(config.peak_tflops)

    eval_history = []

    def run_eval(step: int) -> None:
        result = evaluate(stepper, state.params, evals, baseline_token)
        writer.write(step, 'eval', result)
        eval_history.append({'step': step, **result})
        logging.info(
            'eval step %d | %s', step, ' | '.join(f'{k} {v:.4f}' for k, v in result.items())
        )

    if start_step == 0:
        run_eval(0)  # every run shows its own starting point

    # SIGTERM (preemption): finish the step, save, exit 0.
    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    watchdog = Watchdog(config.watchdog_secs)
    progress = metrics_lib.Progress(start_step, config.total_steps)
    pending: list[dict] = []  # device metrics of the steps since the last log row
    last_logged = start_step
    step = start_step

    def flush_metrics(step: int) -> None:
        nonlocal pending, last_logged
        if not pending:
            return
        host = jax.device_get(pending)
        rows = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        if not all(np.isfinite(h['loss']) for h in host):
            bad = last_logged + next(i for i, h in enumerate(host) if not np.isfinite(h['loss']))
            raise NonFiniteLossError(
                f'the loss became non-finite at step {bad + 1} (steps {last_logged + 1}-{step} '
                f'checked); the last good checkpoint is step {checkpointer.latest_step()}. '
                'Lower learning_rate, raise warmup_steps or check the data'
            )
        per_step, eta = progress.update(step)
        rows['examples_per_sec'] = config.batch_size / per_step
        rows['tokens_per_sec'] = config.batch_size * config.data.seq_len / per_step
        rows['step_time_ms'] = per_step * 1e3
        if peak:
            rows['mfu'] = flops_per_step / per_step / (peak * jax.device_count())
        writer.write(step, 'train', rows)
        progress.log(step, rows, eta)
        pending, last_logged = [], step

    try:
        for step in range(start_step + 1, config.total_steps + 1):
            batch = stepper.put_batch(next(train_iter))
            state, metrics = stepper.train(state, batch, dropout_rng)
            pending.append(metrics)
            if step == start_step + 1:  # leave compilation out of the throughput
                jax.block_until_ready(metrics)
                progress.update(step)
                logging.info('first step done (compiled) after %.1fs', time.time() - started)
            watchdog.ping()
            due_save = step % config.checkpoint_every == 0 or step == config.total_steps
            if step % config.log_every == 0 or due_save or preempted:
                flush_metrics(step)  # also guards checkpoints against a non-finite state
            if step % config.eval_every == 0 or step == config.total_steps:
                run_eval(step)
            if due_save or preempted:
                checkpointer.save(
                    step,
                    stepper.get_state(state),
                    train_iter,
                    config,
                    force=bool(preempted) or step == config.total_steps,
                )
            if preempted:
                logging.warning('SIGTERM: saved step %d; exiting to be restarted', step)
                break
    finally:
        watchdog.stop()
        checkpointer.close()
        signal.signal(signal.SIGTERM, previous_handler)
        if hasattr(train_iter, 'close'):
            train_iter.close()

    summary = {
        'stage': 'pretrain',
        'task': 'mlm',
        'steps': int(step),
        'completed': not preempted and step == config.total_steps,
        'num_params': num_params,
        'flops_per_step': flops_per_step,
        'wall_time_sec': time.time() - started,
    }
    if eval_history:
        final, best = eval_history[-1], max(eval_history, key=lambda r: r['mlm_accuracy'])
        summary.update(
            final_mlm_accuracy=final['mlm_accuracy'],
            final_mlm_loss=final['mlm_loss'],
            best_mlm_accuracy=best['mlm_accuracy'],
            best_step=best['step'],
            most_frequent_token_accuracy=final['most_frequent_token_accuracy'],
        )
    if not preempted:
        writer.write_summary(summary)
    writer.close()
    return summary
