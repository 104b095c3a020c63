"""ViT checkpoints (`model_type` 'vit': ViTModel, ViTForImageClassification) <-> our
`VisionEncoder`.

HF ViT is ours up to layout: a stride-p convolution over patches (kernel [hidden, C, p, p],
ours [p, p, C, hidden]), a cls token first, learned positions, pre-LN layers, a final
LayerNorm (`layernorm`), an optional pooler (Dense + tanh on the cls token).

Inputs differ: our encoder takes images in [0, 1] and maps them to [-1, 1]; an HF ViT
takes what its image processor makes of 0..255 pixels, (x * rescale - mean) / std per
channel. Both are affine in the pixels, so the import folds the checkpoint's processor
(preprocessor_config.json; ViTImageProcessor's 0.5 / 0.5 without one) into the patch
embedding, and our encoder on [0, 1] images computes what the HF model computes on the
processor's output. Export writes a processor with mean = std = 0.5, where nothing needs
folding.
"""

import numpy as np

from core.errors import ConfigError
from interop import rules as r

PATCH = 'embeddings.patch_embeddings.projection'
PREFIXES = ('', 'vit.')  # ViTModel; ViTFor* (the encoder under `vit.`)

DEFAULTS = {  # HF ViTConfig's defaults
    'hidden_size': 768,
    'num_hidden_layers': 12,
    'num_attention_heads': 12,
    'intermediate_size': 3072,
    'hidden_act': 'gelu',
    'hidden_dropout_prob': 0.0,
    'attention_probs_dropout_prob': 0.0,
    'layer_norm_eps': 1e-12,
    'image_size': 224,
    'patch_size': 16,
    'num_channels': 3,
    'qkv_bias': True,
    'pooler_act': 'tanh',
}


def find_prefix(names) -> str | None:
    return next((p for p in PREFIXES if f'{p}{PATCH}.weight' in names), None)


