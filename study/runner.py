"""The transfer study: one pretraining, many fine-tunings, one table.

WORKDIR/config.json             the study's resolved config
WORKDIR/pretrain/               the pretraining run (unless `pretrain_workdir` names one)
WORKDIR/mae_pretrain/           the MAE pretraining of an image study's mae arms (unless
                                `mae_pretrain_workdir` names one)
WORKDIR/dapt/seed<k>/           the domain_adapted arm's pretraining of seed k: MLM continued
                                from `imported` on the task's training text (configs/dapt.py)
WORKDIR/runs/<arm>/<budget>/seed<k>/   one fine-tuning workdir per run (with a
                                       `learning_rates` grid: .../seed<k>/lr<rate>/)
WORKDIR/study.json, study.csv   per-run results and the table (study/report.py)
WORKDIR/study.png               test accuracy against labelled examples, one line per arm

The claim a study makes: at a fixed training budget (the same steps, batch, optimizer and,
for text, vocabulary on every arm; each arm at its own learning rate: its start's, or the
rate of `learning_rates` validation chose), the checkpoint each run selects on its
validation split (carved from the labelled examples by seed, the same for every budget of
a seed) scores this on the test split, which no run reads before its end: a mean and a
95% interval over seeds per arm and budget, and the paired pretrained - scratch
difference with its own interval. Steps-to-target count validation rows.

Every run is an ordinary stage run in its own workdir, so the study resumes for free: a run
whose summary says it completed is read, not redone; a run cut off midway resumes from its
last checkpoint (core/trainer.py); the rest start. Runs go one after another in this
process; on several hosts every process runs the same sequence and process 0 writes the
study's files.
"""

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from core import config as config_lib
from core import metrics as metrics_lib
from core import recipe, selection, trainer
from core.errors import ConfigError, UserError

ARMS = (
    'pretrained',
    'scratch',
    'linear_probe',
    'imported',
    'distilled',
    'domain_adapted',
    'mae',
    'mae_linear_probe',
)
# The arms that start from the study's MAE pretraining (`mae_pretrain`), not `pretrain`.
MAE_ARMS = ('mae', 'mae_linear_probe')


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    budget: float | int  # a fraction of each class (float) or examples per class (int)
    seed: int
    learning_rate: float | None = None  # one rate of study.learning_rates; None: the arm's

    @property
    def budget_name(self) -> str:
        if isinstance(self.budget, int):
            return f'{self.budget}_per_class'
        return f'frac_{self.budget:g}'

    @property
    def path(self) -> str:
        path = os.path.join('runs', self.arm, self.budget_name, f'seed{self.seed}')
        if self.learning_rate is None:
            return path
        return os.path.join(path, f'lr{self.learning_rate:g}')


def arms(config) -> list[str]:
    names = [a.strip() for a in config.arms.split(',') if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise ConfigError(
            f'study arms={config.arms!r}: expected a comma-separated subset of {ARMS}'
        )
    if 'imported' in names and not config.imported:
        raise ConfigError(
            'the imported arm needs --config.imported=DIR, a workdir written by '
            '`launch.py import-hf` (or drop it from --config.arms)'
        )
    if config.imported and 'imported' not in names:
        names.append('imported')
    if 'distilled' in names:
        if 'distill' not in config:
            raise ConfigError(
                'the distilled arm is for text studies (configs/study.py:text with '
                '--config.imported=DIR)'
            )
        if not config.imported:
            raise ConfigError(
                "the distilled arm distils the imported arm's runs: give --config.imported=DIR "
                '(a `launch.py import-hf` workdir), the teacher fine-tuned at each budget and seed'
            )
        if {'pretrained', 'linear_probe'} & set(names):
            raise ConfigError(
                "the distilled arm and scratch both read the teacher's vocabulary, which a "
                'pretrained arm does not: run the distillation study apart, e.g. '
                '--config.arms=imported,distilled,scratch'
            )
        if config.learning_rates:
            raise ConfigError(
                'the distilled arm has no learning-rate grid yet (its teacher would be one '
                'run of the grid): leave --config.learning_rates empty'
            )
        # Each teacher (the imported arm's run of that budget and seed) runs first.
        names = [a for a in names if a != 'distilled'] + ['distilled']
    if 'domain_adapted' in names:
        if 'dapt' not in config:
            raise ConfigError(
                'the domain_adapted arm is for text studies (configs/study.py:text with '
                '--config.imported=DIR)'
            )
        if not config.imported:
            raise ConfigError(
                "the domain_adapted arm continues the imported encoder on the task's text: "
                'give --config.imported=DIR (a `launch.py import-hf` workdir or an MLM run)'
            )
    if any(a in MAE_ARMS for a in names) and 'mae_pretrain' not in config:
        raise ConfigError(
            f'study arms={config.arms!r}: the MAE arms ({", ".join(MAE_ARMS)}) are for image '
            'studies (configs/study.py:digits), which pretrain a ViT with MAE beside SimCLR'
        )
    return names


def budgets(config) -> list[float | int]:
    fractions, counts = tuple(config.label_fractions), tuple(config.examples_per_class)
    if bool(fractions) == bool(counts):
        raise ConfigError(
            'set exactly one of --config.label_fractions (e.g. "(0.01,0.1,1.0)") and '
            f'--config.examples_per_class (e.g. "(1,5,20)"); found {fractions} and {counts}'
        )
    if any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f'label_fractions {fractions} must lie in (0, 1]; 1.0 = every label')
    if any(int(k) != k or k < 1 for k in counts):
        raise ConfigError(f'examples_per_class {counts} must be positive integers')
    return sorted({float(f) for f in fractions}) or sorted({int(k) for k in counts})


