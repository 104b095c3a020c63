"""The package layout's import rules (docs/development.md, Layout): core/ is the runtime the
stages share, so it imports no data/ module and no stage package, at any depth of a file."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_packages(path: pathlib.Path) -> set[str]:
    """The top-level package of every import in `path` (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found


@pytest.mark.parametrize('path', sorted((ROOT / 'core').glob('*.py')), ids=lambda p: p.name)
def test_core_imports_no_data_and_no_stage_package(path):
    forbidden = {'data', 'pretrain', 'finetune', 'study', 'interop'}
    assert not imported_packages(path) & forbidden, f'core/{path.name} imports a package above core'
