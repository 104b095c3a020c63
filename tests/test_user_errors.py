"""No Python traceback for a user's error, in any stage or tool: exit code 1 and one
message naming the input, the problem and the fix (core/cli.py error_message). Also the
files the tools write: exactly the path asked for, with the usual permissions."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import bert_mlm
from interop import hf
from models.bert import BertConfig, BertForMlm
from tests.conftest import ROOT, SMALL_RUN, launch

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(27)]


@pytest.fixture(scope='module')
def text_run(tmp_path_factory) -> str:
    """A small text workdir as a pretraining run leaves it (config.json, vocab.txt,
    checkpoints/0), written directly: no training needed to read it back."""
    workdir = str(tmp_path_factory.mktemp('text') / 'run')
    c = bert_mlm.get_config('tiny')
    c.model.update(
        dict(vocab_size=len(VOCAB), hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64)
    )
    c.model.max_len, c.data.seq_len = 32, 16
    batch = {k: np.zeros((1, 8), np.int32) for k in ('input_ids', 'input_mask', 'segment_ids')}
    batch['masked_positions'] = np.zeros((1, 2), np.int32)
    model = BertForMlm(BertConfig.from_config(c.model))
    params = nn.meta.unbox(model.init(jax.random.key(0), batch)['params'])
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(c.to_json())
    with open(os.path.join(workdir, 'vocab.txt'), 'w') as f:
        f.writelines(t + '\n' for t in VOCAB)
    hf.save_checkpoint(workdir, params, c)
    return workdir


@pytest.fixture(scope='module')
def exported(text_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp('export') / 'hf')
    umask = os.umask(0o022)  # the usual one: files 0644
    try:
        hf.export_hf(text_run, out)
    finally:
        os.umask(umask)
    return out


def write(path, data) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def damaged_copy(exported: str, target, name: str, keep: float) -> str:
    """A copy of the exported HF directory whose file `name` is cut to `keep` of its size."""
    os.makedirs(target)
    for f in os.listdir(exported):
        with open(os.path.join(exported, f), 'rb') as src:
            data = src.read()
        write(target / f, data[: int(len(data) * keep)] if f == name else data)
    return str(target)


def case(tmp_path, text_run, exported, name):
    """(launch.py arguments, the message expected) of the case `name`."""
    t = tmp_path
    pretrain = ['pretrain', '--config', 'configs/bert_mlm.py:tiny', '--workdir', str(t / 'w')]
    if name == 'config file with a syntax error':
        config = write(t / 'bad.py', 'def get_config(:\n')
        return ['pretrain', '--config', config, '--workdir', str(t / 'w')], (
            f'{config}: line 1: SyntaxError: invalid syntax; fix the config file'
        )
    if name == 'config file that raises':
        config = write(t / 'raises.py', 'def get_config(arg=None):\n    return 1 / 0\n')
        return ['pretrain', '--config', config, '--workdir', str(t / 'w')], (
            f'{config}: line 2: ZeroDivisionError: division by zero; fix the config file'
        )
    if name == 'pretraining config given to finetune':
        args = ['finetune', '--config', 'configs/bert_mlm.py:tiny', '--workdir', str(t / 'w')]
        return args, (
            "this is a pretrain config (config.stage='pretrain') and `launch.py finetune` takes "
            'a finetune config (e.g. configs/text_cls.py:tiny); run it with `launch.py pretrain`'
        )
    if name == 'data file that is a directory':
        os.makedirs(t / 'corpus.txt')
        return [*pretrain, f'--config.data.files={t}/corpus.txt'], (
            f'{t}/corpus.txt is a directory, not a data file (nor a `datasets` save_to_disk '
            f"directory); give the files in it, e.g. '{t}/corpus.txt/*.txt'"
        )
    if name == 'workdir under a file':
        write(t / 'file', 'x')
        return [*pretrain[:-1], str(t / 'file' / 'w')], f'{t}/file/w: Not a directory'
    if name == 'image fine-tune from a text run':
        args = ['finetune', '--config', 'configs/image_cls.py:ti', '--workdir', str(t / 'w')]
        return [*args, f'--config.init_from={text_run}'], (
            f'init_from {text_run} is a text model (params/backbone), and this run trains an '
            'image model; give --config.init_from a run with an image encoder'
        )
    if name == 'fine-tune from a run whose config.json is cut short':
        start = str(t / 'start')
        shutil.copytree(text_run, start)
        config = os.path.join(start, 'config.json')
        with open(config, 'r+') as f:
            f.truncate(len(f.read()) // 2)
        args = ['finetune', '--config', 'configs/text_cls.py:tiny', '--workdir', str(t / 'w')]
        return [*args, f'--config.init_from={start}'], f'{config} cannot be read as JSON ('
    if name == 'study with a non-finite learning rate':
        args = ['study', '--config', 'configs/study.py:digits', '--workdir', str(t / 'w')]
        return [*args, '--config.finetune.learning_rate=nan'], (
            '--config.finetune.learning_rate=nan is not a finite number'
        )
    if name == 'import of a truncated model.safetensors':
        source = damaged_copy(exported, t / 'hf', 'model.safetensors', 0.5)
        return ['import-hf', '--from', source, '--to', str(t / 'imported')], (
            f'{source}/model.safetensors cannot be read as safetensors ('
        )
    if name == 'import of a truncated config.json':
        source = damaged_copy(exported, t / 'hf', 'config.json', 0.5)
        return ['import-hf', '--from', source, '--to', str(t / 'imported')], (
            f'{source}/config.json cannot be read as JSON ('
        )
    if name == 'embed of text that is not UTF-8':
        lines = write(t / 'in.txt', b'w1 w2\nw3\ncaf\xe9\n')
        return ['embed', '--workdir', text_run, '--input', lines, '--output', str(t / 'o.npy')], (
            f'{lines} line 3 is not UTF-8 text (byte 0xe9'
        )
    if name == 'embed of UTF-16 text':
        lines = write(t / 'in.txt', 'w1 w2\n'.encode('utf-16'))
        return ['embed', '--workdir', text_run, '--input', lines, '--output', str(t / 'o.npy')], (
            f'{lines} line 1 is not UTF-8 text'
        )
    if name == 'embed into a directory':
        lines = write(t / 'in.txt', 'w1 w2\n')
        os.makedirs(t / 'out')
        return ['embed', '--workdir', text_run, '--input', lines, '--output', str(t / 'out')], (
            f'--output {t}/out is a directory; give the path of the .npy file to write'
        )
    raise KeyError(name)


CASES = [
    'config file with a syntax error',
    'config file that raises',
    'pretraining config given to finetune',
    'data file that is a directory',
    'workdir under a file',
    'image fine-tune from a text run',
    'fine-tune from a run whose config.json is cut short',
    'study with a non-finite learning rate',
    'import of a truncated model.safetensors',
    'import of a truncated config.json',
    'embed of text that is not UTF-8',
    'embed of UTF-16 text',
    'embed into a directory',
]


@pytest.mark.parametrize('name', CASES)
def test_a_user_error_exits_1_with_a_message_and_no_traceback(tmp_path, text_run, exported, name):
    args, message = case(tmp_path, text_run, exported, name)
    r = launch(*args)
    assert r.returncode == 1, (name, r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert f'error: {message}' in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'w').exists() and not (tmp_path / 'imported').exists()


def test_embed_writes_exactly_the_output_path_it_reports(tmp_path, text_run):
    lines = write(tmp_path / 'in.txt', 'w1 w2\nw3\n')
    out = tmp_path / 'features'  # no .npy: numpy alone would write features.npy
    r = launch('embed', '--workdir', text_run, '--input', lines, '--output', str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'written to {out}\n' in r.stdout
    assert sorted(os.listdir(tmp_path)) == ['features', 'in.txt']
    assert np.load(out).shape == (2, 32)


def test_exported_files_have_the_usual_mode(exported):
    """Written under umask 022: every file 0644, model.safetensors too (not 0600)."""
    modes = {
        n: stat.S_IMODE(os.stat(os.path.join(exported, n)).st_mode) for n in os.listdir(exported)
    }
    assert 'model.safetensors' in modes
    assert {n: oct(m) for n, m in modes.items()} == {n: '0o644' for n in modes}


def test_ctrl_c_stops_a_run_with_a_line_not_a_traceback(tmp_path, pydoc_vocab):
    workdir = tmp_path / 'w'
    args = ['pretrain', '--config', 'configs/bert_mlm.py:tiny', '--workdir', str(workdir)]
    args += [*SMALL_RUN, f'--config.data.vocab_file={pydoc_vocab}', '--config.total_steps=100000']
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    # Started as a terminal's foreground job is: with Ctrl-C's default action. A process
    # started in the background by a non-interactive shell (as a CI runner may start the
    # suite) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt. So
    # SIGINT is caught here while the child starts (exec resets a caught signal to its
    # default action), not reset by a preexec_fn: Python code run between fork and exec in
    # a process with JAX's threads can deadlock the child before it starts (a CI run hung
    # so).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(tmp_path / 'log', 'w') as log:
            proc = subprocess.Popen(
                [sys.executable, 'launch.py', *args], cwd=ROOT, env=env, stderr=log
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if 'first step done' in (tmp_path / 'log').read_text():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()  # a run that ignored the signal must not outlive the test
    stderr = (tmp_path / 'log').read_text()
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert 'interrupted (Ctrl-C): the run stops here; rerun the same command to resume it' in stderr
