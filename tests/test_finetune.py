"""End to end: the finetune and evaluate stages through `launch.py`, on tiny models.

A pretrained encoder restores into a classifier with a new zero head (and a mismatched one
is refused, naming the differing paths); a ViT pretrained at 16px restores at 32px; low-label
subsets, early stopping, local TSV files, the evaluate stage and pmap mode all run."""

import json
import math
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tests.conftest import ROOT, SMALL_RUN, launch
from tests.contract import check_workdir

TEXT_TINY = [
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.model.vocab_size=1024',
    '--config.data.seq_len=32',
    '--config.batch_size=16',
]
IMAGE_TINY = [
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.batch_size=32',
]


def text_cls(workdir, vocab, *overrides) -> list[str]:
    """The arguments of a tiny text_cls run (the stage name goes first)."""
    return [
        '--config',
        'configs/text_cls.py:tiny',
        '--workdir',
        str(workdir),
        *TEXT_TINY,
        f'--config.data.vocab_file={vocab}',
        *overrides,
    ]


def ok(r) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_rows(workdir, split: str | None = None) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r['split'] == split]


def kept_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def saved_params(workdir, step: int) -> dict:
    """The params tree of checkpoint `step` as saved (no target: an independent read)."""
    import orbax.checkpoint as ocp

    state_dir = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
    with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as checkpointer:
        warnings.filterwarnings('ignore', 'Sharding info not provided')
        return checkpointer.restore(state_dir)['params']


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {
        jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.fixture(scope='module')
def mlm_run(tmp_path_factory, pydoc_vocab) -> str:
    """A 2-step MLM run of the tiny text encoder (H32 L1)."""
    workdir = str(tmp_path_factory.mktemp('mlm') / 'mlm')
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=2',
        '--config.eval_steps=1',
    )
    ok(r)
    return workdir


def write_tsv(path, rows: list[tuple[str, str]]) -> str:
    with open(path, 'w') as f:
        f.write('text\tlabel\n')
        f.writelines(f'{text}\t{label}\n' for text, label in rows)
    return str(path)


def sentiment_rows(n: int, seed: int, labels=('negative', 'positive')) -> list[tuple[str, str]]:
    """`n` short sentences, alternating between two labels with their own vocabulary."""
    words = {
        labels[0]: ['error', 'raise', 'exception', 'fails', 'invalid', 'deprecated'],
        labels[1]: ['return', 'value', 'list', 'string', 'module', 'class'],
    }
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = labels[i % 2]
        rows.append((' '.join(rng.choice(words[label], size=6)), label))
    return rows


