"""The input pipeline never limits the step: its examples/s alone against the step's, for text
and images.

    PYTHONPATH=. python benchmarks/input_pipeline.py [--which text,images,images224,images224npz]
        [--steps 50] [--warmup 5] [--batch N] [--step_steps 3] [--big_step_batch 4]
        [--images224_count 2048] [--gpu_step_examples_per_s ROW=EXAMPLES_PER_S ...]

Every stream is the trainer's own: `core.trainer.set_up` (the code a run calls before its
first step) builds the task from the config, so the batches come from `task.train_iter`, the
sharded Grain stream with the config's prefetch, exactly as a run reads them:

  text        `configs/bert_mlm.py` on the embedded `pydoc_stdlib` corpus: WordPiece
              tokenization, packing into seq 128, BERT masking (20 predictions), batching
              (data/pipeline.py, data/masking.py, data/shards.py). Rows: the tiny preset's
              batch (32) and the base/large presets' (256).
  images      `configs/vit_simclr.py:tiny` on the embedded digits (16x16x1 after resize).
  images224   `configs/vit_simclr.py:b,imagenet` (ViT-B/16, 224x224x3) with
              `data.files` a folder of JPEGs written here (FolderImages: Pillow decodes every
              image when it is read): smooth random pictures with a little noise, ~15 KB
              each (the run prints the mean).
  images224npz  the same pictures as an .npz (ArrayImages: no decoding), to show what the
              JPEG decoding costs.

Pipeline: after `set_up` (reported: for text it trains the WordPiece vocabulary, which is
timed on its own too) and the first batch (its own column), `--warmup` batches are drawn and
then `--steps` batches are timed back to back; nothing else runs, so the figure is what the
host threads produce when the consumer never waits. "cores busy" is the process CPU time over
the wall time of that window (all threads): how much of the host the stream used.

Step: the same task built by `set_up` at the step's batch, its state created and its
`stepper.train` (forward, backward, optimizer update) compiled, then `--step_steps` steps
timed on one real batch of the stream (`jax.block_until_ready` every step; median). The
tiny presets run at the pipeline's batch; BERT-base and ViT-B/16 run at `--big_step_batch`
(a step at 256 takes minutes on a 2-core CPU), so their examples/s is a CPU rate at a small
batch. SimCLR's augmentation is part of its step (`data/augment.py`, jitted, on the
accelerator); it is also timed alone, `two_views` at the step's batch, as its own row.

ratio = pipeline examples/s / step examples/s: above 1 the stream keeps up with the step.
`--gpu_step_examples_per_s ROW=VALUE` (repeatable) adds rows comparing the stream with a step
rate measured elsewhere (a GPU figure from BENCHMARKS.md), ROW a row name of the table.
"""

import argparse
import dataclasses
import datetime
import os
import shutil
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from configs import bert_mlm, vit_simclr
from core import train_state, trainer
from data import augment as augment_lib
from data import text as text_lib
from data.tokenizer import make_tokenizer

CONFIGS = {'bert_mlm': bert_mlm.get_config, 'vit_simclr': vit_simclr.get_config}
WHICH = ('text', 'images', 'images224', 'images224npz')


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a source read as `config` (file:preset) prescribes, at `batch`."""

    name: str  # the row's name, e.g. text/tiny/32
    which: str  # one of WHICH
    config: str  # e.g. bert_mlm:tiny
    batch: int  # the pipeline's batch
    step_batch: int  # the step's batch on this CPU
    files: str = ''  # data.files (a generated image source)


def cases(which: list[str], batch: int, big_step_batch: int, sources: dict) -> list[Case]:
    """The rows of the table: each preset's own batch unless `batch` overrides it."""
    out = []
    for w in which:
        if w == 'text':
            for preset, preset_batch, big in (('tiny', 32, False), ('base', 256, True)):
                b = batch or preset_batch
                step_b = min(b, big_step_batch) if big else b
                out.append(Case(f'text/{preset}/{b}', w, f'bert_mlm:{preset}', b, step_b))
        elif w == 'images':
            b = batch or 256
            out.append(Case(f'images/tiny/{b}', w, 'vit_simclr:tiny', b, b))
        else:  # images224, images224npz: the ImageNet recipe's model on a generated source
            b = batch or 256
            kind = 'jpeg' if w == 'images224' else 'npz'
            step_b = min(b, big_step_batch)
            out.append(Case(f'{w}/b16/{b}', w, 'vit_simclr:b,imagenet', b, step_b, sources[kind]))
    return out


