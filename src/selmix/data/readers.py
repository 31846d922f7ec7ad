"""Readers of dataset files, usable on their own: IDX arrays (:func:`read_idx`, the
Fashion-MNIST format) and the pickles of torchvision's CIFAR batches, read without
executing any pickled code (:func:`read_data_pickle`, :func:`read_cifar_batch`).

The lowest layer of the data sources: :mod:`selmix.data.sources` and
:mod:`selmix.data.formats` read their files with these and neither is imported here.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Reads an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or not.

    Args:
        path: e.g. ``.../train-images-idx3-ubyte.gz``.

    Returns:
        A tensor with the file's shape and element type, e.g. uint8 [60000, 28, 28] for
        images and uint8 [60000] for labels.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: if the file is not a valid IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        # a truncated download or a damaged disk: gzip raises EOFError, BadGzipFile or zlib.error
        raise ValueError(f"IDX file {path} is truncated or corrupt: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: bad magic number {data[:4].hex()}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is not an IDX file: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path} is not a valid IDX file: header says shape {shape} "
            f"({count * dtype.itemsize} bytes) but {len(data) - header} bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    # Copy into native byte order: torch needs it, and frombuffer's array is read-only.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _only_latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes (protocol 2) as _codecs.encode(text, "latin1"); other codecs
    # are never needed by a data file, so they are not callable from one.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _plain_dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)  # type: ignore[call-overload]
    if dtype.hasobject:
        # object arrays would unpickle arbitrary Python objects as their elements
        raise pickle.UnpicklingError(f"numpy arrays of dtype {dtype} are not allowed")
    return dtype


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that can only build plain data: containers, numbers, text, numpy arrays.

    Pickle runs whatever callable a file names; a data file needs none but numpy's array
    reconstruction (and ``_codecs.encode`` for bytes in Python 3 pickles), so every other
    global is refused and no code from the file can run.
    """

    # numpy's array constructor under its NumPy 1 and NumPy 2 module names (the CIFAR files
    # were written by NumPy 1); taken from __reduce__ so no private module is imported
    _reconstruct = np.zeros(0).__reduce__()[0]
    _frombuffer = np.zeros(0).__reduce_ex__(5)[0]  # protocol 5's array constructor
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _only_latin1_encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a data file never needs (refused: "
                "a pickle can run code when loaded)"
            ) from None


def read_data_pickle(path: str | os.PathLike, what: str = "data file") -> object:
    """Loads a pickled data file (CIFAR-10/100 batches) without running code from it.

    Only dicts, lists, tuples, bytes, str, numbers and plain (non-object) numpy arrays can be
    built; Python 2 strings come back as ``bytes`` (``encoding="bytes"``), as in the
    original CIFAR files.

    Args:
        path: the pickle file.
        what: how error messages name the file, e.g. ``"CIFAR-10 batch file"``.

    Returns:
        The unpickled object.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt, or refers to anything but plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty")
    try:
        with open(path, "rb") as file:
            return _DataUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{what} {path} is not readable data: {detail}") from None


def read_cifar_batch(
    path: Path, what: str, kind: str, label_key: bytes
) -> tuple[np.ndarray, list[int]]:
    """Images and labels of one CIFAR pickle (CIFAR-10's and CIFAR-100's share the layout).

    Args:
        path: the pickle file.
        what: how error messages name the file, e.g. ``"CIFAR-10 batch file"``.
        kind: how error messages name the expected content, e.g. ``"CIFAR"``.
        label_key: the key of the labels, ``b"labels"`` or ``b"fine_labels"``.

    Returns:
        ``(images, labels)``: uint8 array [N, 3, 32, 32] and N int labels (unchecked range).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: one line naming the file: unreadable, not a batch dict, or images and
            labels of different counts.
    """
    batch = read_data_pickle(path, what)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # type: ignore[index]
        labels = [int(label) for label in batch[label_key]]  # type: ignore[index]
    except (TypeError, KeyError, ValueError, IndexError) as error:
        raise ValueError(
            f"{what} {path} does not hold a {kind} batch (a dict with b'data' of N x 3072 "
            f"bytes and {label_key!r}): {type(error).__name__}: {error}"
        ) from None
    if len(labels) != len(data):
        raise ValueError(f"{what} {path} has {len(data)} images but {len(labels)} labels")
    return data, labels
