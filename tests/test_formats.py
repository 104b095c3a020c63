"""Compressed text (.gz, .zst), Parquet, Arrow and Hugging Face `datasets` directories:
every reader of local files gives the same records, in the same order, as from the plain
.txt / .jsonl / .tsv / CoNLL equivalent, and a damaged or unsupported file is one
DataError naming it and the fix."""

import gzip
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from core.errors import DataError
from data import labelled, text, token_files
from tests.conftest import SMALL_RUN, launch

DOCS = ['The first document.', 'Zweite Zeile: café, naïve', 'a third, with "quotes"', '4']


def write(path, data) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode('utf-8'))
    return str(path)


def jsonl(records: list[dict]) -> str:
    return ''.join(json.dumps(r) + '\n' for r in records)


def compressed(data: str, suffix: str) -> bytes:
    """`data` gzip- or zstd-compressed, in two members / frames (as `cat a.gz b.gz`, pigz or
    pzstd write): a reader that stops after the first loses the rest."""
    raw = data.encode('utf-8')
    half = len(raw) // 2
    if suffix == '.gz':
        return gzip.compress(raw[:half]) + gzip.compress(raw[half:])
    c = zstandard.ZstdCompressor()
    return c.compress(raw[:half]) + c.compress(raw[half:])


def save_to_disk(table: pa.Table, path, shards: int = 2) -> str:
    """A directory laid out as `datasets.Dataset.save_to_disk` writes it: Arrow IPC *stream*
    files `data-0000i-of-0000n.arrow` (schema metadata 'huggingface': the features),
    `dataset_info.json` and `state.json` (listing the data files in order)."""
    os.makedirs(path)
    features = {
        name: {'dtype': str(t), '_type': 'Value'}
        for name, t in zip(table.schema.names, table.schema.types)
    }
    info = {'citation': '', 'description': '', 'features': features, 'homepage': '', 'license': ''}
    schema = table.schema.with_metadata(
        {'huggingface': json.dumps({'info': {'features': features}})}
    )
    names = []
    size = -(-len(table) // shards)
    for i in range(shards):
        name = f'data-{i:05d}-of-{shards:05d}.arrow'
        with pa.OSFile(os.path.join(path, name), 'wb') as sink:
            with pa.ipc.new_stream(sink, schema) as writer:
                writer.write_table(
                    table.slice(i * size, size).replace_schema_metadata(schema.metadata)
                )
        names.append({'filename': name})
    with open(os.path.join(path, 'dataset_info.json'), 'w') as f:
        json.dump(info, f, indent=2)
    state = {
        '_data_files': names,
        '_fingerprint': '0123456789abcdef',
        '_format_columns': None,
        '_format_kwargs': {},
        '_format_type': None,
        '_output_all_columns': False,
        '_split': None,
    }
    with open(os.path.join(path, 'state.json'), 'w') as f:
        json.dump(state, f, indent=2)
    return str(path)


def write_table(records: list[dict], path, form: str) -> str:
    """`records` as a table: 'parquet', 'arrow' (an IPC stream, as `datasets` writes one),
    'feather' (the IPC file format, in an .arrow file) or 'datasets' (a save_to_disk dir)."""
    table = pa.Table.from_pylist(records)
    if form == 'parquet':
        pq.write_table(table, path, row_group_size=2)  # several row groups
    elif form == 'arrow':
        with pa.OSFile(str(path), 'wb') as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=2)
    elif form == 'feather':
        with pa.OSFile(str(path), 'wb') as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table, max_chunksize=2)
    else:
        save_to_disk(table, path)
    return str(path)


TABLE_NAMES = {
    'parquet': 'x.parquet',
    'arrow': 'x.arrow',
    'feather': 'y.arrow',
    'datasets': 'x_dataset',
}

# --- pretraining text ------------------------------------------------------------------------


