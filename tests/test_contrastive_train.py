"""End to end through `launch.py pretrain`: SimCLR, CLIP / SigLIP and SimCSE runs with tiny
models leave workdirs that meet the contract, carry their evaluators' metrics, and hold
backbones that restore through `core.checkpoint.restore_params` into the standalone
encoders (the path fine-tuning takes); bad input stops with a message naming the fix."""

import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from core import checkpoint
from models.bert import BertConfig, TextEncoder
from models.contrastive import SimClrModel, TwoTower
from models.vit import VisionEncoder, VitConfig
from tests.conftest import SMALL_RUN, check_evals_timed, launch
from tests.contract import check_workdir

SIZES = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
TINY_VIT = [f'--config.model.{k}={v}' for k, v in SIZES.items()]
SCHEDULE = [
    '--config.batch_size=32',
    '--config.total_steps=4',
    '--config.log_every=1',
    '--config.eval_every=2',
    '--config.checkpoint_every=2',
    '--config.eval_steps=2',
]
SIMCLR = [
    'pretrain',
    '--config',
    'configs/vit_simclr.py:tiny',
    *TINY_VIT,
    '--config.model.proj_hidden=64',
    '--config.model.proj_dim=16',
    *SCHEDULE,
    '--config.eval.probe_train_examples=200',
]
CLIP = [
    *TINY_VIT,
    *[f'--config.model.text.{k}={v}' for k, v in SIZES.items()],
    '--config.model.text.vocab_size=256',
    '--config.model.embed_dim=16',
    *SCHEDULE,
    '--config.eval.max_pairs=200',
]
# The digits ViT of the presets: 16x16 grey images in 4x4 patches.
IMAGE = dict(image_size=16, patch_size=4, channels=1)
PROBE_KEYS = ('knn_accuracy', 'linear_probe_accuracy', 'linear_probe_5shot_accuracy')
# Adam moves a weight by at most about the learning rate per step; 4 warm-up steps add up
# to far less than this, while any other initialisation differs by far more.
TRAINED_TOLERANCE = 1e-2


def rows(workdir: str, split: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == split]


def read_json(workdir: str, name: str) -> dict:
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def abstract_params(module: nn.Module, *example) -> dict:
    """Shapes and dtypes of a fresh `module.init`, unboxed: what restore_params fills."""
    return jax.eval_shape(
        lambda rng: nn.meta.unbox(module.init(rng, *example)['params']), jax.random.key(0)
    )


def fresh_params(module: nn.Module, rng: jax.Array, *example) -> dict:
    return nn.meta.unbox(module.init(rng, *example)['params'])


def max_abs_diff(a, b) -> dict[str, float]:
    """Per leaf ('path/to/leaf'), the largest absolute difference of two param trees."""
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(diffs)}


def assert_same_shapes(params, abstract) -> None:
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.all(np.isfinite(np.asarray(got)))


def assert_trained_from(restored, start) -> None:
    """Every leaf moved off the run's starting point (trained), and only by a few small
    optimizer steps (so `start` is the right starting point, and the right subtree)."""
    for path, d in max_abs_diff(restored, start).items():
        assert 0.0 < d < TRAINED_TOLERANCE, (path, d)


def vision_encoder() -> tuple[VisionEncoder, jax.Array]:
    vit = VitConfig(**IMAGE, **SIZES)
    return VisionEncoder(vit), jnp.zeros((1, 16, 16, 1), jnp.float32)


def text_encoder(text_config: dict) -> tuple[TextEncoder, jax.Array, jax.Array]:
    """The CLIP text tower as a standalone TextEncoder, from a run's config.json."""
    cfg = BertConfig(
        vocab_size=text_config['vocab_size'],
        max_len=text_config['max_len'],
        type_vocab_size=0,
        layer_norm='pre',
        **SIZES,
    )
    ids = jnp.zeros((1, text_config['max_len']), jnp.int32)
    return TextEncoder(cfg), ids, jnp.ones_like(ids)


def run_init_rng(seed: int = 0) -> jax.Array:
    """The key the trainer initialises its params with (core/trainer.py)."""
    return jax.random.split(jax.random.key(seed))[0]


