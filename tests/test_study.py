"""The transfer-study runner: its plan, its table, and a minute-sized study run end to end,
killed midway and resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import study as study_config
from core.errors import ConfigError, UserError
from core.metrics import read_metrics
from data import digits
from study import report, runner
from tests.conftest import ROOT, SMALL_RUN, launch
from tests.contract import check_workdir


def test_plan_orders_budgets_first_and_covers_every_arm_and_seed():
    c = study_config.get_config('digits')
    runs = runner.plan(c)
    assert len(runs) == 6 * 3 * 3
    assert [r.budget for r in runs[:9]] == [0.01] * 9  # the low-label end comes first
    assert {(r.arm, r.budget, r.seed) for r in runs} == {
        (a, b, s)
        for a in ('pretrained', 'scratch', 'linear_probe')
        for b in c.label_fractions
        for s in c.seeds
    }
    assert len({r.path for r in runs}) == len(runs)


def test_budget_and_arm_errors_name_the_fix():
    c = study_config.get_config('smoke')
    c.examples_per_class = (1, 5)
    with pytest.raises(ConfigError, match='exactly one of'):
        runner.plan(c)
    c.label_fractions = ()
    assert [r.budget for r in runner.plan(c)][::3] == [1, 5]
    c.examples_per_class = (0,)
    with pytest.raises(ConfigError, match='positive integers'):
        runner.plan(c)
    c = study_config.get_config('smoke')
    c.label_fractions = (0.5, 2.0)
    with pytest.raises(ConfigError, match=r'\(0, 1\]'):
        runner.plan(c)
    c = study_config.get_config('smoke')
    c.arms = 'pretrained,imported'
    with pytest.raises(ConfigError, match='--config.imported'):
        runner.plan(c)
    c.arms = 'pretrained,warm'
    with pytest.raises(ConfigError, match='warm'):
        runner.plan(c)


def test_finetune_config_per_arm(tmp_path):
    pretrain = tmp_path / 'pretrain'
    pretrain.mkdir()
    c = study_config.get_config('text')
    saved = c.pretrain.to_dict()
    saved['model']['num_layers'] = 3  # what the pretraining actually ran
    (pretrain / 'config.json').write_text(json.dumps(saved))
    (pretrain / 'vocab.txt').write_text('[PAD]\n')

    def config(arm, budget=0.1, seed=1):
        return runner.finetune_config(c, runner.Run(arm, budget, seed), str(pretrain))

    pretrained, scratch, probe = config('pretrained'), config('scratch'), config('linear_probe')
    for f in (pretrained, scratch, probe):
        assert f.model.num_layers == 3 and f.seed == 1 and f.train_examples == '0.1'
    assert pretrained.init_from == str(pretrain) and not pretrained.transfer.freeze_backbone
    assert scratch.init_from == '' and scratch.data.vocab_file == str(pretrain / 'vocab.txt')
    assert probe.transfer.freeze_backbone and probe.learning_rate == c.probe_learning_rate
    assert pretrained.model.dropout_rate == c.finetune.model.dropout_rate
    assert config('pretrained', budget=1.0).train_examples == ''  # every label
    assert config('pretrained', budget=1).train_examples == '1'  # one per class
    with pytest.raises(UserError, match='import-hf'):
        runner.finetune_config(c, runner.Run('pretrained', 0.1, 0), str(tmp_path / 'none'))


def test_aggregate_reports_test_means_with_intervals_and_paired_differences():
    def row(arm, budget, seed, test, step=None):
        return {
            'arm': arm,
            'budget': budget,
            'seed': seed,
            'train_examples': 10 if budget == 0.1 else 100,
            'test_accuracy': test,
            'val_accuracy': test + 0.01,
            'test_step': 50,
            'steps': 50,
            'steps_to_target': step,
            'train_time_to_target_sec': None if step is None else step / 10,
            'wall_time_sec': 5.0,
        }

    rows = [
        row('pretrained', 0.1, 0, 0.8, 20),
        row('scratch', 0.1, 0, 0.3),
        row('pretrained', 0.1, 1, 0.6),
        row('scratch', 0.1, 1, 0.5),
        row('pretrained', 0.1, 2, 0.7),
        row('scratch', 0.1, 2, 0.4),
        row('pretrained', 1.0, 0, 0.9, 10),
        row('scratch', 1.0, 0, 0.85, 30),
    ]
    table = report.aggregate(rows, 'accuracy')
    assert [(t['arm'], t['budget']) for t in table] == [
        ('pretrained', 0.1),
        ('scratch', 0.1),
        ('pretrained', 1.0),
        ('scratch', 1.0),
    ]
    # Three seeds: mean 0.7, sample std 0.1, t(0.975, 2 dof) = 4.303: +- 0.2484.
    first = table[0]
    assert first['seeds'] == 3 and first['test_mean'] == pytest.approx(0.7)
    assert first['test_ci_low'] == pytest.approx(0.4516, abs=1e-4)
    assert first['test_ci_high'] == pytest.approx(0.9484, abs=1e-4)
    # Paired by seed: differences 0.5, 0.1, 0.3: mean 0.3, std 0.2, +- 0.4968.
    assert first['diff_vs_scratch'] == pytest.approx(0.3) and first['pairs'] == 3
    assert first['diff_ci_low'] == pytest.approx(-0.1968, abs=1e-4)
    assert first['diff_ci_high'] == pytest.approx(0.7968, abs=1e-4)
    assert table[1]['diff_vs_scratch'] is None  # scratch against itself: nothing
    assert first['reached'] == 1 and first['steps_to_target'] == 20
    assert first['time_to_target_sec'] == pytest.approx(2.0)
    assert table[1]['reached'] == 0 and table[1]['steps_to_target'] is None
    # One seed: a mean, no interval.
    one = table[2]
    assert one['test_mean'] == pytest.approx(0.9) and one['test_ci_low'] is None
    assert one['diff_vs_scratch'] == pytest.approx(0.05) and one['diff_ci_low'] is None
    assert not any(k.startswith('best') for t in table for k in t)

    text = report.markdown(table, 'accuracy', 0.7)
    assert (
        '| 0.1 | 10 | 0.700 [0.452, 0.948] | 0.400 [0.152, 0.648] | +0.300 [-0.197, +0.797] '
        '| 20 (2 s), 1/3 | never (0/3) |'
    ) in text
    assert '| 1 | 100 | 0.900 | 0.850 | +0.050 | 10 (1 s), 1/1 | 30 (3 s), 1/1 |' in text


def test_a_run_without_a_test_figure_is_refused(tmp_path):
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'summary.json').write_text(json.dumps({'final_accuracy': 0.5, 'steps': 2}))
    (workdir / 'metrics.jsonl').write_text('')
    with pytest.raises(UserError, match='test split'):
        runner.result_row(runner.Run('scratch', 1.0, 0), str(workdir), 'accuracy', 0.9)


def test_mae_arms_start_from_the_mae_pretraining(tmp_path):
    simclr, mae = tmp_path / 'simclr', tmp_path / 'mae'
    c = study_config.get_config('digits')
    for path, block, layers in ((simclr, c.pretrain, 2), (mae, c.mae_pretrain, 3)):
        path.mkdir()
        saved = block.to_dict()
        saved['model']['num_layers'] = layers
        (path / 'config.json').write_text(json.dumps(saved))

    def config(arm):
        return runner.finetune_config(c, runner.Run(arm, 0.1, 0), str(simclr), str(mae))

    tuned, probe, pretrained = config('mae'), config('mae_linear_probe'), config('pretrained')
    assert tuned.init_from == probe.init_from == str(mae) and tuned.model.num_layers == 3
    assert not tuned.transfer.freeze_backbone and probe.transfer.freeze_backbone
    assert probe.learning_rate == c.probe_learning_rate
    assert pretrained.init_from == str(simclr) and pretrained.model.num_layers == 2
    c.arms = 'scratch,mae'
    assert [r.arm for r in runner.plan(c)][:2] == ['scratch', 'mae']
    text = study_config.get_config('text')
    text.arms = 'pretrained,mae'
    with pytest.raises(ConfigError, match='image studies'):
        runner.plan(text)


def test_distilled_arm_distils_the_imported_run_of_its_budget_and_seed(tmp_path):
    imported = tmp_path / 'minilm'
    imported.mkdir()
    c = study_config.get_config('text')
    saved = c.pretrain.to_dict()
    saved['model'].update(vocab_size=30522, hidden_size=384, num_layers=6)
    saved['data']['lowercase'] = True
    (imported / 'config.json').write_text(json.dumps(saved))
    (imported / 'vocab.txt').write_text('[PAD]\n')
    c.imported = str(imported)
    c.arms = 'distilled,scratch'
    assert runner.arms(c) == ['scratch', 'imported', 'distilled']  # each teacher first
    teacher = str(tmp_path / 'runs' / 'imported' / 'frac_0.1' / 'seed2')
    student = runner.finetune_config(c, runner.Run('distilled', 0.1, 2), '', '', teacher)
    assert student.teacher == teacher and not student.init_from
    assert student.distill.temperature == c.distill.temperature
    assert student.model.num_layers == c.finetune.model.num_layers  # the small model
    scratch = runner.finetune_config(c, runner.Run('scratch', 0.1, 2), '')
    assert scratch.data.vocab_file == str(imported / 'vocab.txt')  # the teacher's tokens
    assert scratch.model.vocab_size == 30522 and scratch.model.hidden_size == 128
    for arms, match in (('pretrained,distilled', 'apart'), ('distilled', 'learning-rate grid')):
        c.arms = arms
        c.learning_rates = (1e-3, 1e-4) if arms == 'distilled' else ()
        with pytest.raises(ConfigError, match=match):
            runner.plan(c)
    c.imported, c.learning_rates = '', ()
    with pytest.raises(ConfigError, match='--config.imported'):
        runner.plan(c)
    digits = study_config.get_config('digits')
    digits.arms, digits.imported = 'distilled', str(imported)
    with pytest.raises(ConfigError, match='text studies'):
        runner.plan(digits)


def test_smoke_study_with_a_distilled_arm(tmp_path):
    """A text study whose `imported` start is a small MLM run: the imported arm's run of
    each budget and seed is the teacher its distilled arm learns from; scratch and the
    student read its vocabulary."""
    imported = str(tmp_path / 'mlm')
    steps = ['--config.total_steps=4', '--config.checkpoint_every=4', '--config.eval_every=4']
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        imported,
        *SMALL_RUN,
        *steps,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    workdir = str(tmp_path / 'study')
    small = [
        f'--config.finetune.model.{k}={v}'
        for k, v in (('hidden_size', 16), ('num_layers', 1), ('num_heads', 2), ('mlp_dim', 32))
    ]
    r = launch(
        'study',
        '--config',
        'configs/study.py:text',
        '--workdir',
        workdir,
        f'--config.imported={imported}',
        '--config.arms=distilled,scratch',
        '--config.label_fractions=(0.5,)',
        '--config.seeds=(0,)',
        *small,
        '--config.finetune.data.seq_len=32',
        '--config.finetune.batch_size=16',
        *(
            f'--config.finetune.{k}={v}'
            for k, v in (
                ('total_steps', 4),
                ('warmup_steps', 1),
                ('eval_every', 2),
                ('checkpoint_every', 2),
            )
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(os.path.join(workdir, 'study.json')))
    assert [t['arm'] for t in result['table']] == ['scratch', 'imported', 'distilled']
    run = os.path.join(workdir, 'runs', '{}', 'frac_0.5', 'seed0')
    student = json.load(open(os.path.join(run.format('distilled'), 'summary.json')))
    assert student['teacher'] == os.path.abspath(run.format('imported'))
    assert student['student_params'] < student['teacher_params']
    by_arm = {t['arm']: t for t in result['table']}
    assert by_arm['distilled']['params'] == student['student_params']  # not the teacher's
    assert by_arm['imported']['params'] == student['teacher_params']  # the teacher's run
    assert all(t['step_time_ms'] > 0 for t in result['table'])
    vocab = open(os.path.join(imported, 'vocab.txt')).read()
    for arm in ('scratch', 'distilled'):
        config = json.load(open(os.path.join(run.format(arm), 'config.json')))
        assert open(config['data']['vocab_file']).read() == vocab
    assert 'distilled - scratch (paired)' in r.stdout


def test_smoke_study_with_mae_arms(tmp_path):
    """An MAE pretraining runs in WORKDIR/mae_pretrain and both mae arms start from it."""
    workdir = str(tmp_path / 'study')
    r = launch(
        'study',
        '--config',
        'configs/study.py:smoke',
        '--workdir',
        workdir,
        '--config.arms=scratch,mae,mae_linear_probe',
        '--config.label_fractions=(1.0,)',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    mae = os.path.join(workdir, 'mae_pretrain')
    assert json.load(open(os.path.join(mae, 'summary.json')))['task'] == 'mae'
    assert not os.path.exists(os.path.join(workdir, 'pretrain'))  # no SimCLR arm asked
    result = json.load(open(os.path.join(workdir, 'study.json')))
    assert result['mae_pretrain_workdir'] == mae
    assert [t['arm'] for t in result['table']] == ['scratch', 'mae', 'mae_linear_probe']
    for arm in ('mae', 'mae_linear_probe'):
        run = json.load(open(os.path.join(workdir, 'runs', arm, 'frac_1', 'seed0', 'config.json')))
        assert run['init_from'] == mae
        assert run['transfer']['freeze_backbone'] == (arm == 'mae_linear_probe')
    assert 'mae - scratch (paired)' in r.stdout


def _study_args(workdir: str) -> list[str]:
    return [
        'study',
        '--config',
        'configs/study.py:smoke',
        '--workdir',
        workdir,
        '--config.arms=pretrained,scratch',
    ]


def test_smoke_study_runs_resumes_after_a_kill_and_writes_the_table(tmp_path):
    workdir = str(tmp_path / 'study')
    first_run = os.path.join(workdir, 'runs', 'pretrained', 'frac_0.05', 'seed0')
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    with open(workdir + '.log', 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, 'launch.py', *_study_args(workdir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.time() + 300
    summary = os.path.join(first_run, 'summary.json')
    while not os.path.isfile(summary) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(workdir + '.log').read()[-3000:]
    assert not os.path.exists(os.path.join(workdir, 'study.csv'))
    done_at = os.path.getmtime(summary)

    r = launch(*_study_args(workdir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'reusing it' in r.stderr  # the pretraining
    assert 'run 1/4 runs/pretrained/frac_0.05/seed0 is complete' in r.stderr
    assert os.path.getmtime(summary) == done_at  # read, not redone
    check_workdir(first_run, 'accuracy')

    result = json.load(open(os.path.join(workdir, 'study.json')))
    assert len(result['runs']) == 4 and len(result['table']) == 4
    by_key = {(t['arm'], t['budget']): t for t in result['table']}
    # The digits' 1408 training images less a tenth of each class for validation, then 5%
    # of each class of the rest (halves round up).
    per_class = np.bincount(digits.digits_images(split='train').labels)
    kept = per_class - np.floor(0.1 * per_class + 0.5).astype(int)
    assert by_key[('scratch', 1.0)]['train_examples'] == kept.sum() < 1408
    assert by_key[('scratch', 0.05)]['train_examples'] == np.floor(0.05 * kept + 0.5).sum()
    for run in result['runs']:
        run_summary = json.load(open(os.path.join(run['workdir'], 'summary.json')))
        assert run['test_accuracy'] == run_summary['test_accuracy']  # the test split's
        assert run['test_step'] == run_summary['test_step'] == run_summary['best_checkpoint_step']
        evals = [row for row in read_metrics(run['workdir']) if row['split'] in ('eval', 'test')]
        assert [row['split'] for row in evals] == ['eval'] * 3 + ['test']
        assert run['val_accuracy'] == next(
            e['accuracy'] for e in evals if e['step'] == run['test_step'] and e['split'] == 'eval'
        )
        assert run_summary['steps'] == 8
    for t in result['table']:  # one seed: a mean, no interval
        assert t['test_ci_low'] is None and t['seeds'] == 1
    assert by_key[('pretrained', 1.0)]['diff_vs_scratch'] == pytest.approx(
        by_key[('pretrained', 1.0)]['test_mean'] - by_key[('scratch', 1.0)]['test_mean']
    )
    with open(os.path.join(workdir, 'study.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['arm'], float(r['budget'])) for r in rows] == list(by_key)
    assert {'test_mean', 'test_ci_low', 'diff_vs_scratch', 'diff_ci_high'} <= set(rows[0])
    assert not any(k.startswith('best') for k in rows[0])
    png = open(os.path.join(workdir, 'study.png'), 'rb').read()
    assert png.startswith(b'\x89PNG') and len(png) > 10_000
    assert (
        '| budget | labels | pretrained test accuracy | scratch test accuracy | '
        'pretrained - scratch (paired) |'
    ) in r.stdout

    # Run again: nothing left to do, the same table.
    r = launch(*_study_args(workdir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count('/seed0 is complete') == 4
    again = json.load(open(os.path.join(workdir, 'study.json')))
    assert again['table'] == result['table']


@pytest.mark.slow
def test_smoke_study_on_two_processes(tmp_path):
    """Every process runs the same sequence of runs (each a 2-process run); process 0
    alone collects and writes the table."""
    workdir = str(tmp_path / 'study')
    r = launch('study', '--local_processes', '2', *_study_args(workdir)[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('| budget | labels |') == 1
    result = json.load(open(os.path.join(workdir, 'study.json')))
    assert len(result['runs']) == 4
    assert 'jit over 2 devices, 2 processes' in r.stderr


def test_the_grid_chooses_each_arms_rate_on_validation(tmp_path):
    c = study_config.get_config('smoke')
    c.learning_rates = (1e-3, 1e-2)
    runs = runner.plan(c)
    assert len(runs) == 2 * 3 * 2  # budgets x arms x rates
    assert runs[0].path == os.path.join('runs', 'pretrained', 'frac_0.05', 'seed0', 'lr0.001')
    pretrain = tmp_path / 'pretrain'
    pretrain.mkdir()
    (pretrain / 'config.json').write_text(json.dumps(c.pretrain.to_dict()))
    probe = runner.finetune_config(c, runner.Run('linear_probe', 1.0, 0, 1e-3), str(pretrain))
    assert probe.learning_rate == 1e-3  # the grid's rate, not probe_learning_rate
    pretrained = runner.finetune_config(c, runner.Run('pretrained', 1.0, 0, 1e-2), str(pretrain))
    assert pretrained.learning_rate == 1e-2 and 'learning_rate=' not in (
        pretrained.transfer.start_defaults.replace('end_learning_rate', '')
    )
    for bad in ((1e-3, 1e-3), (0.0,), (-1e-3,)):
        c.learning_rates = bad
        with pytest.raises(ConfigError, match='learning_rates'):
            runner.plan(c)

    def row(arm, seed, rate, val, test):
        return {
            'arm': arm,
            'budget': 1.0,
            'seed': seed,
            'learning_rate': rate,
            'val_accuracy': val,
            'test_accuracy': test,
        }

    rows = [
        row('pretrained', 0, 1e-4, 0.7, 0.9),  # best on test, not on validation
        row('pretrained', 0, 1e-3, 0.8, 0.6),
        row('scratch', 0, 1e-4, 0.5, 0.5),
        row('scratch', 0, 1e-3, 0.5, 0.4),  # a tie: the grid's earlier rate
        row('pretrained', 1, 1e-4, None, 0.9),  # no validation figure: never chosen
        row('pretrained', 1, 1e-3, 0.1, 0.2),
    ]
    chosen = {(r['arm'], r['seed']): r for r in runner.choose_rates(rows, 'accuracy')}
    assert chosen['pretrained', 0]['learning_rate'] == 1e-3
    assert chosen['pretrained', 0]['test_accuracy'] == 0.6
    assert chosen['pretrained', 0]['rates_tried'] == [1e-4, 1e-3]
    assert chosen['scratch', 0]['learning_rate'] == 1e-4
    assert chosen['pretrained', 1]['learning_rate'] == 1e-3


def test_smoke_study_with_a_rate_grid_reports_the_chosen_rates(tmp_path):
    workdir = str(tmp_path / 'study')
    r = launch(
        *_study_args(workdir),
        '--config.label_fractions=(1.0,)',
        '--config.learning_rates=(1e-3,3e-2)',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(os.path.join(workdir, 'study.json')))
    assert len(result['grid_runs']) == 4 and len(result['runs']) == 2
    for run in result['runs']:
        grid = [g for g in result['grid_runs'] if g['arm'] == run['arm']]
        assert {g['learning_rate'] for g in grid} == {1e-3, 3e-2}
        assert run['val_accuracy'] == max(g['val_accuracy'] for g in grid)
        run_config = json.load(open(os.path.join(run['workdir'], 'config.json')))
        assert run_config['learning_rate'] == run['learning_rate']
        assert run['workdir'].endswith(f'lr{run["learning_rate"]:g}')
    for t in result['table']:
        rate = next(x['learning_rate'] for x in result['runs'] if x['arm'] == t['arm'])
        assert t['learning_rates'] == f'{rate:g}'
        assert f'(lr {rate:g})' in r.stdout
