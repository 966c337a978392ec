"""Registry of image data sets, all read offline from their usual on-disk formats, labelled or not.

Every data set is an :class:`ImageDataset`: ``ds[i]`` is ``(RGB PIL image, label)`` (label -1: unlabelled),
``ds.targets`` holds all labels without decoding images, and ``ds.describe(i)`` names the sample in error messages.
``build_dataset(cfg, split)`` picks one by ``cfg.name``. Array-backed sets (digits, Fashion-MNIST,
CIFAR, STL-10, synthetic) are decoded once per process and shared by their splits. ``folder`` (any folder of
images) and ``filelist`` (a text or CSV list of paths) need no labels and hold out a seeded split when they have
none of their own; ``data.labels=none`` makes any data set unlabelled.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import multiprocessing
import os
import pickle
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from selfsup.config import ConfigError, DataConfig, check_choice
from selfsup.data.decode import load_rgb, open_image, oriented_size
from selfsup.errors import ImageLoadError  # noqa: F401  (re-exported)
from selfsup.registry import DATASETS


class DataFormatError(RuntimeError):
    """A data-set file whose contents do not match its format (truncated, wrong header, ...)."""


class CorruptImageWarning(UserWarning):
    """An unreadable image was skipped (``data.skip_corrupt=true``)."""


class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``ds[i] -> (PIL RGB image, int label)``; label -1 marks unlabelled images."""

    name: str = ""
    split: str = ""
    classes: list[str]
    targets: np.ndarray  # int64 labels of all images, cheap (no decoding)
    skipped: int = 0  # distinct unreadable images skipped in this process (skip_corrupt)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def open(self, i: int) -> tuple[Image.Image, int]:
        """``(image, label)`` where the image may be opened lazily (header read, pixels not yet decoded), for a
        decoder that crops at reduced size (:mod:`selfsup.data.decode`); in-memory data sets return ``self[i]``."""
        return self[i]

    def describe(self, i: int) -> str:
        return f"{self.name}/{self.split}[{i}]"

    def keep_first(self, n: int) -> None:
        """Keep only the first ``n`` images (in place)."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} with {n} images")
        return i % n

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}/{self.split}: {len(self)} images, "
                f"{self.num_classes} classes)")


def _to_rgb(array: np.ndarray) -> Image.Image:
    """uint8 HxW (grey) or HxWx3 array -> RGB PIL image."""
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        return Image.fromarray(array).convert("RGB")
    return Image.fromarray(array)


class ArrayDataset(ImageDataset):
    """Images held as uint8 arrays (in memory or memory-mapped), one or more concatenated parts."""

    def __init__(self, name: str, split: str, parts: Sequence[Any], targets: np.ndarray,
                 classes: list[str]) -> None:
        self.name, self.split, self.classes = name, split, list(classes)
        self.parts = list(parts)  # each indexable: part[j] -> HxW or HxWx3 uint8 array
        self.targets = np.asarray(targets, dtype=np.int64)
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])
        if self._offsets[-1] != len(self.targets):
            raise DataFormatError(f"{name}/{split}: {self._offsets[-1]} images but "
                                  f"{len(self.targets)} labels")

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return _to_rgb(self.parts[part][i - self._offsets[part]]), int(self.targets[i])

    def keep_first(self, n: int) -> None:
        self.targets = self.targets[:n]


# ---------------------------------------------------------------------------------------------
# registry

DatasetBuilder = Callable[[DataConfig, str], ImageDataset]

# decoded arrays shared by the builds of one process, keyed by file path (+ size and mtime)
_CACHE: dict[tuple[Any, ...], Any] = {}

LABEL_MODES = ("auto", "none", "folders")  # data.labels


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator: make ``data.name=<name>`` build a data set with ``builder(cfg, split)``."""
    return DATASETS.register(name)


def build_dataset(cfg: DataConfig, split: str) -> ImageDataset:
    """The ``split`` (e.g. ``cfg.train_split``) of data set ``cfg.name``; ``cfg.subset`` trims training."""
    if cfg.name.startswith("python:") and cfg.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.name!r} was a torch Dataset given to selfsup.train() in another Python "
                          "process; pass it again there (dataset=...), or register it with @register_dataset in a "
                          "module named under imports")
    builder = DATASETS[cfg.name]  # an unknown name: one error with the nearest name
    check_choice("data.labels", cfg.labels, LABEL_MODES)
    if cfg.labels == "folders" and cfg.name != "folder":
        raise ConfigError(f"data.labels=folders reads class sub-folders of data.name=folder; {cfg.name!r} has labels "
                          "of its own: use data.labels=auto (them) or none (no labels)")
    dataset = builder(cfg, split)
    if cfg.labels == "none":
        dataset.targets, dataset.classes = np.full(len(dataset.targets), -1, dtype=np.int64), []
    if cfg.subset is not None and split == cfg.train_split:
        if cfg.subset <= 0:
            raise ConfigError(f"data.subset must be a positive number of images or null, got {cfg.subset}")
        dataset.keep_first(cfg.subset)
    return dataset


def _check_split(cfg: DataConfig, split: str, valid: Sequence[str]) -> None:
    key = ("data.train_split" if split == cfg.train_split
           else "data.val_split" if split == cfg.val_split else "split")
    try:
        check_choice(key, split, valid)
    except ConfigError as error:
        raise ConfigError(f"{error} (splits of data set {cfg.name!r})") from None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _find_folder(root: Path, sub: str, marker: str) -> Path | None:
    """``root/sub`` or ``root`` itself, whichever holds ``marker``."""
    for folder in (root / sub, root):
        if (folder / marker).is_file():
            return folder
    return None


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if "digits" not in _CACHE:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        labels = bunch.target.astype(np.int64)
        train, val = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels)
        _CACHE["digits"] = (images[train], labels[train], images[val], labels[val])
    return _CACHE["digits"]