# --- SimCLR -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def simclr_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    workdir = str(tmp_path_factory.mktemp('simclr') / 'run')
    r = launch(*SIMCLR, '--workdir', workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


def test_simclr_workdir_meets_the_contract(simclr_run):
    check_workdir(simclr_run[0], 'linear_probe_accuracy')


def test_simclr_on_digits_evaluates_with_probes(simclr_run):
    workdir, _ = simclr_run
    evals = rows(workdir, 'eval')
    assert [r['step'] for r in evals] == [0, 2, 4]
    for row in evals:
        for key in (*PROBE_KEYS, 'contrastive_loss'):
            assert key in row, (row['step'], key)
        for key in PROBE_KEYS:
            assert 0.0 <= row[key] <= 1.0, (row['step'], key, row[key])
        # NT-Xent over a batch of 32 pairs starts near log(2 * 32 - 1).
        assert 0.0 < row['contrastive_loss'] < 2 * np.log(63), row
    # 10 balanced classes: a linear probe on even random ViT features beats chance.
    assert evals[0]['linear_probe_accuracy'] > 0.2
    summary = read_json(workdir, 'summary.json')
    assert summary['task'] == 'simclr' and summary['completed'] and summary['steps'] == 4
    assert summary['final_linear_probe_accuracy'] == evals[-1]['linear_probe_accuracy']
    assert 'best_linear_probe_accuracy' in summary
    assert '4' in os.listdir(os.path.join(workdir, 'checkpoints'))


def test_simclr_evals_report_their_time_and_compile_once(simclr_run):
    workdir, r = simclr_run
    check_evals_timed(workdir, r.stderr, [0, 2, 4])  # loss, k-NN and linear-probe functions


def test_simclr_backbone_restores_into_a_vision_encoder(simclr_run):
    """The fine-tuning path: the `backbone` subtree into a standalone VisionEncoder."""
    workdir, _ = simclr_run
    encoder, images = vision_encoder()
    abstract = abstract_params(encoder, images)
    params, step = checkpoint.restore_params(workdir, abstract, subtree=('backbone',))
    assert step == 4
    assert_same_shapes(params, abstract)
    # Trained: off a fresh encoder's init, and off the run's own starting point (rebuilt
    # here with the trainer's key) by a few warm-up steps of AdamW.
    fresh = fresh_params(encoder, jax.random.key(1), images)
    assert max(max_abs_diff(params, fresh).values()) > TRAINED_TOLERANCE
    model = SimClrModel(encoder.cfg, proj_hidden=64, proj_dim=16, proj_layers=2)
    start = fresh_params(model, run_init_rng(), images)['backbone']
    assert_trained_from(params, start)
    # The features the probes saw come from these weights: the backbone applies.
    tokens = encoder.apply({'params': params}, images)
    assert tokens.shape == (1, 17, 32) and bool(jnp.all(jnp.isfinite(tokens)))


def test_simclr_pmap_on_two_devices(tmp_path, simclr_run):
    workdir = str(tmp_path / 'pmap')
    r = launch(
        *SIMCLR,
        '--workdir',
        workdir,
        '--config.parallelism=pmap',
        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'pmap over 2 devices' in r.stderr
    summary = read_json(workdir, 'summary.json')
    assert summary['completed'] and summary['steps'] == 4
    assert [r['step'] for r in rows(workdir, 'train')] == [1, 2, 3, 4]
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))
    # Same initial params, deterministic frozen features: the step-0 probes match jit's.
    pmap0, jit0 = rows(workdir, 'eval')[0], rows(simclr_run[0], 'eval')[0]
    for key in PROBE_KEYS:
        assert abs(pmap0[key] - jit0[key]) < 1e-6, (key, pmap0[key], jit0[key])


