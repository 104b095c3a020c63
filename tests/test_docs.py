"""README.md is the front door and docs/ holds the reference: every relative link of README
and docs/*.md resolves (file and heading), README stays short, it links every docs page,
and its first two commands are the install + run and the test command CI runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
README_LIMIT = 12_000

FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.M | re.S)
CODE_SPAN = re.compile(r'`[^`\n]*`')
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
HEADING = re.compile(r'^(#{1,6})[ \t]+(.+?)[ \t#]*$', re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link's text only
    text = re.sub(r'[^\w\- ]', '', text.strip().lower())
    return text.replace(' ', '-')


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code), repeats numbered as GitHub
    numbers them (`x`, `x-1`, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(FENCE.sub('', path.read_text(encoding='utf-8'))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f'{base}-{n}')
    return out


def links(path: pathlib.Path) -> list[str]:
    """Link targets of a Markdown file, code blocks and code spans left out."""
    text = CODE_SPAN.sub('', FENCE.sub('', path.read_text(encoding='utf-8')))
    return LINK.findall(text)


def broken_links(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """The relative links of `path` whose file or heading does not exist under `root`."""
    broken = []
    for target in links(path):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition('#')
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root):
            broken.append(f'{target} (outside the repository)')
        elif not dest.exists():
            broken.append(f'{target} (no such file)')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            broken.append(f'{target} (no heading #{anchor} in {dest.relative_to(root)})')
    return broken


def test_slug_is_githubs():
    assert slug('Memory plan: `--dry_run`') == 'memory-plan---dry_run'
    assert slug('CLIP and SigLIP (`configs/clip.py`)') == 'clip-and-siglip-configsclippy'
    assert slug('(a) One machine') == 'a-one-machine'


def test_broken_links_are_found(tmp_path):
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'outside.md').write_text('# Outside\n')
    (tmp_path / 'docs' / 'b.md').write_text(
        '# Title\n\n## A `key`: value\n```\n# not a heading\n```\n'
    )
    page = tmp_path / 'docs' / 'a.md'
    page.write_text(
        '# Page\n[ok](b.md#a-key-value) [ok](#page) [ok](https://x.org/y.md) `[no](gone.md)`\n'
        '[bad](b.md#not-a-heading) [bad](gone.md) [bad](#nowhere) ![bad](img.png)\n'
    )
    assert broken_links(page, root=tmp_path / 'docs') == [
        'b.md#not-a-heading (no heading #not-a-heading in b.md)',
        'gone.md (no such file)',
        '#nowhere (no heading #nowhere in a.md)',
        'img.png (no such file)',
    ]
    (tmp_path / 'docs' / 'c.md').write_text('[up](../outside.md)\n')
    assert broken_links(tmp_path / 'docs' / 'c.md', root=tmp_path / 'docs') == [
        '../outside.md (outside the repository)'
    ]


@pytest.mark.parametrize('page', [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == [], f'{page.relative_to(ROOT)} has broken links'


def test_readme_is_short():
    size = len(README.read_text(encoding='utf-8'))
    assert size < README_LIMIT, (
        f'README.md is {size} characters; keep it under {README_LIMIT} and move reference '
        'material to a docs/ page it links'
    )


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition('#')[0]).resolve() for t in links(README) if t.partition('#')[0]}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert missing == [], f'docs pages README.md does not link: {missing}'


def _bash_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r'^```bash\n(.*?)^```', text, re.M | re.S)]


def test_readme_opens_with_install_run_and_the_ci_test_command():
    text = README.read_text(encoding='utf-8')
    first_fence = re.search(r'^```.*$', text, re.M)
    assert first_fence and first_fence.group(0) == '```bash'
    install_run, test_cmd = _bash_blocks(text)[:2]
    assert 'pip install -r requirements.txt' in install_run
    assert install_run.endswith(
        'python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm'
    )

    ci = ROOT / '.ci' / 'run'
    if not ci.exists():
        pytest.skip('no .ci/run')
    # .ci/run runs README's test command step by step (`python -m pip install -q` for
    # `pip install`); every step of README's command must be one of its lines.
    ci_lines = {
        line.strip().replace('python -m pip install -q ', 'pip install ')
        for line in ci.read_text(encoding='utf-8').splitlines()
    }
    steps = [s.strip() for s in test_cmd.split('&&')]
    assert steps[-1].startswith('python -m pytest')
    missing = [s for s in steps if s != '. .venv/bin/activate' and s not in ci_lines]
    assert missing == [], f"README's test command has steps .ci/run does not run: {missing}"
