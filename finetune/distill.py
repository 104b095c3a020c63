"""Knowledge distillation (Hinton et al. 2015) of a fine-tuned classifier into a student.

A text_cls run with `config.teacher` (a finished text_cls workdir; configs/distill.py)
trains its model, the student, on the teacher's soft targets as well as the labels:

  loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross-entropy(student, label)      (labelled examples only)

per example, summed over the batch. T^2 keeps the soft term's gradient at the scale of the
hard one whatever the temperature (its gradient in the student's logits is
T * (softmax(student / T) - softmax(teacher / T))). With `distill.unlabelled` the
training stream also carries the training examples the label budget left out, which
only the soft term sees.

The teacher runs inside the same sharded step: its parameters are the `teacher/` subtree of
the run's params, restored from the teacher's validation-selected checkpoint when the run
starts, read with stop_gradient and frozen by the optimizer (a zero update, core/optim.py;
its optimizer moments are kept, at zero: memory twice the teacher's size, not yet saved),
applied in the run's compute dtype and without dropout. Its logits are never stored.
Checkpoints of the run carry the teacher, so a resume needs nothing else; what transfers
(`backbone/`, `head/`) is the student alone.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from core import checkpoint as ckpt_lib
from core import selection
from core.config import read_json
from core.errors import ConfigError
from data.labels import LabelMap

TEACHER = 'teacher'


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """[batch] T^2 * KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    t = jnp.asarray(temperature, jnp.float32)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
    return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def loss_fn_for(model, teacher, temperature: float, alpha: float, freeze_backbone: bool, inputs):
    """loss_fn(params, batch, rng, train, rows) of a distilled classifier: `model` (the
    student) on params without `teacher/`, `teacher` on params['teacher'] (stop_gradient,
    deterministic). Batch rows with labelled == 0 (unlabelled) get the soft term only.
    Reports the soft term (`kd_loss`), the hard one over labelled rows (`label_loss`), and
    how often the student's class is the teacher's (`teacher_agreement`)."""

    def loss_fn(params, batch, rng, train: bool, rows=None):
        student = {k: v for k, v in params.items() if k != TEACHER}
        if freeze_backbone:
            student['backbone'] = jax.lax.stop_gradient(student['backbone'])
        x = inputs(batch)
        logits = model.apply({'params': student}, x, not train, rows, rngs={'dropout': rng})
        teacher_logits = teacher.apply({'params': jax.lax.stop_gradient(params[TEACHER])}, x)
        soft = kd_loss(logits, teacher_logits, temperature)
        labels = batch['label'].astype(jnp.int32)
        labelled = batch.get('labelled', jnp.ones_like(labels)).astype(jnp.float32)
        hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * labelled
        loss = alpha * soft + (1.0 - alpha) * hard
        agree = jnp.argmax(logits, axis=1) == jnp.argmax(teacher_logits, axis=1)
        count = jnp.asarray(labels.shape[0], jnp.float32)
        return jnp.sum(loss), {
            'kd_loss': jnp.sum(soft),
            'label_loss': jnp.sum(hard),
            'teacher_agreement': jnp.sum(agree.astype(jnp.float32)),
            'denominator': count,
        }

    return loss_fn


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A finished classification run to distil: its config, labels and selected step."""

    workdir: str
    config: ml_collections.ConfigDict
    label_map: LabelMap
    step: int

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.workdir, 'checkpoints', str(self.step))

    @property
    def vocab_file(self) -> str:
        return os.path.join(self.workdir, 'vocab.txt')


def read_teacher(workdir: str, task: str) -> Teacher:
    """The teacher in `workdir`: a finished `task` run (its config.json, labels.json and
    the checkpoint its validation selected). Anything missing is a ConfigError naming it."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        raise ConfigError(
            f'--config.teacher={workdir}: no config.json there; the teacher is the workdir of a '
            f'finished fine-tuning run (python launch.py finetune --config configs/{task}.py ...)'
        )
    config = ml_collections.ConfigDict(read_json(path))
    if config.get('task') != task:
        raise ConfigError(
            f'--config.teacher={workdir} is a {config.get("task")!r} run; a {task} student '
            f'distils a {task} teacher (a fine-tuned classifier)'
        )
    labels = os.path.join(workdir, 'labels.json')
    if not os.path.isfile(labels):
        raise ConfigError(f'--config.teacher={workdir}: no labels.json; is the run finished?')
    metric = config.get('eval', {}).get('metric') or 'accuracy'
    step = selection.best_kept_step(workdir, metric)
    return Teacher(os.path.abspath(workdir), config, LabelMap.load(labels), step)


