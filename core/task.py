"""What a task hands the shared trainer (`core/trainer.py`).

A task module (`mlm`, `simclr`, `mae`, `clip`, `simcse`; the fine-tuning tasks) has
`check_config(config)` (its own start-up checks), optionally `follow_start(config,
workdir)` (keys it takes from elsewhere before the config is checked and written: a
distillation teacher's vocabulary), and `build(config, workdir, runtime) -> Task`: the
data, the model, the pure loss function and the evaluators (of the validation split; a
labelled task's test split is built only when the run ends, `Task.test`). The trainer owns
everything else (mesh, state, restore order, loop, checkpoints, metrics), so every
objective runs the same way.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh

from core import checkpoint as ckpt_lib
from core import step as step_lib


def compute_dtype(config) -> str:
    """The dtype a task's model computes in (`precision`; parameters stay float32)."""
    return 'bfloat16' if config.precision == 'bfloat16' else 'float32'


# The task registry: config.task -> the module that defines it, by stage.
TASKS = {
    'pretrain': {
        'mlm': 'pretrain.mlm',
        'simclr': 'pretrain.simclr',
        'clip': 'pretrain.clip',
        'simcse': 'pretrain.simcse',
        'mae': 'pretrain.mae',
    },
    'finetune': {
        'text_cls': 'finetune.text_cls',
        'image_cls': 'finetune.image_cls',
        'token_cls': 'finetune.token_cls',
    },
}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where the run happens, as a task needs to know it."""

    mesh: Mesh  # the step's mesh (pmap: one device, where the state is built)
    parallelism: str  # jit | pmap
    per_host_batch: int
    process_index: int
    process_count: int
    # The training stream's data shards (data/shards.py): how many, fixed for the run.
    data_shards: int = 1

    @property
    def data_shard_ids(self) -> range:
        """The data shards this process reads (the caller checked that they divide)."""
        per = self.data_shards // self.process_count
        return range(self.process_index * per, (self.process_index + 1) * per)

    @property
    def pmap_axis(self) -> str | None:
        """The device axis a loss reduces over under pmap (None under jit)."""
        return step_lib.PmapStepper.axis if self.parallelism == 'pmap' else None


# evaluate(stepper, params) -> {metric: value}; runs on every host, returns global figures.
Evaluator = Callable[[Any, Any], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Scorer:
    """How a labelled split is scored: its metrics, and one row per example (for
    WORKDIR/predictions.jsonl) where the task can."""

    evaluate: Evaluator
    predict: Callable[[Any, Any], list[dict]] | None = None


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """What `config.init_from` restores: params only, all of them (`subtrees` None) or
    the saved subtree `theirs` into our `ours` for each {ours: theirs} (an encoder into
    `backbone`), the rest as initialised. `adapt(saved_metadata, abstract) -> (target,
    fix)` restores a subtree saved at other shapes and converts it (`fix(params)`): the
    ViT position table of another image size. `besides` names top-level params that are
    not the start's to give (a distillation run's teacher and hidden-state projection):
    restoring all params leaves ours as initialised and ignores any the start holds."""

    subtrees: dict[str, str] | None = None
    adapt: Callable[[Any, Any], tuple[Any, Callable | None]] | None = None
    besides: tuple[str, ...] = ()

    def restore(self, params, abstract_params, path: str):
        """`params` (a new state's) with the checkpoint at `path` restored into them."""
        if self.subtrees is None:
            own = {k: v for k, v in abstract_params.items() if k not in self.besides}
            restored, step = ckpt_lib.restore_params(path, own, besides=self.besides)
            logging.info('initialised params from %s (step %d)', path, step)
            return {**params, **restored}  # ours in `besides` as initialised
        params = dict(params)
        for ours, theirs in self.subtrees.items():
            target, fix = abstract_params[ours], None
            if self.adapt is not None:
                target, fix = self.adapt(ckpt_lib.saved_params_metadata(path, theirs), target)
            params[ours], step = ckpt_lib.restore_params(path, target, subtree=(theirs,))
            if fix is not None:
                params[ours] = fix(params[ours])
            logging.info('initialised %s from %s (params/%s, step %d)', ours, path, theirs, step)
        return params


@dataclasses.dataclass
class Task:
    name: str
    model: nn.Module
    init_params: Callable[[jax.Array], Any]  # rng -> params (boxed with logical names)
    loss_fn: step_lib.LossFn
    train_iter: Iterator[dict]  # host-local batches; checkpointable (Grain)
    evaluate: Evaluator
    metric: str  # the eval metric that picks the best step (higher is better)
    flops_per_step: float = 0.0  # model FLOPs of one training step, for MFU (0: unknown)
    tokens_per_example: int = 0  # for tokens_per_sec (text tasks)
    init_from: InitFrom = InitFrom()  # what config.init_from restores (all params)
    summary_extras: Callable[[dict], dict] = lambda final: {}
    # predict(stepper, params) -> one JSON-able row per eval example (the evaluate stage).
    predict: Callable[[Any, Any], list[dict]] | None = None
    # test() -> the test split's Scorer, reading the test data only when called: the
    # trainer calls it once, after training, for the validation-selected checkpoint (and
    # the evaluate stage). None: the task has no test split. `evaluate` and `predict`
    # above score the validation split.
    test: Callable[[], Scorer] | None = None
    # frozen(params, abstract_params) -> params with the frozen parameters a new run reads
    # from elsewhere (a distillation teacher: finetune/distill.py); None: none.
    frozen: Callable[[Any, Any], Any] | None = None
    close: Callable[[], None] = lambda: None
