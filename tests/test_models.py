"""BERT MLM model and the shared encoder (models/): shapes, axis names, tying, masking,
dropout, layer-norm placement, remat, the attention paths and mixed precision."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from models.bert import BertConfig, BertForMlm
from models.encoder import Encoder, SelfAttention, attention_impl, stack_layers, unstack_layers

VOCAB, HIDDEN, LAYERS, HEADS, MLP, MAX_LEN = 101, 32, 2, 4, 48, 24
BATCH, LENGTH, P = 2, 16, 4
LENGTHS = (16, 9)  # real tokens of each example; the rest is padding


def tiny_config(**overrides) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        mlp_dim=MLP,
        max_len=MAX_LEN,
        **overrides,
    )


def make_batch(seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    ids[mask == 0] = 0
    positions = np.stack([rng.choice(n, P, replace=False) for n in LENGTHS]).astype(np.int32)
    segment = np.zeros_like(ids)
    segment[:, LENGTH // 2 :] = 1
    return {
        'input_ids': jnp.asarray(ids),
        'input_mask': jnp.asarray(mask),
        'segment_ids': jnp.asarray(segment * mask),
        'masked_positions': jnp.asarray(positions),
    }


# Eager (not jitted) on purpose: for a model this small, op-by-op dispatch is much faster
# than compiling every variant under test.
def init(model: nn.Module, batch: dict, seed: int = 0):
    return model.init(jax.random.key(seed), batch)


@pytest.fixture(scope='module')
def batch():
    return make_batch()


@pytest.fixture(scope='module')
def post_ln(batch):
    model = BertForMlm(tiny_config())
    return model, init(model, batch)


def apply(model, variables, batch, deterministic=True, rngs=None):
    return model.apply(variables, batch, deterministic=deterministic, rngs=rngs)


def param_leaves(variables) -> dict[str, jax.Array]:
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(variables['params']))[0]
    return {'/'.join(k.key for k in path): leaf for path, leaf in flat}


def test_logits_shape_and_dtype(post_ln, batch):
    model, variables = post_ln
    logits = apply(model, variables, batch)
    assert logits.shape == (BATCH, P, VOCAB)
    assert logits.dtype == jnp.float32
    assert jnp.isfinite(logits).all()


def test_every_parameter_has_logical_axis_names(batch):
    model = BertForMlm(tiny_config())
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    specs = nn.get_partition_spec(abstract)['params']
    shapes = nn.meta.unbox(abstract)['params']
    spec_leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    shape_leaves = jax.tree_util.tree_leaves_with_path(shapes)
    assert len(spec_leaves) == len(shape_leaves) > 10
    for (path, spec), (_, shape) in zip(spec_leaves, shape_leaves):
        name = jax.tree_util.keystr(path)
        assert isinstance(spec, jax.sharding.PartitionSpec), name
        assert len(spec) == len(shape.shape), f'{name}: {spec} for shape {shape.shape}'
        assert all(a is None or isinstance(a, str) for a in spec), name
        assert any(isinstance(a, str) for a in spec), f'{name} has no named axis'


def test_output_layer_is_tied_to_the_token_embedding(post_ln, batch):
    model, variables = post_ln
    params = param_leaves(variables)
    vocab_by_hidden = [k for k, v in params.items() if v.shape == (VOCAB, HIDDEN)]
    hidden_by_vocab = [k for k, v in params.items() if v.shape == (HIDDEN, VOCAB)]
    assert vocab_by_hidden == ['backbone/embeddings/token/embedding']
    assert hidden_by_vocab == []
    assert not any(k.startswith('mlm_head') and VOCAB in v.shape for k, v in params.items())
    # Changing the embedding changes the output layer: scaling it moves every logit.
    scaled = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(variables))
    scaled['params']['backbone']['embeddings']['token']['embedding'] *= 2.0
    a, b = apply(model, variables, batch), apply(model, scaled, batch)
    assert not np.allclose(a, b, atol=1e-3)


def test_padding_does_not_change_real_predictions(post_ln, batch):
    model, variables = post_ln
    changed = dict(batch)
    ids = np.asarray(batch['input_ids']).copy()
    pad = np.asarray(batch['input_mask']) == 0
    assert pad.any()
    ids[pad] = np.random.default_rng(1).integers(5, VOCAB, pad.sum())
    changed['input_ids'] = jnp.asarray(ids)
    a, b = apply(model, variables, batch), apply(model, variables, changed)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # ... while a change to a real token does change them (the check can fail).
    ids[1, 0] = (ids[1, 0] + 1) % VOCAB
    changed['input_ids'] = jnp.asarray(ids)
    c = apply(model, variables, changed)
    assert not np.allclose(a[1], c[1], atol=1e-4)


def test_dropout_only_when_not_deterministic(post_ln, batch):
    model, variables = post_ln
    a = apply(model, variables, batch, deterministic=True)
    b = apply(model, variables, batch, deterministic=True)
    np.testing.assert_array_equal(a, b)
    r1 = {'dropout': jax.random.key(1)}
    r2 = {'dropout': jax.random.key(2)}
    c = apply(model, variables, batch, deterministic=False, rngs=r1)
    d = apply(model, variables, batch, deterministic=False, rngs=r2)
    e = apply(model, variables, batch, deterministic=False, rngs=r1)
    assert not np.allclose(c, d, atol=1e-4)
    assert not np.allclose(a, c, atol=1e-4)
    np.testing.assert_array_equal(c, e)  # same rng, same dropout mask


@pytest.mark.parametrize('variant', ['plain', 'scan_layers', 'remat'])
def test_dropout_masks_follow_the_example_rows(post_ln, batch, variant):
    """Each example's masks (hidden and attention dropout) depend on the key and its row in
    the step's batch only: an example alone, given its row, comes out as within the batch,
    so the split of a batch over devices or micro-batches does not change the masks."""
    options = {'plain': {}, 'scan_layers': {'scan_layers': True}, 'remat': {'remat': 'full'}}
    model = BertForMlm(tiny_config(attention_dropout_rate=0.2, **options[variant]))
    params = nn.meta.unbox(post_ln[1]['params'])
    variables = {'params': stack_layers(params) if variant == 'scan_layers' else params}
    rngs = {'dropout': jax.random.key(3)}
    whole = model.apply(variables, batch, False, rngs=rngs)  # rows 0 .. BATCH - 1
    last = jax.tree.map(lambda x: x[-1:], batch)
    alone = model.apply(variables, last, False, jnp.array([BATCH - 1]), rngs=rngs)
    np.testing.assert_allclose(alone[0], whole[-1], rtol=1e-5, atol=1e-6)
    as_row_0 = model.apply(variables, last, False, rngs=rngs)  # other masks
    assert not np.allclose(as_row_0[0], whole[-1], atol=1e-4)


def test_pre_and_post_layer_norm(batch, post_ln):
    pre_model = BertForMlm(tiny_config(layer_norm='pre'))
    pre = init(pre_model, batch)
    pre_params = param_leaves(pre)
    post_params = param_leaves(post_ln[1])
    assert 'backbone/encoder/ln_final/scale' in pre_params
    assert not any('ln_final' in k for k in post_params)
    # Post-LN (BERT) normalises the embeddings; pre-LN leaves that to the first layer.
    assert 'backbone/embeddings/ln/scale' in post_params
    assert not any(k.startswith('backbone/embeddings/ln') for k in pre_params)
    for model, variables in ((pre_model, pre), post_ln):
        logits = apply(model, variables, batch)
        assert logits.shape == (BATCH, P, VOCAB) and jnp.isfinite(logits).all()


def test_pre_ln_encoder_output_is_normalised():
    x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, HIDDEN)) * 5 + 3
    encoder = Encoder(num_layers=1, num_heads=HEADS, mlp_dim=MLP, layer_norm='pre')
    y = encoder.apply(encoder.init(jax.random.key(1), x), x)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_the_same_outputs_and_gradients(post_ln, batch, remat):
    model, variables = post_ln
    remat_model = BertForMlm(tiny_config(remat=remat))
    remat_vars = init(remat_model, batch)
    assert jax.tree.structure(remat_vars) == jax.tree.structure(variables)  # same checkpoints

    def loss(params, m):
        return m.apply({'params': params}, batch).sum()

    grad = jax.grad(loss)
    np.testing.assert_allclose(
        apply(remat_model, variables, batch), apply(model, variables, batch), atol=1e-5
    )
    g_remat = grad(variables['params'], remat_model)
    g_plain = grad(variables['params'], model)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_remat_with_dropout_runs(post_ln, batch):
    model = BertForMlm(tiny_config(remat='full'))
    out = apply(model, post_ln[1], batch, deterministic=False, rngs={'dropout': jax.random.key(0)})
    assert jnp.isfinite(out).all()


def test_unknown_remat_policy_raises(batch):
    with pytest.raises(ValueError, match='remat'):
        init(BertForMlm(tiny_config(remat='sometimes')), batch)


def test_attention_dropout_in_deterministic_mode_matches_no_dropout(post_ln, batch):
    model, variables = post_ln
    with_dropout = BertForMlm(tiny_config(attention_dropout_rate=0.1))
    np.testing.assert_array_equal(
        apply(with_dropout, variables, batch), apply(model, variables, batch)
    )
    rngs = {'dropout': jax.random.key(0)}
    no_hidden_dropout = BertForMlm(tiny_config(dropout_rate=0.0, attention_dropout_rate=0.3))
    trained = apply(no_hidden_dropout, variables, batch, deterministic=False, rngs=rngs)
    assert not np.allclose(trained, apply(model, variables, batch), atol=1e-4)


def manual_attention(params, x, padding_mask, num_heads):
    """Softmax attention written out with einsums, from the module's own parameters."""
    hidden = x.shape[-1]
    qkv = jnp.einsum('btd,dshk->btshk', x, params['qkv']['kernel']) + params['qkv']['bias']
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hidden // num_heads)
    logits = jnp.where(padding_mask[:, None, None, :] > 0, logits, -1e30)
    out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)
    return jnp.einsum('bqhd,hdo->bqo', out, params['out']['kernel']) + params['out']['bias']