@register_dataset("digits")
def _build_digits(cfg: DataConfig, split: str) -> ImageDataset:
    _check_split(cfg, split, ["train", "val", "test"])
    train_x, train_y, val_x, val_y = _digits()
    x, y = (train_x, train_y) if split == "train" else (val_x, val_y)
    return ArrayDataset("digits", split, [x], y, [str(d) for d in range(10)])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files (gzip-compressed or plain)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


GZIP_MAX_RATIO = 1032  # deflate expands at most ~1032:1, so a .gz file of n bytes holds at most this many times n
_READ_CHUNK = 1 << 20


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an idx file of uint8 values (``.gz`` or plain) with ``ndim`` dimensions.

    Memory stays within what the header implies and what the file can hold: the shape is checked against the file
    size before the data is read, and a gzip stream is decompressed in chunks that stop as soon as it yields more
    than the header announced."""
    path = Path(path)
    compressed = path.suffix == ".gz"
    size = path.stat().st_size
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            # header: two zero bytes, type code 0x08 (uint8), number of dimensions, then big-endian int32 sizes
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
                raise DataFormatError(f"{path} is not a uint8 idx file with {ndim} dimension(s) "
                                      f"(magic bytes {magic.hex() or 'missing'}, expected 000008{ndim:02x})")
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DataFormatError(f"{path} is truncated: its header is incomplete")
            shape = tuple(int(n) for n in np.frombuffer(sizes, dtype=">u4"))
            count, header = math.prod(shape), 4 + 4 * ndim
            if not compressed and header + count != size:
                raise DataFormatError(f"{path} holds {size} bytes but its header {shape} implies {header + count} "
                                      "(truncated or corrupt file)")
            if compressed and count > GZIP_MAX_RATIO * size:
                raise DataFormatError(f"{path}: its header {shape} implies {count} bytes of images, more than a "
                                      f"gzip file of {size} bytes can hold (corrupt header)")
            raw = _read_at_most(f, count + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataFormatError(f"{path} is not a readable gzip file ({error}); "
                              "re-install or replace it") from None
    if len(raw) > count:
        raise DataFormatError(f"{path} holds more data than its header {shape} implies ({count} bytes; "
                              "corrupt file or a decompression bomb)")
    if len(raw) < count:
        raise DataFormatError(f"{path} holds {header + len(raw)} bytes but its header {shape} implies "
                              f"{header + count} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _read_at_most(f: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``f``, read in chunks (a single ``read(n)`` may reserve n bytes up front)."""
    chunks, total = [], 0
    while total < limit:
        chunk = f.read(min(_READ_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    stems = _FASHION_FILES[part]
    files: list[Path] = []
    for stem in stems:
        found = next((f for folder in (root, root / "FashionMNIST" / "raw")
                      if (f := _find_idx(folder, stem)) is not None), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}.gz not found in {root}: install the data set with "
                f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) or set "
                "data.path=<folder with the four idx .gz files>")
        files.append(found)
    key = ("fashion-mnist", *_file_key(files[0]), *_file_key(files[1]))
    if key not in _CACHE:
        images, labels = read_idx(files[0], 3), read_idx(files[1], 1)
        if len(images) != len(labels):
            raise DataFormatError(f"{files[0]} has {len(images)} images but "
                                  f"{files[1]} has {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataFormatError(f"{files[1]} has label {labels.max()}, expected 0..9")
        _CACHE[key] = (images, labels.astype(np.int64))
    return _CACHE[key]


@register_dataset("fashion-mnist")
def _build_fashion_mnist(cfg: DataConfig, split: str) -> ImageDataset:
    _check_split(cfg, split, ["train", "val", "test"])
    part = "train" if split == "train" else "test"
    images, labels = _fashion_mnist(Path(cfg.path or FASHION_MNIST_DIR), part)
    return ArrayDataset("fashion-mnist", split, [images], labels, FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the python pickle batches torchvision downloads

_CIFAR = {  # name -> folder, train files, test files, meta file, label key, class-name key, archive
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names",
                 "cifar-100-python.tar.gz"),
}


class _CodeInPickle(pickle.UnpicklingError):
    """A pickle that names a Python object outside the CIFAR format (a function to call, a class to build)."""


class _PickledArray:
    """Stands in for ``numpy.ndarray`` while a CIFAR pickle is read. numpy writes an array as
    ``_reconstruct(ndarray, (0,), b'b')`` followed by BUILD with ``(version, shape, dtype, fortran, data)``;
    the state becomes an array only through :func:`_array_from_bytes`."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an array state that numpy does not write")
        shape, dtype, fortran, data = state[-4:]
        self.array = _array_from_bytes(data, dtype, shape, "F" if fortran else "C")


class _PickledDtype:
    """Stands in for ``numpy.dtype(code, align, copy)`` and its BUILD state (byte order; no fields, no
    sub-arrays): only plain booleans, integers and floats, never Python objects."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(code, (str, bytes)):
            raise pickle.UnpicklingError(f"dtype code {code!r:.40} is not a string")
        self.code = code.decode("latin1") if isinstance(code, bytes) else code
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, sub-array, names, fields, item size, alignment, flags[, metadata])
        if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "=", "|")
                or any(part is not None for part in state[2:5])):
            raise pickle.UnpicklingError("only plain numeric dtypes belong in a CIFAR batch")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.code)
        if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"dtype {self.code!r:.40} is not a plain number type")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _array_from_bytes(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if isinstance(data, str):  # a python-2 str read with encoding="latin1": the original bytes, one per character
        data = data.encode("latin1")
    if (not isinstance(data, (bytes, bytearray)) or not isinstance(dtype, _PickledDtype) or order not in ("C", "F")
            or not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError("an array that numpy's own pickling does not write")
    resolved = dtype.resolve()
    if math.prod(shape) * resolved.itemsize != len(data):  # checked before anything is allocated
        raise pickle.UnpicklingError(f"an array of shape {shape[:8]} with {len(data)} bytes of data")
    return np.frombuffer(data, dtype=resolved).reshape(shape, order=order)


_NDARRAY = object()  # what ``numpy.ndarray`` names inside the pickle: only _reconstruct's first argument


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _PickledArray:
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("numpy's _reconstruct of something other than ndarray")
    return _PickledArray()  # numpy's own arguments here are (0,), b'b': the array comes from the state


def _scalar(dtype: Any, data: Any) -> np.generic:
    return _array_from_bytes(data, dtype, (), "C")[()]


def _frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:  # protocol 5 (numpy >= 1.16)
    return _array_from_bytes(data, dtype, shape, order)


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:  # python 3, protocol < 3: bytes as encode(str)
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than a byte string")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:  # python 3, protocol < 3: b"" as bytes()
    if args:
        raise pickle.UnpicklingError("bytes() called with arguments")
    return b""


# every global the CIFAR python format needs, as python 2 / numpy < 2 and python 3 / numpy >= 2 write it
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _PickledDtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _CifarUnpickler(pickle._Unpickler):
    """Reads the CIFAR python format and nothing else: dicts, lists, strings, numbers and numpy arrays of plain
    numbers, rebuilt by :func:`_array_from_bytes` (never by numpy's unpickling code). Any other global a file
    names is refused before it is looked up, so a crafted batch cannot run code.

    It is the pure-Python unpickler reading from memory: its memo is a dict (the C unpickler grows an array to the
    largest memo index a file names, 16 GiB for one opcode) and a length field can read at most the file."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _CodeInPickle(f"{module}.{name}") from None

    def load_build(self) -> None:  # BUILD may set any attribute of anything: only our stand-ins take a state
        if not isinstance(self.stack[-2], (_PickledArray, _PickledDtype)):
            raise pickle.UnpicklingError("a state for something other than a numpy array or dtype")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        raw = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except _CodeInPickle as error:
        raise DataFormatError(
            f"{path} contains code (it names the Python object {str(error)[:80]!r}, which a CIFAR batch never does) "
            "and was not loaded; replace it with the file from the data set's original archive") from None
    except Exception as error:  # UnpicklingError, EOFError, ValueError, MemoryError, RecursionError ...
        raise DataFormatError(f"{path} is not a readable CIFAR pickle ({type(error).__name__}: "
                              f"{str(error)[:200]})") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path} should hold a dict, got {type(raw).__name__}")
    # python-2 pickles give str keys, pickles written by python 3 may give bytes keys; arrays are top-level values
    return {(k.decode("latin1") if isinstance(k, bytes) else k): (v.array if isinstance(v, _PickledArray) else v)
            for k, v in raw.items()}


def _labels(batch: dict[str, Any], key: str, path: Path) -> np.ndarray:
    """The batch's labels: a list of ints (the CIFAR format) or a 1-d integer array; checked before numpy sees it."""
    labels = batch[key]
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if isinstance(labels, list) and all(isinstance(y, (int, np.integer)) for y in labels):
        return np.asarray(labels, dtype=np.int64)
    raise DataFormatError(f"{path}: {key!r} must be a list of integer labels, got {type(labels).__name__}")


def _cifar(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    sub, train_files, test_files, meta_file, label_key, names_key, archive = _CIFAR[name]
    wanted = train_files if train else test_files
    folder = _find_folder(root, sub, wanted[0])
    if folder is None:
        raise FileNotFoundError(
            f"{name} files not found: expected {root / sub}/"
            f"{{{', '.join(train_files + test_files)}, {meta_file}}} "
            f"(torchvision's python format). Downloads are off: extract {archive} (it unpacks to {sub}/) "
            f"into {root}, or set data.path=<folder containing {sub}/>")
    paths = [folder / f for f in wanted]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{name} file {path} is missing; the extracted archive is incomplete")
    key = (name, *(k for p in paths for k in _file_key(p)))
    if key not in _CACHE:
        images, labels = [], []
        for path in paths:
            batch = _unpickle(path)
            if "data" not in batch or label_key not in batch:
                raise DataFormatError(f"{path} lacks 'data' or {label_key!r} "
                                      f"(keys: {', '.join(sorted(str(k)[:40] for k in batch)[:12])})")
            data, batch_labels = batch["data"], _labels(batch, label_key, path)
            if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                    or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels)):
                raise DataFormatError(f"{path}: 'data' must be a uint8 array of {len(batch_labels)} rows of 3x32x32 "
                                      f"values, got {type(data).__name__} {getattr(data, 'shape', '')}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are CHW planes
            labels.append(batch_labels)
        num_classes = 10 if name == "cifar10" else 100
        classes = [str(c) for c in range(num_classes)]
        if (folder / meta_file).is_file():
            names = _unpickle(folder / meta_file).get(names_key)
            if (isinstance(names, list) and len(names) == num_classes
                    and all(isinstance(n, (str, bytes)) for n in names)):
                classes = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
        _CACHE[key] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)
    return _CACHE[key]


def _build_cifar(name: str, cfg: DataConfig, split: str) -> ImageDataset:
    _check_split(cfg, split, ["train", "val", "test"])
    images, labels, classes = _cifar(name, Path(cfg.path or "data"), train=split == "train")
    return ArrayDataset(name, split, [images], labels, classes)


@register_dataset("cifar10")
def _build_cifar10(cfg: DataConfig, split: str) -> ImageDataset:
    return _build_cifar("cifar10", cfg, split)


@register_dataset("cifar100")
def _build_cifar100(cfg: DataConfig, split: str) -> ImageDataset:
    return _build_cifar("cifar100", cfg, split)


# ---------------------------------------------------------------------------------------------
# STL-10: torchvision's binary files, memory-mapped (the unlabelled part is 100,000 images)

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_STL_PIXELS = 3 * 96 * 96


class _StlImages:
    """Lazily memory-mapped ``*_X.bin``: ``[j]`` -> 96x96x3 uint8. Pickles as its path (workers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        if size % _STL_PIXELS:
            raise DataFormatError(f"{path} holds {size} bytes, not a multiple of 3*96*96 (truncated file?)")
        self.count = size // _STL_PIXELS
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> np.ndarray:
        if self._images is None:
            raw = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.count, 3, 96, 96))
            # stored column-major: torchvision's transpose (0, 1, 3, 2), then channels last
            self._images = raw.transpose(0, 3, 2, 1)
        return self._images[j]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}


@register_dataset("stl10")
def _build_stl10(cfg: DataConfig, split: str) -> ImageDataset:
    _check_split(cfg, split, ["train", "test", "val", "unlabeled", "train+unlabeled"])
    root = Path(cfg.path or "data")
    folder = next((f for f in (root / "stl10_binary", root) if f.is_dir() and any(f.glob("*_X.bin"))), None)
    if folder is None:
        raise FileNotFoundError(
            f"STL-10 files not found: expected {root / 'stl10_binary'}/{{train_X.bin, train_y.bin, "
            "test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt} (torchvision's binary format). "
            f"Downloads are off: extract stl10_binary.tar.gz (it unpacks to stl10_binary/) into {root}, "
            "or set data.path=<folder containing stl10_binary/>")
    parts, labels = [], []
    for part in {"val": ["test"], "train+unlabeled": ["train", "unlabeled"]}.get(split, [split]):
        x_path = folder / f"{part}_X.bin"
        if not x_path.is_file():
            raise FileNotFoundError(f"STL-10 file {x_path} is missing; the extracted archive is incomplete")
        images = _StlImages(x_path)
        if part == "unlabeled":
            y = np.full(len(images), -1, dtype=np.int64)
        else:
            y_path = folder / f"{part}_y.bin"
            if not y_path.is_file():
                raise FileNotFoundError(f"STL-10 file {y_path} is missing; "
                                        "the extracted archive is incomplete")
            if y_path.stat().st_size != len(images):  # one byte per image, checked before reading
                raise DataFormatError(f"{y_path} holds {y_path.stat().st_size} labels for {len(images)} images "
                                      f"in {x_path.name}; the extracted archive is incomplete or corrupt")
            y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # stored 1-based
            if y.size and not 0 <= y.min() <= y.max() < 10:
                raise DataFormatError(f"{y_path}: {len(y)} labels in 1..10 expected for {len(images)} images")
        parts.append(images)
        labels.append(y)
    classes = STL10_CLASSES
    names_path = folder / "class_names.txt"
    if names_path.is_file() and names_path.stat().st_size < 1 << 16:  # ten short lines
        names = [line.strip() for line in names_path.read_text(errors="replace").splitlines() if line.strip()]
        classes = names if len(names) == 10 else classes
    return ArrayDataset("stl10", split, parts, np.concatenate(labels), classes)


# ---------------------------------------------------------------------------------------------
# synthetic "Shapes-10": generated, deterministic

SHAPES = ["circle", "square", "triangle", "plus", "ring", "horizontal bar", "vertical bar", "diamond",
          "x", "half-disc"]


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``shape`` in coordinates normalised by its radius (unit box)."""
    r = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    masks = [
        lambda: r <= 1.0,
        lambda: np.maximum(au, av) <= 0.8,
        lambda: (v <= 0.8) & (au <= (v + 1.0) * 0.5),  # apex up
        lambda: ((au <= 0.28) | (av <= 0.28)) & (np.maximum(au, av) <= 1.0),
        lambda: (r <= 1.0) & (r >= 0.6),
        lambda: (au <= 1.0) & (av <= 0.3),
        lambda: (au <= 0.3) & (av <= 1.0),
        lambda: au + av <= 1.0,
        lambda: ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)) & (np.maximum(au, av) <= 0.9),
        lambda: (r <= 1.0) & (v >= 0.0),  # lower half
    ]
    return masks[shape]()


