"""Every preset of every config file resolves to the keys, values and types it resolved to
when the snapshot tests/data/configs_resolved.json was taken: the snapshot is what users'
runs were made with, so a refactoring of configs/ must leave it unchanged.

A deliberate change of a config value (or a new key or preset) regenerates the snapshot:

  python -m tests.test_configs_resolved --update

and the diff of tests/data/configs_resolved.json goes into the same commit. Key order is
not compared: config.json is read back as a dict and compared flattened
(core/rundir.py check_workdir), checkpoints save `to_dict()` (sorted).
"""

import ast
import importlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, 'tests', 'data', 'configs_resolved.json')

BERT = ('tiny', 'small', 'base', 'large')
VIT = ('tiny', 'ti', 's', 'b', 'l')
# Every argument each file's get_config accepts ('' = get_config() without one, as
# `--config configs/x.py` calls it).
PRESETS = {
    'bert_mlm': ('', *BERT),
    'simcse': ('', *BERT),
    'text_cls': ('', *BERT),
    'distill': ('', *BERT, *(f'mlm_{p}' for p in BERT)),
    'dapt': ('', *BERT),
    'token_cls': ('', *BERT),
    'clip': ('', *VIT, *(f'{p},{loss}' for p in VIT for loss in ('softmax', 'sigmoid'))),
    'vit_simclr': ('', *VIT, *(f'{p},{r}' for p in VIT for r in ('digits', 'imagenet'))),
    'vit_mae': ('', *VIT, *(f'{p},{r}' for p in VIT for r in ('digits', 'imagenet'))),
    'image_cls': ('', *VIT, *(f'{p},{r}' for p in VIT for r in ('digits', 'imagenet'))),
    'study': ('', 'digits', 'text', 'smoke'),
}


def _type(value) -> str:
    if isinstance(value, (tuple, list)):
        return f'{type(value).__name__}[{",".join(_type(v) for v in value)}]'
    return type(value).__name__


def _leaves(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = [_type(value), value]
    return flat


def resolve(name: str, preset: str) -> dict:
    """{dotted key: [type, value]} of configs/<name>.py:<preset>, as JSON holds it."""
    module = importlib.import_module(f'configs.{name}')
    config = module.get_config(preset) if preset else module.get_config()
    return json.loads(json.dumps(_leaves(config.to_dict())))


def resolve_all() -> dict:
    return {f'{n}.py:{p}': resolve(n, p) for n, presets in PRESETS.items() for p in presets}


def _snapshot() -> dict:
    with open(SNAPSHOT) as f:
        return json.load(f)


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_every_preset_resolves_as_in_the_snapshot(name):
    snapshot = _snapshot()
    for preset in PRESETS[name]:
        spec = f'{name}.py:{preset}'
        old, new = snapshot[spec], resolve(name, preset)
        assert sorted(set(new) - set(old)) == [], f'{spec}: keys added'
        assert sorted(set(old) - set(new)) == [], f'{spec}: keys removed'
        changed = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
        assert changed == {}, f'{spec}: [type, value] changed (snapshot, now)'


def test_every_config_file_is_covered():
    files = {f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py')}
    assert files - {'common', '__init__'} == set(PRESETS)


def test_the_snapshot_covers_exactly_these_presets():
    specs = [f'{n}.py:{p}' for n, presets in PRESETS.items() for p in presets]
    assert sorted(_snapshot()) == sorted(specs)


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_an_unknown_preset_is_refused(name):
    module = importlib.import_module(f'configs.{name}')
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        module.get_config('huge')


def test_configs_import_no_other_package_of_the_project():
    """ARCHITECTURE: configs import nothing of the project but other configs (the size
    tables live in configs/common.py, not models/)."""
    project = {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d))}
    for name in os.listdir(os.path.join(ROOT, 'configs')):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(ROOT, 'configs', name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or '']
            else:
                continue
            for module in modules:
                top = module.split('.')[0]
                assert top not in project - {'configs'}, f'configs/{name} imports {module}'


if __name__ == '__main__':
    if sys.argv[1:] != ['--update']:
        sys.exit(f'usage: python -m tests.test_configs_resolved --update (rewrites {SNAPSHOT})')
    sys.path.insert(0, ROOT)
    os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
    specs = resolve_all()
    with open(SNAPSHOT, 'w') as f:  # a line a key, so a diff names what changed
        f.write('{\n')
        for i, spec in enumerate(sorted(specs)):
            leaves = [f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in sorted(specs[spec].items())]
            f.write(f' {json.dumps(spec)}: {{\n' + ',\n'.join(leaves) + '\n }')
            f.write(',\n' if i < len(specs) - 1 else '\n')
        f.write('}\n')
    print(f'wrote {SNAPSHOT}')
