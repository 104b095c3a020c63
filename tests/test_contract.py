"""The workdir contract (tests/contract.py): the checker itself, then the pretrain stage's
workdir through both entrypoints, one and two processes."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, SMALL_RUN, launch
from tests.contract import check_workdir, workdir_problems


def write_workdir(root, rows: list[dict], summary: dict, config: dict | None = None) -> str:
    """A workdir as a run leaves it, written by hand (summary.json last)."""
    root.mkdir()
    (root / 'config.json').write_text(json.dumps(config or {'data': {'vocab_file': ''}}))
    (root / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (root / 'checkpoints' / '4' / 'state').mkdir(parents=True)
    (root / 'tensorboard').mkdir()
    (root / 'tensorboard' / 'events.out.tfevents.1.host').write_bytes(b'\0')
    (root / 'summary.json').write_text(json.dumps(summary))
    return str(root)


TRAIN = {'loss': 2.0, 'learning_rate': 1e-3, 'grad_norm': 1.0, 'examples_per_sec': 9.0}
GOOD = [
    {'step': 0, 'split': 'eval', 'accuracy': 0.1},
    {'step': 4, 'split': 'train', **TRAIN, 'tokens_per_sec': 90.0},
    {'step': 4, 'split': 'eval', 'accuracy': 0.5},
]


def test_the_contract_checker_accepts_a_good_workdir_and_names_each_breach(tmp_path):
    good = write_workdir(tmp_path / 'good', GOOD, {'final_accuracy': 0.5})
    check_workdir(good, 'accuracy')

    def problems(name, rows=GOOD, summary=None, **kwargs) -> str:
        workdir = write_workdir(tmp_path / name, rows, summary or {'final_accuracy': 0.5})
        return '\n'.join(workdir_problems(workdir, 'accuracy', **kwargs))

    assert 'no eval row at step 0' in problems('no_step_0', GOOD[1:])
    assert 'lacks accuracy' in problems('no_metric', [*GOOD[:2], {'step': 4, 'split': 'eval'}])
    no_grad_norm = {k: v for k, v in GOOD[1].items() if k != 'grad_norm'}
    assert "lacks ['grad_norm']" in problems('no_grad_norm', [GOOD[0], no_grad_norm, GOOD[2]])
    no_tokens = {k: v for k, v in GOOD[1].items() if k != 'tokens_per_sec'}
    assert "lacks ['tokens_per_sec']" in problems('text', [GOOD[0], no_tokens, GOOD[2]])
    assert problems('image', [GOOD[0], no_tokens, GOOD[2]], text=False) == ''
    # The compiled first step alone is not timed: its row may carry no throughput, while a
    # run none of whose rows carries it breaks the contract.
    untimed = {k: v for k, v in GOOD[1].items() if k not in ('examples_per_sec', 'tokens_per_sec')}
    assert problems('compiled', [GOOD[0], {**untimed, 'step': 1}, *GOOD[1:]]) == ''
    assert 'no train row carries examples_per_sec' in problems(
        'untimed', [GOOD[0], {**untimed, 'step': 1}, GOOD[2]]
    )
    assert 'is not an int' in problems('float_step', [{**GOOD[0], 'step': 0.0}, *GOOD[1:]])
    assert 'is not a number' in problems('string_value', [*GOOD, {**GOOD[2], 'x': 'high'}])
    assert 'final_accuracy' in problems('stale_summary', summary={'final_accuracy': 0.4})
    # A run with a test split ends with one test row, repeated in summary.json.
    test_row = {'step': 4, 'split': 'test', 'accuracy': 0.45}
    summary = {'final_accuracy': 0.5, 'test_accuracy': 0.45, 'test_step': 4}
    assert problems('test', [*GOOD, test_row], summary) == ''
    assert '0 test rows' in problems('no_test_row', summary=summary)
    assert '0 test rows' in problems('test_split', test_split=True)
    assert 'test_step' in problems('test_step', [*GOOD, test_row], {**summary, 'test_step': 2})
    assert 'must end the run' in problems('test_first', [*GOOD[:2], test_row, GOOD[2]], summary)
    # Files and directories.
    broken = write_workdir(tmp_path / 'files', GOOD, {'final_accuracy': 0.5})
    os.rename(os.path.join(broken, 'checkpoints', '4'), os.path.join(broken, 'checkpoints', 'x'))
    os.remove(os.path.join(broken, 'tensorboard', 'events.out.tfevents.1.host'))
    with open(os.path.join(broken, 'config.json'), 'w') as f:
        f.write('{not json')
    os.utime(os.path.join(broken, 'summary.json'), (0, 0))  # written before the metrics
    found = '\n'.join(workdir_problems(broken, 'accuracy'))
    for problem in (
        'config.json is not JSON',
        'no checkpoints/<step>',
        'no TensorBoard event file',
        "summary.json is not written last: ['config.json', 'metrics.jsonl', 'checkpoints']",
    ):
        assert problem in found
    os.remove(os.path.join(broken, 'summary.json'))
    assert 'missing summary.json' in '\n'.join(workdir_problems(broken, 'accuracy'))


def test_pretrain_workdir_meets_the_contract(tmp_path, pydoc_vocab):
    workdir = str(tmp_path / 'mlm')
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=4',
        '--config.log_every=1',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    check_workdir(workdir, 'mlm_accuracy')
    with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['steps'] == 4 and summary['completed']
    assert 0.0 <= summary['final_mlm_accuracy'] <= 1.0
    assert 'most_frequent_token_accuracy' in summary
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['total_steps'] == 4
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    train = [r for r in rows if r['split'] == 'train']
    assert [r['step'] for r in train] == [1, 2, 3, 4]
    for key in ('loss', 'learning_rate', 'grad_norm'):
        assert all(key in r for r in train), key
    # Throughput times training steps only: step 1 compiled, so its row has none.
    for key in ('examples_per_sec', 'tokens_per_sec', 'step_time_ms'):
        assert all(key in r for r in train[1:]) and key not in train[0], key
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '4'


def test_module_entrypoint_and_pmap_mode(tmp_path, pydoc_vocab):
    """`python -m pretrain.main` is the same stage; parallelism=pmap runs it data parallel."""
    workdir = str(tmp_path / 'pmap')
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        PYTHONPATH=ROOT,
        XLA_FLAGS='--xla_force_host_platform_device_count=2',
    )
    r = subprocess.run(
        [
            sys.executable,
            '-m',
            'pretrain.main',
            '--config',
            'configs/bert_mlm.py:tiny',
            '--workdir',
            workdir,
            *SMALL_RUN,
            f'--config.data.vocab_file={pydoc_vocab}',
            '--config.total_steps=4',
            '--config.log_every=2',
            '--config.eval_every=2',
            '--config.checkpoint_every=2',
            '--config.parallelism=pmap',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'pmap over 2 devices' in r.stderr
    check_workdir(workdir, 'mlm_accuracy')


def test_two_local_processes(tmp_path, pydoc_vocab):
    """`--local_processes 2`: two jax.distributed processes (gloo) train one model; process
    0 writes the workdir, both write the checkpoint."""
    workdir = str(tmp_path / 'mp')
    r = launch(
        'pretrain',
        '--local_processes',
        '2',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=4',
        '--config.log_every=2',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'jit over 2 devices, 2 processes' in r.stderr
    check_workdir(workdir, 'mlm_accuracy')
