"""`--dry_run`: the train step compiled for the mesh, not run. Per-device parameter and
optimizer bytes fall as 1/fsdp on 1, 2, 4 and 8 fake CPU devices, the parameter count is the
model's, and the workdir gets the plan only (no config.json, checkpoints or metrics)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT, launch

# Wide enough that the fsdp-sharded kernels and embeddings dominate the replicated leaves
# (biases of mlp and vocab width, layer norms), yet compiled in seconds.
MODEL = {'hidden_size': 64, 'num_layers': 1, 'num_heads': 2, 'mlp_dim': 256, 'vocab_size': 1024}
SMALL_MLM = [
    '--config.data.name=pydoc',
    *(f'--config.model.{k}={v}' for k, v in MODEL.items()),
    '--config.data.seq_len=32',
    '--config.data.max_predictions=5',
    '--config.batch_size=16',
    '--config.eval_steps=1',
]
DEVICES = (1, 2, 4, 8)


def start(workdir, devices: int, args: list[str]) -> subprocess.Popen:
    """`python launch.py ARGS --workdir WORKDIR --dry_run` on `devices` fake CPU devices."""
    env = dict(
        os.environ,
        XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
        JAX_PLATFORMS='cpu',
        PYTHONPATH=ROOT,
    )
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'launch.py'), *args, '--workdir', str(workdir)]
        + ['--dry_run'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope='module')
def plans(tmp_path_factory, pydoc_vocab) -> dict:
    """name -> (plan JSON, stdout, workdir) of dry runs made side by side (compiles only)."""
    vocab = f'--config.data.vocab_file={pydoc_vocab}'
    mlm = ['pretrain', '--config', 'configs/bert_mlm.py:tiny', vocab, *SMALL_MLM]
    runs = {
        f'fsdp{n}': (n, [*mlm, f'--config.mesh.fsdp={n}', '--config.mesh.data=1']) for n in DEVICES
    }
    # A fine-tuning run under pmap: planned as the jit layout pmap's devices hold.
    runs['finetune_pmap'] = (
        2,
        [
            'finetune',
            '--config',
            'configs/text_cls.py:tiny',
            vocab,
            *(f'--config.model.{k}={v}' for k, v in MODEL.items()),
            '--config.data.seq_len=32',
            '--config.batch_size=16',
            '--config.eval_steps=1',
            '--config.parallelism=pmap',
        ],
    )
    workdirs = {name: tmp_path_factory.mktemp(name) / 'run' for name in runs}
    # As many at a time as there are cores: more only makes the compilers wait on each other.
    width = max(1, os.cpu_count() or 1)
    names, out = list(runs), {}
    for i in range(0, len(names), width):
        procs = {name: start(workdirs[name], *runs[name]) for name in names[i : i + width]}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, (name, stderr[-3000:])
            with open(workdirs[name] / 'memory_plan.json') as f:
                out[name] = (json.load(f), stdout, workdirs[name])
    return out


def model_param_count() -> int:
    from configs import bert_mlm
    from pretrain import mlm

    config = bert_mlm.get_config('tiny')
    config.model.update(MODEL)
    config.data.update(seq_len=32, max_predictions=5)
    model = mlm.make_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), mlm.dummy_batch(config))['params']
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_state_bytes_per_device_fall_as_one_over_fsdp(plans):
    one = plans['fsdp1'][0]['per_device_bytes']
    for n in DEVICES:
        plan = plans[f'fsdp{n}'][0]
        assert plan['mesh'] == {'data': 1, 'fsdp': n, 'tensor': 1}
        assert plan['devices'] == n
        got = plan['per_device_bytes']
        for key in ('params', 'opt_state'):
            # Small leaves fsdp does not divide (biases, layer norms) stay replicated.
            ratio = got[key] / one[key]
            assert 1 / n <= ratio <= 1.15 / n, (n, key, got[key], one[key])
        # The whole state is what the sharded leaves add up to, on every mesh.
        assert plan['total_bytes'] == plans['fsdp1'][0]['total_bytes']
        # XLA's own view of the step's arguments: the state's shards plus the batch's.
        assert got['arguments'] >= got['state'] + got['batch']
        assert got['arguments'] - got['state'] - got['batch'] < 1024  # the rng key
        assert got['temp'] > 0
        assert got['aliased'] == got['state']  # the state is donated


def test_parameter_count_and_flops(plans):
    count = model_param_count()
    for name, (plan, _, _) in plans.items():
        if name == 'finetune_pmap':
            continue
        assert plan['num_params'] == count
        assert plan['per_device_bytes']['params'] * plan['devices'] >= 4 * count
        flops = plan['flops']
        assert flops['xla_per_device'] > 0
        assert flops['analytic_per_step'] > 0
        # XLA counts more than the model's matmuls (softmax, norms, the optimizer), not less.
        assert 0.9 < flops['xla_all_devices'] / flops['analytic_per_step'] < 2.0
    # The program of each device is its share of the work.
    one = plans['fsdp1'][0]['flops']['xla_per_device']
    eight = plans['fsdp8'][0]['flops']['xla_per_device']
    assert eight < one / 4


def test_finetune_under_pmap_is_planned_as_its_jit_layout(plans):
    plan, stdout, _ = plans['finetune_pmap']
    assert (plan['stage'], plan['task'], plan['parallelism']) == ('finetune', 'text_cls', 'jit')
    assert plan['mesh'] == {'data': 2, 'fsdp': 1, 'tensor': 1}
    assert 'memory plan: finetune text_cls' in stdout
    assert 'the memory plan is for parallelism=jit' in stdout
    # pmap replicates the state: every device holds all of it.
    assert plan['per_device_bytes']['params'] == plan['total_bytes']['params']
    assert plan['per_device_bytes']['params'] == 4 * plan['num_params']
    assert plan['flops']['xla_per_device'] > 0


def test_workdir_gets_the_plan_only(plans):
    for name, (_, _, workdir) in plans.items():
        assert sorted(os.listdir(workdir)) == ['memory_plan.json'], name


def test_printed_table(plans):
    _, stdout, workdir = plans['fsdp8']
    for line in (
        "memory plan: pretrain mlm, parallelism jit, mesh {'data': 1, 'fsdp': 8, 'tensor': 1}",
        'parameters: ',
        '  parameters ',
        '  optimizer state ',
        '  activations / temporaries ',
        '  generated code ',
        '  peak estimate ',
        'FLOPs of one train step',
        '  XLA cost analysis, per device ',
        '  analytic (task.flops_per_step',
        f'written to {workdir}/memory_plan.json',
    ):
        assert line in stdout, (line, stdout)


def test_format_plan_names_every_figure():
    from core import memory_plan

    plan = {
        'stage': 'pretrain',
        'task': 'mlm',
        'parallelism': 'jit',
        'note': '',
        'mesh': {'data': 1, 'fsdp': 2, 'tensor': 1},
        'devices': 2,
        'processes': 1,
        'device_kind': 'cpu',
        'batch_size': 16,
        'grad_accum_steps': 1,
        'precision': 'float32',
        'batch': {'input_ids': 'int32[16, 32]'},
        'num_params': 1234567,
        'per_device_bytes': {
            'params': 2_469_134,
            'opt_state': 4_938_268,
            'state': 7_407_406,
            'batch': 2048,
            'arguments': 7_409_462,
            'outputs': 7_407_500,
            'aliased': 7_407_406,
            'temp': 3 * 2**20,
            'generated_code': 0,
            'peak_estimate': 10_555_284,
        },
        'total_bytes': {'params': 4_938_268, 'opt_state': 9_876_536},
        'flops': {'xla_per_device': 1.5e9, 'xla_all_devices': 3e9, 'analytic_per_step': 0.0},
    }
    text = memory_plan.format_plan(plan)
    assert 'parameters: 1,234,567 (4.71 MiB in all' in text
    assert '2,469,134' in text and '4,938,268' in text
    assert 'activations / temporaries' in text and '3.00' in text
    assert '1.5e+09' in text and '3e+09' in text
    assert 'unknown' in text  # no analytic FLOPs for this task


def test_bad_config_fails_before_compiling_and_leaves_no_scratch(tmp_path, pydoc_vocab):
    """The task's own checks run as in training (here: the vocabulary outgrows vocab_size),
    exit 1, and the plan's scratch directory is gone."""
    workdir = tmp_path / 'run'
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        '--dry_run',
        f'--config.data.vocab_file={pydoc_vocab}',
        *SMALL_MLM,
        '--config.model.vocab_size=512',
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'set --config.model.vocab_size=1024' in r.stderr
    assert os.listdir(workdir) == []
