"""Image and image-text data (data/decode.py, image_sources.py, pair_sources.py, digits.py,
image_splits.py, pipeline.py): sources (embedded digits, .npz, image folders,
TFDS, caption files), the resize policy, splits and the Grain pipelines."""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError, DataError
from data import decode, digits, image_sources, image_splits, pair_sources, pipeline
from data.tokenizer import SPECIAL_TOKENS, WordPiece
from tests import tfds_image_fixture

TFDS_NAME = tfds_image_fixture.NAME


def data_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            'name': 'digits',
            'files': '',
            'eval_files': '',
            'eval_fraction': 0.1,
            'train_split': 'train',
            'eval_split': '',
            'data_dir': '',
            'label_field': 'label',
            'image_field': 'image',
            'text_field': 'caption',
            'resize': False,
        }
    )
    c.update(overrides)
    return c


def labelled(n: int, size: int = 4) -> image_sources.ArrayImages:
    """n images whose label is their index, to follow every item through a pipeline."""
    pixels = (np.arange(n)[:, None, None] + np.zeros((1, size, size))).astype(np.uint8)
    return image_sources.ArrayImages(pixels, np.arange(n))


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def write_png(path, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


# --- one image ----------------------------------------------------------------------------


def test_conform_image_converts_channels_and_dtype():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = decode.conform_image(rgb, None, 1, resize=False)
    expected = np.asarray(Image.fromarray(rgb, mode='RGB').convert('L'))[:, :, None]
    np.testing.assert_array_equal(grey, expected)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(decode.conform_image(rgba, None, 3, resize=False), rgb)
    tripled = decode.conform_image(rgb[:, :, 0], None, 3, resize=False)
    assert tripled.shape == (5, 7, 3) and (tripled == rgb[:, :, :1]).all()
    floats = decode.conform_image(np.array([[0.0, 0.5, 1.0]]), None, 1, resize=False)
    assert floats.dtype == np.uint8 and floats[0, :, 0].tolist() == [0, 128, 255]
    resized = decode.conform_image(rgb, 4, 3, resize=True)
    assert resized.shape == (4, 4, 3) and resized.dtype == np.uint8


def test_wrong_size_without_resize_says_how_to_fix_it():
    with pytest.raises(DataError) as e:
        decode.conform_image(np.zeros((5, 7), np.uint8), 8, 1, resize=False, what='photo 3')
    message = str(e.value)
    assert 'photo 3 is 5x7' in message and 'expected 8x8' in message
    assert '--config.data.resize=true' in message and '--config.model.image_size' in message


# --- embedded digits ----------------------------------------------------------------------


def test_digits_are_8x8_uint8_with_labels_0_to_9():
    source = digits.digits_images()
    assert len(source) == 1797 and source.classes == [str(d) for d in range(10)]
    item = source[0]
    assert item['image'].shape == (8, 8, 1) and item['image'].dtype == np.uint8
    assert item['label'].dtype == np.int32
    labels = np.array([source[i]['label'] for i in range(len(source))])
    assert set(labels.tolist()) == set(range(10))
    pixels = np.stack([source[i]['image'] for i in range(0, len(source), 50)])
    assert pixels.max() == 255 and pixels.min() == 0
    assert set(np.unique(pixels).tolist()) <= {round(v * 255 / 16) for v in range(17)}


def test_digits_resized_to_the_model_size_only_when_asked():
    item = digits.digits_images(16, 3, resize=True)[5]
    assert item['image'].shape == (16, 16, 3)
    with pytest.raises(DataError, match='data.resize'):
        digits.digits_images(16, 3, resize=False)


# --- .npz ---------------------------------------------------------------------------------


def test_npz_uint8_with_labels(tmp_path):
    path = str(tmp_path / 'a.npz')
    pixels = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    np.savez(path, images=pixels, labels=np.array([2, 0, 1]))
    source = image_sources.npz_images(path, 4, 1)
    assert len(source) == 3
    np.testing.assert_array_equal(source[1]['image'][:, :, 0], pixels[1])
    assert [source[i]['label'] for i in range(3)] == [2, 0, 1]


def test_num_classes_from_names_or_labels(tmp_path, folder):
    assert image_sources.num_classes(digits.digits_images()) == 10
    assert image_sources.num_classes(image_sources.FolderImages(folder)) == 3
    path = str(tmp_path / 'n.npz')
    np.savez(path, images=np.zeros((40, 4, 4), np.uint8), labels=np.arange(40) % 4)
    train, _ = image_splits.image_splits(data_config(files=path, eval_fraction=0.2), 4, 1)
    assert image_sources.num_classes(train) == 4
    assert image_sources.num_classes(image_sources.ArrayImages(np.zeros((3, 4, 4), np.uint8))) == 0


def test_npz_float_without_labels_under_other_keys(tmp_path):
    path = str(tmp_path / 'b.npz')
    pixels = np.random.default_rng(0).random((2, 4, 4, 3))
    np.savez(path, x=pixels)
    source = image_sources.npz_images(path, 4, 3)
    item = source[1]
    assert item['image'].dtype == np.uint8 and item['label'] == -1
    np.testing.assert_array_equal(item['image'], np.round(pixels[1] * 255).astype(np.uint8))


def test_npz_without_images_lists_its_keys(tmp_path):
    path = str(tmp_path / 'c.npz')
    np.savez(path, pictures=np.zeros((2, 4, 4)), targets=np.zeros(2))
    with pytest.raises(DataError) as e:
        image_sources.npz_images(path)
    assert path in str(e.value) and "['pictures', 'targets']" in str(e.value)


def test_npz_floats_outside_0_1_are_an_error(tmp_path):
    path = str(tmp_path / 'd.npz')
    np.savez(path, images=np.full((2, 4, 4), 255.0))
    with pytest.raises(DataError, match=r'must lie in \[0, 1\]'):
        image_sources.npz_images(path)


# --- image folders ------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> str:
    """Classes cat (2 images), ant (1), bee (2); RGB and grey, 8x8 and 12x10."""
    root = tmp_path / 'pets'
    rng = np.random.default_rng(0)
    write_png(root / 'cat' / 'b.png', rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    write_png(root / 'cat' / 'a.png', rng.integers(0, 256, (8, 8), dtype=np.uint8))
    write_png(root / 'ant' / 'x.png', rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    write_png(root / 'bee' / 'y.png', rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    write_png(root / 'bee' / 'z.png', rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (root / 'bee' / 'notes.txt').write_text('not an image')
    return str(root)


def test_folder_classes_are_sorted_and_images_resized(folder):
    source = image_sources.FolderImages(folder, 8, 3, resize=True)
    assert source.classes == ['ant', 'bee', 'cat']
    items = list(source)
    assert [int(item['label']) for item in items] == [0, 1, 1, 2, 2]
    assert all(item['image'].shape == (8, 8, 3) for item in items)
    assert all(item['image'].dtype == np.uint8 for item in items)
    grey = image_sources.FolderImages(folder, 8, 1, resize=True)[3]['image']  # cat/a.png
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(Image.open(f'{folder}/cat/a.png')))


def test_folder_of_mixed_sizes_without_resize_names_the_file(folder):
    source = image_sources.FolderImages(folder, 8, 3, resize=False)
    assert source[1]['image'].shape == (8, 8, 3)
    with pytest.raises(DataError) as e:
        list(source)
    message = str(e.value)
    assert os.path.join(folder, 'ant', 'x.png') in message and '12x10' in message
    assert 'expected 8x8' in message and '--config.data.resize=true' in message


def test_folder_without_classes_or_images_names_the_path(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DataError, match='no class folders') as e:
        image_sources.FolderImages(str(empty))
    assert str(empty) in str(e.value)
    (empty / 'cat').mkdir()
    with pytest.raises(DataError, match='holds no images'):
        image_sources.FolderImages(str(empty))
    with pytest.raises(DataError, match='does not exist'):
        image_sources.FolderImages(str(tmp_path / 'nowhere'))


def test_eval_folder_keeps_the_training_labels(folder, tmp_path):
    rng = np.random.default_rng(1)
    write_png(tmp_path / 'val' / 'cat' / 'c.png', rng.integers(0, 256, (8, 8, 3), np.uint8))
    c = data_config(files=folder, eval_files=str(tmp_path / 'val'), resize=True)
    train, eval_ = image_splits.image_splits(c, 8, 3)
    assert len(train) == 5 and [int(item['label']) for item in eval_] == [2]
    assert eval_.classes == ['ant', 'bee', 'cat']


# --- TFDS ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> str:
    return tfds_image_fixture.prepare(str(tmp_path_factory.mktemp('tfds')))


def test_tfds_images_read_back_decoded_without_tensorflow(tfds_dir):
    source = image_sources.TfdsImages(TFDS_NAME, 'validation', data_dir=tfds_dir, image_size=8)
    expected = tfds_image_fixture.examples('validation')
    assert len(source) == len(expected) and source.classes == list(tfds_image_fixture.CLASSES)
    for item, example in zip(source, expected):
        np.testing.assert_array_equal(item['image'], example['image'])
        assert item['label'] == example['label'] and item['label'].dtype == np.int32
    assert 'tensorflow' not in sys.modules


def test_tfds_image_splits_and_missing_label(tfds_dir):
    c = data_config(name=TFDS_NAME, data_dir=tfds_dir, eval_split='validation')
    train, eval_ = image_splits.image_splits(c, 8, 3)
    assert (len(train), len(eval_)) == (40, 8)
    assert train[0]['image'].shape == (8, 8, 3) and train.classes == eval_.classes
    unlabelled = image_sources.TfdsImages(
        TFDS_NAME, 'train[:2]', data_dir=tfds_dir, label_field='x'
    )
    assert unlabelled[1]['label'] == -1


def test_tfds_images_are_read_from_data_image_field(tfds_dir):
    c = data_config(name=TFDS_NAME, data_dir=tfds_dir, eval_split='validation')
    c.image_field = 'image'
    train, _ = image_splits.image_splits(c, 8, 1)
    np.testing.assert_array_equal(
        train[0]['image'], tfds_image_fixture.examples('train')[0]['image']
    )
    c.image_field = 'picture'  # not a feature of this dataset: said, with the key to set
    with pytest.raises(DataError, match=r"no feature 'picture'.*set --config.data.image_field"):
        image_splits.image_splits(c, 8, 1)
    with pytest.raises(DataError, match=r"no feature 'picture'.*set --config.data.image_field"):
        image_splits.labelled_image_splits(c, 8, 1)


def test_tfds_image_size_mismatch_fails_at_load(tfds_dir):
    c = data_config(name=TFDS_NAME, data_dir=tfds_dir, eval_split='validation')
    with pytest.raises(DataError, match='data.resize'):
        image_splits.image_splits(c, 16, 1)
    c.resize = True
    train, _ = image_splits.image_splits(c, 16, 1)
    assert train[0]['image'].shape == (16, 16, 1)


def test_tfds_pairs_and_errors(tfds_dir, tmp_path):
    c = data_config(name=TFDS_NAME, data_dir=tfds_dir, eval_fraction=0.25)
    train, eval_ = image_splits.pair_splits(c, 8, 1)
    captions = [e['caption'] for e in tfds_image_fixture.examples('train')]
    got = [item['caption'] for item in train] + [item['caption'] for item in eval_]
    assert sorted(got) == sorted(captions) and 0 < len(eval_) < len(train)
    assert isinstance(train[0]['caption'], str) and train[0]['image'].shape == (8, 8, 1)
    with pytest.raises(DataError, match="no feature 'text'.*--config.data.text_field"):
        image_splits.pair_splits(
            data_config(name=TFDS_NAME, data_dir=tfds_dir, text_field='text'), 8, 1
        )
    with pytest.raises(DataError, match='Prepare it first'):
        image_sources.TfdsImages(TFDS_NAME, 'train', data_dir=str(tmp_path / 'empty'))


# --- splits -------------------------------------------------------------------------------


def test_held_out_split_is_fixed_and_disjoint():
    train, eval_ = image_splits.image_splits(data_config(eval_fraction=0.1), 8, 1)
    again_train, again_eval = image_splits.image_splits(data_config(eval_fraction=0.1), 8, 1)
    # Of the digits' training split only (1408 of 1797; the rest is the test split).
    assert len(train) + len(eval_) == 1408 and 100 < len(eval_) < 200
    np.testing.assert_array_equal(train._indices, again_train._indices)
    np.testing.assert_array_equal(eval_._indices, again_eval._indices)
    assert set(train._indices).isdisjoint(eval_._indices)
    np.testing.assert_array_equal(
        eval_[0]['image'], digits.digits_images(split='train')[eval_._indices[0]]['image']
    )


def test_too_few_items_to_hold_out(tmp_path):
    path = str(tmp_path / 'two.npz')
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match='too few to hold out'):
        image_splits.image_splits(data_config(files=path, eval_fraction=0.05), 4, 1)


def test_name_errors():
    with pytest.raises(ConfigError, match='no captions'):
        image_splits.pair_splits(data_config(name='digits'), 8, 1)
    with pytest.raises(ConfigError, match='image-text set'):
        image_splits.image_splits(data_config(name='digits_captions'), 8, 1)
    with pytest.raises(ConfigError, match='channels'):
        digits.digits_images(8, 2)


# --- Grain pipeline -----------------------------------------------------------------------


def test_training_batches_are_deterministic_for_a_seed():
    source = digits.digits_images(8, 1)

    def first(seed):
        ds = pipeline.image_dataset(source, batch_size=8, seed=seed, train=True, prefetch=0)
        return take(iter(ds), 3)

    a, b, c = first(1), first(1), first(2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]['label'], c[0]['label'])
    assert a[0]['image'].shape == (8, 8, 8, 1) and a[0]['image'].dtype == np.uint8
    assert a[0]['label'].shape == (8,) and a[0]['label'].dtype == np.int32


def test_training_repeats_in_a_new_order_every_epoch():
    ds = pipeline.image_dataset(labelled(6), batch_size=3, seed=0, train=True, prefetch=0)
    it = iter(ds)
    stream = np.concatenate([b['label'] for b in take(it, 6)])
    epochs = stream.reshape(3, 6)
    assert all(sorted(e.tolist()) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_eval_is_one_ordered_pass_with_a_short_last_batch():
    ds = pipeline.image_dataset(labelled(10), batch_size=4, seed=0, train=False)
    batches = list(ds)
    assert [len(b['label']) for b in batches] == [4, 4, 2]
    assert np.concatenate([b['label'] for b in batches]).tolist() == list(range(10))
    assert batches[2]['image'].shape == (2, 4, 4, 1)


def test_two_shards_are_disjoint_and_cover_the_data():
    source = labelled(11)
    seen = []
    for shard in range(2):
        ds = pipeline.image_dataset(
            source, batch_size=4, seed=0, train=False, shard_index=shard, shard_count=2
        )
        seen.append(np.concatenate([b['label'] for b in ds]).tolist())
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(11))
    train = pipeline.image_dataset(
        source, batch_size=5, seed=3, train=True, shard_index=1, shard_count=2, prefetch=0
    )
    assert set(next(iter(train))['label'].tolist()) <= set(seen[1])


def test_resumed_iterator_gives_the_same_following_batches():
    source = digits.digits_images(8, 1)
    ds = pipeline.image_dataset(source, batch_size=16, seed=5, train=True, prefetch=2)
    it = iter(ds)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    it.close()
    resumed = iter(pipeline.image_dataset(source, batch_size=16, seed=5, train=True, prefetch=2))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), expected)
    resumed.close()


