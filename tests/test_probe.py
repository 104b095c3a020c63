"""Online evaluation of frozen features (core/probe.py): weighted k-NN and the linear probe."""

import numpy as np
import pytest

from core import probe
from core.errors import DataError


def knn_reference(train_x, train_y, test_x, *, num_classes, k, temperature):
    """Plain NumPy (float64) weighted cosine k-NN, written from the definition."""
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    k = min(k, len(train))
    preds = []
    for row in test:
        sims = train @ row
        nearest = np.argsort(-sims, kind='stable')[:k]
        scores = np.zeros(num_classes)
        for i in nearest:
            scores[train_y[i]] += np.exp(sims[i] / temperature)
        preds.append(int(np.argmax(scores)))
    return np.array(preds)


def clustered(rng, n, dim, num_classes, spread=1.0):
    """Features around one random centre per class, so k-NN is far from trivial or chance."""
    centres = rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def blobs(rng, n, dim, num_classes):
    """Linearly separable Gaussian blobs: class c sits at 10 * e_c with unit noise."""
    y = rng.integers(0, num_classes, size=n)
    x = 10.0 * np.eye(dim)[y] + rng.normal(size=(n, dim))
    return x.astype(np.float32), y


# Hand-checkable k-NN: cosine similarities of the test rows [1, 0] and [0, 1] to the train
# rows (the norms do not matter, only the directions):
#   train            class   sim to [1, 0]   sim to [0, 1]
#   [5, 0]           0        1               0
#   [0, 2]           1        0               1
#   [3, 3]           1        0.7071          0.7071
#   [-1, -0.1]       0       -0.995          -0.0995
HAND_TRAIN_X = np.array([[5, 0], [0, 2], [3, 3], [-1, -0.1]], np.float32)
HAND_TRAIN_Y = np.array([0, 1, 1, 0])
HAND_TEST_X = np.array([[1, 0], [0, 1]], np.float32)
HAND_TEST_Y = np.array([0, 1])


def test_knn_hand_example():
    # [1, 0] with k=3: neighbours [5,0] (sim 1, class 0), [3,3] (0.7071, 1), [0,2] (0, 1).
    # T=0.07: class 0 scores e^(1/0.07) = e^14.3; class 1 e^10.1 + e^0: class 0 wins.
    # T=10:   class 0 scores e^0.1 = 1.105; class 1 e^0.0707 + e^0 = 2.073: class 1 wins.
    # [0, 1] with k=3: [0,2] (1, class 1), [3,3] (0.7071, 1), [5,0] (0, 0): class 1 either way.
    kw = dict(num_classes=2, k=3)
    sharp = probe.knn_predict(HAND_TRAIN_X, HAND_TRAIN_Y, HAND_TEST_X, temperature=0.07, **kw)
    flat = probe.knn_predict(HAND_TRAIN_X, HAND_TRAIN_Y, HAND_TEST_X, temperature=10.0, **kw)
    np.testing.assert_array_equal(sharp, [0, 1])
    np.testing.assert_array_equal(flat, [1, 1])
    args = (HAND_TRAIN_X, HAND_TRAIN_Y, HAND_TEST_X, HAND_TEST_Y)
    assert probe.knn_accuracy(*args, temperature=0.07, **kw) == 1.0
    assert probe.knn_accuracy(*args, temperature=10.0, **kw) == 0.5
    # k=1: the single nearest neighbour decides. k=100 is clipped to the 4 train rows: for
    # [1, 0] at T=10, class 0 adds e^-0.0995 = 0.905 -> 2.010 < 2.073, still class 1; for
    # [0, 1], class 0 gets e^0 + e^-0.00995 = 1.990 < e^0.1 + e^0.0707 = 2.178: class 1.
    assert probe.knn_accuracy(*args, num_classes=2, k=1, temperature=10.0) == 1.0
    assert probe.knn_accuracy(*args, num_classes=2, k=100, temperature=10.0) == 0.5