@pytest.mark.parametrize('suffix', ['.gz', '.zst'])
@pytest.mark.parametrize('ext', ['.txt', '.jsonl', '.tsv', '.csv'])
def test_compressed_text_reads_as_the_plain_file(tmp_path, ext, suffix):
    if ext == '.txt':
        content = '\n\n'.join(DOCS) + '\n'
    elif ext == '.jsonl':
        content = jsonl([{'text': d, 'id': i} for i, d in enumerate(DOCS)])
    else:
        sep = '\t' if ext == '.tsv' else ','
        quote = (lambda d: d) if ext == '.tsv' else (lambda d: '"' + d.replace('"', '""') + '"')
        content = f'id{sep}text\n' + ''.join(f'{i}{sep}{quote(d)}\n' for i, d in enumerate(DOCS))
    plain = list(text.read_text_files(write(tmp_path / f'plain{ext}', content)))
    assert plain == DOCS
    path = write(tmp_path / f'packed{ext}{suffix}', compressed(content, suffix))
    assert list(text.read_text_files(path)) == plain


@pytest.mark.parametrize('form', list(TABLE_NAMES))
def test_tables_read_as_the_jsonl_file(tmp_path, form):
    records = [{'body': d, 'n': i} for i, d in enumerate(DOCS)]
    plain = list(text.read_text_files(write(tmp_path / 'plain.jsonl', jsonl(records)), 'body'))
    path = write_table(records, tmp_path / TABLE_NAMES[form], form)
    assert list(text.read_text_files(path, 'body')) == plain == DOCS


def test_a_glob_mixes_formats_in_file_name_order(tmp_path):
    write_table([{'text': 'b1'}, {'text': 'b2'}], tmp_path / 'b.parquet', 'parquet')
    write(tmp_path / 'a.txt.gz', gzip.compress(b'a1\n\na2\n'))
    write_table([{'text': 'c1'}], tmp_path / 'c', 'datasets')
    assert list(text.read_text_files(f'{tmp_path}/*')) == ['a1', 'a2', 'b1', 'b2', 'c1']


# --- labelled text and token classification --------------------------------------------------

PAIRS = [
    {'premise': 'a cat sat', 'hypothesis': 'an animal sat', 'label': 1},
    {'premise': 'it rains', 'hypothesis': 'it is dry', 'label': 0},
    {'premise': 'x', 'hypothesis': 'y', 'label': 2},
]
FIELDS = dict(text_field='premise', text_pair_field='hypothesis', label_field='label')


@pytest.mark.parametrize('form', list(TABLE_NAMES) + ['jsonl.gz', 'jsonl.zst', 'tsv.gz'])
def test_labelled_examples_read_as_from_jsonl(tmp_path, form):
    plain = labelled.read_labelled_text(write(tmp_path / 'plain.jsonl', jsonl(PAIRS)), **FIELDS)
    assert [e['label'] for e in plain] == ['1', '0', '2']
    if form in TABLE_NAMES:
        path = write_table(PAIRS, tmp_path / TABLE_NAMES[form], form)
    elif form == 'tsv.gz':
        rows = ''.join(f'{r["premise"]}\t{r["hypothesis"]}\t{r["label"]}\n' for r in PAIRS)
        tsv = 'premise\thypothesis\tlabel\n' + rows
        path = write(tmp_path / 'x.tsv.gz', compressed(tsv, '.gz'))
    else:
        path = write(tmp_path / f'x.{form}', compressed(jsonl(PAIRS), '.' + form.split('.')[1]))
    assert labelled.read_labelled_text(path, **FIELDS) == plain


SENTENCES = [
    {'words': ['EU', 'rejects', 'German', 'call'], 'ner': [3, 0, 7, 0]},
    {'words': ['Peter', 'Blackburn'], 'ner': [1, 2]},
]


@pytest.mark.parametrize('form', list(TABLE_NAMES) + ['jsonl.zst'])
def test_token_sentences_read_as_from_jsonl(tmp_path, form):
    read = lambda p: token_files.read_token_files(p, 'words', 'ner')  # noqa: E731
    plain = read(write(tmp_path / 'plain.jsonl', jsonl(SENTENCES)))
    assert plain[1] == {'tokens': ['Peter', 'Blackburn'], 'tags': ['1', '2']}
    if form in TABLE_NAMES:
        path = write_table(SENTENCES, tmp_path / TABLE_NAMES[form], form)
    else:
        path = write(tmp_path / 'x.jsonl.zst', compressed(jsonl(SENTENCES), '.zst'))
    assert read(path) == plain