def plan(config) -> list[Run]:
    """Every run of the study, in the order they are done: budgets from small to large, so
    a study cut short already has the low-label end, where the question is."""
    if not config.seeds:
        raise ConfigError('study seeds is empty; give e.g. --config.seeds="(0,1,2)"')
    config_lib.check_ranges(config)  # its stages' keys too (pretrain.*, finetune.*)
    rates = [float(r) for r in config.learning_rates]
    if any(not 0 < r < float('inf') for r in rates) or len(set(rates)) < len(rates):
        raise ConfigError(
            f'study learning_rates {tuple(config.learning_rates)} must be distinct positive '
            'rates, e.g. --config.learning_rates="(1e-4,3e-4,1e-3)"; () = each arm its own'
        )
    return [
        Run(arm, budget, int(seed), rate)
        for budget in budgets(config)
        for seed in config.seeds
        for arm in arms(config)
        for rate in rates or [None]
    ]


def choose_rates(rows: list[dict], metric: str) -> list[dict]:
    """Of each (arm, budget, seed)'s runs at the grid's rates, the one whose selected
    checkpoint is best on validation (the earlier rate of the grid on a tie): the rate is
    chosen as the checkpoint is, never on test. Each row keeps the rates tried."""
    best: dict[tuple, tuple[float, dict]] = {}
    tried: dict[tuple, list] = {}
    for row in rows:
        key = (row['arm'], row['budget'], row['seed'])
        tried.setdefault(key, []).append(row['learning_rate'])
        score = row.get(f'val_{metric}')
        score = -math.inf if score is None else score
        if key not in best or score > best[key][0]:
            best[key] = (score, row)
    return [dict(row, rates_tried=tried[key]) for key, (_, row) in best.items()]


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def completed(workdir: str) -> bool:
    return bool(read_json(os.path.join(workdir, 'summary.json')).get('completed'))


