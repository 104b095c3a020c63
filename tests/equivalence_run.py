"""Runs the same MLM training steps under several parallel layouts and prints, as JSON,
each layout's losses and its parameters' largest difference from the 1-device run.

Needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the test).
"""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import optim
from core import sharding as sharding_lib
from core import step as step_lib
from core import train_state as state_lib
from models.bert import BertConfig, BertForMlm
from pretrain.losses import mlm_loss_fn

BATCH, SEQ, PRED, VOCAB, STEPS = 16, 32, 6, 97, 4


def batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        lengths = rng.integers(SEQ // 2, SEQ + 1, BATCH)
        mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
        yield {
            'input_ids': (rng.integers(5, VOCAB, (BATCH, SEQ)) * mask).astype(np.int32),
            'input_mask': mask,
            'segment_ids': np.zeros((BATCH, SEQ), np.int32),
            'masked_positions': rng.integers(0, SEQ // 2, (BATCH, PRED)).astype(np.int32),
            'masked_ids': rng.integers(5, VOCAB, (BATCH, PRED)).astype(np.int32),
            'masked_weights': (rng.random((BATCH, PRED)) < 0.8).astype(np.float32),
        }


def run(layout: str, dropout: float) -> tuple[list[float], dict]:
    model = BertForMlm(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            mlp_dim=64,
            max_len=SEQ,
            dropout_rate=dropout,
        )
    )
    config = ml_collections.ConfigDict(
        {
            'learning_rate': 1e-2,
            'warmup_steps': 1,
            'total_steps': STEPS,
            'optimizer': {
                'name': 'adamw',
                'b1': 0.9,
                'b2': 0.999,
                'eps': 1e-6,
                'weight_decay': 0.01,
                'grad_clip_norm': 1.0,
                'schedule': 'linear',
                'end_learning_rate': 0.0,
            },
        }
    )
    tx, schedule = optim.make_optimizer(config)
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), next(batches()))
    init_params = lambda r: model.init(r, example)['params']
    loss_fn = mlm_loss_fn(model)
    accum = 2 if layout.endswith('accum2') else 1
    if layout == 'pmap':
        mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
        stepper = step_lib.PmapStepper(loss_fn, tx, schedule, accum)
    else:
        shape = {
            'single': (1, 1, 1),
            'data8': (8, 1, 1),
            'data2_fsdp2_tensor2': (2, 2, 2),
            'fsdp8': (1, 8, 1),
            'data8_accum2': (8, 1, 1),
            'single_accum2': (1, 1, 1),
        }[layout]
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = sharding_lib.make_mesh(*shape, devices=devices)
    state, shardings = state_lib.create_sharded_state(init_params, tx, mesh, jax.random.key(0))
    if layout != 'pmap':
        stepper = step_lib.JitStepper(mesh, shardings, loss_fn, tx, schedule, accum)
    state = stepper.put_state(state)
    losses = []
    for batch in batches():
        state, metrics = stepper.train(state, stepper.put_batch(batch), jax.random.key(1))
        losses.append(float(metrics['loss']))
    return losses, jax.device_get(stepper.get_state(state).params)


def main(layouts: list[str], dropout: float) -> None:
    assert jax.device_count() == 8, jax.devices()
    ref_losses, ref_params = run('single', dropout)
    out = {'single': {'losses': ref_losses, 'max_param_diff': 0.0}}
    for layout in layouts:
        losses, params = run(layout, dropout)
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))
        )
        out[layout] = {'losses': losses, 'max_param_diff': diff}
    print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
    main(sys.argv[1].split(','), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
