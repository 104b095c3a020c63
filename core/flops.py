"""Model FLOPs per training step, and MFU against the device's peak.

MFU counts the model's matmul FLOPs (forward x 3 for forward + backward), as the PaLM
paper defines it: rematerialisation and other overheads do not count as useful work.
"""

import jax

# Dense bf16 peak TFLOP/s per device (vendor figures, no sparsity).
PEAK_TFLOPS_BF16 = {
    'H100': 989.0,
    'H200': 989.0,
    'A100': 312.0,
    'L4': 121.0,
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5p': 459.0,
    'TPU v6 lite': 918.0,
    'TPU v6e': 918.0,
}


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


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one local device, or None when unknown (e.g. CPU without override)."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS_BF16.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None
