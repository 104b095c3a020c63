"""Knowledge distillation (Hinton et al. 2015) of a fine-tuned classifier into a student.

A text_cls run with `config.teacher` (a finished text_cls workdir; configs/distill.py)
trains its model, the student, on the teacher's soft targets as well as the labels:

  loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross-entropy(student, label)      (labelled examples only)

per example, summed over the batch. T^2 keeps the soft term's gradient at the scale of the
hard one whatever the temperature (its gradient in the student's logits is
T * (softmax(student / T) - softmax(teacher / T))). With `distill.unlabelled` the
training stream also carries the training examples the label budget left out, and with
`data.unlabelled_files` the task's text from those files (less any validation or test
text): only the soft term sees them.

The teacher runs inside the same sharded step: its parameters are the `teacher/` subtree of
the run's params, restored from the teacher's validation-selected checkpoint when the run
starts, read with stop_gradient and frozen by the optimizer (a zero update and no optimizer
state, core/optim.py), applied in the run's compute dtype and without dropout. Its logits
are never stored. Checkpoints of the run carry the teacher, and WORKDIR/teacher.json what
the run read of the teacher's workdir when it started, so a resume or `evaluate` needs
nothing of that workdir (it may since have moved, or trained further); what transfers
(`backbone/`, `head/`) is the student alone.
"""

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from core import checkpoint as ckpt_lib
from core import rundir, selection
from core.config import read_json
from core.errors import ConfigError, DataError
from core.files import atomic_write
from core.losses import weighted_cross_entropy
from data.formats import match_files
from data.labels import LabelMap
from data.text import read_text_files
from models.encoder import LAYERS, dense_init, zeros_init

