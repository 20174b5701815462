"""Tests for experiments/data.py. Fast, no network; real data is read from SGJAX_DATA_DIR or the
default ``shared/data`` lookup (tests that need it are skipped when it is absent)."""

from __future__ import annotations

import gzip
import io
import os
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import data

MNIST_TRAIN_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
MNIST_TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def _real_data_root(subdir: str) -> Path | None:
    env = os.environ.get(data.DATA_DIR_ENV)
    dirs = [Path(env)] if env else data.default_data_dirs()
    for d in dirs:
        if (d / subdir).is_dir():
            return d
    return None


@pytest.fixture
def mnist_root() -> Path:
    root = _real_data_root(data.MNIST_SUBDIR)
    if root is None:
        pytest.skip(
            f"no real MNIST: set {data.DATA_DIR_ENV} to a directory containing mnist/*.gz "
            f"(looked in {[str(d) for d in data.default_data_dirs()]})"
        )
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write to the user's ~/.cache/sgjax from tests."""
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("sgjax-cache")))


# --------------------------------------------------------------------------------------------
# MNIST (real files, small subsets)
# --------------------------------------------------------------------------------------------


def test_mnist_subset_shapes_dtypes_ranges(mnist_root):
    ds = data.load("mnist", data_dir=mnist_root, train_limit=1000, test_limit=500)
    assert ds.name == "mnist" and ds.label == "MNIST" and ds.num_classes == 10
    assert ds.source == str(mnist_root / "mnist")
    assert ds.x_train.shape == (1000, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (500, 28, 28, 1) and ds.x_test.dtype == np.float32
    assert ds.y_train.shape == (1000,) and ds.y_train.dtype == np.int32
    assert ds.y_test.shape == (500,) and ds.y_test.dtype == np.int32
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (ds.y_train, ds.y_test):
        assert y.min() >= 0 and y.max() < 10
    assert set(np.unique(ds.y_train)) == set(range(10))
    # The FIRST n examples, in file order.
    assert ds.y_train[:10].tolist() == MNIST_TRAIN_FIRST_LABELS
    assert ds.y_test[:10].tolist() == MNIST_TEST_FIRST_LABELS
    raw = data.read_idx(mnist_root / "mnist" / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(ds.x_train[..., 0], raw[:1000] / np.float32(255))


def test_mnist_full_sizes(mnist_root):
    ds = data.load("mnist", data_dir=mnist_root)
    assert (ds.num_train, ds.num_test) == (60000, 10000)
    assert ds.input_shape == (28, 28, 1)
    counts = np.bincount(ds.y_train, minlength=10)
    assert counts.sum() == 60000 and counts.min() > 5000


def test_flattened_is_a_view(mnist_root):
    ds = data.load("mnist", data_dir=mnist_root, train_limit=20, test_limit=10)
    flat = ds.flattened()
    assert flat.x_train.shape == (20, 784) and flat.x_test.shape == (10, 784)
    assert flat.input_shape == (784,)
    assert np.shares_memory(flat.x_train, ds.x_train)
    assert flat.y_train is ds.y_train and flat.label == ds.label


def test_env_var_and_default_lookup(mnist_root, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(mnist_root))
    ds = data.load("mnist", train_limit=3, test_limit=3)
    assert ds.source == str(mnist_root / "mnist")

    monkeypatch.delenv(data.DATA_DIR_ENV)
    if mnist_root.resolve() not in data.default_data_dirs():
        pytest.skip(f"{mnist_root} is not one of the default locations")
    ds = data.load("mnist", source="local", train_limit=3, test_limit=3)
    assert ds.y_train.tolist() == MNIST_TRAIN_FIRST_LABELS[:3]


def test_limits_zero_and_validation(mnist_root):
    ds = data.load("mnist", data_dir=mnist_root, train_limit=0, test_limit=5)
    assert ds.x_train.shape == (0, 28, 28, 1) and ds.y_test.shape == (5,)
    with pytest.raises(ValueError, match="train_limit"):
        data.load("mnist", data_dir=mnist_root, train_limit=-1)
    with pytest.raises(ValueError, match="test_limit"):
        data.load("mnist", data_dir=mnist_root, test_limit=2.5)


# --------------------------------------------------------------------------------------------
# Errors: bad names, missing data, corrupt files
# --------------------------------------------------------------------------------------------


def test_unknown_name_and_source():
    with pytest.raises(ValueError, match=r"'imagenet'.*mnist, cifar10"):
        data.load("imagenet")
    with pytest.raises(ValueError, match=r"'s3'"):
        data.load("mnist", source="s3")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mnist", "train-images-idx3-ubyte.gz"), ("cifar10", "cifar10-jpeg")],
)
def test_missing_dataset_message(name, expected, tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load(name, source="local")
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    for part in (data.DATA_DIR_ENV, expected, str(tmp_path), "pip install tensorflow", "data_dir"):
        assert part in msg, (part, msg)


def test_default_location_is_per_user_and_the_error_says_how_to_get_the_files(
        tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_data_dirs() == [tmp_path / ".cache" / "sgjax" / "data"]
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("mnist", source="local")
    msg = str(info.value)
    assert str(tmp_path / ".cache" / "sgjax" / "data" / "mnist") in msg
    assert all(url in msg for url in data.MNIST_URLS) and "pip install tensorflow" in msg
    with pytest.raises(data.DatasetNotFoundError, match="tensorflow_datasets"):
        data.load("cifar10", source="local")
    assert data.expected_label("cifar10") == "CIFAR-10"  # no local tar: tfds would be used
    _write_fake_mnist(tmp_path / ".cache" / "sgjax" / "data" / "mnist")
    assert data.load("mnist", source="local").num_train == 6


def test_missing_dataset_auto_without_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    with pytest.raises(data.DatasetNotFoundError, match="tensorflow is not installed"):
        data.load("mnist")


def test_explicit_data_dir_never_falls_back_to_tfds(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(data, "_load_tfds", lambda *a: pytest.fail("tfds must not be used"))
    with pytest.raises(data.DatasetNotFoundError, match="data_dir"):
        data.load("mnist", data_dir=tmp_path)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _write_fake_mnist(d: Path, n_train: int = 6, n_test: int = 4) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_idx_roundtrip(tmp_path):
    _write_fake_mnist(tmp_path / "mnist")
    ds = data.load("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.y_test.tolist() == [0, 1, 2, 3]


def test_idx_truncated_gzip(tmp_path):
    _write_fake_mnist(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*corrupt or truncated"):
        data.load("mnist", data_dir=tmp_path)


def test_idx_not_gzip(tmp_path):
    bad = tmp_path / "x-idx3-ubyte.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="x-idx3-ubyte.gz"):
        data.read_idx(bad)


def test_idx_bad_magic_and_size(tmp_path):
    bad = tmp_path / "magic.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic.gz.*bad magic"):
        data.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:  # header says 10 bytes of data, only 3 present
        f.write(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match=r"short.gz.*\(10,\)"):
        data.read_idx(short)


def test_mnist_inconsistent_counts(tmp_path):
    _write_fake_mnist(tmp_path / "mnist")
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz has 3 labels"):
        data.load("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR-10 JPEG tar reader (tiny synthetic tar) and cache
# --------------------------------------------------------------------------------------------


def _class_color(c: int) -> tuple[int, int, int]:
    return (20 * c + 10, 250 - 20 * c, 128)


def _jpeg(color, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def _make_cifar_tar(root: Path, n_train=2, n_test=1, extra=()) -> Path:
    d = root / data.CIFAR_SUBDIR
    d.mkdir(parents=True)
    path = d / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "./README.md", b"tiny")
        # Folders written in reverse class order: labels must still follow CIFAR10_CLASSES.
        for c, cls in reversed(list(enumerate(data.CIFAR10_CLASSES))):
            for split, n in (("train", n_train), ("test", n_test)):
                for i in range(n):
                    _add(tf, f"./{split}/{cls}/{i:04d}.jpg", _jpeg(_class_color(c)))
        for name, payload in extra:
            _add(tf, name, payload)
    return path


def test_cifar_tiny_tar(tmp_path, monkeypatch):
    root = tmp_path / "data"
    tar = _make_cifar_tar(root)
    before = sorted(p.name for p in tar.parent.iterdir())
    ds = data.load("cifar10", data_dir=root, progress=False)
    assert ds.label == "CIFAR-10 (JPEG substitute)" and ds.source == str(tar.parent)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (10, 32, 32, 3) and ds.y_test.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # Interleaved, deterministic order: 0000 of every class, then 0001 of every class.
    assert ds.y_train.tolist() == list(range(10)) * 2
    assert ds.y_test.tolist() == list(range(10))
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        for img, label in zip(x, y, strict=True):
            want = np.array(_class_color(int(label)), np.float32) / 255
            np.testing.assert_allclose(img.mean(axis=(0, 1)), want, atol=3 / 255)
    # Nothing written next to the data; exactly one cache file in SGJAX_CACHE_DIR.
    assert sorted(p.name for p in tar.parent.iterdir()) == before
    cache = Path(os.environ[data.CACHE_DIR_ENV])
    assert len(list(cache.glob("cifar10-jpeg-*.npz"))) == 1

    # Second load comes from the cache, without decoding.
    monkeypatch.setattr(data, "_decode_cifar_tar", lambda *a: pytest.fail("decoded again"))
    again = data.load("cifar10", data_dir=root, train_limit=5, test_limit=3)
    np.testing.assert_array_equal(again.x_train, ds.x_train[:5])
    np.testing.assert_array_equal(again.y_test, ds.y_test[:3])


def test_cifar_cache_keyed_by_mtime(tmp_path):
    tar = _make_cifar_tar(tmp_path / "data")
    cache = tmp_path / "cache"
    data.read_cifar10_jpeg_tar(tar, cache=cache, progress=False)
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    data.read_cifar10_jpeg_tar(tar, cache=cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 2
    assert not list(cache.glob("*.tmp"))


def test_cifar_unreadable_cache_is_rebuilt(tmp_path):
    tar = _make_cifar_tar(tmp_path / "data")
    cache = tmp_path / "cache"
    first = data.read_cifar10_jpeg_tar(tar, cache=cache, progress=False)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        second = data.read_cifar10_jpeg_tar(tar, cache=cache, progress=False)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ([("./train/unicorn/0000.jpg", _jpeg((0, 0, 0)))], "unknown class folder 'unicorn'"),
        ([("./train/cat/9999.jpg", _jpeg((0, 0, 0), (16, 16)))], r"9999.jpg.*\(16, 16, 3\)"),
        ([("./test/dog/0042.jpg", b"not a jpeg")], "cannot decode member './test/dog/0042.jpg'"),
        ([("./misc/cat/0000.jpg", _jpeg((0, 0, 0)))], "not under train/<class>/"),
    ],
)
def test_cifar_bad_members(tmp_path, extra, match):
    tar = _make_cifar_tar(tmp_path / "data", extra=extra)
    with pytest.raises(ValueError, match=match):
        data.read_cifar10_jpeg_tar(tar, cache=False, progress=False)


def test_cifar_corrupt_tar(tmp_path):
    tar = _make_cifar_tar(tmp_path / "data")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ValueError, match="tiny.tar.gz"):
        data.read_cifar10_jpeg_tar(tar, cache=False, progress=False)


@pytest.mark.slow
def test_cifar_real_tar(tmp_path):
    root = _real_data_root(data.CIFAR_SUBDIR)
    if root is None:
        pytest.skip(f"no real CIFAR-10 JPEG tar: set {data.DATA_DIR_ENV}")
    ds = data.load("cifar10", data_dir=root, progress=False)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    # Per-channel means of CIFAR-10 proper are (0.4914, 0.4822, 0.4465).
    mean = ds.x_train.mean(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.01)


# --------------------------------------------------------------------------------------------
# tensorflow_datasets path
# --------------------------------------------------------------------------------------------


def test_tfds_path_with_fake_module(monkeypatch):
    """Exercises split strings and dtype conversion without TensorFlow."""
    calls = []

    def fake_load(name, *, split, batch_size, as_supervised):
        calls.append((name, split, batch_size, as_supervised))
        n = 7 if split.startswith("train") else 3
        return np.zeros((n, 32, 32, 3), np.uint8) + 255, np.arange(n, dtype=np.int64)

    fake = types.SimpleNamespace(load=fake_load, as_numpy=lambda t: t)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
    ds = data.load("cifar10", source="tfds", train_limit=7)
    assert calls == [("cifar10", "train[:7]", -1, True), ("cifar10", "test", -1, True)]
    assert ds.source == "tfds" and ds.label == "CIFAR-10"
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0
    assert ds.y_train.dtype == np.int32 and ds.y_test.tolist() == [0, 1, 2]


def test_tfds_auto_fallback_when_no_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(data, "_load_tfds", lambda name, *limits: ("tfds", name, limits))
    assert data.load("mnist", test_limit=4) == ("tfds", "mnist", (None, 4))


def test_tfds_source_without_tensorflow(monkeypatch):
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    with pytest.raises(ImportError, match="pip install tensorflow"):
        data.load("mnist", source="tfds")


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock_data(name, shape, monkeypatch):
    pytest.importorskip("tensorflow", reason="tfds needs TensorFlow to build datasets")
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data has no split metadata (0 examples), so batch_size=-1 would batch by
    # sys.maxsize, which aborts the process in recent TensorFlow; real prepared data has it.
    monkeypatch.setattr(tfds.core.splits.SplitDict, "total_num_examples", property(lambda self: 8))
    with tfds.testing.mock_data(num_examples=8):
        ds = data.load(name, source="tfds")
    assert ds.x_train.shape == (8, *shape) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.dtype == np.int32 and ds.source == "tfds"


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _toy(n=10):
    return np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n, dtype=np.int32)


def test_batches_epochs_are_permutations_and_deterministic():
    x, y = _toy(12)
    it = data.batches(x, y, 4, key_or_seed=0)
    epochs = [np.concatenate([next(it)[1] for _ in range(3)]) for _ in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(12))
    assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled each epoch
    again = data.batches(x, y, 4, key_or_seed=0)
    assert np.concatenate([next(again)[1] for _ in range(3)]).tolist() == epochs[0].tolist()
    other = data.batches(x, y, 4, key_or_seed=1)
    assert np.concatenate([next(other)[1] for _ in range(3)]).tolist() != epochs[0].tolist()
    xb, yb = next(it)
    np.testing.assert_array_equal(xb[:, 0], 2 * yb)  # x and y stay paired


def test_batches_drop_remainder():
    x, y = _toy(10)
    it = data.batches(x, y, 4, key_or_seed=0)
    assert [len(next(it)[1]) for _ in range(5)] == [4, 4, 4, 4, 4]
    it = data.batches(x, y, 4, key_or_seed=0, drop_remainder=False)
    assert [len(next(it)[1]) for _ in range(6)] == [4, 4, 2, 4, 4, 2]
    with pytest.raises(ValueError, match="no batches"):
        next(data.batches(x, y, 11, key_or_seed=0))
    assert data.steps_per_epoch(10, 4) == 2
    assert data.steps_per_epoch(10, 4, drop_remainder=False) == 3


def test_batches_accept_jax_keys():
    jax = pytest.importorskip("jax")
    x, y = _toy(8)
    for key in (jax.random.PRNGKey(3), jax.random.key(3)):
        a = next(data.batches(x, y, 8, key_or_seed=key))[1]
        b = next(data.batches(x, y, 8, key_or_seed=key))[1]
        assert a.tolist() == b.tolist() and sorted(a.tolist()) == list(range(8))
    with pytest.raises(TypeError, match="key_or_seed"):
        next(data.batches(x, y, 2, key_or_seed=1.5))


def test_epoch_batches():
    x, y = _toy(10)
    got = list(data.epoch_batches(x, y, 4))
    assert [b[1].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = [b[1] for b in data.epoch_batches(x, y, 4, key_or_seed=(0, 1), drop_remainder=True)]
    assert [len(b) for b in shuffled] == [4, 4]
    again = [b[1] for b in data.epoch_batches(x, y, 4, key_or_seed=(0, 1), drop_remainder=True)]
    assert [b.tolist() for b in again] == [b.tolist() for b in shuffled]
