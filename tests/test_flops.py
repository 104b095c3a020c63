"""The MFU numerator: the MLM FLOPs formula against XLA's own count of the compiled
forward + backward (which adds the elementwise work the formula leaves out)."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from core import flops
from models.bert import BertConfig, BertForMlm
from pretrain.losses import mlm_loss_fn


@pytest.mark.parametrize(
    'hidden,layers,mlp,vocab,batch,seq,pred',
    [(128, 2, 512, 8192, 8, 128, 20), (64, 2, 256, 30522, 8, 64, 10)],
)
def test_formula_matches_xla_cost_analysis(hidden, layers, mlp, vocab, batch, seq, pred):
    model = BertForMlm(
        BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=2,
            mlp_dim=mlp,
            max_len=seq,
            dropout_rate=0.0,
        )
    )
    batch_ = {
        'input_ids': jnp.zeros((batch, seq), jnp.int32),
        'input_mask': jnp.ones((batch, seq), jnp.int32),
        'segment_ids': jnp.zeros((batch, seq), jnp.int32),
        'masked_positions': jnp.zeros((batch, pred), jnp.int32),
        'masked_ids': jnp.zeros((batch, pred), jnp.int32),
        'masked_weights': jnp.ones((batch, pred), jnp.float32),
    }
    params = nn.meta.unbox(model.init(jax.random.key(0), batch_)['params'])
    loss_fn = mlm_loss_fn(model)
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, batch_, jax.random.key(0), True)[0]))
    cost = grad.lower(params).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)['flops']
    formula = flops.mlm_train_flops(batch, seq, pred, hidden, layers, mlp, vocab)
    # Matmuls are all but a few percent of the work; the formula counts only them.
    assert 0.9 * xla_flops <= formula <= xla_flops


def test_peak_follows_the_precision_in_use():
    """MFU of a float32 run is taken against the peak float32 matmuls reach, not bf16's."""
    h100 = 'NVIDIA H100 80GB HBM3'
    bf16 = flops.peak_flops_per_device(precision='bfloat16', device_kind=h100)
    f32 = flops.peak_flops_per_device(precision='float32', device_kind=h100)
    assert bf16 == 989e12 and f32 == 495e12  # TF32 tensor cores: JAX's default on GPU
    assert flops.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.0
    assert flops.peak_tflops('NVIDIA A100-SXM4-80GB', 'float32') == 156.0
    assert flops.peak_tflops('NVIDIA L40S', 'bfloat16') is None  # not an L4
    # TPU: a float32 dot is one bf16 pass by default, six at 'highest'.
    assert flops.peak_tflops('TPU v5 lite', 'float32') == 197.0
    assert flops.peak_tflops('TPU v5', 'bfloat16') == 459.0
    assert flops.peak_tflops('TPU v4', 'float32', 'highest') == pytest.approx(275.0 / 6)
    assert flops.peak_tflops('NVIDIA H200', 'float32', 'highest') == 67.0
    assert flops.peak_tflops('NVIDIA H200', 'bfloat16', 'highest') == 989.0  # 32-bit only


def test_peak_follows_jax_default_matmul_precision():
    h200 = 'NVIDIA H200'
    with jax.default_matmul_precision('float32'):
        assert flops.peak_flops_per_device(precision='float32', device_kind=h200) == 67e12


def test_peak_flops_override_wins_and_unknown_device_has_none():
    assert flops.peak_flops_per_device(100.0) == 100e12
    assert flops.peak_flops_per_device(100.0, 'float32', 'NVIDIA H100 80GB HBM3') == 100e12
    assert flops.peak_flops_per_device() is None  # CPU: no published peak
