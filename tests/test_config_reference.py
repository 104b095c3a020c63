"""docs/config.md, the config reference, is current: it is what scripts/config_reference.py
prints now, and every key of every config preset has a one-line meaning there."""

import os

from scripts import config_reference as reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, 'docs', 'config.md')


def test_docs_config_md_is_current():
    with open(PAGE, encoding='utf-8') as f:
        page = f.read()
    assert page == reference.render(), (
        f'docs/config.md is not what the configs and their meanings give now; regenerate it: '
        f'{reference.COMMAND}'
    )


def test_every_key_has_a_meaning():
    assert reference.missing() == {}, (
        'config keys without a meaning: add a line for each to MEANINGS in '
        f'scripts/config_reference.py, then run {reference.COMMAND}'
    )


def test_every_meaning_is_of_a_key():
    """A line of MEANINGS that no key of any preset reads is stale (a renamed key)."""
    assert reference.unused() == [], (
        'MEANINGS lines no config key uses: remove or rename them in scripts/config_reference.py'
    )


def test_every_config_file_lists_its_presets():
    assert sorted(reference.PRESETS) == reference.config_names()
