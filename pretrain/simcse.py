"""Unsupervised SimCSE (Gao et al. 2021) as a pretraining task: every sentence is encoded
twice with different dropout masks, and each encoding must find its twin among the
global batch (InfoNCE at temperature 0.05). The encoder is the MLM task's BERT, so a text
encoder can be pretrained by MLM, by SimCSE, or by MLM then SimCSE (`init_from` an MLM
run: its backbone and vocabulary carry over).

Evaluated by k-NN and a linear probe on frozen features of a labelled text task built from
the same embedded source: which CPython documentation topic a paragraph comes from
(`data.text.pydoc_topic_paragraphs`, 13 topics), on that task's training paragraphs only
(its test split is left to fine-tuning). The embedded corpora hold none of the task's
paragraphs (data/text.py), so the sentences SimCSE trains on are not the probe's."""

import functools

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from core import config as config_lib
from core import evaluators
from core import flops as flops_lib
from core.task import InitFrom, Runtime, Task, compute_dtype
from data import labelled, pipeline, shards, text
from data.text import heldout_indices
from data.tokenizer import FixedLengthEncoder, make_tokenizer
from models.bert import BertConfig
from models.contrastive import SimCseModel
from models.encoder import example_rows
from pretrain import contrastive


def check_config(config: ml_collections.ConfigDict) -> None:
    if not 4 <= config.data.seq_len <= config.model.max_len:
        raise config_lib.ConfigError(
            f'data.seq_len {config.data.seq_len} must be in [4, model.max_len = '
            f'{config.model.max_len}]'
        )
    if config.model.dropout_rate <= 0:
        raise config_lib.ConfigError(
            'SimCSE makes its two views with dropout: model.dropout_rate must be above 0 '
            f"(found {config.model.dropout_rate}); 0.1 is the paper's value"
        )
    if config.model.pooling not in ('cls', 'mean'):
        raise config_lib.ConfigError(
            f'model.pooling={config.model.pooling!r}; expected cls or mean'
        )


def make_model(config) -> SimCseModel:
    m = config.model
    return SimCseModel(
        BertConfig.from_config(m, dtype=compute_dtype(config)),
        m.pooling,
        m.proj_hidden,
        m.proj_dim,
        m.proj_layers,
    )


def simcse_loss_fn(model: SimCseModel, temperature: float, runtime: Runtime):
    """loss_fn(params, batch, rng, train, rows): batch input_ids / input_mask [batch, length]."""

    def local(z1, z2, axis_name):
        return contrastive.clip_softmax(z1, z2, 1.0 / temperature, axis_name)

    loss = contrastive.global_loss(local, runtime, 2)

    def loss_fn(params, batch, rng, train: bool, rows=None):
        del train  # dropout makes the views, so it is on in eval too (with the eval rng)
        twice = {k: jnp.concatenate([batch[k], batch[k]]) for k in ('input_ids', 'input_mask')}
        n = batch['input_ids'].shape[0]
        # One forward pass over [batch; batch]: each copy of a sentence its own dropout masks.
        view_rows = contrastive.view_rows(example_rows(rows, n))
        z = model.apply({'params': params}, twice, False, view_rows, rngs={'dropout': rng})
        z = contrastive.l2_normalize(z)
        sums = loss(z[:n], z[n:])
        return sums['loss'], {'accuracy': sums['i2t_accuracy'], 'denominator': sums['count']}

    return loss_fn


PROBE_SCORE_FRACTION = 0.3


def topic_probe_indices() -> tuple[np.ndarray, np.ndarray]:
    """(fit, score) indices into `data.text.pydoc_topic_paragraphs` of the topic probe: both
    inside the pydoc_topics task's training split (data/labelled.py:pydoc_topics_task), a
    fixed 30% of each topic scoring a probe fitted on the rest. The probe picks
    checkpoints, so it never reads the task's test split."""
    texts, labels, _ = text.pydoc_topic_paragraphs()
    pool, _ = heldout_indices(len(texts), labelled.PYDOC_TOPICS_TEST_FRACTION)
    fit, score = labelled.validation_split(labels[pool], PROBE_SCORE_FRACTION, seed=0)
    return pool[fit], pool[score]


def topic_probe(model, tokenize: FixedLengthEncoder, runtime: Runtime, config):
    """k-NN / linear probe on the pydoc topic task's training paragraphs (`topic_probe_indices`:
    70% of each topic fit, 30% score; the task's test paragraphs are never read)."""
    texts, labels, names = text.pydoc_topic_paragraphs()
    fit_idx, score_idx = topic_probe_indices()
    ids = np.stack([tokenize(t) for t in texts])

    def arrays(idx):
        return {
            'input_ids': ids[idx],
            'input_mask': (ids[idx] != 0).astype(np.int32),
            'label': labels[idx],
        }

    logging.info(
        "probe: pydoc topics, %d classes, %d fit / %d scored paragraphs (of the task's "
        'training split)',
        len(names),
        len(fit_idx),
        len(score_idx),
    )
    return evaluators.FeatureProbe(
        lambda params, batch: model.apply({'params': params}, batch, method='features'),
        evaluators.array_batches(arrays(fit_idx), runtime),
        evaluators.array_batches(arrays(score_idx), runtime),
        num_classes=len(names),
        knn_k=config.eval.knn_k,
        knn_temperature=config.eval.knn_temperature,
        probe_l2=config.eval.probe_l2 or None,
    )


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    train_docs, eval_docs = text.load_corpus(config.data)
    train_sents, eval_sents = text.sentences(train_docs), text.sentences(eval_docs)
    tokenizer = make_tokenizer(config, workdir, train_docs)
    tokenize = FixedLengthEncoder(tokenizer, config.data.seq_len)
    train_ds = shards.training_stream(
        functools.partial(pipeline.sentence_dataset, train_sents, tokenize),
        config,
        runtime,
    )
    model = make_model(config)
    loss_fn = simcse_loss_fn(model, config.loss.temperature, runtime)
    loss_batches = evaluators.fixed_batches(
        lambda **kw: pipeline.sentence_dataset(eval_sents, tokenize, **kw),
        len(eval_sents),
        runtime,
        full_only=True,
    )[: config.eval_steps]
    probe = topic_probe(model, tokenize, runtime, config) if config.eval.topic_probe else None

    logging.info(
        'data: %d train / %d eval sentences, vocab %d',
        len(train_sents),
        len(eval_sents),
        tokenizer.vocab_size,
    )
    seq, m = config.data.seq_len, config.model
    example = {
        'input_ids': jnp.zeros((1, seq), jnp.int32),
        'input_mask': jnp.ones((1, seq), jnp.int32),
    }
    return Task(
        name='simcse',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=evaluators.contrastive_evaluate(loss_batches, probe),
        metric='linear_probe_accuracy' if probe is not None else 'contrastive_accuracy',
        flops_per_step=3.0
        * flops_lib.encoder_forward_flops(
            2 * config.batch_size, seq, m.hidden_size, m.num_layers, m.mlp_dim
        ),
        tokens_per_example=2 * seq,
        init_from=InitFrom({'backbone': 'backbone'}),
    )
