"""docs/config.md, the config reference, is current: it is what scripts/config_reference.py
prints now, and every key of every config preset has a one-line meaning in
core/reference.py (the text `launch.py config` prints too)."""

import os

from core import reference
from scripts import config_reference as docs_page

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, 'docs', 'config.md')


def test_docs_config_md_is_current():
    with open(PAGE, encoding='utf-8') as f:
        page = f.read()
    assert page == docs_page.render(), (
        f'docs/config.md is not what the configs and their meanings give now; regenerate it: '
        f'{docs_page.COMMAND}'
    )


def test_every_key_has_a_meaning():
    assert reference.missing() == {}, (
        'config keys without a meaning: add a line for each to MEANINGS in '
        f'core/reference.py, then run {docs_page.COMMAND}'
    )


def test_every_meaning_is_of_a_key():
    """A line of MEANINGS that no key of any preset reads is stale (a renamed key)."""
    assert reference.unused() == [], (
        'MEANINGS lines no config key uses: remove or rename them in core/reference.py'
    )


def test_every_config_file_lists_its_presets():
    assert sorted(reference.PRESETS) == reference.config_names()