def adopt_vocabulary(config: ml_collections.ConfigDict, teacher: Teacher) -> None:
    """The student reads the teacher's token ids: the teacher's vocab.txt, casing and
    vocab_size, unless the command line gave a vocabulary (then it must be the same)."""
    if not os.path.isfile(teacher.vocab_file):
        raise ConfigError(f'--config.teacher={teacher.workdir} has no vocab.txt to tokenize with')
    given = config.data.vocab_file
    if given and _tokens(given) != _tokens(teacher.vocab_file):
        raise ConfigError(
            f'data.vocab_file {given} is not the vocabulary of the teacher '
            f'({teacher.vocab_file}); the student and the teacher read the same token ids: '
            "leave data.vocab_file empty (the teacher's is taken)"
        )
    config.data.vocab_file = teacher.vocab_file
    config.data.lowercase = teacher.config.data.get('lowercase', config.data.lowercase)
    # The student's token embeddings cover the teacher's ids (an init_from start then sets
    # its own, which must be of the same vocabulary: core/recipe.py init_from_vocab).
    config.model.vocab_size = teacher.config.model.vocab_size


def _tokens(path: str) -> list[str]:
    with open(path, encoding='utf-8') as f:
        return f.read().split('\n')


def check_config(config: ml_collections.ConfigDict) -> None:
    """distill.* beyond their ranges (core/config.py RANGES: alpha, temperature)."""
    if config.task_type == 'regression':
        raise ConfigError(
            'distillation here is of classifiers: task_type=regression has no soft targets'
        )


def restore_teacher(teacher: Teacher):
    """restore(params, abstract_params) -> params with `teacher/` read from the teacher's
    selected checkpoint (Task.frozen)."""

    def restore(params, abstract_params):
        restored, _ = ckpt_lib.restore_params(teacher.checkpoint, abstract_params[TEACHER])
        return dict(params, **{TEACHER: restored})

    return restore


def param_count(model, example) -> int:
    """Parameters of `model` (shapes only: nothing is initialised)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)['params']
    return sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))


def training_examples(config, teacher, label_map, train, labels, picked, encode) -> list[dict]:
    """The training stream of a distilled student: the labelled examples (`picked` of
    `train`, each `encode(example, label)`), plus (with
    distill.unlabelled) the training examples the label budget left out, without their
    labels (`labelled` 0: the soft targets only). Validation examples are in neither."""
    if teacher.label_map != label_map:
        raise ConfigError(
            f'the teacher {teacher.workdir} was trained on other labels ({teacher.label_map}) '
            f'than this task has ({label_map}); distil a teacher of the same task'
        )
    examples = [dict(encode(train[i], labels[i]), labelled=np.int32(1)) for i in picked]
    if config.distill.unlabelled:
        chosen = set(int(i) for i in picked)
        rest = [i for i in range(len(train)) if i not in chosen]
        no_label = np.zeros((), labels.dtype)
        examples += [dict(encode(train[i], no_label), labelled=np.int32(0)) for i in rest]
        logging.info(
            'distillation: %d labelled + %d unlabelled training examples (soft targets only)',
            len(picked),
            len(rest),
        )
    return examples
