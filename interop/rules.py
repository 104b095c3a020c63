"""How our parameters are made of Hugging Face tensors, one `Rule` per parameter, so that
import and export read the same table in opposite directions.

Layouts: an HF `nn.Linear` weight is [out, in], our Dense kernel [in, out]. Our attention
projects Q, K and V with one fused kernel [hidden, 3, heads, head_dim] (bias [3, heads,
head_dim]) and maps back with [heads, head_dim, hidden]; HF keeps three [hidden, hidden]
Linears and one output Linear, heads contiguous along `out`.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from core.errors import ConfigError, DataError

# HF `hidden_act` -> our `model.activation`. The tanh approximations differ only in how the
# same formula is written (gelu_fast expands sqrt(2/pi)).
ACTIVATIONS_FROM_HF = {
    'gelu': 'gelu',
    'gelu_python': 'gelu',
    'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'gelu_python_tanh': 'gelu_tanh',
    'gelu_fast': 'gelu_tanh',
    'relu': 'relu',
}
ACTIVATIONS_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu'}


def activation_from_hf(hf_act, where: str) -> str:
    if hf_act not in ACTIVATIONS_FROM_HF:
        raise ConfigError(
            f'{where}: hidden_act={hf_act!r} has no pretrax equivalent; supported: '
            f'{sorted(ACTIVATIONS_FROM_HF)} (model.activation gelu, gelu_tanh, relu)'
        )
    return ACTIVATIONS_FROM_HF[hf_act]


def activation_to_hf(activation: str) -> str:
    if activation not in ACTIVATIONS_TO_HF:
        raise ConfigError(
            f'model.activation={activation!r} has no Hugging Face equivalent; expected one of '
            f'{sorted(ACTIVATIONS_TO_HF)}'
        )
    return ACTIVATIONS_TO_HF[activation]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One of our parameters (`ours`, a '/'-separated path) and the HF tensors it is made
    of (`hf`, names without the model's prefix). `to_ours(*hf_tensors)` builds ours;
    `to_hf(ours)` gives the HF tensors back, in the order of `hf`."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def copy(ours: str, hf: str) -> list[Rule]:
    return [Rule(ours, (hf,), lambda w: w, lambda w: (w,))]


def reshaped(ours: str, hf: str, ours_shape: tuple, hf_shape: tuple) -> list[Rule]:
    """The same values in another shape (HF's [1, 1, hidden] cls token is our [hidden])."""
    return [Rule(ours, (hf,), lambda w: w.reshape(ours_shape), lambda w: (w.reshape(hf_shape),))]


def linear(ours: str, hf: str) -> list[Rule]:
    """Dense `ours/{kernel,bias}` <- Linear `hf.{weight,bias}` (weight transposed)."""
    return [
        Rule(f'{ours}/kernel', (f'{hf}.weight',), lambda w: w.T, lambda k: (k.T,)),
        *copy(f'{ours}/bias', f'{hf}.bias'),
    ]


def layer_norm(ours: str, hf: str) -> list[Rule]:
    return [*copy(f'{ours}/scale', f'{hf}.weight'), *copy(f'{ours}/bias', f'{hf}.bias')]


def attention(ours: str, q: str, k: str, v: str, out: str, heads: int) -> list[Rule]:
    """Our fused `ours/qkv` and `ours/out` <- HF's query, key, value and output Linears."""

    def qkv_kernel(wq, wk, wv):
        hidden = wq.shape[1]
        return np.stack([wq.T, wk.T, wv.T], axis=1).reshape(hidden, 3, heads, -1)

    def qkv_kernel_hf(kernel):
        fused = kernel.reshape(kernel.shape[0], 3, -1)  # [hidden, 3, heads * head_dim]
        return tuple(fused[:, i].T for i in range(3))

    def qkv_bias(bq, bk, bv):
        return np.stack([bq, bk, bv]).reshape(3, heads, -1)

    def out_kernel(w):
        return w.T.reshape(heads, -1, w.shape[0])

    return [
        Rule(
            f'{ours}/qkv/kernel',
            (f'{q}.weight', f'{k}.weight', f'{v}.weight'),
            qkv_kernel,
            qkv_kernel_hf,
        ),
        Rule(
            f'{ours}/qkv/bias',
            (f'{q}.bias', f'{k}.bias', f'{v}.bias'),
            qkv_bias,
            lambda b: tuple(b.reshape(3, -1)),
        ),
        Rule(
            f'{ours}/out/kernel',
            (f'{out}.weight',),
            out_kernel,
            lambda kernel: (kernel.reshape(-1, kernel.shape[-1]).T,),
        ),
        *copy(f'{ours}/out/bias', f'{out}.bias'),
    ]


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split('/')
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for key in path.split('/'):
        tree = tree[key]
    return tree


def to_pretrax(tensors: dict[str, np.ndarray], rules: list[Rule], prefix: str, where: str):
    """Our params (nested dicts of float32 arrays) from HF `tensors` ({prefix + name:
    array}); returns (params, the HF names used). A missing tensor is a DataError naming it."""
    params, used = {}, set()
    for rule in rules:
        names = [prefix + n for n in rule.hf]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise DataError(
                f'{where}: tensor {missing[0]!r} is missing (needed for our {rule.ours}); the '
                'weights do not match config.json: re-save the checkpoint with transformers '
                '`save_pretrained`, or fix config.json'
            )
        value = rule.to_ours(*(np.asarray(tensors[n], np.float32) for n in names))
        _set(params, rule.ours, np.ascontiguousarray(value, np.float32))
        used.update(names)
    return params, used


def to_hf(params: dict, rules: list[Rule], prefix: str) -> dict[str, np.ndarray]:
    """HF tensors ({prefix + name: float32 array}) from our nested `params`."""
    tensors = {}
    for rule in rules:
        try:
            value = np.asarray(_get(params, rule.ours), np.float32)
        except KeyError as e:
            raise ConfigError(
                f'the checkpoint has no {rule.ours}, which the model config implies; is the '
                'config.json beside it the one it was trained with?'
            ) from e
        for name, array in zip(rule.hf, rule.to_hf(value)):
            tensors[prefix + name] = np.ascontiguousarray(array, np.float32)
    return tensors
