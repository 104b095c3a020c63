"""Input refused before anything compiles, with the file, the line and the fix: .jsonl
field types, text that is not UTF-8, byte-order marks (read alike by every reader), and
class labels written two ways."""

import codecs
import os

import numpy as np
import pytest

from core.errors import DataError
from data import image_sources, labelled, pair_sources, text, token_files, tokenizer
from data.labels import LabelMap
from interop import embed

# --- .jsonl field types ---------------------------------------------------------------------


def write(path, content) -> str:
    if isinstance(content, str):
        content = content.encode('utf-8')
    path.write_bytes(content)
    return str(path)


def read_pretraining(path):
    return list(text.read_text_files(path))


def read_labelled(path):
    return labelled.read_labelled_text(path)


def read_captions(path):
    return pair_sources.CaptionFilePairs(path)


def read_tokens(path):
    return token_files.read_token_files(path)


@pytest.mark.parametrize(
    'reader,good,bad,message',
    [
        (read_pretraining, '{"text": "a"}', '{"text": null}', "field 'text' is null (null)"),
        (read_pretraining, '{"text": "a"}', '{"text": 12345}', "field 'text' is a number (12345)"),
        (
            read_labelled,
            '{"text": "a", "label": "x"}',
            '{"text": 7, "label": "y"}',
            "field 'text' is a number (7)",
        ),
        (
            read_labelled,
            '{"text": "a", "label": "x"}',
            '{"text": "b", "label": null}',
            "field 'label' is null",
        ),
        (
            read_labelled,
            '{"text": "a", "label": "x"}',
            '{"text": "b", "label": ["y"]}',
            "field 'label' is a list",
        ),
        (
            read_captions,
            '{"image": "x.png", "caption": "a"}',
            '{"image": "x.png", "caption": null}',
            "field 'caption' is null",
        ),
        (
            read_captions,
            '{"image": "x.png", "caption": "a"}',
            '{"image": 3, "caption": "b"}',
            "field 'image' is a number (3)",
        ),
        (
            read_tokens,
            '{"tokens": ["a"], "tags": ["O"]}',
            '{"tokens": ["b", null], "tags": ["O", "O"]}',
            "item 1 of field 'tokens' is null",
        ),
        (
            read_tokens,
            '{"tokens": ["a"], "tags": ["O"]}',
            '{"tokens": ["b"], "tags": [true]}',
            "item 0 of field 'tags' is a boolean",
        ),
    ],
)
def test_a_jsonl_field_of_the_wrong_type_names_the_line(tmp_path, reader, good, bad, message):
    """A null or a number where text belongs is refused, not read as 'None' or '12345'."""
    (tmp_path / 'x.png').write_bytes(b'')
    path = write(tmp_path / 'c.jsonl', f'{good}\n{bad}\n')
    with pytest.raises(DataError) as e:
        reader(path)
    assert f'{path} line 2' in str(e.value)
    assert message in str(e.value)
    assert 'fix the line' in str(e.value)


def test_labels_1_and_1_0_in_json_are_one_class(tmp_path):
    path = write(
        tmp_path / 'c.jsonl',
        '{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": 0}\n',
    )
    examples = labelled.read_labelled_text(path)
    assert [e['label'] for e in examples] == ['1', '1', '0']
    label_map = LabelMap.fit(e['label'] for e in examples)
    assert label_map.classes == ['0', '1']


def test_label_texts_of_one_number_are_refused_not_split_into_two_classes(tmp_path):
    path = write(tmp_path / 'c.tsv', 'text\tlabel\na\t1\nb\t1.0\nc\t0\nd\t2\ne\t02\n')
    labels = [e['label'] for e in labelled.read_labelled_text(path)]
    with pytest.raises(DataError) as e:
        LabelMap.fit(labels, where=path)
    assert "labels '1' and '1.0'; '02' and '2' are one number written in different ways" in str(
        e.value
    )
    assert 'write every label of a class the same way' in str(e.value)
    # An eval split that writes a training label another way is named as such.
    label_map = LabelMap.fit(['0', '1', 'x'])
    with pytest.raises(DataError, match=r"labels '1\.0' \(training: '1'\) are training labels"):
        label_map.encode(['1.0', '0'], where='dev.tsv')
    assert list(label_map.encode(['1', 'x'])) == [1, 2]  # text labels stay as written


# --- encodings and byte-order marks ---------------------------------------------------------


def _line3(kind: str) -> bytes:
    rows = {
        'txt': [b'one doc', b'', b'caf\xe9'],
        'jsonl': [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "caf\xe9"}'],
        'csv': [b'text', b'a', b'caf\xe9'],
        'tsv': [b'text\tlabel', b'a\tx', b'caf\xe9\ty'],
        'conll': [b'EU B-ORG', b'', b'caf\xe9 O'],
    }[kind]
    return b'\n'.join(rows) + b'\n'


@pytest.mark.parametrize(
    'reader,ext',
    [
        (read_pretraining, 'txt'),
        (read_pretraining, 'jsonl'),
        (read_pretraining, 'csv'),
        (read_labelled, 'tsv'),
        (read_tokens, 'conll'),
        (embed.read_lines, 'txt'),
        (lambda p: pair_sources.CaptionFilePairs(p), 'tsv'),
    ],
)
def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path, reader, ext):
    path = write(tmp_path / f'c.{ext}', _line3(ext))
    with pytest.raises(DataError) as e:
        reader(path)
    assert f'{path} line 3 is not UTF-8 text (byte 0xe9' in str(e.value)
    assert 'save it as UTF-8' in str(e.value)