def make_shapes(n: int = 2000, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shapes-10: ``n`` RGB ``size``-px images (uint8 NxHxWx3) and balanced labels (shape index)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES))
    ss = 2 * size  # render at 2x, then average 2x2 blocks (anti-aliasing)
    grid = (np.arange(ss) + 0.5) / 2.0
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for k in range(n):
        radius = rng.uniform(0.2, 0.4) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        background = rng.uniform(0, 255, size=3)
        colour = rng.uniform(0, 255, size=3)
        while np.abs(colour - background).max() < 100:  # keep the shape visible
            colour = rng.uniform(0, 255, size=3)
        mask = _shape_mask(int(labels[k]), (xx - cx) / radius, (yy - cy) / radius)
        alpha = mask.reshape(size, 2, size, 2).mean(axis=(1, 3))[..., None]
        image = background * (1 - alpha) + colour * alpha + rng.normal(0, 6, size=(size, size, 3))
        images[k] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@register_dataset("synthetic")
def _build_synthetic(cfg: DataConfig, split: str) -> ImageDataset:
    _check_split(cfg, split, ["train", "val", "test"])
    if "synthetic" not in _CACHE:
        _CACHE["synthetic"] = make_shapes()
    images, labels = _CACHE["synthetic"]
    part = slice(0, 1600) if split == "train" else slice(1600, None)
    return ArrayDataset("synthetic", split, [images[part]], labels[part], SHAPES)


