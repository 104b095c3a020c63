"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023) as a pretraining task: an image
tower and a text tower trained on image-caption pairs, with the softmax (CLIP) or the
sigmoid (SigLIP) loss over the global batch; evaluated by image<->text retrieval on the
held-out pairs."""

import functools

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from core import config as config_lib
from core import evaluators
from core import flops as flops_lib
from core.task import Runtime, Task, compute_dtype
from data import image_sources, image_splits, pipeline, shards
from data.tokenizer import make_tokenizer
from models.bert import BertConfig
from models.contrastive import TwoTower
from models.vit import VitConfig
from pretrain import contrastive

LOSSES = ('softmax', 'sigmoid')


def check_config(config: ml_collections.ConfigDict) -> None:
    config_lib.check_vit(config.model)
    t = config.model.text  # its width and heads: core/config.py check_common
    if config.loss.type not in LOSSES:
        raise config_lib.ConfigError(f'--config.loss.type={config.loss.type!r}; expected {LOSSES}')
    if not 4 <= config.data.seq_len <= t.max_len:
        raise config_lib.ConfigError(
            f'data.seq_len {config.data.seq_len} must be in [4, model.text.max_len = {t.max_len}]'
        )


def make_model(config) -> TwoTower:
    dtype = compute_dtype(config)
    return TwoTower(
        VitConfig.from_config(config.model, dtype=dtype),
        BertConfig.from_config(config.model.text, dtype=dtype),
        embed_dim=config.model.embed_dim,
        text_pooling=config.model.text.pooling,
        init_logit_scale=float(np.log(config.loss.init_scale)),
        init_logit_bias=config.loss.init_bias,
        max_logit_scale=config.loss.max_logit_scale,
        max_abs_logit_bias=config.loss.max_abs_logit_bias,
    )


def clip_loss_fn(model: TwoTower, loss_type: str, runtime: Runtime):
    """loss_fn(params, batch, rng, train, rows): batch image uint8 [batch, S, S, C], input_ids and
    input_mask [batch, length]."""
    if loss_type == 'softmax':

        def local(img, txt, scale, bias, axis_name):
            del bias
            return contrastive.clip_softmax(img, txt, scale, axis_name)
    else:
        local = contrastive.sigmoid_loss
    loss = contrastive.global_loss(local, runtime, 2)

    def loss_fn(params, batch, rng, train: bool, rows=None):
        inputs = dict(batch, image=batch['image'].astype(jnp.float32) / 255.0)
        img, txt, scale, bias = model.apply(
            {'params': params}, inputs, not train, rows, rngs={'dropout': rng}
        )
        sums = loss(contrastive.l2_normalize(img), contrastive.l2_normalize(txt), scale, bias)
        count = sums['count']
        metrics = {'denominator': count, 'scale': scale * count, 'bias': bias * count}
        metrics.update({k: v for k, v in sums.items() if k.endswith('accuracy')})
        return sums['loss'], metrics

    return loss_fn


def retrieval_recall(img: np.ndarray, txt: np.ndarray, caption_ids: np.ndarray) -> dict[str, float]:
    """Recall@1 both ways over N held-out pairs (embeddings l2-normalised, [N, dim]).

    A hit is a retrieved caption (or image) whose caption is the query's own caption word
    for word: generated captions repeat, and a caption identical to the true one is as
    right as the true one. `chance` is what a random pick scores under the same rule.
    """
    sims = img @ txt.T  # [N images, N captions]
    same = np.all(caption_ids[:, None, :] == caption_ids[None, :, :], axis=-1)  # [N, N]
    rows = np.arange(len(img))
    i2t = same[rows, np.argmax(sims, axis=1)]
    t2i = same[rows, np.argmax(sims, axis=0)]
    return {
        'i2t_recall_at_1': float(i2t.mean()),
        't2i_recall_at_1': float(t2i.mean()),
        'recall_at_1_chance': float(same.mean(axis=1).mean()),
    }


class RetrievalEval:
    """Embeds every held-out pair (at most `limit`) with both towers and scores recall@1."""

    def __init__(self, model: TwoTower, source, tokenize, runtime: Runtime, limit: int):
        source = image_sources.probe_subset(source, limit)
        self.batches = evaluators.fixed_batches(
            lambda **kw: pipeline.pair_dataset(source, tokenize, **kw),
            len(source),
            runtime,
            full_only=False,
        )

        def fn(params, batch):
            img = model.apply(
                {'params': params},
                batch['image'].astype(jnp.float32) / 255.0,
                method='embed_images',
            )
            txt = model.apply(
                {'params': params}, batch['input_ids'], batch['input_mask'], method='embed_texts'
            )
            return {
                'img': contrastive.l2_normalize(img),
                'txt': contrastive.l2_normalize(txt),
                'ids': batch['input_ids'],
            }

        self._outputs = evaluators.EvalOutputs(fn)
        self.num_pairs = len(source)

    def __call__(self, stepper, params) -> dict[str, float]:
        out = self._outputs(stepper, params, self.batches)
        return retrieval_recall(out['img'], out['txt'], out['ids'])


def caption_corpus(source, limit: int = 50_000) -> list[str]:
    """Captions to train the WordPiece vocabulary on (at most `limit`, in order)."""
    return [source[i]['caption'] for i in range(min(len(source), limit))]


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    m = config.model
    train_source, eval_source = image_splits.pair_splits(config.data, m.image_size, m.channels)
    captions = caption_corpus(train_source)
    tokenizer = make_tokenizer(config, workdir, captions, 'model.text.vocab_size')
    tokenize = pipeline.caption_tokenizer(tokenizer, config.data.seq_len)
    train_ds = shards.training_stream(
        functools.partial(pipeline.pair_dataset, train_source, tokenize, train=True),
        config,
        runtime,
    )
    model = make_model(config)
    loss_fn = clip_loss_fn(model, config.loss.type, runtime)
    retrieval = RetrievalEval(model, eval_source, tokenize, runtime, config.eval.max_pairs)
    loss_batches = evaluators.fixed_batches(
        lambda **kw: pipeline.pair_dataset(eval_source, tokenize, **kw),
        len(eval_source),
        runtime,
        full_only=True,
    )[: config.eval_steps]

    logging.info(
        'data: %d train / %d eval image-caption pairs, vocab %d; %s loss',
        len(train_source),
        len(eval_source),
        tokenizer.vocab_size,
        config.loss.type,
    )
    seq = config.data.seq_len
    example = {
        'image': jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32),
        'input_ids': jnp.zeros((1, seq), jnp.int32),
        'input_mask': jnp.ones((1, seq), jnp.int32),
    }
    t = m.text
    text_flops = 3.0 * flops_lib.encoder_forward_flops(
        config.batch_size, seq, t.hidden_size, t.num_layers, t.mlp_dim
    )
    return Task(
        name=f'clip_{config.loss.type}',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=evaluators.contrastive_evaluate(loss_batches, retrieval),
        metric='i2t_recall_at_1',
        flops_per_step=flops_lib.vit_train_flops(
            VitConfig.from_config(config.model), config.batch_size
        )
        + text_flops,
        tokens_per_example=seq,
    )
