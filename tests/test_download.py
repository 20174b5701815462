"""Downloads on first use (experiments.data.fetch), for real over HTTP, without internet: a
server in a thread on 127.0.0.1 serves small fixture files and, where they exist, the real
files of $SGJAX_DATA_DIR; $SGJAX_DATA_URL points the downloader at it. Every test runs with
sockets limited to 127.0.0.1 (connections and name lookups for other hosts fail)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import socket
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from experiments import data, sequences

# Read before any fixture changes the environment: the real files, when this machine has them.
REAL_DIR = Path(os.environ[data.DATA_DIR_ENV]) if os.environ.get(data.DATA_DIR_ENV) else None
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _real(subdir: str) -> Path:
    if REAL_DIR is None or not (REAL_DIR / subdir).is_dir():
        pytest.skip(f"no real {subdir}/ files: set {data.DATA_DIR_ENV} to a data directory")
    return REAL_DIR


@pytest.fixture(autouse=True)
def _only_localhost(monkeypatch, tmp_path):
    """No test here may contact anything but 127.0.0.1."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL_HOSTS:
            raise OSError(f"test tried to connect to {address}")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise socket.gaierror(f"test tried to resolve {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``root``; ``requests`` lists the paths asked for.
    ``$SGJAX_DATA_URL`` points at it."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def do_HEAD(self):
            requests.append(f"HEAD {self.path}")
            super().do_HEAD()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    monkeypatch.setenv(data.DATA_URL_ENV, url)
    yield SimpleNamespace(root=root, url=url, requests=requests)
    httpd.shutdown()
    httpd.server_close()


def _publish(monkeypatch, server, name: str, files: dict[str, bytes]) -> None:
    """Serve ``files`` (path relative to the data directory: bytes) and make them dataset
    ``name``'s registry, with their true sizes and SHA-256s. The registry's own URLs point
    at a host no test may reach: only ``$SGJAX_DATA_URL`` can be used."""
    entries = []
    for rel, payload in files.items():
        (server.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (server.root / rel).write_bytes(payload)
        entries.append(data.RemoteFile(rel, len(payload), _sha256(payload),
                                       (f"https://mirror.invalid/{rel}",)))
    monkeypatch.setitem(data.FILES, name, tuple(entries))


def _sha256(payload: bytes) -> str:
    import hashlib

    return hashlib.sha256(payload).hexdigest()


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def _fake_mnist(n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        out[f"mnist/{split}-images-idx3-ubyte.gz"] = _idx(rng.integers(0, 256, (n, 28, 28)))
        out[f"mnist/{split}-labels-idx1-ubyte.gz"] = _idx(np.arange(n) % 10)
    return out


@pytest.fixture
def fake_mnist(server, monkeypatch) -> dict[str, bytes]:
    files = _fake_mnist()
    _publish(monkeypatch, server, "mnist", files)
    return files


# --------------------------------------------------------------------------------------------
# First use, second use, corrupt files
# --------------------------------------------------------------------------------------------


def test_first_use_downloads_and_verifies_then_makes_no_request(server, fake_mnist):
    ds = data.load("mnist", progress=False)
    assert sorted(server.requests) == sorted(f"/{rel}" for rel in fake_mnist)
    root = data.data_dir()
    for rel, payload in fake_mnist.items():
        assert (root / rel).read_bytes() == payload
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        Path(rel).name for rel in fake_mnist)  # no temporary files left
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5] and ds.source == str(root / "mnist")

    again = data.load("mnist", progress=False)
    assert len(server.requests) == 4
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    data.fetch("mnist", download=False)
    assert len(server.requests) == 4


@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "empty"])
def test_corrupt_file_is_refetched(server, fake_mnist, damage):
    data.load("mnist", progress=False)
    rel = "mnist/train-images-idx3-ubyte.gz"
    path = data.data_dir() / rel
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2],
                      "one byte changed": raw[:-1] + bytes([raw[-1] ^ 1]),
                      "empty": b""}[damage])
    with pytest.raises(data.DatasetNotFoundError, match="corrupt or truncated"):
        data.fetch("mnist", download=False)  # detected by size or hash, never used
    data.load("mnist", progress=False)
    assert server.requests[4:] == [f"/{rel}"]
    assert path.read_bytes() == fake_mnist[rel]