def test_decoded_files_read_ahead_in_threads_in_the_same_order(folder):
    """A folder is decoded by worker threads, arrays in memory in the consumer's thread; the
    batches, and the iterator state a checkpoint saves, do not depend on the thread count."""
    threaded = image_sources.FolderImages(folder, 8, 3, resize=True)
    assert threaded.read_threads >= 1 and digits.digits_images(8, 1).read_threads == 0
    single = image_sources.FolderImages(folder, 8, 3, resize=True)
    single.read_threads = 0

    def stream(source):
        return iter(pipeline.image_dataset(source, batch_size=2, seed=3, train=True, prefetch=0))

    a, b = stream(threaded), stream(single)
    assert_batches_equal(take(a, 4), take(b, 4))
    resumed = stream(single)
    resumed.set_state(a.get_state())  # saved by a threaded reader, resumed by a single one
    assert_batches_equal(take(resumed, 3), take(a, 3))
    for it in (a, b, resumed):
        it.close()


# --- image-text pairs ---------------------------------------------------------------------


def caption_dir(tmp_path, n: int = 3) -> str:
    """`data/` holding `imgs/i.png` (8x8 grey, pixel value 10 * i)."""
    root = tmp_path / 'data'
    for i in range(n):
        write_png(root / 'imgs' / f'{i}.png', np.full((8, 8), 10 * i, np.uint8))
    return str(root)