def attention_inputs():
    x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, HIDDEN))
    padding = jnp.asarray(make_batch()['input_mask'])
    return x, padding, padding.astype(bool)[:, None, None, :]


def test_fused_attention_matches_einsum_softmax():
    x, padding, mask = attention_inputs()
    attention = SelfAttention(num_heads=HEADS, attention_dropout_rate=0.1)
    variables = attention.init(jax.random.key(1), x, mask, True)
    params = nn.meta.unbox(variables['params'])
    # Deterministic: jax.nn.dot_product_attention.
    fused = attention.apply(variables, x, mask, True)
    expected = manual_attention(params, x, padding, HEADS)
    real = np.asarray(padding, bool)
    np.testing.assert_allclose(fused[real], expected[real], atol=1e-5, rtol=1e-5)


def test_dropout_attention_path_matches_einsum_softmax():
    x, padding, mask = attention_inputs()
    # A dropout rate so small nothing is dropped: the explicit path without its noise.
    attention = SelfAttention(num_heads=HEADS, attention_dropout_rate=1e-9)
    variables = attention.init(jax.random.key(1), x, mask, True)
    params = nn.meta.unbox(variables['params'])
    explicit = attention.apply(variables, x, mask, False, rngs={'dropout': jax.random.key(2)})
    expected = manual_attention(params, x, padding, HEADS)
    real = np.asarray(padding, bool)
    np.testing.assert_allclose(explicit[real], expected[real], atol=1e-5, rtol=1e-5)
    fused = attention.apply(variables, x, mask, True)
    np.testing.assert_allclose(explicit[real], fused[real], atol=1e-5, rtol=1e-5)