# ---------------------------------------------------------------------------------------------
# imagefolder: root/<split>/<class>/<image>, decoded lazily with PIL

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS, used when it has been set to None
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def _check_pixel_count(image: Image.Image, path: str) -> None:
    """Refuse an image whose header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (or PIL's default limit
    when that is switched off) before it is decoded: PIL itself only warns up to twice its limit."""
    limit = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_IMAGE_PIXELS
    if image.width * image.height > limit:
        image.close()
        raise ImageLoadError(f"cannot read image {path}: its header claims {image.width}x{image.height} pixels, more "
                             f"than the limit of {limit} (a decompression bomb?); raise PIL.Image.MAX_IMAGE_PIXELS if "
                             "the image is genuine, or set data.skip_corrupt=true to skip unreadable images")


class ImageFolderDataset(ImageDataset):
    """``root/<split>/<class>/**/<image>``; labels index ``classes`` (sorted class folders)."""

    def __init__(self, root: Path, split: str, classes: list[str], skip_corrupt: bool = False) -> None:
        self.name, self.split, self.classes = "imagefolder", split, classes
        self.root, self.skip_corrupt = root, skip_corrupt
        folder = root / split
        index = {c: k for k, c in enumerate(classes)}
        unknown = [c for c in _subfolders(folder) if c not in index]
        if unknown:
            raise DataFormatError(f"{folder} has class folders absent from the class list "
                              f"({len(classes)} classes of {root / '<train split>'}): {unknown[:5]}")
        self.paths: list[str] = []
        labels: list[int] = []
        for c in classes:
            if (folder / c).is_dir():
                files = _images_under(folder / c)
                self.paths += files
                labels += [index[c]] * len(files)
        if not self.paths:
            loose = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
            hint = (f" ({len(loose)} images lie directly in it: move them into one sub-folder per class)"
                    if loose else "")
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in class folders of "
                                    f"{folder}{hint}")
        self.targets = np.asarray(labels, dtype=np.int64)
        self._bad: set[str] = set()  # unreadable paths seen by this process
        self._skip_count = multiprocessing.Value("i", 0)  # shared with DataLoader workers: the run's total

    @property
    def skipped(self) -> int:  # type: ignore[override]
        """Unreadable images skipped so far, summed over this process and its loader workers."""
        return int(self._skip_count.value)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # plain pickling: a snapshot; spawning a worker: the shared counter
            state["_skip_count"] = self.skipped
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_skip_count"], int):
            state["_skip_count"] = multiprocessing.Value("i", state["_skip_count"])
        self.__dict__.update(state)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def keep_first(self, n: int) -> None:
        self.paths, self.targets = self.paths[:n], self.targets[:n]

    def _load(self, path: str, lazy: bool = False) -> Image.Image:
        """The image at ``path``, upright (EXIF orientation) and RGB; ``lazy``: opened only (header and orientation
        read), for :func:`selfsup.data.decode.decode_resized_crops`. A header that claims more pixels than the limit
        is refused before any decoding."""
        image = open_image(path)
        _check_pixel_count(image, path)
        if lazy:
            oriented_size(image)  # reads the header: a file that is no image fails here, where it can be skipped
            return image
        with image:
            return load_rgb(image)  # forces a full decode

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self._read(i, lazy=False)

    def open(self, i: int) -> tuple[Image.Image, int]:
        return self._read(i, lazy=True)

    def _read(self, i: int, lazy: bool) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            path = self.paths[j]
            if path in self._bad:
                continue
            try:
                return self._load(path, lazy), int(self.targets[j])
            except ImageLoadError as error:
                if not self.skip_corrupt:
                    raise
                self._bad.add(path)
                with self._skip_count.get_lock():
                    self._skip_count.value += 1
                warnings.warn(f"skipping unreadable image {path} ({error.__cause__})", CorruptImageWarning,
                              stacklevel=2)
        raise ImageLoadError(f"no readable image in {self.root / self.split} ({len(self._bad)} unreadable)")


