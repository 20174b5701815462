"""Dataset loading for the sgjax experiments: MNIST and CIFAR-10, as plain numpy arrays.

Typical use::

    from experiments import data

    ds = data.load("mnist")                      # or "cifar10"
    ds.x_train.shape, ds.y_train.shape           # (60000, 28, 28, 1) float32, (60000,) int32
    flat = ds.flattened()                        # x_* reshaped to (N, 784) for MLPs
    it = data.batches(ds.x_train, ds.y_train, 128, key_or_seed=0)
    xb, yb = next(it)                            # (128, 28, 28, 1), (128,)

Where the data comes from (``source="auto"``):

1. A local directory: the ``data_dir`` argument; else the ``SGJAX_DATA_DIR``
   environment variable; else the user location ``~/.cache/sgjax/data``
   (:func:`default_data_dirs`). It must hold ``mnist/train-images-idx3-ubyte.gz`` (and the
   three other LeCun IDX files) or
   ``cifar10-jpeg/<one .tar/.tar.gz/.tgz of train/<class>/*.jpg, test/<class>/*.jpg>``.
   These are read with the numpy/Pillow readers below, never with tfds. (The repository's
   CI points ``SGJAX_DATA_DIR`` at its sibling ``../shared/data`` when that exists.)
2. Otherwise, if TensorFlow is installed, ``tensorflow_datasets`` (downloads and prepares
   into its own cache, ``~/tensorflow_datasets`` by default).
3. Otherwise :class:`DatasetNotFoundError` explains what was looked for and how to fix it.

There is never a fallback to random or synthetic data.

The CIFAR-10 JPEG tar is decoded once (about 5 s for 60000 images) into an uncompressed
``.npz`` cache under ``$SGJAX_CACHE_DIR`` (default ``~/.cache/sgjax``), keyed by the tar's
resolved path, size and mtime. The data directory itself is treated as read-only.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
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
    "CACHE_DIR_ENV",
    "VALID_NAMES",
    "CorruptDatasetError",
    "Dataset",
    "DatasetNotFoundError",
    "batches",
    "cache_dir",
    "default_data_dirs",
    "epoch_batches",
    "expected_label",
    "load",
    "read_cifar10_jpeg_tar",
    "read_idx",
    "read_mnist_dir",
    "steps_per_epoch",
]

DATA_DIR_ENV = "SGJAX_DATA_DIR"
CACHE_DIR_ENV = "SGJAX_CACHE_DIR"
VALID_NAMES = ("mnist", "cifar10")
VALID_SOURCES = ("auto", "local", "tfds")

#: Standard CIFAR-10 label order (label i is CIFAR10_CLASSES[i]), as in the original batches
#: and in tfds.
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
CIFAR_SUBDIR = "cifar10-jpeg"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1

_LABELS_LOCAL = {"mnist": "MNIST", "cifar10": "CIFAR-10 (JPEG substitute)"}
_LABELS_TFDS = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
_IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of the dataset was found and tfds could not be used."""


class CorruptDatasetError(ValueError):
    """A dataset file that is truncated, corrupt or not in the expected format (the
    message names the file)."""


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
        source: ``"tfds"`` or the local directory the files were read from.
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
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    train_limit: int | None = None,
    test_limit: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Load ``name`` (``"mnist"`` or ``"cifar10"``) as a :class:`Dataset`.

    Args:
        name: ``"mnist"`` (60000/10000 images of shape (28, 28, 1)) or ``"cifar10"``
            (50000/10000 images of shape (32, 32, 3)). Case-insensitive.
        data_dir: local directory holding ``mnist/`` or ``cifar10-jpeg/``. When given, only
            this directory is used (no tfds fallback). When ``None``, ``$SGJAX_DATA_DIR`` or a
            default ``shared/data`` next to the repository is tried (see module docstring).
        source: ``"auto"`` (local files, else tfds if TensorFlow is installed), ``"local"``
            (local files only) or ``"tfds"`` (tensorflow_datasets only).
        train_limit: keep only the FIRST ``train_limit`` training examples (deterministic).
        test_limit: keep only the FIRST ``test_limit`` test examples.
        progress: show a tqdm bar when the CIFAR-10 JPEG tar has to be decoded.

    Returns:
        A :class:`Dataset` with float32 NHWC images in [0, 1] and int32 labels.

    Raises:
        ValueError: unknown ``name`` or ``source``, negative limits; CorruptDatasetError (a
            ValueError) for corrupt files.
        DatasetNotFoundError: the data could not be found locally nor obtained from tfds.
        ImportError: ``source="tfds"`` but TensorFlow is not installed.
    """
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key not in VALID_NAMES:
        raise ValueError(
            f"unknown dataset name {name!r}; valid names are: {', '.join(VALID_NAMES)}"
        )
    if source not in VALID_SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources are: {VALID_SOURCES}")
    for arg, val in (("train_limit", train_limit), ("test_limit", test_limit)):
        if val is not None and (
            isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0
        ):
            raise ValueError(f"{arg} must be a non-negative integer or None, got {val!r}")

    if source in ("auto", "local"):
        dirs, how = _candidate_dirs(data_dir)
        for d in dirs:
            found = _find_local(key, d)
            if found is not None:
                return _load_local(key, found, train_limit, test_limit, progress)
        if source == "local" or data_dir is not None or not _tensorflow_available():
            raise DatasetNotFoundError(_not_found_message(key, dirs, how, source))
    return _load_tfds(key, train_limit, test_limit)


# --------------------------------------------------------------------------------------------
# Locating local files
# --------------------------------------------------------------------------------------------


MNIST_URLS = tuple(f"https://storage.googleapis.com/cvdf-datasets/mnist/{f}"
                   for f in MNIST_FILES.values())
"""Where the four MNIST IDX files can be downloaded (the mirror tfds uses)."""


def default_data_dirs() -> list[Path]:
    """The local data directory used when neither ``data_dir`` nor ``$SGJAX_DATA_DIR`` is
    given: ``~/.cache/sgjax/data`` (a user location, never one tied to a machine)."""
    return [Path.home() / ".cache" / "sgjax" / "data"]


def expected_label(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The ``label`` :func:`load` would give ``name`` (e.g. ``"CIFAR-10 (JPEG substitute)"``
    when the local JPEG tar is what it finds), found by looking for the files without
    reading them."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in VALID_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; valid names are: "
                         f"{', '.join(VALID_NAMES)}")
    dirs, _ = _candidate_dirs(data_dir)
    if any(_find_local(key, d) is not None for d in dirs):
        return _LABELS_LOCAL[key]
    return _LABELS_TFDS[key]


def _candidate_dirs(data_dir: str | os.PathLike[str] | None) -> tuple[list[Path], str]:
    """The directories to search and a phrase saying where they came from."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()], "the data_dir argument"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [Path(env).expanduser()], f"${DATA_DIR_ENV}"
    return default_data_dirs(), f"the default location (${DATA_DIR_ENV} is not set)"


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