def test_404_is_one_clear_error(server, fake_mnist):
    (server.root / "mnist/t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DownloadError) as info:
        data.load("mnist", progress=False)
    msg = str(info.value)
    url = f"{server.url}/mnist/t10k-labels-idx1-ubyte.gz"
    assert msg.startswith("Dataset 'mnist' not found: ")
    assert f"{url}: HTTP 404" in msg
    folder = data.data_dir() / "mnist"
    assert f"put them in {folder}/" in msg and "https://mirror.invalid/mnist/" in msg
    assert data.DATA_DIR_ENV in msg and data.DATA_URL_ENV in msg
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists()


def test_wrong_hash_is_one_clear_error(server, fake_mnist, monkeypatch):
    rel = "mnist/train-labels-idx1-ubyte.gz"
    (server.root / rel).write_bytes(_idx(np.arange(6) % 3))  # another file
    with pytest.raises(data.DownloadError) as info:
        data.load("mnist", progress=False)
    want = next(f.sha256 for f in data.FILES["mnist"] if f.path == rel)
    assert f"{server.url}/{rel}: the downloaded file's SHA-256 is not {want}" in str(info.value)
    folder = data.data_dir() / "mnist"
    assert not (folder / "train-labels-idx1-ubyte.gz").exists()
    assert [p.name for p in folder.iterdir()] == ["train-images-idx3-ubyte.gz"]  # no temp file


def test_mirrors_are_tried_in_order_and_each_failure_is_named(server, fake_mnist, monkeypatch):
    monkeypatch.delenv(data.DATA_URL_ENV)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    entries = tuple(data.RemoteFile(f.path, f.size, f.sha256,
                                    (f"{dead}/{f.path}", f"{server.url}/gone/{f.path}",
                                     f"{server.url}/{f.path}"))
                    for f in data.FILES["mnist"])
    monkeypatch.setitem(data.FILES, "mnist", entries)
    assert data.load("mnist", progress=False).num_train == 6
    assert server.requests[:2] == ["/gone/mnist/train-images-idx3-ubyte.gz",
                                   "/mnist/train-images-idx3-ubyte.gz"]

    (data.data_dir() / "mnist/t10k-images-idx3-ubyte.gz").unlink()
    (server.root / "mnist/t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DownloadError) as info:
        data.load("mnist", progress=False)
    msg = str(info.value)
    assert f"{dead}/mnist/t10k-images-idx3-ubyte.gz: cannot connect" in msg
    assert f"{server.url}/gone/mnist/t10k-images-idx3-ubyte.gz: HTTP 404" in msg
    assert f"{server.url}/mnist/t10k-images-idx3-ubyte.gz: HTTP 404" in msg


def test_download_false_never_makes_a_request(server, fake_mnist):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("mnist", download=False)
    assert not isinstance(info.value, data.DownloadError)
    assert "download=False" in str(info.value) and "train-images-idx3-ubyte.gz" in str(info.value)
    assert server.requests == []


def test_unwritable_data_directory_is_one_clear_error(server, fake_mnist, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(blocker))
    with pytest.raises(data.DownloadError, match=r"cannot write .*a-file"):
        data.load("mnist", progress=False)


def test_no_test_here_can_reach_another_host():
    with pytest.raises(OSError, match="tried to"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    with pytest.raises(OSError, match="tried to resolve"):
        socket.getaddrinfo("example.com", 443)


# --------------------------------------------------------------------------------------------
# The real files (when this machine has them): served, downloaded, checked, read
# --------------------------------------------------------------------------------------------


def test_real_files_download_and_read_the_same(server, monkeypatch):
    real = _real("mnist")
    for sub in ("mnist", "ptb"):
        if (real / sub).is_dir():
            (server.root / sub).symlink_to(real / sub, target_is_directory=True)
    ds = data.load("mnist", train_limit=100, test_limit=50, progress=False)
    assert sorted(server.requests) == sorted(f"/{f.path}" for f in data.FILES["mnist"])
    local = data.load("mnist", data_dir=real, train_limit=100, test_limit=50, download=False)
    np.testing.assert_array_equal(ds.x_train, local.x_train)
    np.testing.assert_array_equal(ds.y_test, local.y_test)

    if not (real / "ptb").is_dir():
        return
    n = len(server.requests)
    ptb = sequences.load_ptb()
    assert sorted(server.requests[n:]) == sorted(f"/{f.path}" for f in data.FILES["ptb"])
    assert ptb.vocab_size == 50 and ptb.train.shape == (5017482,)
    sequences.load_ptb(limit=10)
    assert len(server.requests) == n + 3


def test_local_real_directory_is_used_without_network(server, monkeypatch):
    real = _real("mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(real))
    assert data.load("mnist", train_limit=10, test_limit=10).label == "MNIST"
    if (real / "ptb").is_dir():
        sequences.load_ptb(limit=10)
    assert server.requests == []


def test_ptb_symbols_equal_mikolovs_character_files():
    """The char-level streams derived from the word files are those of Mikolov's
    ptb.char.*.txt (what the loader used to read), so results on PTB do not change."""
    real = _real("ptb")
    chars = {s: real / "ptb" / f"ptb.char.{s}.txt" for s in sequences.PTB_FILES}
    if not all(p.is_file() for p in chars.values()):
        pytest.skip("no ptb.char.*.txt next to the word files")
    ptb = sequences.load_ptb(real, download=False)
    symbols = {}
    for split, path in chars.items():
        symbols[split] = [c for line in path.read_text().splitlines() if line.split()
                          for c in [*line.split(), sequences.EOS]]
    vocab = tuple(sorted(set(symbols["train"])))
    assert ptb.vocab == vocab
    for split, seq in symbols.items():
        index = {c: i for i, c in enumerate(vocab)}
        np.testing.assert_array_equal(getattr(ptb, split), [index[c] for c in seq])


# --------------------------------------------------------------------------------------------
# CIFAR-10: the original archive (a tiny one in its format)
# --------------------------------------------------------------------------------------------


def _cifar_pixels(n: int, offset: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images whose every pixel encodes (image, row, col, channel)."""
    i, r, c, ch = np.meshgrid(np.arange(n) + offset, np.arange(32), np.arange(32),
                              np.arange(3), indexing="ij")
    return ((i * 7 + r * 3 + c * 5 + ch * 11) % 256).astype(np.uint8)


def _batch_pickle(images: np.ndarray, labels: list[int], module: str | None = None) -> bytes:
    # As in the real archive: a dict with "data" (N, 3072) as R, G, B planes, and "labels".
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    raw = pickle.dumps({"batch_label": "fake", "labels": labels, "data": rows,
                        "filenames": [f"{k}.png" for k in range(len(labels))]}, protocol=2)
    if module is not None:  # the numpy module name the Python 2 pickles of 2009 use
        raw = raw.replace(b"numpy._core.multiarray", module.encode())
    return raw


def _cifar_python_tar(per_batch: int = 2, n_test: int = 3, extra=(), drop=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        batches = [(f"data_batch_{b}", per_batch * (b - 1), per_batch) for b in range(1, 6)]
        for name, offset, n in [*batches, ("test_batch", 1000, n_test)]:
            if name in drop:
                continue
            payload = _batch_pickle(_cifar_pixels(n, offset), [(offset + k) % 10
                                                               for k in range(n)],
                                    module="numpy.core.multiarray")
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        for name, payload in extra:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_original_cifar10_is_downloaded_and_read(server, monkeypatch):
    _publish(monkeypatch, server, "cifar10", {data.CIFAR_PYTHON_PATH: _cifar_python_tar()})
    assert data.expected_label("cifar10") == "CIFAR-10"
    ds = data.load("cifar10", progress=False)
    assert server.requests == [f"/{data.CIFAR_PYTHON_PATH}"]
    assert ds.label == "CIFAR-10" and ds.source == str(data.data_dir() / "cifar10")
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_train, _cifar_pixels(10, 0) / np.float32(255))
    np.testing.assert_array_equal(ds.x_test, _cifar_pixels(3, 1000) / np.float32(255))
    assert ds.y_train.tolist() == [k % 10 for k in range(10)] and ds.y_test.tolist() == [0, 1, 2]
    data.load("cifar10", train_limit=2)
    assert len(server.requests) == 1


def test_original_cifar10_is_preferred_to_the_jpeg_substitute(server, monkeypatch):
    _publish(monkeypatch, server, "cifar10", {data.CIFAR_PYTHON_PATH: _cifar_python_tar()})
    jpeg = data.data_dir() / data.CIFAR_SUBDIR / "substitute.tar.gz"
    jpeg.parent.mkdir(parents=True)
    jpeg.write_bytes(b"never read")
    assert data.expected_label("cifar10") == data.CIFAR10_JPEG_LABEL  # only it is local
    (data.data_dir() / "cifar10").mkdir()
    (data.data_dir() / data.CIFAR_PYTHON_PATH).write_bytes(b"a partial download")
    assert data.expected_label("cifar10") == "CIFAR-10"
    assert data.load("cifar10", progress=False).label == "CIFAR-10"  # re-fetched, not the JPEGs
    assert server.requests == [f"/{data.CIFAR_PYTHON_PATH}"]


@pytest.mark.parametrize(
    ("tar_kwargs", "match"),
    [
        ({"drop": ("data_batch_3",)}, "no member 'data_batch_3'"),
        ({"extra": [("cifar-10-batches-py/batches.meta", pickle.dumps({"label_names": []}))]},
         None),
    ],
)
def test_cifar10_python_reader_checks_members(tmp_path, tar_kwargs, match):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(_cifar_python_tar(**tar_kwargs))
    if match is None:
        x_train, y_train, x_test, y_test = data.read_cifar10_python_tar(path)
        assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
        assert x_test.shape == (3, 32, 32, 3) and y_test.shape == (3,)
    else:
        with pytest.raises(data.CorruptDatasetError, match=match):
            data.read_cifar10_python_tar(path)


def test_cifar10_python_reader_unpickles_nothing_but_arrays(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        payload = pickle.dumps({"data": Evil(), "labels": []}, protocol=2)
        for name in [*data.CIFAR_PYTHON_BATCHES["train"], "test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(data.CorruptDatasetError, match=r"data_batch_1.*unexpected global"):
        data.read_cifar10_python_tar(path)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(_cifar_python_tar()[:-200])
    with pytest.raises(data.CorruptDatasetError, match="truncated.tar.gz"):
        data.read_cifar10_python_tar(truncated)