@register_dataset("imagefolder")
def _build_imagefolder(cfg: DataConfig, split: str) -> ImageDataset:
    if cfg.path is None:
        raise ConfigError("data.name='imagefolder' needs data.path=<root folder with train/ and val/ "
                          "sub-folders, one folder per class inside each>")
    root = Path(cfg.path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.path to the root that holds "
                                "train/<class>/*.jpg and val/<class>/*.jpg")
    splits = _subfolders(root)
    if not splits:
        raise FileNotFoundError(f"{root} has no split sub-folders; expected {root}/train/<class>/*.jpg "
                                f"and {root}/val/<class>/*.jpg")
    _check_split(cfg, split, splits)
    # the class list comes from the training split, so every split's labels agree
    class_root = root / cfg.train_split if (root / cfg.train_split).is_dir() else root / split
    classes = _subfolders(class_root)
    if not classes:
        raise FileNotFoundError(f"{class_root} has no class sub-folders; expected {class_root}/<class>/*.jpg")
    return ImageFolderDataset(root, split, classes, skip_corrupt=cfg.skip_corrupt)


# ---------------------------------------------------------------------------------------------
# folder / filelist: images you have, labelled or not, with a seeded held-out split when they bring none


class ImageFilesDataset(ImageFolderDataset):
    """Images named by path, with their labels (-1: unlabelled) and class names: ``data.name=folder`` and
    ``filelist``. Read as :class:`ImageFolderDataset` reads them (upright by their EXIF orientation, opened lazily
    for stage 1's reduced-size decode; an :class:`ImageLoadError` naming the path, or skipped and counted with
    ``data.skip_corrupt``)."""

    def __init__(self, name: str, split: str, root: Path, paths: Sequence[str], targets: Sequence[int] | np.ndarray,
                 classes: Sequence[str], skip_corrupt: bool = False) -> None:
        self.name, self.split, self.classes = name, split, list(classes)
        self.root, self.skip_corrupt = root, skip_corrupt
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(len(self.paths))
        self._bad: set[str] = set()
        self._skip_count = multiprocessing.Value("i", 0)