def test_init_from_mlm_restores_the_encoder_under_a_zero_head(tmp_path, mlm_run, pydoc_vocab):
    import jax

    from configs import text_cls as text_cls_config
    from core import optim, trainer
    from core import train_state as state_lib
    from core.task import InitFrom
    from data.labels import LabelMap
    from finetune.text_cls import make_model

    workdir = tmp_path / 'cls'
    args = text_cls(
        workdir,
        pydoc_vocab,
        f'--config.init_from={mlm_run}',
        '--config.total_steps=2',
        '--config.checkpoint_every=1',
        '--config.eval_every=1',
        '--config.log_every=1',
    )
    r = launch('finetune', *args)
    ok(r)
    assert 'initialised backbone from' in r.stderr
    check_workdir(str(workdir), 'accuracy')
    label_map = LabelMap.load(str(workdir / 'labels.json'))
    assert label_map.num_classes > 2
    summary = read_json(workdir / 'summary.json')
    assert summary['completed'] and summary['steps'] == 2 and not summary['early_stopped']

    # Step 0: the zero head predicts uniformly, whatever the encoder says.
    evals = read_rows(workdir, 'eval')
    assert [e['step'] for e in evals] == [0, 1, 2]
    assert evals[0]['loss'] == pytest.approx(math.log(label_map.num_classes), abs=1e-5)
    # ... which is not counted as correct in training either (ties are not hits).
    train = read_rows(workdir, 'train')
    assert train[0]['step'] == 1 and train[0]['accuracy'] < 1.0

    # In process: the trainer's abstract params, the encoder restored from the MLM run.
    config = text_cls_config.get_config('tiny')
    for arg in [*TEXT_TINY, f'--config.init_from={mlm_run}']:
        key, value = arg[len('--config.') :].split('=', 1)
        *parents, leaf = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    model = make_model(config, label_map.num_classes)
    example = {k: np.zeros((1, 32), np.int32) for k in ('input_ids', 'segment_ids')}
    example['input_mask'] = np.ones((1, 32), np.int32)
    init_params = lambda rng: model.init(rng, example)['params']
    mesh, _ = trainer.make_mesh(config)
    tx, schedule = optim.make_optimizer(config)
    rng = jax.random.split(jax.random.key(config.seed))[0]
    shardings = state_lib.state_shardings(init_params, tx, mesh, rng)
    abstract = state_lib.abstract_state(init_params, tx, mesh, rng, shardings)
    backbone = InitFrom({'backbone': 'backbone'}).restore(
        dict(abstract.params), abstract.params, mlm_run
    )['backbone']

    mlm_backbone = flat(saved_params(mlm_run, 2)['backbone'])
    restored = flat(backbone)
    assert sorted(restored) == sorted(mlm_backbone)
    assert any(k.startswith('encoder/layer_0/') for k in restored)
    for key, value in restored.items():
        np.testing.assert_array_equal(value, mlm_backbone[key], err_msg=key)
    fresh, _ = state_lib.create_sharded_state(init_params, tx, mesh, rng, shardings)
    for key, value in flat(fresh.params['head']).items():
        np.testing.assert_array_equal(value, 0.0, err_msg=f'head/{key}')

    # The run itself: warmup starts at lr 0, so checkpoint 1 still holds the step-0 params:
    # the MLM encoder and the zero head.
    assert float(schedule(0)) == 0.0
    first = saved_params(workdir, 1)
    for key, value in flat(first['backbone']).items():
        np.testing.assert_array_equal(value, mlm_backbone[key], err_msg=key)
    for key, value in flat(first['head']).items():
        np.testing.assert_array_equal(value, 0.0, err_msg=f'head/{key}')
    # ... and step 2 trained the head.
    assert np.abs(flat(saved_params(workdir, 2)['head'])['out/bias']).max() > 0


def test_mismatched_init_from_lists_the_differing_paths(tmp_path, mlm_run, pydoc_vocab):
    workdir = tmp_path / 'wide'
    args = text_cls(
        workdir,
        pydoc_vocab,
        f'--config.init_from={mlm_run}',
        '--config.model.hidden_size=64',
        '--config.total_steps=2',
    )
    r = launch('finetune', *args)
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'does not match the model' in r.stderr
    assert (
        'shape differs: embeddings/token/embedding checkpoint (1024, 32) vs model (1024, 64)'
        in (r.stderr)
    )
    assert 'encoder/layer_0/mlp/wi/kernel checkpoint (32, 64) vs model (64, 64)' in r.stderr
    assert 'first step done' not in r.stderr  # refused before any training


@pytest.mark.slow
def test_simclr_vit_restores_at_another_image_size(tmp_path):
    simclr = tmp_path / 'simclr'
    r = launch(
        'pretrain',
        '--config',
        'configs/vit_simclr.py:tiny',
        '--workdir',
        str(simclr),
        *IMAGE_TINY,
        '--config.model.proj_hidden=64',
        '--config.model.proj_dim=16',
        '--config.eval.probe_train_examples=200',
        '--config.eval.few_shot=0',
        '--config.eval_steps=1',
        '--config.total_steps=2',
    )
    ok(r)
    workdir = tmp_path / 'digits32'
    r = launch(
        'finetune',
        '--config',
        'configs/image_cls.py:tiny',
        '--workdir',
        str(workdir),
        *IMAGE_TINY,
        f'--config.init_from={simclr}',
        '--config.model.image_size=32',
        '--config.total_steps=2',
    )
    ok(r)
    assert 'position embeddings: 4x4 patch grid resized to 8x8' in r.stderr
    assert 'initialised backbone from' in r.stderr
    summary = read_json(workdir / 'summary.json')
    assert summary['completed'] and summary['steps'] == 2
    assert flat(saved_params(workdir, 2)['backbone'])['pos_embedding'].shape == (1 + 8 * 8, 32)