def test_jsonl_pairs_resolve_paths_against_the_file(tmp_path, monkeypatch):
    root = caption_dir(tmp_path)
    path = os.path.join(root, 'pairs.jsonl')
    absolute = os.path.join(root, 'imgs', '2.png')
    with open(path, 'w') as f:
        f.write(json.dumps({'img': 'imgs/0.png', 'text': 'a black square'}) + '\n\n')
        f.write(json.dumps({'img': absolute, 'text': 'a dark grey square'}) + '\n')
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    source = pair_sources.CaptionFilePairs(
        path, image_field='img', text_field='text', image_size=8, channels=3
    )
    assert [item['caption'] for item in source] == ['a black square', 'a dark grey square']
    assert source[1]['image'].shape == (8, 8, 3) and (source[1]['image'] == 20).all()


def test_tsv_pairs_with_and_without_header(tmp_path):
    root = caption_dir(tmp_path)
    with open(os.path.join(root, 'h.tsv'), 'w') as f:
        f.write('image\tcaption\nimgs/1.png\tone grey square\nimgs/0.png\ta black one\n')
    with open(os.path.join(root, 'plain.tsv'), 'w') as f:
        f.write('imgs/2.png\ta square\twith a tab\n')
    source = pair_sources.CaptionFilePairs(os.path.join(root, 'h.tsv'), image_size=8, channels=1)
    assert [item['caption'] for item in source] == ['one grey square', 'a black one']
    assert (source[0]['image'] == 10).all()
    plain = pair_sources.CaptionFilePairs(os.path.join(root, 'plain.tsv'))
    assert len(plain) == 1 and plain[0]['caption'] == 'a square\twith a tab'