def held_out(keys: Sequence[str], targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which items form the held-out split: in each label group (the unlabelled items are one group) of n items, the
    ``round(fraction * n)`` (at least 1 and at most n - 1 when n >= 2) whose hash of ``(seed, key)`` is lowest.

    An item's place depends only on its key (e.g. its path relative to the data set's root), the seed and its group's
    size: not on the training seed, the order of the files or where the folder is mounted."""
    targets = np.asarray(targets)
    ranks = np.array([int.from_bytes(blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "big")
                      for key in keys], dtype=np.uint64)
    mask = np.zeros(len(keys), dtype=bool)
    if fraction <= 0:
        return mask
    for label in np.unique(targets):
        group = np.flatnonzero(targets == label)
        count = round(fraction * len(group))
        if len(group) >= 2:
            count = min(max(count, 1), len(group) - 1)
        mask[group[np.argsort(ranks[group], kind="stable")[:count]]] = True
    return mask


def _check_holdout(cfg: DataConfig) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction is the fraction of images held out for validation, in [0, 1); got "
                          f"{cfg.val_fraction}")


def _holdout_split(cfg: DataConfig, split: str, keys: Sequence[str], targets: np.ndarray, where: str) -> np.ndarray:
    """The rows of ``split`` (train, val or all) when the data bring no split of their own: ``data.val_fraction``
    held out by :func:`held_out` with ``data.split_seed``."""
    _check_split(cfg, split, ["train", "val", "all"])
    _check_holdout(cfg)
    if split == "all":
        return np.arange(len(keys))
    val = held_out(keys, targets, cfg.val_fraction, cfg.split_seed)
    if split == "val" and not val.any():
        raise ConfigError(f"{where} has no val/ split and data.val_fraction={cfg.val_fraction} holds out no image of "
                          f"its {len(keys)}: raise data.val_fraction (e.g. 0.1) or add images")
    return np.flatnonzero(val if split == "val" else ~val)


def _relative_parts(pool: Path, paths: Sequence[str]) -> list[list[str]]:
    """Each path (found under ``pool`` by :func:`_images_under`) relative to ``pool``, split into its parts."""
    prefix = os.path.join(str(pool), "")
    return [path[len(prefix):].split(os.sep) if path.startswith(prefix) else os.path.relpath(path, pool).split(os.sep)
            for path in paths]


def _folder_classes(pool: Path, paths: Sequence[str], mode: str) -> list[str | None] | None:
    """The class of each image, its immediate sub-folder of ``pool``, under ``data.labels=mode`` (None: the data set
    is unlabelled). ``auto`` takes classes only when every image sits in a sub-folder and there are at least two;
    ``folders`` requires the former."""
    if mode == "none":
        return None
    parts = _relative_parts(pool, paths)
    loose = [path for path, rel in zip(paths, parts, strict=True) if len(rel) == 1]
    if mode == "folders" and loose:
        raise DataFormatError(f"data.labels=folders: {len(loose)} image(s) of {pool} lie in no class sub-folder "
                              f"(e.g. {loose[0]}); move them into one, or use data.labels=auto / none")
    names = [rel[0] for rel in parts]
    if mode == "auto" and (loose or len(set(names)) < 2):
        return None
    return names  # type: ignore[return-value]


def _split_classes(folder: Path, paths: Sequence[str], mode: str) -> list[str | None]:
    """The classes of another split of a labelled folder: its sub-folders; an image lying loose in it is unlabelled
    (``data.labels=auto``) or an error (``folders``)."""
    if mode == "folders":
        return _folder_classes(folder, paths, mode)  # type: ignore[return-value]
    return [rel[0] if len(rel) > 1 else None for rel in _relative_parts(folder, paths)]


def _labels_of(names: Sequence[str | None], classes: list[str], where: str) -> np.ndarray:
    """Class names (None: unlabelled) as indices into ``classes`` (-1: unlabelled)."""
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({n for n in names if n is not None and n not in index})
    if unknown:
        raise DataFormatError(f"{where} has classes absent from the training split's {len(classes)} classes: "
                              f"{unknown[:5]}; give every split the same class folders, or set data.labels=none")
    return np.array([index[n] if n is not None else -1 for n in names], dtype=np.int64)


def _no_images(folder: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}: data.path should be a "
                             "folder holding image files (in sub-folders or not)")


@register_dataset("folder")
def _build_folder(cfg: DataConfig, split: str) -> ImageDataset:
    """Every image under ``data.path`` (recursive). With ``train/`` and ``val/`` sub-folders (``data.train_split``,
    ``data.val_split``) those are the splits; otherwise (the images directly, or a ``train/`` alone) the val split is
    ``data.val_fraction`` of them, held out by :func:`held_out`. Labels: ``data.labels``."""
    if cfg.path is None:
        raise ConfigError("data.name='folder' needs data.path=<a folder of images> (any layout; class sub-folders "
                          "become labels with data.labels=auto)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.path to a folder of images")
    train_dir = root / cfg.train_split
    if train_dir.is_dir() and (root / cfg.val_split).is_dir():  # the folder brings its own splits
        _check_split(cfg, split, _subfolders(root))
        train_paths = _images_under(train_dir)
        paths = train_paths if split == cfg.train_split else _images_under(root / split)
        if not paths:
            raise _no_images(root / split)
        classes = _folder_classes(train_dir, train_paths, cfg.labels)
        if classes is None:  # unlabelled: the other split may not be labelled either
            return ImageFilesDataset("folder", split, root, paths, np.full(len(paths), -1), [], cfg.skip_corrupt)
        names = sorted(set(classes))
        split_names = classes if split == cfg.train_split else _split_classes(root / split, paths, cfg.labels)
        labels = _labels_of(split_names, names, str(root / split))
        return ImageFilesDataset("folder", split, root, paths, labels, names, cfg.skip_corrupt)
    pool = train_dir if train_dir.is_dir() else root
    paths = _images_under(pool)
    if not paths:
        raise _no_images(pool)
    classes = _folder_classes(pool, paths, cfg.labels)
    names = sorted(set(classes)) if classes is not None else []
    labels = _labels_of(classes, names, str(pool)) if classes is not None else np.full(len(paths), -1, np.int64)
    keys = ["/".join(rel) for rel in _relative_parts(pool, paths)]  # the split follows the folder when it moves
    rows = _holdout_split(cfg, split, keys, labels, str(pool))
    return ImageFilesDataset("folder", split, pool, [paths[i] for i in rows], labels[rows], names, cfg.skip_corrupt)


def natural_sorted(names: set[str]) -> list[str]:
    """Class names sorted, numerically when every name is an integer (2 before 10)."""
    if all(n.strip().lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


@dataclass
class FileList:
    """A filelist's rows: paths as written, and the label / split column when it has one (None: no such column)."""

    entries: list[str]
    labels: list[str] | None = None
    splits: list[str] | None = None