def test_attention_rejects_indivisible_heads():
    x = jnp.zeros((1, 4, 30))
    with pytest.raises(ValueError, match='num_heads'):
        SelfAttention(num_heads=4).init(jax.random.key(0), x, None, True)


@pytest.mark.parametrize(
    'choice, dtype, head_dim, backend, expected',
    [
        ('auto', jnp.bfloat16, 64, 'gpu', 'cudnn'),  # BERT's and ViT's heads, bf16, a GPU
        ('auto', jnp.float16, 128, 'gpu', 'cudnn'),
        ('auto', jnp.float32, 64, 'gpu', 'xla'),  # cuDNN's flash attention: bf16/fp16 only
        ('auto', jnp.bfloat16, 60, 'gpu', 'xla'),  # not a multiple of 8
        ('auto', jnp.bfloat16, 256, 'gpu', 'xla'),  # above 128
        ('auto', jnp.bfloat16, 64, 'cpu', 'xla'),
        ('auto', jnp.bfloat16, 64, 'tpu', 'xla'),
        ('xla', jnp.bfloat16, 64, 'gpu', 'xla'),
        ('cudnn', jnp.float32, 64, 'gpu', 'cudnn'),  # asked for: cuDNN itself says if not
    ],
)
def test_attention_asks_for_cudnn_flash_attention_where_it_applies(
    choice, dtype, head_dim, backend, expected
):
    # jax.nn.dot_product_attention's own default is XLA's attention on every backend.
    assert attention_impl(choice, dtype, head_dim, backend) == expected