def test_compressed_conll_reads_as_the_plain_file(tmp_path):
    conll = '-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n'
    plain = token_files.read_token_files(write(tmp_path / 'a.conll', conll))
    assert len(plain) == 2
    assert (
        token_files.read_token_files(write(tmp_path / 'a.conll.gz', compressed(conll, '.gz')))
        == plain
    )


# --- errors ---------------------------------------------------------------------------------


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('suffix', ['.gz', '.zst'])
def test_a_truncated_compressed_file_names_it_and_the_check(tmp_path, suffix):
    data = compressed(jsonl([{'text': d} for d in DOCS * 50]), suffix)
    path = write(tmp_path / f'a.jsonl{suffix}', data[: len(data) * 3 // 4])
    message = one_line_error(text.read_text_files, path)
    tool = 'gzip' if suffix == '.gz' else 'zstd'
    assert path in message and f'{tool} -t {path}' in message


@pytest.mark.parametrize('form', ['parquet', 'arrow', 'datasets'])
def test_a_damaged_table_names_it(tmp_path, form):
    path = write_table([{'text': d} for d in DOCS * 100], tmp_path / TABLE_NAMES[form], form)
    victim = os.path.join(path, 'data-00001-of-00002.arrow') if form == 'datasets' else path
    with open(victim, 'rb') as f:
        data = f.read()
    with open(victim, 'wb') as f:
        f.write(data[: len(data) // 2] if form != 'parquet' else data[len(data) // 2 :])
    message = one_line_error(text.read_text_files, path)
    assert victim in message and 'not a readable' in message


def test_a_damaged_parquet_stops_pretraining_with_one_line(tmp_path):
    path = write_table([{'text': d} for d in DOCS * 100], tmp_path / 'c.parquet', 'parquet')
    with open(path, 'rb') as f:
        data = f.read()
    write(tmp_path / 'c.parquet', data[: len(data) // 2])
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(tmp_path / 'run'),
        f'--config.data.files={path}',
    )
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert f'{path} is not a readable Parquet file (' in r.stderr


def test_a_missing_column_names_the_columns_and_the_key(tmp_path):
    path = write_table(PAIRS, tmp_path / 'x.parquet', 'parquet')
    message = one_line_error(labelled.read_labelled_text, path, text_field='sentence')
    assert "no column 'sentence'" in message and "'premise'" in message
    assert '--config.data.text_field' in message


def test_a_null_or_binary_cell_names_the_row(tmp_path):
    path = write_table([{'text': 'a'}, {'text': None}], tmp_path / 'x.parquet', 'parquet')
    assert "row 2: field 'text' is null" in one_line_error(text.read_text_files, path)
    path = write_table([{'text': b'\xff'}], tmp_path / 'b.parquet', 'parquet')
    assert "row 1: field 'text' is bytes" in one_line_error(text.read_text_files, path)


def test_a_dataset_dict_asks_for_one_split(tmp_path):
    root = tmp_path / 'dd'
    save_to_disk(pa.Table.from_pylist(PAIRS), root / 'train')
    save_to_disk(pa.Table.from_pylist(PAIRS), root / 'test')
    (root / 'dataset_dict.json').write_text(json.dumps({'splits': ['train', 'test']}))
    message = one_line_error(labelled.read_labelled_text, str(root), **FIELDS)
    assert "splits ['test', 'train']" in message and str(root / 'test') in message


def test_a_compressed_table_is_refused(tmp_path):
    path = write(tmp_path / 'x.parquet.gz', gzip.compress(b'PAR1'))
    assert 'give the .parquet file itself' in one_line_error(text.read_text_files, path)


def test_without_zstandard_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    path = write(tmp_path / 'a.txt.zst', compressed('a\n\nb\n', '.zst'))
    monkeypatch.setitem(sys.modules, 'zstandard', None)  # import zstandard -> ImportError
    message = one_line_error(text.read_text_files, path)
    assert 'pip install zstandard==' in message and path in message


def test_an_unsupported_extension_lists_the_formats(tmp_path):
    message = one_line_error(text.read_text_files, write(tmp_path / 'a.md.gz', b''))
    assert "'.md'" in message and '.parquet' in message and '.zst' in message


# --- end to end ------------------------------------------------------------------------------


def train_losses(workdir) -> list[float]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r['loss'] for r in rows if r['split'] == 'train']


def test_pretraining_on_parquet_is_the_run_on_jsonl(tmp_path, pydoc_vocab):
    """`--config.data.files=corpus.parquet` plugs into pretraining: the same losses as the
    run on the same documents as .jsonl.gz."""
    docs = [{'text': d} for d in text.embedded_corpus('pydoc')[:120]]
    sources = {
        'parquet': write_table(docs, tmp_path / 'corpus.parquet', 'parquet'),
        'jsonl': write(tmp_path / 'corpus.jsonl.gz', gzip.compress(jsonl(docs).encode())),
    }
    losses = {}
    for name, path in sources.items():
        workdir = str(tmp_path / name)
        r = launch(
            'pretrain',
            '--config',
            'configs/bert_mlm.py:tiny',
            '--workdir',
            workdir,
            *SMALL_RUN,
            f'--config.data.files={path}',
            f'--config.data.vocab_file={pydoc_vocab}',
            '--config.total_steps=2',
            '--config.log_every=1',
            '--config.eval_steps=1',
        )
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = train_losses(workdir)
    assert len(losses['parquet']) == 2 and losses['parquet'] == losses['jsonl']


# --- images: WebDataset .tar shards and tables of encoded images -----------------------------


def png(image) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


def add_member(tar, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory, images, extras: list[dict], per_shard: int) -> str:
    """WebDataset shards `shard-00000.tar`, ...: `sample{i:05d}.png` and its `extras[i]`
    ({extension: text}) members, `per_shard` samples a shard. Returns their glob."""
    import tarfile

    os.makedirs(directory, exist_ok=True)
    for start in range(0, len(images), per_shard):
        with tarfile.open(os.path.join(directory, f'shard-{start:05d}.tar'), 'w') as tar:
            for i in range(start, min(start + per_shard, len(images))):
                add_member(tar, f'part/sample{i:05d}.png', png(images[i]))
                for ext, value in extras[i].items():
                    add_member(tar, f'part/sample{i:05d}.{ext}', value.encode('utf-8'))
    return os.path.join(str(directory), 'shard-*.tar')


def small_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)


def items(source) -> list[tuple]:
    return [(s['image'].tobytes(), int(s.get('label', -1)), s.get('caption')) for s in source]


NAMES = ['cat', 'dog', 'emu']


def test_webdataset_shards_read_as_the_image_folder(tmp_path):
    from data.encoded_images import EncodedImages
    from data.image_sources import FolderImages

    images, labels = small_images(12), [i % 3 for i in range(12)]
    order = sorted(range(12), key=lambda i: (labels[i], i))  # a folder's order: class, name
    for i in order:
        folder = tmp_path / 'folder' / NAMES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'sample{i:05d}.png').write_bytes(png(images[i]))
    folder = FolderImages(str(tmp_path / 'folder'))
    by_name = [{'json': json.dumps({'label': NAMES[labels[i]]})} for i in order]
    shards = write_shards(tmp_path / 'named', images[order], by_name, per_shard=5)
    tar = EncodedImages(shards)
    assert tar.classes == NAMES and items(tar) == items(folder)
    by_id = [{'cls': str(labels[i])} for i in order]
    tar = EncodedImages(write_shards(tmp_path / 'ids', images[order], by_id, per_shard=5))
    assert items(tar) == items(folder) and tar.labels.tolist() == folder.labels.tolist()


@pytest.mark.parametrize('form', ['parquet', 'datasets'])
def test_a_table_of_encoded_images_reads_as_the_npz(tmp_path, form):
    from data.encoded_images import EncodedImages
    from data.image_sources import npz_images

    images, labels = small_images(7), np.arange(7) % 2
    np.savez(tmp_path / 'x.npz', images=images, labels=labels)
    # The datasets Image feature: a struct {bytes, path} a row.
    rows = [
        {'image': {'bytes': png(im), 'path': f'{i}.png'}, 'label': int(y)}
        for i, (im, y) in enumerate(zip(images, labels))
    ]
    path = write_table(rows, tmp_path / TABLE_NAMES[form], form)
    assert items(EncodedImages(path)) == items(npz_images(str(tmp_path / 'x.npz')))


@pytest.mark.parametrize('form', ['tar', 'parquet'])
def test_encoded_pairs_read_as_the_caption_file(tmp_path, form):
    from data.encoded_images import EncodedPairs
    from data.pair_sources import CaptionFilePairs

    images = small_images(5)
    captions = [f'a photo of thing {i}' for i in range(5)]
    (tmp_path / 'img').mkdir()
    for i in range(5):
        (tmp_path / 'img' / f'{i}.png').write_bytes(png(images[i]))
    lines = jsonl([{'image': f'img/{i}.png', 'caption': c} for i, c in enumerate(captions)])
    plain = CaptionFilePairs(write(tmp_path / 'captions.jsonl', lines))
    if form == 'tar':
        extras = [
            {'txt': c} if i % 2 else {'json': json.dumps({'caption': c})}
            for i, c in enumerate(captions)
        ]
        path = write_shards(tmp_path / 'shards', images, extras, per_shard=2)
    else:
        rows = [{'image': png(im), 'caption': c} for im, c in zip(images, captions)]
        path = write_table(rows, tmp_path / 'pairs.parquet', 'parquet')
    assert items(EncodedPairs(path)) == items(plain)


def test_a_damaged_shard_or_sample_is_one_line(tmp_path):
    from data.encoded_images import EncodedImages, EncodedPairs

    shards = write_shards(tmp_path / 'a', small_images(4), [{'cls': '1'}] * 4, per_shard=4)
    shard = shards.replace('*', '00000')
    with open(shard, 'rb') as f:
        data = f.read()
    write(tmp_path / 'a' / 'shard-00000.tar', data[:700])
    message = one_line_error(lambda: len(EncodedImages(shards)))
    assert shard in message and 'not a readable tar file' in message
    shards = write_shards(tmp_path / 'b', small_images(2), [{'cls': '0'}] * 2, per_shard=2)
    message = one_line_error(EncodedPairs, shards)
    assert "sample 'part/sample00000' has no caption" in message
    import tarfile

    with tarfile.open(tmp_path / 'bad.tar', 'w') as tar:
        add_member(tar, 'k1.png', b'not a png')
        add_member(tar, 'k1.cls', b'0')
    message = one_line_error(lambda: EncodedImages(str(tmp_path / 'bad.tar'))[0])
    assert f'{tmp_path / "bad.tar"}: k1 could not be decoded as an image' in message


def test_image_cls_on_webdataset_shards_is_the_run_on_the_npz(tmp_path):
    """`--config.data.files='shards/*.tar'` plugs into image fine-tuning: the same losses as
    the run on the same images and labels as an .npz."""
    from data.digits import digits_images

    digits = digits_images(split='train')
    images, labels = digits._images[:400], digits.labels[:400]
    np.savez(tmp_path / 'digits.npz', images=images[..., 0], labels=labels)
    extras = [{'cls': str(int(y))} for y in labels]
    sources = {
        'npz': str(tmp_path / 'digits.npz'),
        'tar': write_shards(tmp_path / 'shards', images[..., 0], extras, per_shard=150),
    }
    losses = {}
    for name, files in sources.items():
        workdir = str(tmp_path / name)
        r = launch(
            'finetune',
            '--config',
            'configs/image_cls.py:tiny',
            '--workdir',
            workdir,
            '--config.model.hidden_size=32',
            '--config.model.num_layers=1',
            '--config.model.num_heads=2',
            '--config.model.mlp_dim=64',
            '--config.batch_size=32',
            f'--config.data.files={files}',
            '--config.total_steps=2',
            '--config.log_every=1',
        )
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = train_losses(workdir)
    assert len(losses['tar']) == 2 and losses['tar'] == losses['npz']