def read_filelist(path: Path) -> FileList:
    """``.csv``: a header naming a ``path`` column and optional ``label`` and ``split`` columns; anything else: one
    path per line (blank lines and lines starting with ``#`` skipped)."""
    if path.suffix.lower() != ".csv":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return FileList([line for line in lines if line and not line.startswith("#")])
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "path" not in columns:
            raise DataFormatError(f"{path}: a CSV file list needs a header with a 'path' column (optionally 'label' "
                                  f"and 'split'); its header is {reader.fieldnames or 'empty'}")
        rows = list(reader)

    def column(name: str) -> list[str] | None:
        key = columns.get(name)
        return None if key is None else [(row.get(key) or "").strip() for row in rows]

    entries = column("path") or []
    for number, entry in enumerate(entries, start=2):
        if not entry:
            raise DataFormatError(f"{path}, line {number}: the path is empty")
    return FileList(entries, column("label"), column("split"))


@register_dataset("filelist")
def _build_filelist(cfg: DataConfig, split: str) -> ImageDataset:
    """The images a list file names (``data.path``: a text file, one path per line, or a CSV with ``path`` and
    optional ``label`` / ``split`` columns); relative paths are relative to the list file's folder. Labels (with
    ``data.labels=auto``): the label column's names, sorted, as classes; an empty cell is unlabelled. Splits: the
    split column's values, else ``data.val_fraction`` held out by :func:`held_out`."""
    if cfg.path is None:
        raise ConfigError("data.name='filelist' needs data.path=<a .txt file with one image path per line, or a .csv "
                          "with a 'path' column (and optionally 'label' and 'split')>")
    list_path = Path(cfg.path)
    if not list_path.is_file():
        raise FileNotFoundError(f"file list {list_path} does not exist; set data.path to a .txt or .csv list of images")
    listed = read_filelist(list_path)
    if not listed.entries:
        raise DataFormatError(f"{list_path} lists no image")
    folder = list_path.parent
    paths = [str(folder / Path(entry).expanduser()) for entry in listed.entries]  # an absolute entry stays as it is
    names: list[str] = []
    labels = np.full(len(paths), -1, dtype=np.int64)
    if listed.labels is not None and cfg.labels == "auto" and any(listed.labels):
        names = natural_sorted({name for name in listed.labels if name})
        labels = _labels_of([name or None for name in listed.labels], names, str(list_path))
    if listed.splits is not None:
        values = sorted(set(listed.splits))
        if "" in values:
            raise DataFormatError(f"{list_path}: row {listed.splits.index('') + 2} has an empty split; give every row "
                                  "one (e.g. train or val), or drop the split column")
        _check_split(cfg, split, values)
        rows = np.flatnonzero(np.array(listed.splits) == split)
    else:
        rows = _holdout_split(cfg, split, [Path(entry).as_posix() for entry in listed.entries], labels, str(list_path))
    missing = [paths[i] for i in rows if not os.path.isfile(paths[i])]
    if missing:
        if not cfg.skip_corrupt:
            raise FileNotFoundError(f"{list_path} names {len(missing)} file(s) that do not exist, e.g. {missing[0]} "
                                    "(relative paths are relative to the list file's folder); fix the list, or set "
                                    "data.skip_corrupt=true to leave them out")
        warnings.warn(f"{list_path}: leaving out {len(missing)} listed file(s) that do not exist, e.g. {missing[0]}",
                      CorruptImageWarning, stacklevel=2)
        absent = set(missing)
        rows = np.array([i for i in rows if paths[i] not in absent], dtype=np.int64)
    return ImageFilesDataset("filelist", split, folder, [paths[i] for i in rows], labels[rows], names,
                             cfg.skip_corrupt)