def test_missing_image_names_the_line_and_counts_the_others(tmp_path):
    root = caption_dir(tmp_path, 1)
    path = os.path.join(root, 'pairs.tsv')
    with open(path, 'w') as f:
        f.write('image\tcaption\nimgs/0.png\tfine\nimgs/7.png\tgone\nimgs/8.png\tgone too\n')
    with pytest.raises(DataError) as e:
        pair_sources.CaptionFilePairs(path)
    message = str(e.value)
    assert f'{path} line 3' in message and os.path.join(root, 'imgs', '7.png') in message
    assert '(and 1 more missing)' in message


def test_digits_captions_name_the_digit_and_differ_within_a_class():
    captions = digits.digits_captions()
    _, labels = digits._digits()
    assert len(captions) == len(labels)
    for digit, word in enumerate(digits._DIGIT_WORDS):
        mine = [c for c, label in zip(captions, labels) if label == digit]
        assert all({word, str(digit)} & set(c.replace(',', ' ').split()) for c in mine)
        assert len(set(mine)) > 20
    for weight in ('thin', 'regular', 'bold'):
        assert any(weight in c for c in captions)


def test_written_digits_captions_read_back_as_files(tmp_path):
    path = digits.write_digits_captions(str(tmp_path / 'dc'), image_size=8, limit=12)
    with open(path) as f:
        first = json.loads(f.readline())
    assert first['image'] == 'images/0000.png' and first['caption'] == digits.digits_captions()[0]
    c = data_config(name='', files=path, eval_fraction=0.2)
    files = pair_sources.CaptionFilePairs(path, image_size=8, channels=1)
    embedded = digits.digits_caption_pairs(8, 1)
    assert len(files) == 12
    for i in (0, 11):
        np.testing.assert_array_equal(files[i]['image'], embedded[i]['image'])
        assert files[i]['caption'] == embedded[i]['caption']
    train, eval_ = image_splits.pair_splits(c, 8, 1)
    assert len(train) + len(eval_) == 12


