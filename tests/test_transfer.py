"""Transfer modes of fine-tuning (core/optim.py): which layer a parameter path belongs to,
the per-parameter learning-rate factors of `config.transfer`, and an optimizer that really
leaves frozen parameters alone and keeps their gradients out of the clipped global norm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import image_cls, text_cls
from core import train_state as state_lib
from core.optim import _path, layer_depth, make_optimizer, transfer_scale_fn
from core.sharding import make_mesh
from finetune.text_cls import make_model
from models.classifier import ImageClassifier
from models.encoder import stack_layers
from models.vit import VitConfig

TINY = {'hidden_size': 32, 'num_heads': 2, 'mlp_dim': 64}


def text_config(num_layers: int = 3, **transfer):
    c = text_cls.get_config('tiny')
    c.model.update(TINY, num_layers=num_layers, vocab_size=64)
    c.transfer.update(transfer)
    return c


def text_params(config, num_classes: int = 3, init: bool = False):
    """The TextClassifier params tree (shapes only unless `init`), as the trainer builds it."""
    model = make_model(config, num_classes)
    example = {k: jnp.zeros((1, 8), jnp.int32) for k in ('input_ids', 'segment_ids')}
    example['input_mask'] = jnp.ones((1, 8), jnp.int32)
    init_fn = lambda rng: nn.meta.unbox(model.init(rng, example)['params'])
    if init:
        return jax.jit(init_fn)(jax.random.key(0))
    return jax.eval_shape(init_fn, jax.random.key(0))


def vit_params(num_layers: int = 3):
    c = image_cls.get_config('tiny')
    c.model.update(TINY, num_layers=num_layers)
    model = ImageClassifier(VitConfig.from_config(c.model), 10)
    images = jnp.zeros((1, 16, 16, 1))
    return jax.eval_shape(
        lambda rng: nn.meta.unbox(model.init(rng, images)['params']), jax.random.key(0)
    )


def paths(tree) -> list[str]:
    return [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def expected_depth(path: str, num_layers: int) -> int:
    """What each parameter is, read off its name (not the implementation's regex)."""
    parts = path.split('/')
    if parts[0] == 'head':
        return num_layers + 1
    assert parts[0] == 'backbone', path
    if parts[1] == 'encoder':
        if parts[2].startswith('layer_'):
            return int(parts[2][len('layer_') :]) + 1
        assert parts[2] == 'ln_final', path
        return num_layers + 1
    assert parts[1] in ('embeddings', 'cls', 'patch_embed', 'pos_embedding'), path
    return 0


@pytest.mark.parametrize('family', ['bert', 'vit'])
def test_layer_depth_of_every_real_parameter(family):
    tree = text_params(text_config(num_layers=3)) if family == 'bert' else vit_params(3)
    names = paths(tree)
    for path in names:
        assert layer_depth(path, 3) == expected_depth(path, 3), path
    depths = {layer_depth(p, 3) for p in names}
    assert depths == {0, 1, 2, 3, 4}  # embeddings, three layers, above the encoder
    if family == 'vit':
        for path in ('backbone/cls', 'backbone/pos_embedding', 'backbone/patch_embed/kernel'):
            assert layer_depth(path, 3) == 0
        assert layer_depth('backbone/encoder/ln_final/scale', 3) == 4  # pre-LN final norm
    else:
        assert layer_depth('backbone/embeddings/token/embedding', 3) == 0
        assert layer_depth('backbone/embeddings/ln/scale', 3) == 0
    assert layer_depth('head/out/kernel', 3) == 4


def test_layer_depth_multi_digit_layers_and_lookalikes():
    assert layer_depth('backbone/encoder/layer_11/mlp/wi/kernel', 12) == 12
    assert layer_depth('backbone/encoder/layer_10/mlp/wi/kernel', 12) == 11
    # `layer_` outside backbone/encoder is not an encoder layer.
    assert layer_depth('head/layer_0/kernel', 12) == 13
    assert layer_depth('mlm_head/transform/kernel', 12) == 13


def factors(config) -> dict[str, float]:
    scale = transfer_scale_fn(config)
    return {p: scale(p) for p in paths(text_params(config))}


def test_plain_fine_tuning_has_no_scale():
    assert transfer_scale_fn(text_config()) is None
    c = text_config()
    del c['transfer']
    assert transfer_scale_fn(c) is None


def test_freeze_backbone_zeroes_every_encoder_factor():
    got = factors(text_config(freeze_backbone=True))
    for path, f in got.items():
        assert f == (1.0 if path.startswith('head/') else 0.0), path
    assert any(p.startswith('head/') for p in got)


def test_freeze_layers_freezes_embeddings_and_the_first_layers():
    got = factors(text_config(num_layers=3, freeze_layers=1))
    for path, f in got.items():
        frozen = path.startswith('backbone/embeddings/') or '/layer_0/' in path
        assert f == (0.0 if frozen else 1.0), path


def test_layer_decay_factors():
    L, d = 3, 0.5
    got = factors(text_config(num_layers=L, layer_decay=d))
    for path, f in got.items():
        if path.startswith('backbone/embeddings/'):
            assert f == d ** (L + 1), path
        elif path.startswith('backbone/encoder/layer_'):
            i = int(path.split('/')[2][len('layer_') :])
            assert f == d ** (L - i), path
        else:
            assert path.startswith('head/')
            assert f == 1.0, path
    assert got['backbone/encoder/layer_0/mlp/wi/kernel'] == 0.125
    assert got['backbone/encoder/layer_2/mlp/wi/kernel'] == 0.5
    assert got['backbone/embeddings/token/embedding'] == 0.0625


def test_layer_decay_of_vit_final_layer_norm_and_combined_freezing():
    L, d = 3, 0.5
    c = text_config(num_layers=L, layer_decay=d, freeze_layers=1)
    scale = transfer_scale_fn(c)
    assert scale('backbone/encoder/ln_final/scale') == 1.0  # above the layers, like the head
    assert scale('backbone/pos_embedding') == 0.0
    assert scale('backbone/encoder/layer_0/mlp/wi/kernel') == 0.0
    assert scale('backbone/encoder/layer_1/mlp/wi/kernel') == d**2
    assert scale('head/out/kernel') == 1.0


def optimizer_config(**transfer):
    c = text_config(num_layers=2, **transfer)
    c.warmup_steps = 0  # the warmup starts at 0: the first update would move nothing
    c.optimizer.schedule = 'constant'
    return c


def random_grads(params, seed: int, scale_of=lambda path: 1.0):
    """Standard normal gradients (numpy: nothing to compile), times `scale_of(path)`."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, v: (rng.standard_normal(v.shape) * scale_of(_path(p))).astype(np.float32),
        params,
    )


def is_frozen(path: str) -> bool:
    return path.startswith('backbone/embeddings/') or '/layer_0/' in path


def test_frozen_layers_stay_bit_identical_under_the_real_optimizer():
    config = optimizer_config(freeze_layers=1)
    assert config.optimizer.weight_decay > 0  # decay must not move frozen matrices either
    tx, _ = make_optimizer(config)
    params = text_params(config, init=True)
    # A zero-initialised head would get no weight decay movement to show; make it random.
    params['head']['out']['kernel'] = random_grads(params['head'], 1)['out']['kernel']
    start = jax.tree.map(np.asarray, params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    for i in range(3):
        params, state = step(params, state, random_grads(params, 10 + i))
    after = dict(zip(paths(params), jax.tree.leaves(params)))
    before = dict(zip(paths(start), jax.tree.leaves(start)))
    assert sum(map(is_frozen, after)) >= 10 and sum(not is_frozen(p) for p in after) >= 10
    for path in after:
        if is_frozen(path):
            np.testing.assert_array_equal(np.asarray(after[path]), before[path], err_msg=path)
        else:
            assert not np.array_equal(np.asarray(after[path]), before[path]), path


def trained_size(tree) -> int:
    """Elements in the arrays of `tree` (scalars, such as Adam's step count, left out)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if x.ndim)


@pytest.mark.parametrize(
    'transfer, frozen',
    [
        ({'freeze_backbone': True}, lambda path: path.startswith('backbone/')),
        ({'freeze_layers': 1}, is_frozen),
        ({'teacher': True}, lambda path: path.startswith('teacher/')),
    ],
    ids=['linear_probe', 'freeze_layers', 'distillation_teacher'],
)
def test_frozen_parameters_hold_no_optimizer_state(transfer, frozen):
    """Adam keeps two moments per trained parameter and none for a frozen one: a frozen
    teacher or linear-probe encoder must not double its memory in the optimizer state."""
    teacher = transfer.pop('teacher', False)
    config = optimizer_config(**transfer)
    params = text_params(config)
    if teacher:
        config.teacher = '/runs/teacher'  # the path is not read here
        params = dict(params, teacher={'backbone': params['backbone']})
    tx, _ = make_optimizer(config)
    state = jax.eval_shape(tx.init, params)
    trained = {p: v for p, v in zip(paths(params), jax.tree.leaves(params)) if not frozen(p)}
    assert 0 < len(trained) < len(paths(params))
    assert trained_size(state) == 2 * trained_size(list(trained.values()))

    # The state is placed like any other: every leaf on the mesh, boxes read for its axes.
    model = make_model(config, 3)
    example = {k: jnp.zeros((1, 8), jnp.int32) for k in ('input_ids', 'segment_ids')}
    example['input_mask'] = jnp.ones((1, 8), jnp.int32)

    def init_params(rng):
        boxed = model.init(rng, example)['params']
        return dict(boxed, teacher={'backbone': boxed['backbone']}) if teacher else boxed

    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    rng = jax.random.key(0)
    state, _ = state_lib.create_sharded_state(init_params, tx, mesh, rng)
    assert trained_size(state.opt_state) == 2 * trained_size(list(trained.values()))
    # Frozen parameters take a zero update, trained ones Adam's.
    grads = random_grads(state.params, 7)
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
    for path, u in zip(paths(updates), jax.tree.leaves(updates)):
        assert np.any(np.asarray(u)) != frozen(path), path


def test_frozen_gradients_do_not_count_in_the_clipped_global_norm():
    config = optimizer_config(freeze_layers=1)
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    params = text_params(config, init=True)
    # Trainable gradients far below the clip norm; frozen ones a million times larger, so
    # counted in the global norm they would clip the trainable ones down to ~1e-9.
    small = random_grads(params, 3, lambda p: 1e6 if is_frozen(p) else 1e-4 / 30)
    assert float(optax.tree.norm(small)) > 1e6
    trainable_only = jax.tree_util.tree_map_with_path(
        lambda p, g: jnp.zeros_like(g) if is_frozen(_path(p)) else g, small
    )
    assert float(optax.tree.norm(trainable_only)) < 1.0

    def first_update(cfg, grads):
        tx, _ = make_optimizer(cfg)
        updates, _ = tx.update(grads, tx.init(params), params)
        return dict(zip(paths(updates), jax.tree.leaves(updates)))

    with_frozen = first_update(config, small)
    reference = first_update(config, trainable_only)
    for path, u in with_frozen.items():
        if is_frozen(path):
            np.testing.assert_array_equal(np.asarray(u), 0.0, err_msg=path)
        else:
            np.testing.assert_allclose(u, reference[path], rtol=1e-6, atol=0, err_msg=path)
    # The case is one where counting them matters: without freezing, the same gradients
    # are clipped and Adam's first step on the trainable parameters (|g| ~ eps) shrinks.
    plain = optimizer_config()
    plain.optimizer.weight_decay = 0.0
    unfrozen = first_update(plain, small)
    key = 'backbone/encoder/layer_1/mlp/wi/kernel'
    assert np.abs(unfrozen[key]).max() < 0.01 * np.abs(with_frozen[key]).max()


def test_a_scanned_encoder_gets_the_same_per_layer_updates():
    """model.scan_layers stacks the layers into one array per parameter: layer decay and
    freezing act per layer along its leading axis, and biases / LayerNorm stay without
    weight decay, so an update is the stacked update of the unscanned model."""
    config = optimizer_config(freeze_layers=1, layer_decay=0.5)
    assert config.optimizer.weight_decay > 0
    params = text_params(config, init=True)
    grads = random_grads(params, 5)
    scanned_config = optimizer_config(freeze_layers=1, layer_decay=0.5)
    scanned_config.model.scan_layers = True
    assert 'layers' in text_params(scanned_config)['backbone']['encoder']  # shapes only
    scale = transfer_scale_fn(scanned_config)
    np.testing.assert_array_equal(scale('backbone/encoder/layers/mlp/wi/kernel'), [0.0, 0.5])

    def first_update(cfg, params, grads):
        tx, _ = make_optimizer(cfg)
        return jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)

    expected = stack_layers(first_update(config, params, grads))
    got = first_update(scanned_config, stack_layers(params), stack_layers(grads))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for path, a, b in zip(paths(got), jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=path)
    assert not np.any(got['backbone']['encoder']['layers']['mlp']['wi']['kernel'][0])


def test_head_lr_scale_speeds_up_only_the_new_head():
    got = factors(text_config(num_layers=3, head_lr_scale=10.0, layer_decay=0.5))
    for path, f in got.items():
        if path.startswith('head/'):
            assert f == 10.0, path
        else:
            assert f <= 0.5, path  # the encoder as layer decay has it
    frozen = factors(text_config(freeze_backbone=True, head_lr_scale=10.0))
    assert {f for p, f in frozen.items() if p.startswith('head/')} == {10.0}
    assert {f for p, f in frozen.items() if p.startswith('backbone/')} == {0.0}

    # Under the real optimizer: Adam's first step moves each parameter by about the rate,
    # so the head moves ten times as far as the encoder's top layer.
    config = optimizer_config(head_lr_scale=10.0)
    config.optimizer.weight_decay = 0.0
    tx, _ = make_optimizer(config)
    params = text_params(config, init=True)
    updates, _ = jax.jit(tx.update)(random_grads(params, 3), jax.jit(tx.init)(params), params)
    moved = {p: float(np.abs(u).max()) for p, u in zip(paths(updates), jax.tree.leaves(updates))}
    head = moved['head/out/kernel']
    top = moved['backbone/encoder/layer_1/mlp/wi/kernel']  # the top of two layers
    assert head == pytest.approx(10 * top, rel=1e-3)