def finetune_config(
    config,
    run: Run,
    pretrain_dir: str,
    mae_dir: str = '',
    teacher_dir: str = '',
    dapt_dir: str = '',
) -> ml_collections.ConfigDict:
    """The stage config of one run: the study's `finetune` block, this run's budget and seed,
    and how the arm starts (pretrain_dir: the study's pretraining; mae_dir: its MAE one;
    teacher_dir: the distilled arm's teacher, the imported arm's run of this budget and
    seed; dapt_dir: the domain_adapted arm's start, this seed's domain-adaptive pretraining,
    from its checkpoint that held-out MLM accuracy chose)."""
    c = ml_collections.ConfigDict(config.finetune.to_dict())
    c.seed = run.seed
    every_label = isinstance(run.budget, float) and run.budget == 1.0
    c.train_examples = '' if every_label else str(run.budget)
    source = pretrain_dir
    if run.arm == 'imported':
        source = config.imported
    elif run.arm in MAE_ARMS:
        source = mae_dir
    elif run.arm == 'domain_adapted':
        source = dapt_dir
    if source:
        saved = read_json(os.path.join(source, 'config.json'))
        if not saved:
            raise UserError(
                f'{source}/config.json not found: the {run.arm} arm starts from a pretrax '
                'workdir (a pretraining run, or one written by `launch.py import-hf`)'
            )
        recipe.adopt_architecture(c, saved, c.get('init_subtree', 'backbone'))
    if run.arm not in ('scratch', 'distilled'):
        c.init_from = source
    if run.arm == 'domain_adapted':
        step = selection.best_kept_step(dapt_dir, 'mlm_accuracy')
        c.init_from = os.path.join(dapt_dir, 'checkpoints', str(step))
    if run.arm in ('linear_probe', 'mae_linear_probe'):
        c.transfer.freeze_backbone = True
        c.learning_rate = config.probe_learning_rate
    given = {k.partition('.')[2] for k in config_lib.COMMAND_LINE_KEYS if k.startswith('finetune.')}
    if run.learning_rate is not None:  # a rate of the study's grid, on every arm
        c.learning_rate = run.learning_rate
        given.add('learning_rate')
    if c.get('init_from'):
        # A pretrained start takes the fine-tuning defaults of its encoder (core/recipe.py),
        # except what the study's command line (--config.finetune.KEY) or grid gives.
        recipe.apply(c, saved, recipe.run_directory(source), given)
    if run.arm == 'distilled':  # the student: this block's model, from scratch
        c.teacher = teacher_dir
        c.distill = ml_collections.ConfigDict(config.distill.to_dict())
    if run.arm == 'scratch' and 'vocab_file' in c.data and not c.data.vocab_file:
        vocab = os.path.join(pretrain_dir, 'vocab.txt') if pretrain_dir else ''
        if os.path.isfile(vocab):
            c.data.vocab_file = vocab  # the same tokenization as the pretrained arm
        elif 'distilled' in arms(config):  # the label-only student: the teacher's tokens
            teacher = read_json(os.path.join(config.imported, 'config.json'))
            c.data.vocab_file = os.path.join(config.imported, 'vocab.txt')
            c.data.lowercase = teacher['data'].get('lowercase', c.data.lowercase)
            c.model.vocab_size = teacher['model']['vocab_size']
    return c


def time_to_target(workdir: str, metric: str, target: float) -> tuple[int | None, float | None]:
    """(step, training seconds) of the first eval (validation) row at or above `target`;
    Nones if never."""
    for row in metrics_lib.read_metrics(workdir):
        if row['split'] == 'eval' and row.get(metric, -float('inf')) >= target:
            return row['step'], row.get('train_time_sec')
    return None, None


def result_row(run: Run, workdir: str, metric: str, target: float) -> dict:
    """One run's figures: the test `metric` of its validation-selected checkpoint (and
    that checkpoint's validation figure and step), and when its validation rows first
    reached `target`."""
    summary = read_json(os.path.join(workdir, 'summary.json'))
    if f'test_{metric}' not in summary:
        raise UserError(
            f'{workdir}/summary.json has no test_{metric}: the study reports test figures, '
            'so the fine-tuning task needs a test split (the embedded tasks ship one; else '
            '--config.finetune.data.test_files or test_split). A run finished by an older '
            'pretrax has none either: start the study in a new workdir'
        )
    step, seconds = time_to_target(workdir, metric, target)
    selected = summary['test_step']
    rows = metrics_lib.read_metrics(workdir)
    val = {r['step']: r.get(metric) for r in rows if r['split'] == 'eval' and r['step'] == selected}
    step_times = [r['step_time_ms'] for r in rows if r['split'] == 'train' and 'step_time_ms' in r]
    return {
        'arm': run.arm,
        'budget': run.budget,
        'seed': run.seed,
        'learning_rate': read_json(os.path.join(workdir, 'config.json')).get('learning_rate'),
        'train_examples': summary.get('train_examples'),
        f'test_{metric}': summary[f'test_{metric}'],
        'test_step': selected,
        f'val_{metric}': val.get(selected),
        'steps': summary['steps'],
        'steps_to_target': step,
        'train_time_to_target_sec': seconds,
        'params': summary.get('student_params', summary.get('num_params')),
        'step_time_ms': float(np.median(step_times)) if step_times else None,
        'wall_time_sec': summary['wall_time_sec'],
        'workdir': workdir,
    }