def folder_images(folder: str | Path, skip_corrupt: bool = False) -> ImageFilesDataset:
    """Every image under ``folder`` (recursive, sorted, hidden files and folders left out), unlabelled: what
    ``selfsup embed`` reads."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    paths = _images_under(root)
    if not paths:
        raise _no_images(root)
    return ImageFilesDataset("folder", "all", root, paths, np.full(len(paths), -1), [], skip_corrupt)


# ---------------------------------------------------------------------------------------------
# a torch Dataset of your own (the Python API's train(dataset=...))


def as_pil(item: Any, where: str) -> Image.Image:
    """A data set's image as an RGB PIL image: a PIL image (any mode), a uint8 HxW(xC) array, or a CxHxW tensor
    (uint8, or float in [0, 1])."""
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(item).convert("RGB")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (2, 3):
        return Image.fromarray(item).convert("RGB")
    raise TypeError(f"{where} gave a {type(item).__name__}: expected a PIL image, a uint8 HxW(xC) array or a CxHxW "
                    "tensor, alone or as (image, label)")


def dataset_labels(dataset: Any) -> tuple[np.ndarray, list[str]]:
    """The labels and class names of a torch Dataset whose items are images (unlabelled) or ``(image, label)`` pairs:
    its ``targets`` (and ``classes``) attributes when it has them (torchvision's data sets do), else one pass over
    the items. A negative or None label marks an unlabelled image."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"the data set {type(dataset).__name__} is empty")
    if not isinstance(dataset[0], (tuple, list)):
        return np.full(n, -1, dtype=np.int64), []
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != n:
        targets = [dataset[i][1] for i in range(n)]
    labels = np.array([-1 if y is None else int(y) for y in targets], dtype=np.int64)
    labels[labels < 0] = -1
    classes = getattr(dataset, "classes", None)
    if classes is None or len(classes) <= labels.max():
        classes = [str(c) for c in range(labels.max() + 1)]
    return labels, [str(c) for c in classes]


class TorchImageDataset(ImageDataset):
    """Rows ``indices`` of a user's torch Dataset, as an :class:`ImageDataset` (the images converted to RGB PIL,
    the labels from :func:`dataset_labels`)."""

    def __init__(self, dataset: Any, name: str, split: str, indices: Sequence[int], targets: np.ndarray,
                 classes: list[str]) -> None:
        self.dataset, self.name, self.split, self.classes = dataset, name, split, list(classes)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)[self.indices]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        item = self.dataset[int(self.indices[i])]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return as_pil(image, self.describe(i)), int(self.targets[i])

    def describe(self, i: int) -> str:
        return f"{self.name}[{int(self.indices[i])}]"

    def keep_first(self, n: int) -> None:
        self.indices, self.targets = self.indices[:n], self.targets[:n]


def register_torch_dataset(name: str, dataset: Any, val_dataset: Any | None = None) -> None:
    """Make ``data.name=<name>`` read a torch Dataset: its ``train`` split is ``dataset`` (less the held-out part
    when there is no ``val_dataset``: ``data.val_fraction`` of it, stratified, by :func:`held_out` on the item
    indices with ``data.split_seed``), ``val`` is ``val_dataset`` or that held-out part, ``all`` all of ``dataset``."""
    targets, classes = dataset_labels(dataset)
    val_labels = dataset_labels(val_dataset) if val_dataset is not None else None

    @register_dataset(name)
    def build(cfg: DataConfig, split: str) -> ImageDataset:
        _check_split(cfg, split, ["train", "val", "all"])
        if val_labels is not None and split == "val":
            return TorchImageDataset(val_dataset, name, split, np.arange(len(val_dataset)), val_labels[0],
                                     classes or val_labels[1])
        if val_labels is not None:
            rows = np.arange(len(dataset))
        else:
            rows = _holdout_split(cfg, split, [str(i) for i in range(len(dataset))], targets, name)
        return TorchImageDataset(dataset, name, split, rows, targets, classes)