# --- CLIP / SigLIP ------------------------------------------------------------------------


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_clip_and_siglip_runs_and_towers_restore(tmp_path, loss):
    workdir = str(tmp_path / loss)
    preset = 'tiny' if loss == 'softmax' else 'tiny,sigmoid'
    r = launch('pretrain', '--config', f'configs/clip.py:{preset}', '--workdir', workdir, *CLIP)
    assert r.returncode == 0, r.stderr[-3000:]
    check_workdir(workdir, 'i2t_recall_at_1')
    assert read_json(workdir, 'summary.json')['task'] == f'clip_{loss}'

    evals = rows(workdir, 'eval')
    assert [r['step'] for r in evals] == [0, 2, 4]
    for row in evals:
        for key in ('i2t_recall_at_1', 't2i_recall_at_1', 'recall_at_1_chance'):
            assert 0.0 <= row[key] <= 1.0, (row['step'], key, row.get(key))
        assert 0.0 < row['recall_at_1_chance'] < 1.0
    train = rows(workdir, 'train')
    assert [r['step'] for r in train] == [1, 2, 3, 4] and all('scale' in r for r in train)
    # The learned temperature starts where the recipe says: CLIP 1/0.07, SigLIP 10 and -10.
    first = train[0]
    if loss == 'softmax':
        assert abs(first['scale'] - 1 / 0.07) < 1e-3, first
    else:
        assert abs(first['scale'] - 10.0) < 1e-3 and abs(first['bias'] + 10.0) < 1e-3, first

    # Both towers restore into the standalone encoders fine-tuning uses.
    text_config = read_json(workdir, 'config.json')['model']['text']
    assert text_config['vocab_size'] == 256
    image_encoder, images = vision_encoder()
    text, ids, mask = text_encoder(text_config)
    # The run's starting point: a TwoTower of these towers under the trainer's key (a
    # tower's init depends on its own path only, not on the temperature or projections).
    two_tower = TwoTower(image_encoder.cfg, text.cfg, embed_dim=16)
    start = fresh_params(
        two_tower, run_init_rng(), {'image': images, 'input_ids': ids, 'input_mask': mask}
    )
    for subtree, module, example in (
        ('image_backbone', image_encoder, (images,)),
        ('text_backbone', text, (ids, mask)),
    ):
        abstract = abstract_params(module, *example)
        params, step = checkpoint.restore_params(workdir, abstract, subtree=(subtree,))
        assert step == 4
        assert_same_shapes(params, abstract)
        fresh = fresh_params(module, jax.random.key(1), *example)
        assert max(max_abs_diff(params, fresh).values()) > TRAINED_TOLERANCE, subtree
        assert_trained_from(params, start[subtree])
        assert bool(jnp.all(jnp.isfinite(module.apply({'params': params}, *example))))