def run_pretraining(config, workdir: str, key: str = 'pretrain') -> str:
    """The workdir of the study's pretraining `key` (pretrain, mae_pretrain): the one
    `<key>_workdir` names when given (it must be complete), else WORKDIR/<key>, reused when
    complete, else run (or resumed) here."""
    given = config[f'{key}_workdir']
    if given:
        if not completed(given):
            raise UserError(
                f'{key}_workdir {given} holds no completed pretraining (no summary.json with '
                f'completed=true): finish that run, or leave --config.{key}_workdir empty to '
                'pretrain inside the study'
            )
        logging.info('study: reusing the pretraining in %s', given)
        return given
    return pretrain_in(os.path.join(workdir, key), ml_collections.ConfigDict(config[key].to_dict()))


def pretrain_in(path: str, stage_config: ml_collections.ConfigDict) -> str:
    """`path` once it holds the completed pretraining `stage_config` describes: reused when
    complete, else run (or resumed) here."""
    if completed(path):
        logging.info('study: the pretraining in %s is complete; reusing it', path)
        return path
    logging.info('study: pretraining in %s', path)
    trainer.train_and_evaluate(stage_config, path, 'pretrain')
    jax.clear_caches()
    return path


# The task keys of the study's fine-tuning data that the domain-adaptive pretraining reads
# the same task by (configs/dapt.py takes text_cls.py's data keys).
TASK_DATA_KEYS = (
    'name',
    'files',
    'eval_files',
    'eval_fraction',
    'train_split',
    'eval_split',
    'data_dir',
    'text_field',
    'text_pair_field',
    'label_field',
    'header',
)


def dapt_config(config, seed: int) -> ml_collections.ConfigDict:
    """The domain-adaptive pretraining of one seed (the `dapt` block): MLM continued from
    `imported` on the training text of the study's fine-tuning task, less the validation
    split that seed's fine-tuning runs carve (the same for every budget), which it holds
    out."""
    c = ml_collections.ConfigDict(config.dapt.to_dict())
    c.seed = seed
    c.init_from = config.imported
    c.task_type = config.finetune.get('task_type', 'classification')
    for key in TASK_DATA_KEYS:
        c.data[key] = config.finetune.data[key]
    return c


def run_dapt(config, workdir: str, seed: int) -> str:
    """WORKDIR/dapt/seed<k>: this seed's domain-adaptive pretraining, reused when complete,
    else run (or resumed) here."""
    return pretrain_in(os.path.join(workdir, 'dapt', f'seed{seed}'), dapt_config(config, seed))


def run_study(config, workdir: str) -> dict:
    """Runs what is missing of the study in `workdir`, then writes its table and plot."""
    from study import report

    started = time.time()
    runs = plan(config)
    metric = config.finetune.eval.metric or 'accuracy'
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config.to_json(indent=2))
    needs_pretraining = any(r.arm in ('pretrained', 'linear_probe') for r in runs)
    pretrain_dir = run_pretraining(config, workdir) if needs_pretraining else ''
    needs_mae = any(r.arm in MAE_ARMS for r in runs)
    mae_dir = run_pretraining(config, workdir, 'mae_pretrain') if needs_mae else ''

    rows = []
    for i, run in enumerate(runs):
        path = os.path.join(workdir, run.path)
        if completed(path):
            logging.info('study: run %d/%d %s is complete', i + 1, len(runs), run.path)
        else:
            logging.info('study: run %d/%d %s', i + 1, len(runs), run.path)
            teacher = os.path.join(workdir, dataclasses.replace(run, arm='imported').path)
            dapt = run_dapt(config, workdir, run.seed) if run.arm == 'domain_adapted' else ''
            c = finetune_config(config, run, pretrain_dir, mae_dir, teacher, dapt)
            trainer.train_and_evaluate(c, path, 'finetune')
            jax.clear_caches()  # each run compiles its own step; keep memory flat
        if is_main:  # process 0 wrote the run's files; the others may not see them yet
            rows.append(result_row(run, path, metric, config.target_accuracy))
    if not is_main:
        return {'study': config.name, 'runs': len(runs)}

    chosen = choose_rates(rows, metric)
    table = report.aggregate(chosen, metric)
    result = {
        'study': config.name,
        'metric': metric,
        'target': config.target_accuracy,
        'pretrain_workdir': pretrain_dir,
        'mae_pretrain_workdir': mae_dir,
        'learning_rates': list(config.learning_rates),
        'table': table,
        'runs': chosen,  # with a grid: each the run at the rate validation chose
        'grid_runs': rows if config.learning_rates else [],
        'wall_time_sec': time.time() - started,
    }
    report.write(workdir, result)
    print(report.markdown(table, metric, config.target_accuracy))
    return result
