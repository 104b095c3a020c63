"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow, on request.

`config.loggers` names what a run writes: `jsonl` (WORKDIR/metrics.jsonl, the contract
the rest of pretrax reads, so it must be named), `tensorboard` (WORKDIR/tensorboard/),
`wandb`, `mlflow`. A tracker gets the resolved config (flattened) as hyper-parameters,
every metrics row as `<split>/<name>` at its step, and the summary; its run id is kept in
WORKDIR/trackers.json so a restart of the workdir logs into the same run. Neither library
is imported unless named: they are optional (requirements-trackers.txt). docs/outputs.md,
Trackers, is the user's page.
"""

import atexit
import difflib
import importlib.util
import json
import math
import os
import time
import uuid

import ml_collections
from absl import logging
from flax import traverse_util

from core.errors import ConfigError
from core.files import atomic_write

LOGGERS = ('jsonl', 'tensorboard', 'wandb', 'mlflow')
# The package each optional tracker needs, and the line that installs it.
PACKAGES = {
    'wandb': ('wandb', 'pip install wandb'),
    'mlflow': ('mlflow', 'pip install mlflow-skinny'),
}
IDS = 'trackers.json'  # WORKDIR/trackers.json: {"wandb": {"id": ...}, "mlflow": {...}}


def parse(loggers: str) -> tuple[str, ...]:
    """The logger names of `config.loggers`, checked: known, `jsonl` among them, and the
    optional ones installed; raises ConfigError (one line) naming the fix."""
    names = tuple(dict.fromkeys(n.strip() for n in str(loggers).split(',') if n.strip()))
    for name in names:
        if name not in LOGGERS:
            close = difflib.get_close_matches(name, LOGGERS, n=1)
            hint = f'did you mean {close[0]}? ' if close else ''
            raise ConfigError(
                f'--config.loggers={loggers!r}: no logger {name!r}; {hint}'
                f'known: {",".join(LOGGERS)}'
            )
    if 'jsonl' not in names:
        raise ConfigError(
            f'--config.loggers={loggers!r} leaves out jsonl: metrics.jsonl is what evaluate, '
            "the study and the run's summary read; add it, e.g. "
            f'--config.loggers={",".join(("jsonl", *names))}'
        )
    for name in names:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise ConfigError(
                f'--config.loggers names {name}, which is not installed: run '
                f'`{PACKAGES[name][1]}` (or `pip install -r requirements-trackers.txt`)'
            )
    return names


def check(config: ml_collections.ConfigDict) -> None:
    """Start-up check of `config.loggers` (absent in configs older than the key: the
    default, jsonl and TensorBoard)."""
    parse(config.get('loggers', 'jsonl,tensorboard'))


_WANDB_LOCAL_MODES = ('offline', 'disabled', 'dryrun')


def check_can_start(config: ml_collections.ConfigDict) -> None:
    """Before a run reads its data: online W&B needs an API key (`wandb login`, or
    WANDB_API_KEY). Asked of W&B itself with `wandb.login(verify=False, prompt=False)`
    (nothing is sent; False without a key), so a missing login is one line at start-up,
    not an error minutes later at the first metrics row."""
    names = parse(config.get('loggers', 'jsonl,tensorboard'))
    if 'wandb' not in names or os.environ.get('WANDB_MODE', '').lower() in _WANDB_LOCAL_MODES:
        return
    import wandb

    try:
        logged_in = wandb.login(verify=False, prompt=False)  # False: no API key
    except wandb.errors.Error as e:
        raise ConfigError(_wandb_cannot_start(e)) from None
    if not logged_in:
        raise ConfigError(_wandb_cannot_start('no W&B API key is configured'))


def _wandb_cannot_start(error) -> str:
    return (
        f'--config.loggers names wandb, which cannot start ({error}); run `wandb login`, '
        'or set WANDB_MODE=offline (sync later with `wandb sync`)'
    )


def open_trackers(workdir: str, config: ml_collections.ConfigDict | dict) -> list:
    """The trackers `config.loggers` names, opened (process 0 only: the caller's to say)."""
    names = parse(config.get('loggers', 'jsonl,tensorboard'))
    flat = _flat_config(config)
    opened = []
    for name in names:
        if name == 'wandb':
            opened.append(WandbTracker(workdir, flat))
        elif name == 'mlflow':
            opened.append(MlflowTracker(workdir, flat))
    return opened


def _flat_config(config) -> dict:
    tree = config if isinstance(config, dict) else config.to_dict()
    return {k: _plain(v) for k, v in traverse_util.flatten_dict(tree, sep='.').items()}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _read_ids(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, IDS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_id(workdir: str, name: str, entry: dict) -> None:
    ids = _read_ids(workdir)
    ids[name] = entry
    with atomic_write(os.path.join(workdir, IDS)) as f:
        json.dump(ids, f, indent=2, sort_keys=True)


class _Tracker:
    """Closed at the end by MetricWriter.close; a run that dies of an exception (or exits
    without closing) is closed at interpreter exit, marked failed. A watchdog exit
    (os._exit) leaves it as it was: it resumes on the restart."""

    def __init__(self):
        self.closed = False
        self.summarised = False
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if not self.closed:
            self.close(failed=True)

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._at_exit)
        try:
            self._finish(failed)
        except Exception as e:  # a tracker's service down must not fail a finished run
            logging.warning('closing the %s run failed: %s', type(self).__name__, e)


class WandbTracker(_Tracker):
    """A W&B run: mode from WANDB_MODE (`offline` needs no account), project from
    WANDB_PROJECT (default `pretrax`), files under WANDB_DIR (default the workdir). Rows
    are logged against their own `step` (a W&B step metric), so the steps a resumed run
    redoes after its checkpoint are logged again rather than dropped."""

    def __init__(self, workdir: str, flat_config: dict):
        import wandb

        run_id = _read_ids(workdir).get('wandb', {}).get('id') or uuid.uuid4().hex[:8]
        try:
            self.run = wandb.init(
                project=os.environ.get('WANDB_PROJECT', 'pretrax'),
                id=run_id,
                resume='allow',
                name=os.path.basename(os.path.abspath(workdir)),
                dir=os.environ.get('WANDB_DIR') or workdir,
            )
        except wandb.errors.Error as e:  # no network, a key W&B refuses, ...
            raise ConfigError(_wandb_cannot_start(e)) from e
        _write_id(workdir, 'wandb', {'id': run_id, 'project': self.run.project})
        self.run.config.update(flat_config, allow_val_change=True)  # resume: changed keys
        self.run.define_metric('step')
        self.run.define_metric('*', step_metric='step')
        super().__init__()

    def log(self, step: int, split: str, scalars: dict[str, float]) -> None:
        self.run.log({'step': step, **{f'{split}/{k}': v for k, v in scalars.items()}})

    def summary(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.summarised = True

    def _finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(_Tracker):
    """An MLflow run: tracking URI from MLFLOW_TRACKING_URI, else a file store in
    WORKDIR/mlruns (no server); experiment from MLFLOW_EXPERIMENT_NAME (default
    `pretrax`). A resumed run logs the steps it redoes again (MLflow keeps both values)."""

    def __init__(self, workdir: str, flat_config: dict):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get('MLFLOW_TRACKING_URI')
        if not uri:
            uri = 'file:' + os.path.join(os.path.abspath(workdir), 'mlruns')
            # MLflow 3 keeps the file store in maintenance and asks for this opt-in.
            os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
        try:
            self.client = client = MlflowClient(uri)
        except MlflowException as e:
            raise ConfigError(
                f'--config.loggers names mlflow, which cannot open MLFLOW_TRACKING_URI={uri}: {e}'
            ) from e
        saved = _read_ids(workdir).get('mlflow', {})
        run = None
        if saved.get('tracking_uri') == uri:
            try:
                run = client.get_run(saved['run_id'])
                client.update_run(run.info.run_id, status='RUNNING')
            except MlflowException:
                logging.warning('mlflow: run %s not found in %s; starting a new one', saved, uri)
                run = None
        params = {}
        if run is None:
            name = os.environ.get('MLFLOW_EXPERIMENT_NAME', 'pretrax')
            experiment = client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else client.create_experiment(name)
            )
            run = client.create_run(
                experiment_id, run_name=os.path.basename(os.path.abspath(workdir))
            )
        else:
            params = run.data.params
        self.run_id = run.info.run_id
        _write_id(workdir, 'mlflow', {'run_id': self.run_id, 'tracking_uri': uri})
        # Params cannot change in MLflow: a resume with changed restart-safe keys logs the
        # new ones only (config_history.jsonl holds every change).
        new = [
            Param(k, json.dumps(v) if not isinstance(v, str) else v)
            for k, v in flat_config.items()
            if k not in params
        ]
        for i in range(0, len(new), 100):  # MLflow's limit per batch
            client.log_batch(self.run_id, params=new[i : i + 100])
        super().__init__()

    def _metrics(self, step: int, named: dict[str, float]) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in named.items()]
        try:
            for i in range(0, len(rows), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=rows[i : i + 1000])
        except MlflowException as e:  # a tracking server down must not stop the training
            logging.warning('mlflow: step %d not logged (metrics.jsonl has it): %s', step, e)

    def log(self, step: int, split: str, scalars: dict[str, float]) -> None:
        self._metrics(step, {f'{split}/{k}': v for k, v in scalars.items()})

    def summary(self, summary: dict) -> None:
        """Numbers as `summary/<key>` metrics (at the run's last step); the rest as tags."""
        numbers = {
            f'summary/{k}': v
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        self._metrics(int(summary.get('steps') or 0), numbers)
        for k, v in summary.items():
            if f'summary/{k}' not in numbers:
                self.client.set_tag(self.run_id, f'summary/{k}', json.dumps(v))
        self.summarised = True

    def _finish(self, failed: bool) -> None:
        # A run closed without its summary was preempted: it resumes (KILLED until then).
        status = 'FAILED' if failed else 'FINISHED' if self.summarised else 'KILLED'
        self.client.set_terminated(self.run_id, status)