def _find_cifar_tar(d: Path) -> Path | None:
    """The single CIFAR-10 JPEG tar in ``d/cifar10-jpeg/`` (or ``d`` itself if so named)."""
    bases = (d / CIFAR_SUBDIR, d) if d.name == CIFAR_SUBDIR else (d / CIFAR_SUBDIR,)
    for base in bases:
        if not base.is_dir():
            continue
        tars = sorted(p for p in base.iterdir() if p.is_file() and p.name.endswith(_TAR_SUFFIXES))
        if len(tars) > 1:
            raise CorruptDatasetError(
                f"several tar files in {base}, cannot tell which is CIFAR-10: "
                f"{[t.name for t in tars]}"
            )
        if tars:
            return tars[0]
    return None


def _find_local(name: str, d: Path) -> Any:
    if name == "mnist":
        return _find_mnist_files(d)
    return _find_cifar_tar(d)


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _not_found_message(name: str, dirs: list[Path], how: str, source: str) -> str:
    if name == "mnist":
        wanted = ", ".join(MNIST_FILES.values())
        layout = f"{MNIST_SUBDIR}/{MNIST_FILES['x_train']} (and the other three IDX files)"
        looked = [str(d / MNIST_SUBDIR) for d in dirs]
    else:
        wanted = "one CIFAR-10 JPEG tar (*.tar, *.tar.gz or *.tgz)"
        layout = f"{CIFAR_SUBDIR}/<tar of train/<class>/*.jpg and test/<class>/*.jpg>"
        looked = [str(d / CIFAR_SUBDIR) for d in dirs]
    if source == "local":
        why_not_tfds = "source='local' was requested, so tensorflow_datasets was not tried"
    elif how == "the data_dir argument":
        why_not_tfds = "an explicit data_dir was given, so tensorflow_datasets was not tried"
    else:
        why_not_tfds = (
            "tensorflow is not installed, so tensorflow_datasets cannot download/prepare it"
        )
    if name == "mnist":
        obtain = (f"download {', '.join(MNIST_URLS)} into <dir>/{MNIST_SUBDIR}/ (or "
                  "http://yann.lecun.com/exdb/mnist/)")
    else:
        obtain = (f"place a tar of train/<class>/*.jpg and test/<class>/*.jpg (class folders "
                  f"named {', '.join(CIFAR10_CLASSES)}) in <dir>/{CIFAR_SUBDIR}/; the original "
                  "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz is read through "
                  "tensorflow_datasets (option 2)")
    return (
        f"Dataset {name!r} not found. Looked for {wanted} in {' and '.join(looked)} "
        f"(directories from {how}); {why_not_tfds}.\n"
        f"Fix it in one of three ways:\n"
        f"  1. put the files in a directory <dir> and export {DATA_DIR_ENV}=<dir> (or use "
        f"{default_data_dirs()[0]}): {layout}; to obtain them, {obtain};\n"
        f"  2. pip install tensorflow, so tensorflow_datasets can download and prepare "
        f"{name!r} (needs network access);\n"
        f"  3. pass data_dir=/path/to/data to load()."
    )


def _load_local(
    name: str, found: Any, train_limit: int | None, test_limit: int | None, progress: bool
) -> Dataset:
    if name == "mnist":
        arrays = read_mnist_dir(found)
        src = str(found["x_train"].parent)
    else:
        arrays = read_cifar10_jpeg_tar(found, progress=progress)
        src = str(found.parent)
    return _make_dataset(name, _LABELS_LOCAL[name], src, *arrays, train_limit, test_limit)


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
# tensorflow_datasets
# --------------------------------------------------------------------------------------------


def _load_tfds(name: str, train_limit: int | None, test_limit: int | None) -> Dataset:
    if not _tensorflow_available():
        raise ImportError(
            f"source='tfds' needs TensorFlow to prepare {name!r}: pip install tensorflow "
            f"(or use local files via ${DATA_DIR_ENV} / data_dir)"
        )
    import tensorflow_datasets as tfds

    def get(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        spec = split if limit is None else f"{split}[:{limit}]"
        x, y = tfds.as_numpy(tfds.load(name, split=spec, batch_size=-1, as_supervised=True))
        return np.asarray(x), np.asarray(y)

    x_train, y_train = get("train", train_limit)
    x_test, y_test = get("test", test_limit)
    return _make_dataset(
        name, _LABELS_TFDS[name], "tfds", x_train, y_train, x_test, y_test, None, None
    )


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