def make_config(case: Case, batch: int) -> ml_collections.ConfigDict:
    name, _, preset = case.config.partition(':')
    config = CONFIGS[name](preset)
    config.batch_size = batch
    if case.files:
        config.data.files = case.files
    return config


# --------------------------------------------------------------------------------------
# generated 224x224 sources


def synthetic_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, size, size, 3]: smooth random colour fields (an 8x8 grid upsampled
    bicubically) plus +-12 of noise, so JPEGs come out near photo sizes (not noise's)."""
    rs = np.random.RandomState(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        low = Image.fromarray(rs.randint(0, 256, (8, 8, 3), dtype=np.uint8), mode='RGB')
        smooth = np.asarray(low.resize((size, size), Image.Resampling.BICUBIC), np.int16)
        noise = rs.randint(-12, 13, smooth.shape, dtype=np.int16)
        out[i] = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    return out


def write_sources(root: str, count: int, size: int, classes: int = 10) -> dict:
    """A class-per-folder JPEG tree (quality 90) and an .npz of the same images under
    `root`; returns {'jpeg': folder, 'npz': file, 'jpeg_kb': mean file size, 'seconds'}."""
    began = time.perf_counter()
    images = synthetic_images(count, size)
    labels = np.arange(count, dtype=np.int32) % classes
    folder = os.path.join(root, 'jpeg')
    total = 0
    for k in range(classes):
        os.makedirs(os.path.join(folder, f'class_{k}'), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = os.path.join(folder, f'class_{label}', f'{i:05d}.jpg')
        Image.fromarray(image, mode='RGB').save(path, quality=90)
        total += os.path.getsize(path)
    npz = os.path.join(root, 'images.npz')
    np.savez(npz, images=images, labels=labels)
    return {
        'jpeg': folder,
        'npz': npz,
        'jpeg_kb': total / count / 1024,
        'seconds': time.perf_counter() - began,
    }


# --------------------------------------------------------------------------------------
# timing


def close(task) -> None:
    if hasattr(task.train_iter, 'close'):
        task.train_iter.close()
    task.close()


def build(config: ml_collections.ConfigDict, build_dir: str) -> tuple[trainer.RunSetup, float]:
    """The run as the trainer sets it up (no config.json written); (run, seconds)."""
    began = time.perf_counter()
    run = trainer.set_up(
        config,
        build_dir,
        'pretrain',
        write_config=False,
        build_dir=build_dir,
    )
    return run, time.perf_counter() - began


def time_pipeline(train_iter, batch: int, steps: int, warmup: int) -> dict:
    """First batch, then `warmup` untimed batches, then `steps` timed back to back."""
    began = time.perf_counter()
    first = next(train_iter)
    first_s = time.perf_counter() - began
    rows = len(next(iter(first.values())))
    if rows != batch:
        raise RuntimeError(f'the stream gave batches of {rows} examples, expected {batch}')
    for _ in range(warmup):
        next(train_iter)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(train_iter)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        'first_batch_s': first_s,
        'batches_per_s': steps / wall,
        'examples_per_s': steps * batch / wall,
        'cores_busy': cpu / wall,
    }


def time_step(run: trainer.RunSetup, config, batch: int, steps: int) -> dict:
    """The task's train step on one real batch of its stream: compile, one untimed step,
    then the median of `steps`; for SimCLR also its augmentation (`two_views`) alone."""
    try:
        local = next(run.task.train_iter)
    finally:
        close(run.task)
    state, _ = train_state.create_sharded_state(
        run.task.init_params, run.tx, run.mesh, run.init_rng, run.shardings
    )
    state = run.stepper.put_state(state)
    device_batch = run.stepper.put_batch(local)
    began = time.perf_counter()
    state, metrics = run.stepper.train(state, device_batch, run.dropout_rng)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - began
    times = []
    for i in range(steps + 1):
        began = time.perf_counter()
        state, metrics = run.stepper.train(state, device_batch, run.dropout_rng)
        jax.block_until_ready((state, metrics))
        if i:  # the first one after compiling is not timed
            times.append(time.perf_counter() - began)
    step_s = float(np.median(times))
    result = {
        'compile_s': compile_s,
        'step_ms': 1e3 * step_s,
        'examples_per_s': batch / step_s,
        'params': train_state.count_params(state.params),
    }
    del state
    if 'image' in local:
        result['augment'] = time_augment(config, local['image'], steps)
    return result


def time_augment(config, images: np.ndarray, steps: int) -> dict:
    """SimCLR's two augmented views of a uint8 batch, jitted alone, as the step runs them
    (`pretrain/simclr.py`: to float in [0, 1], then `two_views`); median of `steps`."""
    cfg = augment_lib.AugmentConfig.from_config(config.augment)
    views = jax.jit(lambda rng, x: augment_lib.two_views(rng, x.astype(jnp.float32) / 255.0, cfg))
    x = jax.device_put(images)
    rng = jax.random.key(0)
    jax.block_until_ready(views(rng, x))
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        jax.block_until_ready(views(rng, x))
        times.append(time.perf_counter() - began)
    ms = 1e3 * float(np.median(times[1:]))
    return {'ms': ms, 'examples_per_s': 1e3 * len(images) / ms}


# --------------------------------------------------------------------------------------


def print_header() -> None:
    import flax
    import tokenizers
    from PIL import __version__ as pillow_version

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
    print(f'# Input pipeline vs train step, {now}\n')
    print(
        f'- jax {jax.__version__}, jaxlib {jax.lib.__version__}, flax {flax.__version__}, '
        f'grain {grain.__version__}, numpy {np.__version__}, Pillow {pillow_version}, '
        f'tokenizers {tokenizers.__version__}'
    )
    print(
        f'- CPU: os.cpu_count() = {os.cpu_count()}, usable by this process = {affinity}, '
        f'1-minute load average at start {os.getloadavg()[0]:.2f}; JAX devices {jax.devices()}'
    )


def parse_gpu_rates(values: list[str], names: list[str], parser) -> dict[str, float]:
    rates = {}
    for value in values:
        name, sep, rate = value.partition('=')
        if not sep or name not in names:
            parser.error(
                f'--gpu_step_examples_per_s {value!r}: expected ROW=EXAMPLES_PER_S with ROW one '
                f'of {names}'
            )
        try:
            rates[name] = float(rate)
        except ValueError:
            parser.error(f'--gpu_step_examples_per_s {value!r}: {rate!r} is not a number')
    return rates


def run_case(case: Case, args, root: str, docs, steps_done: dict) -> dict:
    """Times one row's stream and (once per preset and step batch) its step."""
    build_dir = os.path.join(root, case.config.replace(':', '_').replace(',', '_'))
    row = {'case': case, 'vocab_s': None}
    if case.which == 'text' and not os.path.isfile(os.path.join(build_dir, 'vocab.txt')):
        began = time.perf_counter()
        make_tokenizer(make_config(case, case.batch), build_dir, docs)
        row['vocab_s'] = time.perf_counter() - began
    run, row['setup_s'] = build(make_config(case, case.batch), build_dir)
    try:
        row['pipeline'] = time_pipeline(run.task.train_iter, case.batch, args.steps, args.warmup)
    finally:
        close(run.task)
    del run
    key = (case.config, case.step_batch)
    if key not in steps_done:  # images224 and images224npz: one model, the same pictures
        config = make_config(case, case.step_batch)
        step_run, _ = build(config, build_dir)
        steps_done[key] = time_step(step_run, config, case.step_batch, args.step_steps)
    row['step'] = steps_done[key]
    p, s = row['pipeline'], row['step']
    print(
        f'- {case.name}: pipeline {p["examples_per_s"]:,.0f} examples/s '
        f'({p["cores_busy"]:.2f} cores busy); step {s["examples_per_s"]:,.1f} examples/s at '
        f'batch {case.step_batch}',
        flush=True,
    )
    return row


def print_tables(rows: list[dict], args, gpu_rates: dict[str, float]) -> None:
    print(
        f'\n## Pipeline alone ({args.steps} batches after {args.warmup}) vs the step on this '
        f'CPU (median of {args.step_steps})\n'
    )
    print(
        '| row | stage | batch | batches/s | examples/s | cores busy | step batch | step ms '
        '| step examples/s | ratio |'
    )
    print('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for row in rows:
        case, p, s = row['case'], row['pipeline'], row['step']
        print(
            f'| {case.name} | host pipeline | {case.batch} | {p["batches_per_s"]:,.2f} '
            f'| {p["examples_per_s"]:,.0f} | {p["cores_busy"]:.2f} | {case.step_batch} '
            f'| {s["step_ms"]:,.1f} | {s["examples_per_s"]:,.1f} '
            f'| {p["examples_per_s"] / s["examples_per_s"]:,.1f}x |'
        )
        if 'augment' in s and case.which != 'images224npz':  # the npz row shares the step
            a = s['augment']
            print(
                f'| {case.name} | augment (jit, in the step) | {case.step_batch} '
                f'| {1e3 / a["ms"]:,.2f} | {a["examples_per_s"]:,.0f} | - | {case.step_batch} '
                f'| {s["step_ms"]:,.1f} | {s["examples_per_s"]:,.1f} '
                f'| {a["examples_per_s"] / s["examples_per_s"]:,.1f}x |'
            )
    print(
        '\nratio: examples/s over step examples/s; > 1: the stream keeps up. For the augment '
        "rows it is the inverse of augmentation's share of the step.\n"
    )
    print('## Setup (not in the rates above)\n')
    print('| row | set_up s | vocab training s | first batch s | step compile s | params |')
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for row in rows:
        case, p, s = row['case'], row['pipeline'], row['step']
        vocab = '-' if row['vocab_s'] is None else f'{row["vocab_s"]:.1f}'
        print(
            f'| {case.name} | {row["setup_s"]:.1f} | {vocab} | {p["first_batch_s"]:.2f} '
            f'| {s["compile_s"]:.1f} | {s["params"] / 1e6:.1f}M |'
        )
    if gpu_rates:
        print('\n## Pipeline (this host) vs step rates measured elsewhere\n')
        print('| row | pipeline examples/s | given step examples/s | ratio |')
        print('| --- | ---: | ---: | ---: |')
        by_name = {row['case'].name: row for row in rows}
        for name, rate in gpu_rates.items():
            pipe = by_name[name]['pipeline']['examples_per_s']
            print(f'| {name} | {pipe:,.0f} | {rate:,.0f} | {pipe / rate:,.2f}x |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--which', default=','.join(WHICH), help=f'comma-separated: {WHICH}')
    parser.add_argument('--steps', type=int, default=50, help='timed batches per stream')
    parser.add_argument('--warmup', type=int, default=5, help='untimed batches first')
    parser.add_argument('--batch', type=int, default=0, help='every stream at this batch')
    parser.add_argument('--step_steps', type=int, default=3, help='timed steps per preset')
    parser.add_argument(
        '--big_step_batch', type=int, default=4, help='step batch of BERT-base and ViT-B/16'
    )
    parser.add_argument('--images224_count', type=int, default=2048, help='generated images')
    parser.add_argument(
        '--gpu_step_examples_per_s',
        action='append',
        default=[],
        metavar='ROW=VALUE',
        help="a step rate measured elsewhere, compared with ROW's pipeline (repeatable)",
    )
    args = parser.parse_args()
    which = [w for w in args.which.split(',') if w]
    unknown = sorted(set(which) - set(WHICH))
    if unknown:
        parser.error(f'unknown --which {unknown}; choose from {list(WHICH)}')
    names = [c.name for c in cases(which, args.batch, args.big_step_batch, {'jpeg': '', 'npz': ''})]
    gpu_rates = parse_gpu_rates(args.gpu_step_examples_per_s, names, parser)

    began = time.perf_counter()
    print_header()
    root = tempfile.mkdtemp(prefix='input_pipeline_')
    try:
        sources = {'jpeg': '', 'npz': ''}
        if any(w.startswith('images224') for w in which):
            sources = write_sources(root, args.images224_count, 224)
            print(
                f'- generated {args.images224_count} 224x224 RGB images in '
                f'{sources["seconds"]:.1f}s: JPEG quality 90, {sources["jpeg_kb"]:.1f} KB '
                'each on average, and the same as an .npz'
            )
        docs = None
        if 'text' in which:
            began = time.perf_counter()
            docs, _ = text_lib.load_corpus(bert_mlm.get_config('tiny').data)
            print(
                f'- text corpus pydoc_stdlib: {len(docs)} training documents, read in '
                f'{time.perf_counter() - began:.1f}s (set_up reads it again)'
            )
        print()
        steps_done = {}
        rows = [
            run_case(case, args, root, docs, steps_done)
            for case in cases(which, args.batch, args.big_step_batch, sources)
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_tables(rows, args, gpu_rates)
    print(
        f'\nTotal {time.perf_counter() - began:.0f}s; 1-minute load average at the end '
        f'{os.getloadavg()[0]:.2f}.'
    )


if __name__ == '__main__':
    main()
