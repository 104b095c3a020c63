"""The command line explains itself: `launch.py STAGE --help` shows the stage's flags and the
named config's docstring and presets; `launch.py config` prints every resolved key with its
value and meaning; `launch.py list` prints every config and preset (a mistyped stage:
tests/test_bad_input.py)."""

from configs import bert_mlm
from core import config as config_lib
from core import reference
from tests.conftest import launch


def test_stage_help_shows_the_stage_flags_and_the_config():
    r = launch('pretrain', '--help', '--config', 'configs/bert_mlm.py:small')
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ('--config', '--workdir', '--dry_run', '--local_processes'):
        assert flag in r.stdout
    assert (bert_mlm.__doc__ or '').strip().splitlines()[0] in r.stdout  # its docstring
    for preset in reference.PRESETS['bert_mlm'][0]:
        assert f'configs/bert_mlm.py:{preset}' in r.stdout
    assert 'Traceback' not in r.stderr

    r = launch('evaluate', '-h')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '--workdir' in r.stdout and '--config' in r.stdout
    assert '--dry_run' not in r.stdout  # evaluate takes none


def test_config_prints_every_resolved_key_with_its_meaning():
    r = launch('config', 'configs/bert_mlm.py:small', '--config.model.num_layers=3')
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    expected = config_lib.flatten(bert_mlm.get_config('small'))
    expected['model.num_layers'] = 3
    for key, value in expected.items():
        line = next((x for x in lines if x.split() and x.split()[0] == key), None)
        assert line is not None, f'{key} not printed'
        assert repr(value) in line, line
        assert reference.meaning(key) in line, line
    assert len([x for x in lines if x.split() and x.split()[0] in expected]) == len(expected)


def test_config_of_a_run_prints_its_config_json(tmp_path):
    c = bert_mlm.get_config('tiny')
    c.model.num_layers = 3
    (tmp_path / 'config.json').write_text(c.to_json())
    r = launch('config', str(tmp_path), '--config.eval_steps=7')
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith('model.num_layers '))
    assert ' 3 ' in line and reference.meaning('model.num_layers') in line
    assert next(x for x in r.stdout.splitlines() if x.startswith('eval_steps ')).split()[1] == '7'


def test_config_of_an_unknown_key_suggests_the_right_one():
    r = launch('config', 'configs/bert_mlm.py:tiny', '--config.model.num_layer=3')
    assert r.returncode == 1
    assert 'did you mean model.num_layers' in r.stderr and 'Traceback' not in r.stderr


def test_list_prints_every_config_and_preset():
    r = launch('list')
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    for name in reference.config_names():
        for preset in reference.PRESETS[name][0]:
            line = next((x for x in lines if x.startswith(f'configs/{name}.py:{preset} ')), None)
            assert line is not None, f'configs/{name}.py:{preset} not listed'
    tiny = bert_mlm.get_config('tiny').model
    line = next(x for x in lines if x.startswith('configs/bert_mlm.py:tiny '))
    assert f'H{tiny.hidden_size} L{tiny.num_layers} A{tiny.num_heads}' in line