def test_cudnn_attention_off_a_gpu_and_unknown_choices_are_refused():
    x, _, mask = attention_inputs()
    attention = SelfAttention(num_heads=HEADS, attention_impl='cudnn')
    with pytest.raises(ValueError, match='attention_impl=auto'):
        attention.init(jax.random.key(1), x, mask, True)
    with pytest.raises(ValueError, match='expected one of'):
        attention_impl('flash', jnp.bfloat16, 64)


def test_cudnn_path_passes_padding_as_lengths_and_matches_xla(monkeypatch):
    """What SelfAttention hands cuDNN (no GPU here): jax's XLA attention, which takes the
    same key lengths, stands in for it; the outputs must equal the masked XLA path's."""
    x, padding, mask = attention_inputs()
    attention = SelfAttention(num_heads=HEADS)
    variables = attention.init(jax.random.key(1), x, mask, True)
    expected = attention.apply(variables, x, mask, True)  # CPU: the XLA path
    real_attention, calls = jax.nn.dot_product_attention, []

    def fake_cudnn(q, k, v, *, key_value_seq_lengths=None, implementation=None, **kw):
        calls.append((implementation, kw, key_value_seq_lengths))
        return real_attention(
            q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation='xla'
        )

    monkeypatch.setattr('models.encoder.attention_impl', lambda *a: 'cudnn')
    monkeypatch.setattr(jax.nn, 'dot_product_attention', fake_cudnn)
    fused = attention.apply(variables, x, mask, True)
    implementation, kwargs, lengths = calls[0]
    assert implementation == 'cudnn' and 'mask' not in kwargs  # cuDNN refuses [B, 1, 1, S]
    np.testing.assert_array_equal(lengths, np.asarray(padding).sum(-1))
    np.testing.assert_allclose(fused, expected, atol=1e-5, rtol=1e-5)  # padded rows too


def test_auto_attention_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
    x, _, mask = attention_inputs()
    real_attention = jax.nn.dot_product_attention

    def refusing_cudnn(q, k, v, *, implementation=None, **kw):
        if implementation == 'cudnn':
            raise NotImplementedError('The head dim must be <= 128 and a multiple of 8')
        return real_attention(q, k, v, implementation=implementation, **kw)

    auto = SelfAttention(num_heads=HEADS)
    variables = auto.init(jax.random.key(1), x, mask, True)
    expected = auto.apply(variables, x, mask, True)
    monkeypatch.setattr('models.encoder.attention_impl', lambda *a: 'cudnn')
    monkeypatch.setattr(jax.nn, 'dot_product_attention', refusing_cudnn)
    np.testing.assert_allclose(auto.apply(variables, x, mask, True), expected, atol=1e-6)
    insisted = SelfAttention(num_heads=HEADS, attention_impl='cudnn')
    with pytest.raises(NotImplementedError, match='head dim'):
        insisted.apply(variables, x, mask, True)