@pytest.fixture(scope='module')
def caption_vocab(tmp_path_factory) -> WordPiece:
    words = sorted({w for c in digits.digits_captions() for w in c.replace(',', ' ').split()})
    path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
    path.write_text('\n'.join([*SPECIAL_TOKENS, ',', *words]) + '\n', encoding='utf-8')
    return WordPiece(str(path))


def test_caption_tokenizer_adds_cls_sep_truncates_and_pads(caption_vocab):
    tokenize = pipeline.caption_tokenizer(caption_vocab, 8)
    short = tokenize('a bold seven')
    assert short.dtype == np.int32 and short.shape == (8,)
    words = caption_vocab.encode('a bold seven').tolist()
    assert short.tolist() == [caption_vocab.cls_id, *words, caption_vocab.sep_id, 0, 0, 0]
    long = tokenize('the number seven written by hand with a bold stroke , leaning left')
    assert long[0] == caption_vocab.cls_id and long[-1] == caption_vocab.sep_id
    assert (long != 0).all() and caption_vocab.unk_id not in long.tolist()


def test_pair_batches(caption_vocab):
    source = digits.digits_caption_pairs(8, 3)
    tokenize = pipeline.caption_tokenizer(caption_vocab, 16)
    ds = pipeline.pair_dataset(source, tokenize, batch_size=4, seed=0, train=True)
    it = iter(ds)
    batch = next(it)
    it.close()
    assert batch['image'].shape == (4, 8, 8, 3) and batch['image'].dtype == np.uint8
    assert batch['input_ids'].shape == (4, 16) and batch['input_ids'].dtype == np.int32
    np.testing.assert_array_equal(batch['input_mask'], (batch['input_ids'] != 0).astype(np.int32))
    assert batch['input_mask'].dtype == np.int32
    eval_ds = pipeline.pair_dataset(source, tokenize, batch_size=500, seed=0, train=False)
    assert [len(b['input_ids']) for b in eval_ds] == [500, 500, 500, 297]
