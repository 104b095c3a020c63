"""Model FLOPs per training step, and MFU against the device's peak for the precision in use.

MFU counts the model's matmul FLOPs (forward x 3 for forward + backward), as the PaLM
paper defines it: rematerialisation and other overheads do not count as useful work.

Peak FLOP/s per device: vendor datasheets, dense (no sparsity), by `device_kind` and
`config.precision` (docs/throughput.md has the table with its sources):

| device_kind | bfloat16 | float32 (JAX default) | float32, matmul precision highest |
|---|---:|---:|---:|
| H100 SXM (`H100`) | 989 | 495 (TF32) | 67 |
| H100 PCIe | 756 | 378 (TF32) | 51 |
| H100 NVL | 835 | 418 (TF32) | 60 |
| H200 SXM (`H200`) | 989 | 495 (TF32) | 67 |
| H200 NVL | 835 | 418 (TF32) | 60 |
| A100 (SXM, PCIe) | 312 | 156 (TF32) | 19.5 |
| L4 | 121 | 60 (TF32) | 30.3 |
| TPU v4 | 275 | 275 (1 bf16 pass) | 46 (6 passes) |
| TPU v5e (`TPU v5 lite`) | 197 | 197 | 33 |
| TPU v5p (`TPU v5`, `TPU v5p`) | 459 | 459 | 77 |
| TPU v6e (`TPU v6 lite`) | 918 | 918 | 153 |

float32 follows JAX's default matmul precision: TF32 tensor cores on NVIDIA GPUs from Ampere
on, one bf16 pass on TPU; `jax_default_matmul_precision` moves it (docs/throughput.md).
Other devices (CPU, other GPUs) have no peak; `peak_tflops` sets one and always wins.
"""

import re

import jax

# (device_kind pattern, bf16, tf32, fp32) dense TFLOP/s; the first match wins, so more
# specific names come first. fp32 None: a TPU (derived from bf16 passes).
PEAK_TFLOPS = (
    (r'\bH100 PCIe', 756.0, 378.0, 51.0),
    (r'\bH100 NVL', 835.0, 418.0, 60.0),
    (r'\bH100\b', 989.0, 495.0, 67.0),
    (r'\bH200 NVL', 835.0, 418.0, 60.0),
    (r'\bH200\b', 989.0, 495.0, 67.0),
    (r'\bA100\b', 312.0, 156.0, 19.5),
    (r'\bL4\b', 121.0, 60.0, 30.3),
    (r'\bTPU v4(?! lite)\b', 275.0, None, None),
    (r'\bTPU v5 lite\b|\bTPU v5e\b', 197.0, None, None),
    (r'\bTPU v5p?\b', 459.0, None, None),
    (r'\bTPU v6 lite\b|\bTPU v6e\b', 918.0, None, None),
)

# jax_default_matmul_precision -> how float32 dots run: 'default' (TF32 / 1 bf16 pass),
# 'tf32' (TF32 / 3 bf16 passes) or 'fp32' (FP32 / 6 bf16 passes).
_MATMUL_PRECISION = {
    None: 'default',
    'default': 'default',
    'fastest': 'default',
    'bfloat16': 'default',
    'high': 'tf32',
    'tensorfloat32': 'tf32',
    'bfloat16_3x': 'tf32',
    'highest': 'fp32',
    'float32': 'fp32',
}
_TPU_PASSES = {'default': 1, 'tf32': 3, 'fp32': 6}


def encoder_forward_flops(batch: int, seq_len: int, hidden: int, layers: int, mlp: int) -> float:
    """Matmul FLOPs of the encoder's forward pass (2 per multiply-add)."""
    tokens = batch * seq_len
    projections = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp)  # qkv, out, mlp
    attention = 2 * 2 * batch * seq_len * seq_len * hidden  # q.k and probs.v
    return layers * (projections + attention)


def mlm_train_flops(
    batch: int, seq_len: int, predictions: int, hidden: int, layers: int, mlp: int, vocab: int
) -> float:
    """Training FLOPs of one MLM step: encoder + head at the masked positions only."""
    head = 2 * batch * predictions * (hidden * hidden + hidden * vocab)
    return 3.0 * (encoder_forward_flops(batch, seq_len, hidden, layers, mlp) + head)


def vit_train_flops(vit, images: int, head_flops_per_image: float = 0.0) -> float:
    """Forward x 3 matmul FLOPs of a ViT over `images` images (patch embedding included)."""
    patch = 2 * images * vit.grid**2 * vit.patch_size**2 * vit.channels * vit.hidden_size
    encoder = encoder_forward_flops(
        images, vit.num_tokens, vit.hidden_size, vit.num_layers, vit.mlp_dim
    )
    return 3.0 * (patch + encoder + images * head_flops_per_image)


def peak_tflops(
    device_kind: str, precision: str = 'float32', matmul_precision: str | None = None
) -> float | None:
    """Dense peak TFLOP/s of one `device_kind` device computing in `precision` (float32 |
    bfloat16) at `matmul_precision` (jax_default_matmul_precision), None when unknown."""
    row = next((r for r in PEAK_TFLOPS if re.search(r[0], device_kind, re.IGNORECASE)), None)
    if row is None:
        return None
    _, bf16, tf32, fp32 = row
    if precision == 'bfloat16':
        return bf16
    mode = _MATMUL_PRECISION.get(matmul_precision)
    if mode is None:  # a dot algorithm preset or the like: no table entry
        return None
    if tf32 is None:  # TPU: float32 dots are bf16 passes
        return bf16 / _TPU_PASSES[mode]
    return {'default': tf32, 'tf32': tf32, 'fp32': fp32}[mode]


def peak_flops_per_device(
    override_tflops: float = 0.0, precision: str = 'float32', device_kind: str | None = None
) -> float | None:
    """Peak FLOP/s of one local device for MFU, or None when unknown (e.g. CPU without an
    override): `override_tflops` (config.peak_tflops) if set, else the table above for this
    device and `precision` under the current jax_default_matmul_precision."""
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    tflops = peak_tflops(kind, precision, jax.config.jax_default_matmul_precision)
    return tflops * 1e12 if tflops is not None else None