def test_clip_from_local_caption_files(tmp_path):
    from data import digits

    captions = digits.write_digits_captions(str(tmp_path / 'pairs'), limit=200)
    workdir = str(tmp_path / 'run')
    r = launch(
        'pretrain',
        '--config',
        'configs/clip.py:tiny',
        '--workdir',
        workdir,
        *CLIP,
        f'--config.data.files={captions}',
        '--config.total_steps=2',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # 200 pairs, about 20% held out; the vocabulary is trained on the files' captions.
    found = re.search(r'(\d+) train / (\d+) eval image-caption pairs', r.stderr)
    assert found, r.stderr[-3000:]
    train, held_out = int(found[1]), int(found[2])
    assert train + held_out == 200 and 20 <= held_out <= 60, (train, held_out)
    assert read_json(workdir, 'config.json')['data']['files'] == captions
    assert os.path.getsize(os.path.join(workdir, 'vocab.txt')) > 0
    evals = rows(workdir, 'eval')
    assert [r['step'] for r in evals] == [0, 2]
    assert all('i2t_recall_at_1' in r and 'contrastive_loss' in r for r in evals)
    assert read_json(workdir, 'summary.json')['completed']


# --- SimCSE -------------------------------------------------------------------------------


@pytest.mark.slow  # two runs (MLM, then SimCSE): 25-50 s on 2 shared cores
def test_simcse_from_an_mlm_run(tmp_path, pydoc_vocab):
    """MLM then SimCSE: the SimCSE run takes the MLM run's backbone and its vocabulary."""
    mlm_dir, simcse_dir = str(tmp_path / 'mlm'), str(tmp_path / 'simcse')
    schedule = [
        '--config.total_steps=4',
        '--config.log_every=1',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
    ]
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        mlm_dir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        *schedule,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # SimCSE has no masking keys; everything else (sizes, seq_len, batch) as the MLM run.
    simcse_run = [a for a in SMALL_RUN if not a.startswith('--config.data.max_predictions')]
    assert '--config.data.seq_len=32' in simcse_run
    r = launch(
        'pretrain',
        '--config',
        'configs/simcse.py:tiny',
        '--workdir',
        simcse_dir,
        *simcse_run,
        f'--config.init_from={mlm_dir}',
        *schedule,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'initialised backbone from' in r.stderr and mlm_dir in r.stderr, r.stderr[-3000:]
    with (
        open(os.path.join(mlm_dir, 'vocab.txt')) as a,
        open(os.path.join(simcse_dir, 'vocab.txt')) as b,
    ):
        assert a.read() == b.read()  # carried over from init_from (no vocab_file given)
    evals = rows(simcse_dir, 'eval')
    assert [r['step'] for r in evals] == [0, 2, 4]
    for row in evals:
        for key in ('knn_accuracy', 'linear_probe_accuracy', 'contrastive_loss'):
            assert key in row, (row['step'], key)
        assert 0.0 <= row['knn_accuracy'] <= 1.0 and 0.0 <= row['linear_probe_accuracy'] <= 1.0
    assert 'final_linear_probe_accuracy' in read_json(simcse_dir, 'summary.json')
    check_workdir(simcse_dir, 'linear_probe_accuracy')

    # The SimCSE backbone is the MLM backbone plus a few warm-up steps, not a fresh init.
    cfg = BertConfig.from_config(read_json(mlm_dir, 'config.json')['model'])
    encoder = TextEncoder(cfg)
    ids = jnp.zeros((1, 32), jnp.int32)
    abstract = abstract_params(encoder, ids, jnp.ones_like(ids))
    mlm_backbone, _ = checkpoint.restore_params(mlm_dir, abstract, subtree=('backbone',))
    simcse_backbone, step = checkpoint.restore_params(simcse_dir, abstract, subtree=('backbone',))
    assert step == 4
    assert_same_shapes(simcse_backbone, abstract)
    assert max(max_abs_diff(simcse_backbone, mlm_backbone).values()) < TRAINED_TOLERANCE


# --- bad input ----------------------------------------------------------------------------


def write_two_size_folder(root) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ('a', 'b'):
        os.makedirs(root / name)
        for i in range(6):
            size = 16 if i % 2 == 0 else 12
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode='L').save(root / name / f'{i}.png')
    return str(root)


def write_captions_missing_an_image(root) -> str:
    from PIL import Image

    os.makedirs(root / 'images')
    lines = []
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode='L').save(
            root / 'images' / f'{i}.png'
        )
        lines.append({'image': f'images/{i}.png', 'caption': f'image {i}'})
    lines.append({'image': 'images/gone.png', 'caption': 'not there'})
    (root / 'captions.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
    return str(root / 'captions.jsonl')


def bad_run(tmp_path, case: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """(the finished run, strings its message must contain)."""
    workdir = ['--workdir', str(tmp_path / 'w')]
    if case == 'mixed sizes without resize':
        folder = write_two_size_folder(tmp_path / 'folder')
        r = launch(*SIMCLR, *workdir, f'--config.data.files={folder}', '--config.data.resize=false')
        return r, [folder, 'is 12x12 pixels, expected 16x16', '--config.data.resize=true']
    if case == 'caption names a missing image':
        captions = write_captions_missing_an_image(tmp_path / 'pairs')
        r = launch(
            'pretrain',
            '--config',
            'configs/clip.py:tiny',
            *workdir,
            *CLIP,
            f'--config.data.files={captions}',
        )
        missing = str(tmp_path / 'pairs' / 'images' / 'gone.png')
        return r, [f'{captions} line 4', 'does not exist', missing]
    if case == 'batch smaller than the devices':
        r = launch(
            *SIMCLR,
            *workdir,
            '--config.batch_size=4',
            env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
        )
        return r, ['batch_size 4', 'not divisible by 8', 'use a multiple of 8']
    if case == 'unknown task':
        r = launch(*SIMCLR, *workdir, '--config.task=simclrr')
        return r, ["--config.task='simclrr' is not a", "['clip', 'mae', 'mlm', 'simclr', 'simcse']"]
    if case == 'simcse without dropout':
        r = launch(
            'pretrain',
            '--config',
            'configs/simcse.py:tiny',
            *workdir,
            '--config.model.dropout_rate=0',
        )
        return r, ['model.dropout_rate must be above 0', 'dropout']
    raise AssertionError(case)


@pytest.mark.parametrize(
    'case',
    [
        'mixed sizes without resize',
        'caption names a missing image',
        'batch smaller than the devices',
        'unknown task',
        'simcse without dropout',
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, case):
    r, expected = bad_run(tmp_path, case)
    assert r.returncode == 1, (case, r.returncode, r.stderr[-2000:])
    for text in expected:
        assert text in r.stderr, (case, text, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