def test_bfloat16_computes_in_bfloat16_with_float32_params(batch, post_ln):
    model = BertForMlm(tiny_config(dtype='bfloat16'))
    variables = init(model, batch)
    dtypes = {v.dtype for v in param_leaves(variables).values()}
    assert dtypes == {jnp.dtype(jnp.float32)}
    logits = apply(model, variables, batch)
    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, P, VOCAB)
    assert jnp.isfinite(logits).all()
    # Same params in float32 agree to bfloat16 precision, but not exactly.
    reference = apply(post_ln[0], variables, batch)
    assert not np.array_equal(logits, reference)
    np.testing.assert_allclose(logits, reference, atol=0.15)
    hidden = model.apply(
        variables,
        batch['input_ids'],
        batch['input_mask'],
        method=lambda m, ids, mask: m.backbone(ids, mask),
    )
    assert hidden.dtype == jnp.bfloat16


def test_config_from_config_dict_ignores_other_keys():
    import ml_collections

    model_config = ml_collections.ConfigDict(
        {'hidden_size': 64, 'num_layers': 3, 'patch_size': 0, 'image_size': 0}
    )
    cfg = BertConfig.from_config(model_config)
    assert (cfg.hidden_size, cfg.num_layers) == (64, 3)
    assert dataclasses.replace(cfg, hidden_size=768) == BertConfig(num_layers=3)


def test_add_bias_gradient_matches_plain_addition():
    from models.bert import add_bias

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 7)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(7), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4, 7)), jnp.float32)
    ours = jax.grad(lambda x, b: jnp.sum(add_bias(x, b) * w), argnums=(0, 1))(x, b)
    plain = jax.grad(lambda x, b: jnp.sum((x + b) * w), argnums=(0, 1))(x, b)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], plain[1], rtol=1e-5)


# --- scan over layers (model.scan_layers) -----------------------------------------------------


def grads(model, params, batch):
    return jax.grad(lambda p: model.apply({'params': p}, batch).sum())(params)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_bert_matches_unscanned_outputs_and_gradients(post_ln, batch, remat):
    model, variables = post_ln
    params = nn.meta.unbox(variables['params'])
    scanned = BertForMlm(tiny_config(scan_layers=True, remat=remat))
    stacked = stack_layers(params)
    np.testing.assert_allclose(
        apply(scanned, {'params': stacked}, batch), apply(model, variables, batch), atol=1e-5
    )
    g_scanned = unstack_layers(grads(scanned, stacked, batch))
    g_plain = grads(model, params, batch)
    assert jax.tree.structure(g_scanned) == jax.tree.structure(g_plain)
    for a, b in zip(jax.tree.leaves(g_scanned), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_stacked_params_have_a_leading_layers_axis(post_ln, batch):
    params = nn.meta.unbox(post_ln[1]['params'])
    scanned = jax.eval_shape(
        BertForMlm(tiny_config(scan_layers=True)).init, jax.random.key(0), batch
    )
    stacked = stack_layers(params)
    # stack_layers gives exactly the scanned model's tree, and unstack_layers inverts it.
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(
        np.shape, nn.meta.unbox(scanned)['params']
    )
    assert sorted(stacked['backbone']['encoder']) == ['layers']
    round_trip = unstack_layers(stacked)
    assert jax.tree.structure(round_trip) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        stacked['backbone']['encoder']['layers']['mlp']['wi']['kernel'][1],
        params['backbone']['encoder']['layer_1']['mlp']['wi']['kernel'],
    )
    # Every stacked leaf: [LAYERS, ...] with the logical axis 'layers' first.
    specs = nn.get_partition_spec(scanned)['params']['backbone']['encoder']['layers']
    shapes = stacked['backbone']['encoder']['layers']
    for spec, leaf in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(shapes),
    ):
        assert spec[0] == 'layers' and leaf.shape[0] == LAYERS and len(spec) == leaf.ndim
    assert specs['mlp']['wi']['kernel'] == jax.sharding.PartitionSpec('layers', 'embed', 'mlp')