@pytest.mark.parametrize('reader', [read_pretraining, embed.read_lines])
def test_utf16_text_is_named_as_such(tmp_path, reader):
    for name, data in (
        ('bom.txt', 'some text\n'.encode('utf-16')),
        ('nobom.txt', 'some text\n'.encode('utf-16-le')),
    ):
        path = write(tmp_path / name, data)
        with pytest.raises(DataError) as e:
            reader(path)
        assert f'{path} line 1 is not UTF-8 text' in str(e.value)
        assert 'it looks like UTF-16' in str(e.value)


@pytest.mark.parametrize('ext,content', [('csv', 'text\na\nb\n'), ('tsv', 'text\na\nb\n')])
def test_a_utf8_byte_order_mark_is_dropped_by_every_reader(tmp_path, ext, content):
    bom = codecs.BOM_UTF8
    path = write(tmp_path / f'c.{ext}', bom + content.encode())
    assert list(text.read_text_files(path)) == ['a', 'b']  # the pretraining reader
    path = write(tmp_path / 'l.csv', bom + b'text,label\na,x\nb,y\n')
    assert [e['label'] for e in labelled.read_labelled_text(path)] == ['x', 'y']
    path = write(tmp_path / 'c.jsonl', bom + b'{"text": "a"}\n')
    assert list(text.read_text_files(path)) == ['a']
    path = write(tmp_path / 'c.txt', bom + b'first\n\nsecond\n')
    assert list(text.read_text_files(path)) == ['first', 'second']
    path = write(tmp_path / 'lines.txt', bom + b'first\nsecond\n')
    assert embed.read_lines(path) == ['first', 'second']
    path = write(tmp_path / 'c.conll', bom + b'EU B-ORG\n')
    assert token_files.read_token_files(path) == [{'tokens': ['EU'], 'tags': ['B-ORG']}]


def test_a_vocabulary_with_a_byte_order_mark_reads_as_without(tmp_path):
    lines = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello', 'world']
    plain = write(tmp_path / 'plain.txt', '\n'.join(lines) + '\n')
    marked = write(tmp_path / 'bom.txt', codecs.BOM_UTF8 + ('\n'.join(lines) + '\n').encode())
    a, b = tokenizer.WordPiece(plain), tokenizer.WordPiece(marked)
    assert a.pad_id == b.pad_id == 0
    np.testing.assert_array_equal(a.encode('hello world'), b.encode('hello world'))


# --- image files ----------------------------------------------------------------------------


def _encoded(fmt: str, seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode='L').save(buffer, format=fmt)
    return buffer.getvalue()


def corrupt_folder(root) -> list[str]:
    """Two classes of good PNG and JPEG files and, among them, three bad ones: not an image,
    a PNG and a JPEG cut short. Returns the bad files' paths."""
    for k, name in enumerate(('cat', 'dog')):
        (root / name).mkdir(parents=True)
        for i in range(6):
            (root / name / f'{i}.png').write_bytes(_encoded('PNG', 10 * k + i))
        (root / name / 'j.jpg').write_bytes(_encoded('JPEG', 99 + k))
    bad = {
        root / 'cat' / '3.png': b'this is not an image',
        root / 'dog' / '1.png': _encoded('PNG', 1)[:-30],
        root / 'dog' / 'j.jpg': _encoded('JPEG', 100)[:-40],
    }
    for path, data in bad.items():
        path.write_bytes(data)
    return sorted(str(p) for p in bad)


def test_every_corrupt_image_of_a_folder_is_listed_in_one_message(tmp_path):
    bad = corrupt_folder(tmp_path / 'images')
    with pytest.raises(DataError) as e:
        image_sources.FolderImages(str(tmp_path / 'images'), image_size=8, channels=1)
    message = str(e.value)
    assert '3 of the 14 image files of image folder' in message
    assert 'remove or replace them' in message
    listed = [line.split(': ')[0].strip() for line in message.splitlines()[1:]]
    assert listed == bad
    # The same folder without them reads, every file (good PNGs and JPEGs) decodable.
    for path in bad:
        os.remove(path)
    source = image_sources.FolderImages(str(tmp_path / 'images'), image_size=8, channels=1)
    assert len(source) == 11 and all(source[i]['image'].shape == (8, 8, 1) for i in range(11))


def test_a_corrupt_caption_image_is_named_with_its_line(tmp_path):
    (tmp_path / 'a.png').write_bytes(_encoded('PNG', 0))
    (tmp_path / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
    path = write(
        tmp_path / 'c.jsonl',
        '{"image": "a.png", "caption": "one"}\n{"image": "b.png", "caption": "two"}\n',
    )
    with pytest.raises(DataError) as e:
        pair_sources.CaptionFilePairs(path, image_size=8, channels=1)
    assert '1 of the 2 image files' in str(e.value)
    assert f'{tmp_path}/b.png ({path} line 2)' in str(e.value)


def test_a_run_on_a_folder_with_corrupt_images_stops_before_compiling(tmp_path):
    from tests.conftest import launch

    bad = corrupt_folder(tmp_path / 'images')
    workdir = tmp_path / 'run'
    r = launch(
        'finetune',
        '--config',
        'configs/image_cls.py:ti',
        '--workdir',
        str(workdir),
        f'--config.data.files={tmp_path / "images"}',
        '--config.model.image_size=8',
        '--config.model.channels=1',
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    assert all(path in r.stderr for path in bad)
    assert 'first step done' not in r.stderr
    assert not workdir.exists()  # a failed start leaves nothing


@pytest.mark.parametrize('keep', [0.5, 0.98])
def test_a_truncated_npz_is_named(tmp_path, keep):
    path = tmp_path / 'a.npz'
    np.savez(path, images=np.zeros((50, 8, 8), np.uint8), labels=np.arange(50) % 2)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match='could not be read as an .npz of arrays'):
        image_sources.npz_images(str(path))