@pytest.mark.parametrize('k, temperature', [(10, 0.07), (1, 0.5), (1000, 0.1)])
def test_knn_matches_numpy_reference(k, temperature):
    rng = np.random.default_rng(0)
    train_x, train_y = clustered(rng, 300, 16, 5, spread=2.0)
    test_x, test_y = clustered(rng, 70, 16, 5, spread=2.0)
    kw = dict(num_classes=5, k=k, temperature=temperature)
    want = knn_reference(train_x, train_y, test_x, **kw)
    got = probe.knn_predict(train_x, train_y, test_x, **kw)
    np.testing.assert_array_equal(got, want)
    assert 0.0 < np.mean(want == test_y) < 1.0  # a case where neighbours disagree
    assert probe.knn_accuracy(train_x, train_y, test_x, test_y, **kw) == np.mean(want == test_y)


def test_knn_chunking_does_not_change_result():
    rng = np.random.default_rng(1)
    train_x, train_y = clustered(rng, 200, 8, 4, spread=2.0)
    test_x, _ = clustered(rng, 50, 8, 4, spread=2.0)
    kw = dict(num_classes=4, k=20, temperature=0.07)
    whole = probe.knn_predict(train_x, train_y, test_x, chunk=1024, **kw)
    for chunk in (1, 7, 50):  # one row at a time, a ragged last chunk, exactly one chunk
        got = probe.knn_predict(train_x, train_y, test_x, chunk=chunk, **kw)
        np.testing.assert_array_equal(got, whole)


def test_linear_probe_separable_blobs():
    rng = np.random.default_rng(2)
    train_x, train_y = blobs(rng, 150, 8, 3)
    test_x, test_y = blobs(rng, 300, 8, 3)
    assert probe.linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=3) == 1.0
    acc = probe.linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=3, l2=1e-2)
    assert acc == 1.0
    w, b, mean, std = probe.linear_probe(train_x, train_y, num_classes=3, l2=1e-2)
    assert (w.shape, b.shape, mean.shape, std.shape) == ((8, 3), (3,), (8,), (8,))
    np.testing.assert_allclose(mean, train_x.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, train_x.std(axis=0), rtol=1e-5)


def test_linear_probe_random_labels_near_chance():
    rng = np.random.default_rng(3)
    train_x = rng.normal(size=(150, 64)).astype(np.float32)
    test_x = rng.normal(size=(1000, 64)).astype(np.float32)
    train_y, test_y = rng.integers(0, 5, 150), rng.integers(0, 5, 1000)
    acc = probe.linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=5)
    assert abs(acc - 0.2) < 0.06  # chance is 0.2, binomial std 0.013 over 1000 rows
    # 150 points in 64 dimensions: with little regularisation the probe does fit the noise,
    # so the chance level on test is not a failure to train.
    train_acc = probe.linear_probe_accuracy(
        train_x, train_y, train_x, train_y, num_classes=5, l2=1e-5
    )
    assert train_acc > 0.9


@pytest.fixture(scope='module')
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # 1797 images of 8x8 pixels, shipped with sklearn
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1000], order[1000:]
    return x[train].astype(np.float32), y[train], x[test].astype(np.float32), y[test]


def test_linear_probe_digits_matches_sklearn(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, test_x, test_y = digits
    l2 = 1e-3
    acc = probe.linear_probe_accuracy(*digits, num_classes=10, l2=l2)
    # Same objective: sklearn minimises 1/2 ||w||^2 + C * sum CE, i.e. C = 1 / (l2 * N).
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0 / (l2 * len(train_x)), max_iter=5000)
    clf.fit(scaler.transform(train_x), train_y)
    want = clf.score(scaler.transform(test_x), test_y)
    assert abs(acc - want) <= 0.03, (acc, want)
    assert acc > 0.9
    assert probe.linear_probe_accuracy(*digits, num_classes=10) > 0.9  # l2 chosen on train
    # Digits has pixels that are always 0 on the train split: their std is taken as 1, so
    # test rows lit there give finite logits rather than a division by ~0.
    _, _, _, std = probe.linear_probe(train_x, train_y, num_classes=10, l2=l2)
    assert np.any(train_x.std(axis=0) == 0) and np.all(std[train_x.std(axis=0) == 0] == 1)