def test_scanned_layers_draw_their_own_dropout_masks():
    """Attention and the first MLP matrix zero, the MLP output bias one: a pre-LN layer adds
    dropout(ones) to the residual, so before the final LayerNorm each unit holds how many
    layers kept it (0, 1 or 2) over 1 - rate. One mask shared by both layers would leave
    only two values per row."""
    encoder = Encoder(
        num_layers=2,
        num_heads=HEADS,
        mlp_dim=MLP,
        layer_norm='pre',
        dropout_rate=0.5,
        scan_layers=True,
    )
    x = jnp.zeros((BATCH, LENGTH, HIDDEN))
    shapes = nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), x)['params'])

    def value(path, leaf):
        name = jax.tree_util.keystr(path)
        one = 'scale' in name or ('wo' in name and 'bias' in name)
        return jnp.full(leaf.shape, float(one), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(value, shapes)
    y = encoder.apply(
        {'params': params}, x, deterministic=False, rngs={'dropout': jax.random.key(1)}
    )
    levels = [len(np.unique(np.round(row, 4))) for row in np.asarray(y).reshape(-1, HIDDEN)]
    assert min(levels) == 3, levels


_SHARDED_SCAN_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from core import checkpoint as ckpt_lib, sharding as sharding_lib, train_state as state_lib
    from models.bert import BertForMlm
    from tests.test_models import make_batch, tiny_config

    assert jax.device_count() == 8
    checkpoint, expected = sys.argv[1], np.load(sys.argv[2])
    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    batch, rng, tx = make_batch(), jax.random.key(0), optax.adamw(1e-3)
    model = BertForMlm(tiny_config(scan_layers=True))
    init = lambda r: model.init(r, batch)['params']
    shardings = state_lib.state_shardings(init, tx, mesh, rng)
    wi = shardings.params['backbone']['encoder']['layers']['mlp']['wi']['kernel']
    assert wi.spec == P(None, 'fsdp', 'tensor'), wi.spec
    abstract = state_lib.abstract_state(init, tx, mesh, rng, shardings)
    params, _ = ckpt_lib.restore_params(checkpoint, abstract.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract.params)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want)
    stacked = params['backbone']['encoder']['layers']['mlp']['wi']['kernel']
    np.testing.assert_array_equal(stacked[1], expected['layer_1_wi'])
    with sharding_lib.mesh_context(mesh):
        logits = jax.jit(model.apply)({'params': params}, batch)
    np.testing.assert_allclose(logits, expected['logits'], atol=1e-5)
    print('ok')
    """
)


def test_scanned_model_shards_and_restores_an_unscanned_checkpoint_on_8_devices(
    tmp_path, post_ln, batch
):
    """On a 2x2x2 (data, fsdp, tensor) mesh: the stacked layer axis is not sharded, the rest
    of each parameter is as unscanned; an unscanned checkpoint restores into those shardings
    (converted) and gives the single-device logits."""
    import ml_collections

    from interop.hf import save_checkpoint

    model, variables = post_ln
    params = nn.meta.unbox(variables['params'])
    save_checkpoint(str(tmp_path / 'unscanned'), params, ml_collections.ConfigDict())
    np.savez(
        tmp_path / 'expected.npz',
        logits=apply(model, variables, batch),
        layer_1_wi=params['backbone']['encoder']['layer_1']['mlp']['wi']['kernel'],
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        PYTHONPATH=root,
        XLA_FLAGS='--xla_force_host_platform_device_count=8',
    )
    script_args = [str(tmp_path / 'unscanned'), str(tmp_path / 'expected.npz')]
    r = subprocess.run(
        [sys.executable, '-c', _SHARDED_SCAN_SCRIPT, *script_args],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]


def test_a_scanned_checkpoint_restores_into_an_unscanned_model(tmp_path, post_ln, batch):
    import ml_collections

    from core import checkpoint as ckpt_lib
    from interop.hf import save_checkpoint

    model, variables = post_ln
    params = nn.meta.unbox(variables['params'])
    save_checkpoint(str(tmp_path), stack_layers(params), ml_collections.ConfigDict())
    abstract = jax.eval_shape(lambda: params)
    restored, _ = ckpt_lib.restore_params(str(tmp_path), abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
