"""BERT-family checkpoints (`model_type` 'bert': BertModel, BertForMaskedLM,
BertForPreTraining, MiniLM-style BERTs) <-> our `TextEncoder` and `BertForMlm`.

HF BERT is post-LN: embeddings (word + position + token type) -> LayerNorm, then per layer
LayerNorm(x + attention(x)) and LayerNorm(x + MLP(x)); the pooler is Dense + tanh on
[CLS]; the MLM head is a Dense + activation + LayerNorm transform before the output layer
tied to the word embeddings, plus a bias. Every part maps onto a model option
(`layer_norm='post'`, `activation`, `layer_norm_eps`, `type_vocab_size`, `pooler`).
"""

import numpy as np

from core.errors import ConfigError
from interop import rules as r

WORD_EMBEDDINGS = 'embeddings.word_embeddings.weight'
PREFIXES = ('', 'bert.')  # BertModel; BertFor* (the encoder under `bert.`)
MLM = 'cls.predictions.'

# HF BertConfig's defaults, for keys a config.json leaves out.
DEFAULTS = {
    'vocab_size': 30522,
    'hidden_size': 768,
    'num_hidden_layers': 12,
    'num_attention_heads': 12,
    'intermediate_size': 3072,
    'hidden_act': 'gelu',
    'hidden_dropout_prob': 0.1,
    'attention_probs_dropout_prob': 0.1,
    'max_position_embeddings': 512,
    'type_vocab_size': 2,
    'layer_norm_eps': 1e-12,
}


def find_prefix(names) -> str | None:
    """'' or 'bert.': where the encoder's tensors are; None when there is no BERT encoder."""
    return next((p for p in PREFIXES if p + WORD_EMBEDDINGS in names), None)


def has_mlm_head(names) -> bool:
    return MLM + 'transform.dense.weight' in names


def normalise(tensors: dict) -> dict:
    """Older names of the same tensors: LayerNorm gamma/beta, the output bias saved as the
    decoder's bias."""
    out = {}
    for name, value in tensors.items():
        if name.endswith('LayerNorm.gamma'):
            name = name[: -len('gamma')] + 'weight'
        elif name.endswith('LayerNorm.beta'):
            name = name[: -len('beta')] + 'bias'
        out[name] = value
    if MLM + 'bias' not in out and MLM + 'decoder.bias' in out:
        out[MLM + 'bias'] = out[MLM + 'decoder.bias']
    return out