def test_select_l2_deterministic_and_in_grid(digits):
    train_x, train_y, _, _ = digits
    grid = (1e-4, 1e-2, 1.0)
    picks = {probe.select_l2(train_x, train_y, num_classes=10, grid=grid) for _ in range(2)}
    assert len(picks) == 1 and picks <= set(grid)
    assert probe.select_l2(train_x, train_y, num_classes=10, grid=(0.3,)) == 0.3


def test_deterministic():
    rng = np.random.default_rng(4)
    train_x, train_y = clustered(rng, 200, 16, 4, spread=3.0)
    test_x, test_y = clustered(rng, 100, 16, 4, spread=3.0)
    args = (train_x, train_y, test_x, test_y)
    assert probe.knn_accuracy(*args, num_classes=4) == probe.knn_accuracy(*args, num_classes=4)
    acc = [probe.linear_probe_accuracy(*args, num_classes=4) for _ in range(2)]
    assert acc[0] == acc[1]
    first = probe.linear_probe(train_x, train_y, num_classes=4, l2=1e-3)
    second = probe.linear_probe(train_x, train_y, num_classes=4, l2=1e-3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


GOOD = dict(
    train_x=np.ones((4, 3), np.float32),
    train_y=np.array([0, 1, 0, 1]),
    test_x=np.ones((2, 3), np.float32),
    test_y=np.array([0, 1]),
)


@pytest.mark.parametrize(
    'change, message',
    [
        (dict(train_y=np.array([0, 1, 0])), 'train_x has 4 rows but train_y has 3'),
        (dict(test_x=np.ones((2, 5), np.float32)), 'train_x has 3 features .* test_x has 5'),
        (dict(train_y=np.array([0, 1, 2, 1])), r'train_y must be in \[0, num_classes=2\).* 2'),
        (dict(test_y=np.array([-1, 1])), r'test_y must be in \[0, num_classes=2\).* -1'),
        (dict(train_x=np.ones((0, 3)), train_y=np.array([], int)), 'train split is empty'),
        (dict(test_x=np.ones((0, 3)), test_y=np.array([], int)), 'test split is empty'),
        (dict(train_x=np.ones(4)), r'train_x must be 2-D \[N, D\], got shape \(4,\)'),
        (dict(train_y=np.array([0.0, 1, 0, 1])), 'train_y must hold integer .* float64'),
        (dict(train_x=np.array([[1, np.nan, 1]] * 4)), 'train_x has 4 non-finite value'),
    ],
)
@pytest.mark.parametrize('fn', [probe.knn_accuracy, probe.linear_probe_accuracy])
def test_bad_input(fn, change, message):
    kwargs = dict(GOOD, **change)
    with pytest.raises(ValueError, match=message):
        fn(**kwargs, num_classes=2)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(num_classes=0), 'num_classes must be >= 1, got 0'),
        (dict(num_classes=2, k=0), 'k must be an int >= 1, got 0'),
        (dict(num_classes=2, temperature=0.0), r'temperature must be finite and > 0, got 0.0'),
        (dict(num_classes=2, chunk=-3), 'chunk must be an int >= 1, got -3'),
    ],
)
def test_bad_knn_settings(kwargs, message):
    with pytest.raises(DataError, match=message):
        probe.knn_accuracy(**GOOD, **kwargs)


def test_bad_probe_settings():
    train = (GOOD['train_x'], GOOD['train_y'])
    with pytest.raises(DataError, match='l2 must be finite and >= 0, got -1.0'):
        probe.linear_probe(*train, num_classes=2, l2=-1.0)
    with pytest.raises(DataError, match='steps must be an int >= 1, got 0'):
        probe.linear_probe(*train, num_classes=2, steps=0)
    with pytest.raises(DataError, match=r'val_fraction must be in \(0, 1\), got 1.5'):
        probe.select_l2(*train, num_classes=2, val_fraction=1.5)
    with pytest.raises(DataError, match='needs at least 2 train examples .* got 1'):
        probe.select_l2(np.ones((1, 3)), np.array([0]), num_classes=2)