@pytest.mark.slow
def test_train_examples_per_class_on_images(tmp_path):
    from configs import image_cls
    from data import image_splits
    from data.labelled import select_train_examples, validation_split
    from finetune.image_cls import source_labels

    workdir = tmp_path / 'few'
    r = launch(
        'finetune',
        '--config',
        'configs/image_cls.py:tiny',
        '--workdir',
        str(workdir),
        *IMAGE_TINY,
        '--config.train_examples=3',
        '--config.total_steps=1',
    )
    ok(r)
    config = image_cls.get_config('tiny')
    pool, _, _ = image_splits.labelled_image_splits(
        config.data, config.model.image_size, config.model.channels
    )
    kept, _ = validation_split(source_labels(pool), config.data.eval_fraction, 0)
    labels = source_labels(pool)[kept]  # what validation left
    assert f"train_examples='3': 30 of {len(labels)} labelled examples (seed 0)" in r.stderr
    assert f'data: 30 train (of {len(labels)})' in r.stderr
    # The subset is the seed's: the same every time, 3 of each class, another for seed 1.
    picked = select_train_examples(labels, '3', 0)
    np.testing.assert_array_equal(picked, select_train_examples(labels, '3', 0))
    assert np.bincount(labels[picked]).tolist() == [3] * 10
    assert not np.array_equal(picked, select_train_examples(labels, '3', 1))


def test_early_stopping_then_a_relaunch_trains_no_further(tmp_path, pydoc_vocab):
    workdir = tmp_path / 'stop'
    args = text_cls(
        workdir,
        pydoc_vocab,
        '--config.learning_rate=0',
        '--config.early_stopping_patience=2',
        '--config.eval_every=1',
        '--config.checkpoint_every=1',
        '--config.total_steps=20',
    )
    r = launch('finetune', *args)
    ok(r)
    assert 'early stopping at step 2' in r.stderr
    summary = read_json(workdir / 'summary.json')
    assert summary['early_stopped'] and summary['completed']
    assert summary['steps'] == 2 < 20
    assert summary['best_step'] == 0  # nothing moves at lr 0: the first eval stays the best
    rows = read_rows(workdir)
    assert kept_steps(workdir)[-1] == 2

    r = launch('finetune', *args)
    ok(r)
    assert 'already complete' in r.stderr
    assert 'first step done' not in r.stderr
    assert read_rows(workdir) == rows
    assert kept_steps(workdir)[-1] == 2
    assert read_json(workdir / 'summary.json') == summary


def test_a_collapsing_run_says_so_and_a_learning_run_does_not(tmp_path, pydoc_vocab):
    """A classifier that ends predicting a single class, or whose training loss blows up,
    is named in the log and in summary.json with the likely cause and the flag to change;
    a run that learns gets neither."""
    workdir = tmp_path / 'collapse'
    args = ('--config.learning_rate=3.0', '--config.warmup_steps=0', '--config.total_steps=20')
    every = ('--config.eval_every=10', '--config.log_every=5')
    r = launch('finetune', *text_cls(workdir, pydoc_vocab, *args, *every))
    ok(r)
    assert 'loss rose: the training loss of steps 1-5 is' in r.stderr
    assert (
        'collapse: every validation prediction is one class (the model predicts a constant) '
        'at every eval from step 10 to step 20' in r.stderr
    )
    assert 'rerun with a lower --config.learning_rate (e.g. 0.3)' in r.stderr
    summary = read_json(workdir / 'summary.json')
    assert (summary['collapsed_step'], summary['loss_rose_step']) == (10, 5)
    assert [row['predicted_classes'] for row in read_rows(workdir, 'eval')] == [1.0] * 3

    workdir = tmp_path / 'learns'
    every = ('--config.eval_every=20', '--config.log_every=10')
    image = ('--config', 'configs/image_cls.py:tiny', '--workdir', str(workdir), *IMAGE_TINY)
    r = launch('finetune', *image, '--config.total_steps=40', *every)
    ok(r)
    assert 'collapse' not in r.stderr and 'loss rose' not in r.stderr
    summary = read_json(workdir / 'summary.json')
    assert 'collapsed_step' not in summary and 'loss_rose_step' not in summary
    assert read_rows(workdir, 'eval')[-1]['predicted_classes'] > 1