def model_config(hf: dict, names, where: str) -> dict:
    """Our `model.*` keys for an HF BERT config.json (and its tensor names: the pooler is
    there or not). Anything our encoder cannot reproduce is a ConfigError naming the key."""
    c = {**DEFAULTS, **hf}
    if c.get('is_decoder') or c.get('add_cross_attention'):
        raise ConfigError(
            f'{where}: is_decoder / add_cross_attention is set: a causal or cross-attending '
            'BERT is not an encoder pretrax can run; import an encoder checkpoint'
        )
    position = c.get('position_embedding_type') or 'absolute'
    if position != 'absolute':
        raise ConfigError(
            f'{where}: position_embedding_type={position!r}; pretrax BERT has learned absolute '
            'positions only (position_embedding_type="absolute")'
        )
    hidden, heads = c['hidden_size'], c['num_attention_heads']
    if hidden % heads or (c.get('head_dim') or hidden // heads) != hidden // heads:
        raise ConfigError(
            f'{where}: hidden_size {hidden} with {heads} heads of head_dim '
            f'{c.get("head_dim")}: pretrax needs head_dim = hidden_size / num_attention_heads'
        )
    if c.get('tie_word_embeddings') is False and has_mlm_head(names):
        raise ConfigError(
            f'{where}: tie_word_embeddings=false: the MLM output layer is its own matrix, and '
            "pretrax's MLM head is tied to the token embeddings"
        )
    prefix = find_prefix(names) or ''
    return {
        'vocab_size': c['vocab_size'],
        'hidden_size': hidden,
        'num_layers': c['num_hidden_layers'],
        'num_heads': heads,
        'mlp_dim': c['intermediate_size'],
        'max_len': c['max_position_embeddings'],
        'type_vocab_size': c['type_vocab_size'],
        'dropout_rate': float(c['hidden_dropout_prob']),
        'attention_dropout_rate': float(c['attention_probs_dropout_prob']),
        'activation': r.activation_from_hf(c['hidden_act'], where),
        'layer_norm': 'post',
        'layer_norm_eps': float(c['layer_norm_eps']),
        'pooler': f'{prefix}pooler.dense.weight' in names,
    }


def encoder_rules(model: dict, ours: str = 'backbone') -> list[r.Rule]:
    """The encoder (`ours`/...) <- BertModel's tensors (no prefix)."""
    heads = model['num_heads']
    rules = [
        *r.copy(f'{ours}/embeddings/token/embedding', WORD_EMBEDDINGS),
        *r.copy(f'{ours}/embeddings/position', 'embeddings.position_embeddings.weight'),
        *r.layer_norm(f'{ours}/embeddings/ln', 'embeddings.LayerNorm'),
    ]
    if model['type_vocab_size']:
        rules += r.copy(
            f'{ours}/embeddings/segment/embedding', 'embeddings.token_type_embeddings.weight'
        )
    for i in range(model['num_layers']):
        hf, us = f'encoder.layer.{i}.', f'{ours}/encoder/layer_{i}/'
        rules += r.attention(
            f'{us}attention',
            f'{hf}attention.self.query',
            f'{hf}attention.self.key',
            f'{hf}attention.self.value',
            f'{hf}attention.output.dense',
            heads,
        )
        rules += r.layer_norm(f'{us}ln_attention', f'{hf}attention.output.LayerNorm')
        rules += r.linear(f'{us}mlp/wi', f'{hf}intermediate.dense')
        rules += r.linear(f'{us}mlp/wo', f'{hf}output.dense')
        rules += r.layer_norm(f'{us}ln_mlp', f'{hf}output.LayerNorm')
    if model.get('pooler'):
        rules += r.linear(f'{ours}/pooler/dense', 'pooler.dense')
    return rules


def mlm_rules() -> list[r.Rule]:
    """BertForMlm's `mlm_head` and `output_bias` <- `cls.predictions.*` (the decoder
    matrix is the tied word embeddings)."""
    return [
        *r.linear('mlm_head/transform', MLM + 'transform.dense'),
        *r.layer_norm('mlm_head/ln', MLM + 'transform.LayerNorm'),
        *r.copy('output_bias', MLM + 'bias'),
    ]


def check_tied_decoder(tensors: dict, prefix: str, where: str) -> None:
    """A saved decoder matrix must be the word embeddings (our output layer is tied)."""
    decoder = tensors.get(MLM + 'decoder.weight')
    if decoder is None:
        return
    words = tensors[prefix + WORD_EMBEDDINGS]
    if decoder.shape != words.shape or not np.allclose(decoder, words):
        raise ConfigError(
            f'{where}: cls.predictions.decoder.weight differs from the word embeddings: an '
            "untied MLM output layer, and pretrax's MLM head is tied to the token embeddings"
        )


def hf_config(model: dict, with_mlm_head: bool) -> dict:
    """An HF BertConfig (config.json) for our text encoder's `model` config."""
    if model.get('layer_norm', 'post') != 'post':
        raise ConfigError(
            f'model.layer_norm={model.get("layer_norm")!r}: Hugging Face BERT is post-LN, so '
            "export-hf writes BERT only for text encoders with model.layer_norm='post'"
        )
    return {
        'architectures': ['BertForMaskedLM' if with_mlm_head else 'BertModel'],
        'model_type': 'bert',
        'vocab_size': model['vocab_size'],
        'hidden_size': model['hidden_size'],
        'num_hidden_layers': model['num_layers'],
        'num_attention_heads': model['num_heads'],
        'intermediate_size': model['mlp_dim'],
        'hidden_act': r.activation_to_hf(model.get('activation', 'gelu')),
        'hidden_dropout_prob': float(model.get('dropout_rate', 0.1)),
        'attention_probs_dropout_prob': float(model.get('attention_dropout_rate', 0.0)),
        'max_position_embeddings': model['max_len'],
        # HF BERT always adds a token-type embedding: one zero row adds nothing.
        'type_vocab_size': max(int(model.get('type_vocab_size', 2)), 1),
        'layer_norm_eps': float(model.get('layer_norm_eps', 1e-12)),
        'initializer_range': 0.02,
        'pad_token_id': 0,
        'position_embedding_type': 'absolute',
        'tie_word_embeddings': True,
        'is_decoder': False,
        'add_cross_attention': False,
    }


def export_tensors(params: dict, model: dict, with_mlm_head: bool) -> dict[str, np.ndarray]:
    """HF tensors of our saved params ({'backbone': ..., 'mlm_head': ..., 'output_bias':
    ...}): BertModel names, or BertForMaskedLM's (`bert.` + `cls.predictions.`)."""
    prefix = 'bert.' if with_mlm_head else ''
    tensors = r.to_hf(params, encoder_rules(model), prefix)
    if not model.get('type_vocab_size'):
        tensors[prefix + 'embeddings.token_type_embeddings.weight'] = np.zeros(
            (1, model['hidden_size']), np.float32
        )
    if with_mlm_head:
        tensors.update(r.to_hf(params, mlm_rules(), ''))
    return tensors
