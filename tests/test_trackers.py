"""config.loggers: W&B (offline) and MLflow (a file store) get the config, every metrics
row and the summary of a run; a restart of the workdir logs into the same run; an unknown
or missing logger is a one-line error."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.conftest import SMALL_RUN, launch

RUN = [
    'pretrain',
    '--config',
    'configs/bert_mlm.py:tiny',
    *SMALL_RUN,
    '--config.total_steps=4',
    '--config.log_every=2',
    '--config.eval_every=4',
    '--config.checkpoint_every=2',
    '--config.loggers=jsonl,tensorboard,wandb,mlflow',
]


def _env(tmp) -> dict:
    return {
        'WANDB_MODE': 'offline',
        'WANDB_DIR': str(tmp / 'wandb'),
        'WANDB_SILENT': 'true',
        'MLFLOW_TRACKING_URI': f'file:{tmp / "mlruns"}',
        'MLFLOW_ALLOW_FILE_STORE': 'true',
    }


def wandb_records(path: str) -> list:
    """The records of a W&B offline run file (run-<id>.wandb: a LevelDB-style log of
    protobuf records in 32 KiB blocks; wandb has no public reader of it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    pos, part, records = 7, b'', []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack('<IHB', data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block padding
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b''
    return records


def _items(items) -> dict:
    """{key: value} of a record's items (a key is in `key` or, one part, in `nested_key`)."""
    return {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_run(wandb_dir: str) -> dict:
    """{id, config, rows, summary, exit_codes} of every offline run file, in order."""
    out = {'ids': set(), 'config': {}, 'rows': [], 'summary': {}, 'exit_codes': []}
    for path in sorted(glob.glob(os.path.join(wandb_dir, 'wandb', 'offline-run-*', '*.wandb'))):
        for r in wandb_records(path):
            kind = r.WhichOneof('record_type')
            if kind == 'run':
                out['ids'].add(r.run.run_id)
            elif kind == 'config':
                out['config'].update(_items(r.config.update))
            elif kind == 'history':
                row = _items(r.history.item)
                out['rows'].append({k: v for k, v in row.items() if not k.startswith('_')})
            elif kind == 'summary':
                out['summary'].update(_items(r.summary.update))
            elif kind == 'exit':
                out['exit_codes'].append(r.exit.exit_code)
    return out


def expected_rows(workdir) -> list[dict]:
    rows = []
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            row = json.loads(line)
            step, split = row.pop('step'), row.pop('split')
            rows.append({'step': step, **{f'{split}/{k}': v for k, v in row.items()}})
    return rows


@pytest.fixture(scope='module')
def tracked(tmp_path_factory):
    """One tiny run with both trackers, stopped after step 2's checkpoint, resumed to step
    4, then started once more (complete: it must leave the trackers' runs as they are)."""
    tmp = tmp_path_factory.mktemp('trackers')
    workdir = tmp / 'run'
    first = launch(*RUN, '--workdir', str(workdir), '--config.total_steps=2', env=_env(tmp))
    assert first.returncode == 0, first.stderr[-3000:]
    first_ids = json.loads((workdir / 'trackers.json').read_text())
    rows_first = expected_rows(workdir)
    second = launch(*RUN, '--workdir', str(workdir), env=_env(tmp))
    assert second.returncode == 0, second.stderr[-3000:]
    third = launch(*RUN, '--workdir', str(workdir), env=_env(tmp))
    assert third.returncode == 0 and 'already complete' in third.stderr, third.stderr[-3000:]
    return tmp, workdir, first_ids, rows_first


def test_wandb_gets_config_rows_and_summary(tracked):
    tmp, workdir, first_ids, rows_first = tracked
    run = wandb_run(str(tmp / 'wandb'))
    # Resumed: both attempts logged into one run id, the one stored in the workdir.
    assert run['ids'] == {first_ids['wandb']['id']}
    assert json.loads((workdir / 'trackers.json').read_text())['wandb'] == first_ids['wandb']
    assert run['config']['model.hidden_size'] == 32
    assert run['config']['total_steps'] == 4  # the resumed config (a restart-safe change)
    assert run['config']['loggers'] == 'jsonl,tensorboard,wandb,mlflow'
    # Every row of both attempts: the first's, then the second's after its checkpoint.
    assert run['rows'] == rows_first + [r for r in expected_rows(workdir) if r['step'] > 2]
    assert {'train/loss', 'eval/mlm_accuracy'} <= {k for r in run['rows'] for k in r}
    summary = json.loads((workdir / 'summary.json').read_text())
    assert run['summary']['steps'] == summary['steps'] == 4
    assert run['summary']['best_mlm_accuracy'] == pytest.approx(summary['best_mlm_accuracy'])
    assert run['exit_codes'] == [0, 0]


def test_mlflow_gets_config_rows_and_summary(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')

    tmp, workdir, first_ids, rows_first = tracked
    ids = json.loads((workdir / 'trackers.json').read_text())['mlflow']
    assert ids == first_ids['mlflow']  # the resume went into the same run
    client = MlflowClient(f'file:{tmp / "mlruns"}')
    runs = client.search_runs([client.get_experiment_by_name('pretrax').experiment_id])
    assert [r.info.run_id for r in runs] == [ids['run_id']]
    run = client.get_run(ids['run_id'])
    assert run.info.status == 'FINISHED'
    assert run.data.params['model.hidden_size'] == '32'
    assert run.data.params['loggers'] == 'jsonl,tensorboard,wandb,mlflow'
    # Every row of both attempts, in the order they were logged.
    wanted = rows_first + [r for r in expected_rows(workdir) if r['step'] > 2]
    for key in ('train/loss', 'eval/mlm_accuracy'):
        history = [(m.step, m.value) for m in client.get_metric_history(ids['run_id'], key)]
        assert history == [(r['step'], r[key]) for r in wanted if key in r]
    summary = json.loads((workdir / 'summary.json').read_text())
    assert run.data.metrics['summary/best_mlm_accuracy'] == pytest.approx(
        summary['best_mlm_accuracy']
    )
    assert json.loads(run.data.tags['summary/task']) == summary['task']


def test_tensorboard_is_written_only_when_named(tmp_path):
    from core.metrics import MetricWriter

    for loggers in ('jsonl,tensorboard', 'jsonl'):
        workdir = tmp_path / loggers.replace(',', '_')
        workdir.mkdir()
        writer = MetricWriter(str(workdir), config={'loggers': loggers})
        writer.truncate_after(-1)
        writer.write(1, 'train', {'loss': 2.0})
        writer.close()
        assert (workdir / 'tensorboard').is_dir() == ('tensorboard' in loggers)
        assert (
            workdir / 'metrics.jsonl'
        ).read_text() == '{"step": 1, "split": "train", "loss": 2.0}\n'


def test_a_run_that_fails_is_marked_failed(tmp_path, monkeypatch):
    """An exception ends the process without MetricWriter.close: the trackers' runs are
    closed at exit, marked failed (W&B exit code 1, MLflow FAILED)."""
    from mlflow.tracking import MlflowClient

    script = (
        'from core import trackers\n'
        f'opened = trackers.open_trackers({str(tmp_path)!r}, {{"loggers": "jsonl,wandb,mlflow"}})\n'
        'for t in opened:\n'
        '    t.log(1, "train", {"loss": 2.0})\n'
        'raise RuntimeError("boom")\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, **_env(tmp_path))
    r = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and 'boom' in r.stderr
    assert wandb_run(str(tmp_path / 'wandb'))['exit_codes'] == [1]
    ids = json.loads((tmp_path / 'trackers.json').read_text())['mlflow']
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    assert MlflowClient(ids['tracking_uri']).get_run(ids['run_id']).info.status == 'FAILED'


def test_default_mlflow_store_is_in_the_workdir(tmp_path):
    """Without MLFLOW_TRACKING_URI the run goes to WORKDIR/mlruns (no server)."""
    from core.trackers import MlflowTracker

    env = {k: v for k, v in os.environ.items()}
    os.environ.pop('MLFLOW_TRACKING_URI', None)
    try:
        tracker = MlflowTracker(str(tmp_path), {'seed': 0})
        tracker.log(1, 'train', {'loss': 2.0})
        tracker.close()
    finally:
        os.environ.clear()
        os.environ.update(env)
    ids = json.loads((tmp_path / 'trackers.json').read_text())['mlflow']
    assert ids['tracking_uri'] == f'file:{tmp_path / "mlruns"}'
    assert glob.glob(str(tmp_path / 'mlruns' / '*' / ids['run_id'] / 'metrics' / 'train' / 'loss'))


@pytest.mark.parametrize(
    'loggers, message',
    [
        ('jsonl,wandbb', "no logger 'wandbb'; did you mean wandb?"),
        ('jsonl,tensorbord', 'did you mean tensorboard?'),
        ('tensorboard,wandb', 'leaves out jsonl'),
    ],
)
def test_bad_loggers_are_refused(loggers, message):
    from core.errors import ConfigError
    from core.trackers import parse

    with pytest.raises(ConfigError, match=message.replace('?', r'\?')):
        parse(loggers)


def test_missing_package_is_a_one_line_error(monkeypatch):
    """A logger whose package is not installed fails at start-up, naming the install."""
    from core import trackers
    from core.errors import ConfigError

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, 'find_spec', lambda name: None if name == 'mlflow' else real(name)
    )
    with pytest.raises(ConfigError, match='pip install mlflow-skinny') as e:
        trackers.parse('jsonl,tensorboard,mlflow')
    assert '\n' not in str(e.value)
    trackers.parse('jsonl,wandb')  # the other one is still there


def test_unknown_logger_fails_at_start_up(tmp_path):
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(tmp_path / 'run'),
        '--config.loggers=jsonl,mlfow',
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "no logger 'mlfow'; did you mean mlflow?" in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'run').exists()


def test_wandb_without_a_login_fails_at_start_up_before_the_data(tmp_path, pydoc_vocab):
    """Online W&B with no API key: one line at start-up naming the fix, before the corpus
    and the vocabulary are read (not after them, at the first metrics row); nothing is
    written to the workdir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env.update(HOME=str(tmp_path / 'home'), WANDB_DIR=str(tmp_path / 'wandb'))
    workdir = tmp_path / 'run'
    r = subprocess.run(
        [sys.executable, 'launch.py', *RUN, '--workdir', str(workdir)]
        + [f'--config.data.vocab_file={pydoc_vocab}', '--config.loggers=jsonl,wandb'],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'wandb' in errors[0], r.stderr[-2000:]
    assert 'wandb login' in errors[0] and 'WANDB_MODE=offline' in errors[0]
    assert 'data:' not in r.stderr  # refused before the corpus was read
    assert not workdir.exists()


def test_loggers_may_change_on_resume(tmp_path):
    """A workdir's run resumes with other loggers (a tracker added or dropped); the change
    is recorded like any restart-safe key's."""
    from configs import bert_mlm
    from core import rundir

    config = bert_mlm.get_config('tiny')
    rundir.write_config(str(tmp_path), config)
    config.loggers = 'jsonl,tensorboard,wandb'
    plan = rundir.check_workdir(config, str(tmp_path))
    assert plan.changed == {'loggers': ['jsonl,tensorboard', 'jsonl,tensorboard,wandb']}