TEACHER = 'teacher'


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """[batch] T^2 * KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    t = jnp.asarray(temperature, jnp.float32)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
    return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def matched_layers(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of hidden-state matching: every student layer
    i to teacher layer ceil((i + 1) * L_t / L_s) - 1, so the last layers meet and the
    rest spread evenly (a 2-layer student of a 6-layer teacher: (0, 2), (1, 5))."""
    return [(i, -(-(i + 1) * teacher_layers // student_layers) - 1) for i in range(student_layers)]


def layer_outputs(intermediates) -> list[jax.Array]:
    """The per-layer outputs a TextClassifier's encoder sowed (EncoderLayer's 'hidden'),
    first layer first, from unrolled `layer_<i>` entries or the scanned stack."""
    encoder = intermediates['backbone']['encoder']
    if LAYERS in encoder:  # model.scan_layers: one [layers, batch, length, hidden] stack
        stacked = encoder[LAYERS]['hidden'][0]
        return [stacked[i] for i in range(stacked.shape[0])]
    count = sum(1 for key in encoder if key.startswith('layer_'))
    return [encoder[f'layer_{i}']['hidden'][0] for i in range(count)]


class HiddenProjection(nn.Module):
    """The learned map of student hidden states to the teacher's width (TinyBERT's W_h),
    trained with the student and left behind by fine-tuning (it is not under backbone/)."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', dense_init('embed', None), (x.shape[-1], self.width))
        bias = self.param('bias', zeros_init(None), (self.width,))
        return x.astype(jnp.float32) @ kernel.astype(jnp.float32) + bias


def hidden_loss(student, teacher, pairs, mask: jax.Array, project=None) -> jax.Array:
    """[batch] mean squared error between student and teacher hidden states (lists of
    [batch, length, hidden], layer by layer), per real token (mask [batch, length]) and
    hidden unit, averaged over the `pairs` of matched layers; `project` maps the student's
    states to the teacher's width first."""
    mask = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    per_pair = []
    for s, t in pairs:
        h = student[s].astype(jnp.float32)
        h = project(h) if project is not None else h
        error = jnp.mean(jnp.square(h - teacher[t].astype(jnp.float32)), axis=-1)
        per_pair.append(jnp.sum(error * mask, axis=1) / tokens)
    return jnp.mean(jnp.stack(per_pair), axis=0)


@dataclasses.dataclass(frozen=True)
class HiddenMatching:
    """distill.hidden_weight > 0: the matched layers and the projection (None when the
    widths agree), applied on params['hidden_projection']."""

    weight: float
    pairs: list[tuple[int, int]]
    projection: HiddenProjection | None

    def loss(self, params, sown, teacher_sown, mask: jax.Array) -> jax.Array:
        """[batch] `hidden_loss` of what the student and the teacher sowed in one apply
        (their 'intermediates'), the projection read from params['hidden_projection']."""
        project = None
        if self.projection is not None:
            project = functools.partial(self.projection.apply, {'params': params[PROJECTION]})
        return hidden_loss(
            layer_outputs(sown['intermediates']),
            layer_outputs(teacher_sown['intermediates']),
            self.pairs,
            mask,
            project,
        )


PROJECTION = 'hidden_projection'


def hidden_matching(config, teacher_config) -> HiddenMatching | None:
    """The hidden-state matching of a student config and its teacher's (None: off)."""
    weight = float(config.distill.get('hidden_weight', 0.0))
    if weight <= 0.0:
        return None
    s, t = config.model, teacher_config.model
    pairs = matched_layers(s.num_layers, t.num_layers)
    width = t.hidden_size
    return HiddenMatching(
        weight, pairs, None if s.hidden_size == width else HiddenProjection(width)
    )


def loss_fn_for(
    model,
    teacher,
    temperature: float,
    alpha: float,
    freeze_backbone: bool,
    inputs,
    hidden: HiddenMatching | None = None,
):
    """loss_fn(params, batch, rng, train, rows) of a distilled classifier: `model` (the
    student) on params without `teacher/`, `teacher` on params['teacher'] (stop_gradient,
    deterministic). Batch rows with labelled == 0 (unlabelled) get the soft term only.
    With `hidden`, every row adds hidden.weight times the hidden-state error of the matched
    layers (`hidden_loss`). Reports the soft term (`kd_loss`), the hard one over labelled
    rows (`label_loss`), the hidden-state one (`hidden_loss`), and how often the student's
    class is the teacher's (`teacher_agreement`)."""
    # The layers' outputs, only when hidden-state matching reads them.
    sow = {'mutable': ['intermediates']} if hidden is not None else {}

    def loss_fn(params, batch, rng, train: bool, rows=None):
        student = {k: v for k, v in params.items() if k not in (TEACHER, PROJECTION)}
        if freeze_backbone:
            student['backbone'] = jax.lax.stop_gradient(student['backbone'])
        x = inputs(batch)
        logits = model.apply({'params': student}, x, not train, rows, rngs={'dropout': rng}, **sow)
        if CACHED in batch:  # distill.cache_teacher: the logits came with the batch
            teacher_logits = batch[CACHED]
        else:
            teacher_params = {'params': jax.lax.stop_gradient(params[TEACHER])}
            teacher_logits = teacher.apply(teacher_params, x, **sow)
        extra = {}
        if hidden is not None:
            (logits, sown), (teacher_logits, teacher_sown) = logits, teacher_logits
            matched = hidden.loss(params, sown, teacher_sown, x['input_mask'])
            extra['hidden_loss'] = jnp.sum(matched)
        soft = kd_loss(logits, teacher_logits, temperature)
        labels = batch['label'].astype(jnp.int32)
        labelled = batch.get('labelled', jnp.ones_like(labels)).astype(jnp.float32)
        hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * labelled
        loss = alpha * soft + (1.0 - alpha) * hard
        if hidden is not None:
            loss = loss + hidden.weight * matched
        agree = jnp.argmax(logits, axis=1) == jnp.argmax(teacher_logits, axis=1)
        count = jnp.asarray(labels.shape[0], jnp.float32)
        return jnp.sum(loss), {
            'kd_loss': jnp.sum(soft),
            'label_loss': jnp.sum(hard),
            **extra,
            'teacher_agreement': jnp.sum(agree.astype(jnp.float32)),
            'denominator': count,
        }

    return loss_fn


def mlm_loss_fn_for(model, teacher, temperature: float, alpha: float, hidden=None):
    """loss_fn(params, batch, rng, train, rows) of MLM distillation (configs/distill.py:
    mlm_*): `model` (a BertForMlm student) on params without `teacher/`, `teacher` (a
    BertForMlm) on params['teacher'] (stop_gradient, deterministic), both scored at the
    batch's masked positions. Per masked position: alpha * T^2 * KL(teacher || student at
    T) + (1 - alpha) * cross-entropy with the masked token; with `hidden`, each sequence
    adds hidden.weight times its hidden-state error, spread over its masked positions, so
    the loss per masked token is alpha * soft + (1 - alpha) * hard + weight * hidden on
    average. Reports `mlm_accuracy` (the student's), `kd_loss`, `label_loss`,
    `hidden_loss` (per sequence) and `teacher_agreement` (per masked token)."""
    # The layers' outputs, only when hidden-state matching reads them.
    sow = {'mutable': ['intermediates']} if hidden is not None else {}

    def loss_fn(params, batch, rng, train: bool, rows=None):
        student = {k: v for k, v in params.items() if k not in (TEACHER, PROJECTION)}
        teacher_params = {'params': jax.lax.stop_gradient(params[TEACHER])}
        logits = model.apply(
            {'params': student}, batch, not train, rows, rngs={'dropout': rng}, **sow
        )
        teacher_logits = teacher.apply(teacher_params, batch, **sow)
        weights = batch['masked_weights'].astype(jnp.float32)
        extra, total = {}, 0.0
        if hidden is not None:
            (logits, sown), (teacher_logits, teacher_sown) = logits, teacher_logits
            matched = hidden.loss(params, sown, teacher_sown, batch['input_mask'])
            # Per masked token on average: the batch's mean sequence error, times the tokens.
            per_token = jnp.mean(matched) * jnp.sum(weights)
            total = hidden.weight * per_token
            extra['hidden_loss'] = per_token
        soft = jnp.sum(kd_loss(logits, teacher_logits, temperature) * weights)
        hard, correct, count = weighted_cross_entropy(logits, batch['masked_ids'], weights)
        agree = jnp.argmax(logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
        return alpha * soft + (1.0 - alpha) * hard + total, {
            'mlm_accuracy': correct,
            'kd_loss': soft,
            'label_loss': hard,
            **extra,
            'teacher_agreement': jnp.sum(agree.astype(jnp.float32) * weights),
            'denominator': count,
        }

    return loss_fn


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A finished run to distil: its config, labels (a classifier's; None for MLM), the
    step its validation selected, and whether its MLM head is untrained (an import-hf of a
    checkpoint without one: import.json lists it as initialised)."""

    workdir: str
    config: ml_collections.ConfigDict
    label_map: LabelMap | None
    step: int
    fresh_head: bool = False
    # Where its tokens are read: its vocab.txt, or for a teacher recorded by a started run,
    # that run's own copy of it (WORKDIR/vocab.txt).
    tokens_file: str = ''

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.workdir, 'checkpoints', str(self.step))

    @property
    def vocab_file(self) -> str:
        return os.path.join(self.workdir, 'vocab.txt')


RECORD_FILE = 'teacher.json'


def teacher_of(
    config: ml_collections.ConfigDict, task: str, workdir: str | None = None
) -> 'Teacher':
    """The run's teacher: as WORKDIR/teacher.json recorded it when the run started, for a
    run that has (rundir.starts_anew is false); else read from `config.teacher`
    (read_teacher). A resumed or evaluated student so reads nothing of the teacher's
    workdir, which may have moved, or trained on and selected another step than the one
    inside the student's checkpoints."""
    if workdir and not rundir.starts_anew(config, workdir):
        record = os.path.join(workdir, RECORD_FILE)
        if os.path.isfile(record):
            r = read_json(record)
            labels = r.get('labels')
            return Teacher(
                r['workdir'],
                ml_collections.ConfigDict(r['config']),
                LabelMap(labels['classes'], regression=labels['regression']) if labels else None,
                r['step'],
                r['fresh_head'],
                tokens_file=os.path.join(workdir, 'vocab.txt'),
            )
    return read_teacher(config.teacher, task)


def record_teacher(teacher: Teacher, workdir: str) -> None:
    """WORKDIR/teacher.json (process 0): what `teacher_of` reads back for this run."""
    if jax.process_index() != 0 or os.path.isfile(os.path.join(workdir, RECORD_FILE)):
        return
    labels = teacher.label_map
    record = {
        'workdir': teacher.workdir,
        'step': teacher.step,
        'fresh_head': teacher.fresh_head,
        'labels': None
        if labels is None
        else {'classes': labels.classes, 'regression': labels.regression},
        'config': teacher.config.to_dict(),
    }
    with atomic_write(os.path.join(workdir, RECORD_FILE)) as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write('\n')


def read_teacher(workdir: str, task: str) -> Teacher:
    """The teacher in `workdir`: a finished `task` run, or an import-hf workdir (its
    config.json, a classifier's labels.json, and the checkpoint its validation selected).
    Anything missing is a ConfigError naming it."""
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
    label_map = None
    if task != 'mlm':
        labels = os.path.join(workdir, 'labels.json')
        if not os.path.isfile(labels):
            raise ConfigError(f'--config.teacher={workdir}: no labels.json; is the run finished?')
        label_map = LabelMap.load(labels)
    imported = os.path.join(workdir, 'import.json')  # an import-hf workdir: finished as made
    summary = os.path.join(workdir, 'summary.json')
    finished = os.path.isfile(summary) and read_json(summary).get('completed')
    if not (finished or os.path.isfile(imported)):
        raise ConfigError(
            f'--config.teacher={workdir} has not finished training (its summary.json does not '
            'say completed): a teacher still training, or cut off, would change under the '
            'student; finish it first (rerun its command: it resumes), then distil'
        )
    fresh = os.path.isfile(imported) and 'mlm_head' in read_json(imported).get('initialised', [])
    if os.path.isfile(imported):  # one checkpoint and no evals: the weights as imported
        step = selection.latest_kept_step(workdir)
    else:
        metric = 'mlm_accuracy' if task == 'mlm' else config.get('eval', {}).get('metric')
        step = selection.best_kept_step(workdir, metric or 'accuracy')
    return Teacher(os.path.abspath(workdir), config, label_map, step, bool(fresh))


def adopt_vocabulary(config: ml_collections.ConfigDict, teacher: Teacher) -> None:
    """The student reads the teacher's token ids: the teacher's vocab.txt, casing and
    vocab_size, unless the command line gave a vocabulary (then it must be the same)."""
    tokens = teacher.tokens_file or teacher.vocab_file
    if not os.path.isfile(tokens):
        raise ConfigError(f'--config.teacher={teacher.workdir} has no vocab.txt to tokenize with')
    given = config.data.vocab_file
    if given and _tokens(given) != _tokens(tokens):
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
    """distill.* beyond their ranges (core/config.py RANGES: alpha, temperature), and
    data.unlabelled_files."""
    if config.task_type == 'regression':
        raise ConfigError(
            'distillation here is of classifiers: task_type=regression has no soft targets'
        )
    d = config.distill
    if d.get('cache_teacher') and d.get('hidden_weight', 0.0) > 0:
        raise ConfigError(
            "distill.cache_teacher keeps the teacher's logits only, and hidden-state matching "
            '(distill.hidden_weight > 0) needs its layers in every step: use one of the two'
        )
    pattern = config.data.get('unlabelled_files')
    if pattern:
        if config.data.text_pair_field:
            raise ConfigError(
                f'data.unlabelled_files={pattern!r} holds single texts, and this task reads '
                f'pairs (data.text_pair_field={config.data.text_pair_field!r}); leave '
                'data.unlabelled_files empty for a pair task'
            )
        match_files(pattern)  # there, before any training


def unlabelled_file_examples(config, encode, no_label, held_out: set[str]) -> list[dict]:
    """data.unlabelled_files: more text of the task without labels (a .txt block, a .jsonl
    object or a table row's data.text_field per example), which only the soft term sees. A
    text that is also one of the task's validation or test examples (`held_out`, after
    whitespace normalisation) is dropped and counted in the log: the text that selects
    checkpoints and the text that is scored stay unseen."""
    pattern = config.data.unlabelled_files
    texts = read_text_files(pattern, config.data.text_field)
    kept, dropped = [], 0
    for text in texts:
        if not text.strip():
            continue
        if normalise(text) in held_out:
            dropped += 1
            continue
        kept.append(text)
    if not kept:
        raise DataError(
            f"--config.data.unlabelled_files={pattern!r} holds no text beyond the task's "
            f'validation and test examples ({dropped} of those dropped); give other text, or '
            'leave it empty'
        )
    logging.info(
        'distillation: %d unlabelled examples from %s (soft targets only); %d dropped as '
        'validation or test text',
        len(kept),
        pattern,
        dropped,
    )
    return [
        dict(encode({'text': t, 'text_pair': ''}, no_label), labelled=np.int32(0)) for t in kept
    ]


def normalise(text: str) -> str:
    """A text as the unlabelled files are compared with the task's: whitespace collapsed."""
    return ' '.join(text.split())


CACHED = 'teacher_logits'  # the batch field of cached teacher logits (distill.cache_teacher)
CACHE_FILE = 'teacher_logits.npz'


def cached_teacher_logits(teacher: Teacher, model, examples, batch_size: int, workdir: str):
    """[examples, classes] float32: the teacher's logits of every training example
    (distill.cache_teacher), computed once in batches of `batch_size` with the teacher's
    selected checkpoint (deterministic, no dropout, the run's compute dtype) and kept in
    WORKDIR/teacher_logits.npz with the teacher's path and step and a digest of the token
    ids. A resumed run reads the file when all three match, else computes it again. The
    training stream then carries each example's row, so its batches, shuffling and
    checkpointed position are the examples' own."""
    ids = np.stack([e['input_ids'] for e in examples])
    digest = hashlib.sha256(ids.tobytes()).hexdigest()
    path = os.path.join(workdir, CACHE_FILE)
    if os.path.isfile(path):
        with np.load(path) as saved:
            same = (
                str(saved['teacher']) == teacher.workdir
                and int(saved['step']) == teacher.step
                and str(saved['digest']) == digest
            )
            if same:
                logging.info('distillation: the teacher logits cached in %s', path)
                return saved['logits']
        logging.info('distillation: %s is of another teacher or data; computing it again', path)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), _stack(examples[:1])))['params']
    params, _ = ckpt_lib.restore_params(teacher.checkpoint, nn.meta.unbox(abstract))
    apply = jax.jit(lambda p, b: model.apply({'params': p}, b).astype(jnp.float32))
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = _stack(examples[start : start + batch_size])
        rows.append(np.asarray(apply(params, batch)))
    logits = np.concatenate(rows)
    if jax.process_index() == 0:
        with atomic_write(path, 'wb') as f:
            np.savez(f, logits=logits, teacher=teacher.workdir, step=teacher.step, digest=digest)
    logging.info(
        'distillation: the teacher logits of %d training examples cached in %s',
        len(examples),
        path,
    )
    return logits


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    keys = ('input_ids', 'input_mask', 'segment_ids')
    return {k: np.stack([e[k] for e in examples]) for k in keys}


def init_with_teacher(
    student_init, teacher_model, example, hidden: HiddenMatching | None, states, inside=True
):
    """init_params(rng) of a distillation run: the student's params (`student_init` on the
    first key of rng's split), the teacher's under `teacher/` (`inside`; its values are
    replaced by its checkpoint's at the start: restore_teacher) and, when hidden-state
    matching projects, the projection under `hidden_projection/`, initialised on `states`
    (zeros shaped as one sequence of student hidden states)."""

    def init_params(rng):
        student_rng, teacher_rng = jax.random.split(rng)
        params = student_init(student_rng)
        if inside:
            params[TEACHER] = teacher_model.init(teacher_rng, example)['params']
        if hidden is not None and hidden.projection is not None:
            projection = hidden.projection.init(jax.random.fold_in(rng, 2), states)
            params[PROJECTION] = projection['params']
        return params

    return init_params


def summary_extras(teacher: Teacher, teacher_model, model, example) -> dict:
    """What a distillation run's summary.json says of its teacher (num_params counts both
    when the teacher is inside the step; these, each)."""
    return {
        'teacher': teacher.workdir,
        'teacher_step': teacher.step,
        'teacher_params': param_count(teacher_model, example),
        'student_params': param_count(model, example),
    }


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