def _square(value, key: str, where: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConfigError(
                f'{where}: {key}={list(value)}: pretrax ViTs take square images and patches'
            )
        value = value[0]
    return int(value)


def model_config(hf: dict, names, where: str) -> dict:
    """Our `model.*` keys for an HF ViT config.json (and its tensor names: the pooler is
    there or not)."""
    c = {**DEFAULTS, **hf}
    prefix = find_prefix(names) or ''
    pooler = f'{prefix}pooler.dense.weight' in names
    hidden, heads = c['hidden_size'], c['num_attention_heads']
    if hidden % heads:
        raise ConfigError(f'{where}: hidden_size {hidden} is not divisible by {heads} heads')
    if pooler and c['pooler_act'] != 'tanh':
        raise ConfigError(
            f'{where}: pooler_act={c["pooler_act"]!r}; the pretrax pooler is Dense + tanh'
        )
    if pooler and (c.get('pooler_output_size') or hidden) != hidden:
        raise ConfigError(
            f'{where}: pooler_output_size={c["pooler_output_size"]} differs from hidden_size '
            f'{hidden}; the pretrax pooler keeps the width'
        )
    image_size = _square(c['image_size'], 'image_size', where)
    patch_size = _square(c['patch_size'], 'patch_size', where)
    if image_size % patch_size:
        raise ConfigError(f'{where}: image_size {image_size} is not a multiple of {patch_size}')
    return {
        'image_size': image_size,
        'patch_size': patch_size,
        'channels': int(c['num_channels']),
        'hidden_size': hidden,
        'num_layers': c['num_hidden_layers'],
        'num_heads': heads,
        'mlp_dim': c['intermediate_size'],
        'dropout_rate': float(c['hidden_dropout_prob']),
        'attention_dropout_rate': float(c['attention_probs_dropout_prob']),
        'activation': r.activation_from_hf(c['hidden_act'], where),
        'layer_norm_eps': float(c['layer_norm_eps']),
        'pooling': 'cls',
        'pooler': pooler,
    }


def encoder_rules(model: dict, ours: str = 'backbone') -> list[r.Rule]:
    """The ViT encoder (`ours`/...) <- ViTModel's tensors (no prefix)."""
    hidden, heads = model['hidden_size'], model['num_heads']
    tokens = (model['image_size'] // model['patch_size']) ** 2 + 1
    rules = [
        r.Rule(
            f'{ours}/patch_embed/kernel',
            (f'{PATCH}.weight',),
            lambda w: w.transpose(2, 3, 1, 0),  # [hidden, C, p, p] -> [p, p, C, hidden]
            lambda k: (k.transpose(3, 2, 0, 1),),
        ),
        *r.copy(f'{ours}/patch_embed/bias', f'{PATCH}.bias'),
        *r.reshaped(f'{ours}/cls', 'embeddings.cls_token', (hidden,), (1, 1, hidden)),
        *r.reshaped(
            f'{ours}/pos_embedding',
            'embeddings.position_embeddings',
            (tokens, hidden),
            (1, tokens, hidden),
        ),
    ]
    for i in range(model['num_layers']):
        hf, us = f'encoder.layer.{i}.', f'{ours}/encoder/layer_{i}/'
        rules += r.layer_norm(f'{us}ln_attention', f'{hf}layernorm_before')
        rules += r.attention(
            f'{us}attention',
            f'{hf}attention.attention.query',
            f'{hf}attention.attention.key',
            f'{hf}attention.attention.value',
            f'{hf}attention.output.dense',
            heads,
        )
        rules += r.layer_norm(f'{us}ln_mlp', f'{hf}layernorm_after')
        rules += r.linear(f'{us}mlp/wi', f'{hf}intermediate.dense')
        rules += r.linear(f'{us}mlp/wo', f'{hf}output.dense')
    rules += r.layer_norm(f'{ours}/encoder/ln_final', 'layernorm')
    if model.get('pooler'):
        rules += r.linear(f'{ours}/pooler/dense', 'pooler.dense')
    return rules


def add_missing_qkv_bias(tensors: dict, hf: dict, prefix: str, model: dict) -> dict:
    """qkv_bias=false: the Q, K, V biases are zeros (ours always has them)."""
    if {**DEFAULTS, **hf}['qkv_bias']:
        return tensors
    tensors = dict(tensors)
    for i in range(model['num_layers']):
        for part in ('query', 'key', 'value'):
            name = f'{prefix}encoder.layer.{i}.attention.attention.{part}.bias'
            tensors.setdefault(name, np.zeros(model['hidden_size'], np.float32))
    return tensors


def input_normalisation(processor: dict | None, channels: int) -> dict:
    """What the HF model's inputs are in terms of ours (x in [0, 1]): hf = (x - mean) / std
    per channel, from the image processor's rescale and normalisation settings."""
    p = processor or {}
    rescale = float(p.get('rescale_factor', 1 / 255)) if p.get('do_rescale', True) else 1.0
    if p.get('do_normalize', True):
        mean = np.broadcast_to(np.asarray(p.get('image_mean', 0.5), np.float64), (channels,))
        std = np.broadcast_to(np.asarray(p.get('image_std', 0.5), np.float64), (channels,))
    else:
        mean, std = np.zeros(channels), np.ones(channels)
    # hf = (255 * rescale * x - mean) / std = (x - mean') / std'
    scale = 255.0 * rescale
    return {'mean': (mean / scale).tolist(), 'std': (std / scale).tolist()}


def fold_normalisation(params: dict, norm: dict, ours: str = 'backbone') -> dict:
    """Rewrites the patch embedding so that, fed our 2x - 1, it gives what the HF one gives
    on (x - mean) / std:  K = W / (2 std),  b' = b + sum(K) - sum(W mean / std)."""
    mean, std = np.asarray(norm['mean']), np.asarray(norm['std'])
    embed = params[ours]['patch_embed']
    w = embed['kernel'].astype(np.float64)  # [p, p, C, hidden]
    kernel = w / (2.0 * std)[None, None, :, None]
    bias = (
        embed['bias']
        + kernel.sum((0, 1, 2))
        - (w * (mean / std)[None, None, :, None]).sum((0, 1, 2))
    )
    embed['kernel'], embed['bias'] = kernel.astype(np.float32), bias.astype(np.float32)
    return params


def hf_config(model: dict, pooler: bool) -> dict:
    """An HF ViTConfig (config.json) for our ViT `model` config."""
    if model.get('pooling', 'cls') != 'cls':
        raise ConfigError(
            f'model.pooling={model.get("pooling")!r}: this ViT has no cls token, and a Hugging '
            'Face ViT always has one; export-hf writes ViTs with model.pooling=cls'
        )
    hidden = model['hidden_size']
    return {
        'architectures': ['ViTModel'],
        'model_type': 'vit',
        'hidden_size': hidden,
        'num_hidden_layers': model['num_layers'],
        'num_attention_heads': model['num_heads'],
        'intermediate_size': model['mlp_dim'],
        'hidden_act': r.activation_to_hf(model.get('activation', 'gelu')),
        'hidden_dropout_prob': float(model.get('dropout_rate', 0.0)),
        'attention_probs_dropout_prob': float(model.get('attention_dropout_rate', 0.0)),
        'layer_norm_eps': float(model.get('layer_norm_eps', 1e-6)),
        'image_size': model['image_size'],
        'patch_size': model['patch_size'],
        'num_channels': model.get('channels', 3),
        'qkv_bias': True,
        'encoder_stride': model['patch_size'],
        'pooler_act': 'tanh',
        'pooler_output_size': hidden,
        'initializer_range': 0.02,
    }


def preprocessor_config(model: dict) -> dict:
    """ViTImageProcessor settings whose output is exactly our encoder's input scaling:
    0..255 -> [0, 1] -> [-1, 1]."""
    channels = model.get('channels', 3)
    return {
        'image_processor_type': 'ViTImageProcessor',
        'do_resize': True,
        'size': {'height': model['image_size'], 'width': model['image_size']},
        'resample': 2,
        'do_rescale': True,
        'rescale_factor': 1 / 255,
        'do_normalize': True,
        'image_mean': [0.5] * channels,
        'image_std': [0.5] * channels,
    }