def test_the_collapse_advice_follows_the_start():
    from configs import text_cls as text_cls_config
    from core import loop

    config = text_cls_config.get_config('tiny')
    assert 'from scratch at learning_rate=0.001' in loop.collapse_message(config, 10, 20)
    assert '(e.g. 0.0001)' in loop.collapse_message(config, 10, 20)
    config.init_from = 'runs/minilm'
    config.model.hidden_size = 384  # MiniLM's width: the recipe's rate is below the run's
    message = loop.collapse_message(config, 10, 20)
    assert 'from the pretrained encoder of runs/minilm at learning_rate=0.001' in message
    assert "(e.g. 0.0001, the recipe's for this encoder)" in message
    config.learning_rate = 1e-4  # at the recipe's rate already: a tenth of it
    assert '(e.g. 1e-05)' in loop.collapse_message(config, 10, 20)


def test_tsv_run_then_the_evaluate_stage(tmp_path, pydoc_vocab):
    from core.selection import best_kept_step

    train_tsv = write_tsv(tmp_path / 'train.tsv', sentiment_rows(40, seed=0))
    dev_rows = sentiment_rows(12, seed=1)
    dev_tsv = write_tsv(tmp_path / 'dev.tsv', dev_rows)
    workdir = tmp_path / 'tsv'
    args = text_cls(
        workdir,
        pydoc_vocab,
        f'--config.data.files={train_tsv}',
        f'--config.data.eval_files={dev_tsv}',
        '--config.total_steps=3',
        '--config.warmup_steps=1',
        '--config.eval_every=1',
        '--config.checkpoint_every=1',
    )
    r = launch('finetune', *args)
    ok(r)
    assert (
        f'data: {train_tsv}, 40 train (of 40) / 12 validation examples, 2 classes; no test split'
        in r.stderr
    )
    assert read_json(workdir / 'labels.json')['classes'] == ['negative', 'positive']
    summary = read_json(workdir / 'summary.json')
    assert summary['completed'] and summary['steps'] == 3

    r = launch('evaluate', *args)
    ok(r)
    report = read_json(workdir / 'evaluation.json')
    step = best_kept_step(str(workdir), 'accuracy')
    assert report['step'] == step and step in kept_steps(workdir)
    assert report['task'] == 'text_cls'
    assert report['split'] == 'validation'  # no test split: the validation split, said so
    # The same eval data as in training: the same accuracy as that step's eval row.
    row = next(e for e in read_rows(workdir, 'eval') if e['step'] == step)
    assert report['accuracy'] == pytest.approx(row['accuracy'], abs=1e-6)
    assert row['accuracy'] == max(
        e['accuracy'] for e in read_rows(workdir, 'eval') if e['step'] in kept_steps(workdir)
    )
    with open(workdir / 'predictions.jsonl') as f:
        predictions = [json.loads(line) for line in f]
    assert [p['index'] for p in predictions] == list(range(len(dev_rows)))
    assert [p['label'] for p in predictions] == [label for _, label in dev_rows]
    assert {p['prediction'] for p in predictions} <= {'negative', 'positive'}
    hits = np.mean([p['label'] == p['prediction'] for p in predictions])
    assert hits == pytest.approx(report['accuracy'], abs=1e-6)

    # An eval file with a label the training data did not have: exit 1, the label named.
    bad = write_tsv(tmp_path / 'bad.tsv', [*dev_rows[:3], ('some neutral text', 'neutral')])
    r = launch('evaluate', *args, f'--config.data.eval_files={bad}')
    assert r.returncode == 1, r.stderr[-3000:]
    assert "labels ['neutral'] are not among the 2 training labels" in r.stderr


