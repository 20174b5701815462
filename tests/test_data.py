"""Tests for experiments/data.py's readers and local files. Fast, no network (downloads are
tested in test_download.py); real data is read from $SGJAX_DATA_DIR or the default data
directory, and tests that need it are skipped when it is absent."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
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
def _isolated_cache_and_no_downloads(tmp_path_factory, monkeypatch):
    """Never write to the user's ~/.cache/sgjax from tests, and never download: the only
    mirror is a closed port on 127.0.0.1."""
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("sgjax-cache")))
    monkeypatch.setenv(data.DATA_URL_ENV, "http://127.0.0.1:9")


def _register_local(monkeypatch, root: Path, name: str) -> None:
    """Make the files now in ``root`` dataset ``name``'s registry (their sizes and hashes)."""
    files = tuple(
        data.RemoteFile(str(p.relative_to(root)), p.stat().st_size, data.sha256sum(p),
                        (f"https://mirror.invalid/{p.relative_to(root)}",))
        for p in sorted((root / name).iterdir()))
    monkeypatch.setitem(data.FILES, name, files)


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
    ds = data.load("mnist", download=False, train_limit=3, test_limit=3)
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


def test_readme_lists_every_file_with_its_size_and_hash():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for files in data.FILES.values():
        for f in files:
            rows = [line for line in readme.splitlines() if line.startswith(f"| `{f.path}` |")]
            assert len(rows) == 1 and f"| {f.size} | `{f.sha256}` |" in rows[0], f.path


def test_unknown_name():
    with pytest.raises(ValueError, match=r"'imagenet'.*mnist, cifar10"):
        data.load("imagenet")
    with pytest.raises(ValueError, match=r"'imagenet'.*mnist, cifar10, ptb"):
        data.fetch("imagenet")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mnist", "mnist/train-images-idx3-ubyte.gz"), ("cifar10", "cifar10/cifar-10-python.tar.gz")],
)
@pytest.mark.parametrize("download", [False, True])
def test_missing_dataset_message(name, expected, download, tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    error = data.DownloadError if download else data.DatasetNotFoundError
    with pytest.raises(error) as info:
        data.load(name, download=download, progress=False)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert msg.startswith(f"Dataset {name!r} not found: {tmp_path / expected} is missing")
    for part in (data.DATA_DIR_ENV, data.DATA_URL_ENV, *(f.urls[0] for f in data.FILES[name]),
                 f"put them in {(tmp_path / expected).parent}/"):
        assert part in msg, (part, msg)
    assert ("download=False" in msg) is not download
    assert "shared" not in msg and "tensorflow" not in msg


def test_default_location_is_per_user(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    default = tmp_path / ".cache" / "sgjax" / "data"
    assert data.default_data_dirs() == [default] and data.data_dir() == default
    with pytest.raises(data.DatasetNotFoundError, match=str(default / "mnist")):
        data.load("mnist", download=False)
    assert data.expected_label("cifar10") == "CIFAR-10"  # nothing local: the original
    _write_fake_mnist(default / "mnist")
    _register_local(monkeypatch, default, "mnist")
    assert data.load("mnist", download=False).num_train == 6


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_corrupt_local_file_is_never_used(damage, tmp_path, monkeypatch):
    _write_fake_mnist(tmp_path / "mnist")
    _register_local(monkeypatch, tmp_path, "mnist")
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:-40] if damage == "truncated" else raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(data.DatasetNotFoundError,
                       match=f"{bad} is corrupt or truncated.*download=False"):
        data.load("mnist", data_dir=tmp_path, download=False)
    with pytest.raises(data.DownloadError, match=r"Dataset 'mnist' is corrupt: .*127.0.0.1:9"):
        data.load("mnist", data_dir=tmp_path, progress=False)


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


def test_idx_roundtrip(tmp_path, monkeypatch):
    _write_fake_mnist(tmp_path / "mnist")
    _register_local(monkeypatch, tmp_path, "mnist")
    ds = data.load("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.y_test.tolist() == [0, 1, 2, 3]


def test_idx_truncated_gzip(tmp_path):
    _write_fake_mnist(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*corrupt or truncated"):
        data.read_mnist_dir(tmp_path)


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
        data.read_mnist_dir(tmp_path)


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
# Penn Treebank: character-level streams from the word files
# --------------------------------------------------------------------------------------------


def test_ptb_from_word_files(tmp_path, monkeypatch):
    from experiments import sequences

    with pytest.raises(data.DatasetNotFoundError, match=r"ptb/ptb.train.txt is missing"):
        sequences.load_ptb(tmp_path, download=False)
    (tmp_path / "ptb").mkdir()
    texts = {"train": " ab c \n\n b a\n", "valid": " a c\n", "test": "b\n"}
    for split, text in texts.items():
        (tmp_path / "ptb" / f"ptb.{split}.txt").write_text(text)
    _register_local(monkeypatch, tmp_path, "ptb")
    ptb = sequences.load_ptb(tmp_path, download=False)
    assert ptb.vocab == ("<eos>", "_", "a", "b", "c") and ptb.source == str(tmp_path / "ptb")
    # "ab c" -> a b _ c <eos>; the empty line is skipped; "b a" -> b _ a <eos>
    assert ptb.train.tolist() == [2, 3, 1, 4, 0, 3, 1, 2, 0]
    assert ptb.valid.tolist() == [2, 1, 4, 0] and ptb.test.tolist() == [3, 0]
    assert sequences.read_ptb(tmp_path / "ptb", limit=2).train.tolist() == [2, 3]
    (tmp_path / "ptb" / "ptb.test.txt").write_text("z\n")
    with pytest.raises(ValueError, match="not in train"):
        sequences.read_ptb(tmp_path / "ptb")


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


def test_printed_paths_name_no_machine_directory(tmp_path, monkeypatch):
    """A Dataset's repr and the download line show where data is relative to the data
    directory or home, never an absolute path (printed outputs get committed)."""
    monkeypatch.setenv("SGJAX_DATA_DIR", str(tmp_path / "d"))
    assert data.shown_path(tmp_path / "d" / "mnist") == "$SGJAX_DATA_DIR/mnist"
    assert data.shown_path(tmp_path / "d") == "$SGJAX_DATA_DIR"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.shown_path(tmp_path / "home" / "x" / "y") == "~/x/y"
    assert data.shown_path("/opt/elsewhere/data/mnist") == "data/mnist"