def test_evaluate_reads_the_runs_config_and_refuses_another_model(tmp_path, pydoc_vocab):
    """`evaluate --workdir RUN` needs no --config (the run's config.json); data and eval keys
    may change, a model key or seq_len is refused with the differing keys, and
    evaluation.json is left as it was."""
    train_tsv = write_tsv(tmp_path / 'train.tsv', sentiment_rows(40, seed=0))
    dev_tsv = write_tsv(tmp_path / 'dev.tsv', sentiment_rows(12, seed=1))
    test_tsv = write_tsv(tmp_path / 'test.tsv', sentiment_rows(10, seed=2))
    workdir = tmp_path / 'run'
    args = text_cls(
        workdir,
        pydoc_vocab,
        f'--config.data.files={train_tsv}',
        f'--config.data.eval_files={dev_tsv}',
        '--config.total_steps=2',
        '--config.warmup_steps=1',
        '--config.eval_every=1',
        '--config.checkpoint_every=1',
    )
    ok(launch('finetune', *args))
    run = ['--workdir', str(workdir)]

    ok(launch('evaluate', *run))  # no --config: the run's own
    report = read_json(workdir / 'evaluation.json')
    row = next(e for e in read_rows(workdir, 'eval') if e['step'] == report['step'])
    assert report['split'] == 'validation'
    assert report['accuracy'] == pytest.approx(row['accuracy'], abs=1e-6)

    ok(launch('evaluate', *run, f'--config.data.test_files={test_tsv}'))  # a data key
    report = read_json(workdir / 'evaluation.json')
    assert report['split'] == 'test'
    with open(workdir / 'evaluation.json') as f:
        before = f.read()

    r = launch('evaluate', *run, '--config.model.pooling=mean')
    assert r.returncode == 1, r.stderr[-3000:]
    assert "model.pooling: 'cls' -> 'mean'" in r.stderr and 'Traceback' not in r.stderr
    r = launch('evaluate', *args, '--config.data.seq_len=16')  # --config and a new seq_len
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'data.seq_len: 32 -> 16' in r.stderr
    with open(workdir / 'evaluation.json') as f:
        assert f.read() == before


@pytest.mark.slow
def test_text_cls_in_pmap_mode(tmp_path, pydoc_vocab):
    workdir = tmp_path / 'pmap'
    r = launch(
        'finetune',
        *text_cls(
            workdir,
            pydoc_vocab,
            '--config.parallelism=pmap',
            '--config.total_steps=2',
            '--config.eval_every=1',
        ),
        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
    )
    ok(r)
    assert 'pmap over 2 devices' in r.stderr
    summary = read_json(workdir / 'summary.json')
    assert summary['completed'] and summary['steps'] == 2
    evals = read_rows(workdir, 'eval')
    assert [e['step'] for e in evals] == [0, 1, 2]
    assert all(0.0 <= e['accuracy'] <= 1.0 for e in evals)


def launch_group(*args: str, timeout: int) -> tuple[int, str]:
    """`launch()` in its own process group, all of it killed on timeout (a multi-process
    run that hangs leaves no orphans); returns (exit code, stderr)."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f'launch.py {args[0]} hung for {timeout}s:\n{stderr[-3000:]}')
    return proc.returncode, stderr


@pytest.mark.slow
def test_evaluate_with_two_local_processes(tmp_path, pydoc_vocab):
    """Predictions are a collective step: every process must take part, process 0 writes."""
    train_tsv = write_tsv(tmp_path / 'train.tsv', sentiment_rows(40, seed=0))
    dev_tsv = write_tsv(tmp_path / 'dev.tsv', sentiment_rows(12, seed=1))
    test_tsv = write_tsv(tmp_path / 'test.tsv', sentiment_rows(10, seed=2))
    workdir = tmp_path / 'tsv'
    args = text_cls(
        workdir,
        pydoc_vocab,
        f'--config.data.files={train_tsv}',
        f'--config.data.eval_files={dev_tsv}',
        f'--config.data.test_files={test_tsv}',
        '--config.total_steps=2',
    )
    ok(launch('finetune', *args))
    code, stderr = launch_group('evaluate', *args, '--local_processes', '2', timeout=240)
    assert code == 0, stderr[-3000:]
    report = read_json(workdir / 'evaluation.json')
    assert report['step'] == 2 and report['split'] == 'test'
    row = read_rows(workdir, 'test')[0]  # scored by the 1-process run at its end
    assert row['step'] == 2 and report['accuracy'] == pytest.approx(row['accuracy'], abs=1e-6)
    with open(workdir / 'predictions.jsonl') as f:
        assert [json.loads(line)['index'] for line in f] == list(range(10))
