"""Weights on the wire: float32, or half the bytes as float16 or bfloat16.

numpy has no bfloat16, so bfloat16 travels as the upper 16 bits of each float32
(round-to-nearest-even) in a uint16 array. Integer buffers (BatchNorm's counters)
travel unchanged. Decoding always gives float32 back, so aggregation runs in float32.

A Flower ``Array`` holds the ``.npy`` bytes of its array; ``Array.numpy()`` copies them
out and ``Array(ndarray)`` copies twice on the way in. A ResNet-50 is ~94 MB, handled a
few times per site per round, so :func:`view` and :func:`to_array` read and write
those bytes with one copy at most (sim/bench.py measures what that is worth).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecordValues, ConfigScalar

from common.config import UPDATE_DTYPES as WIRE_DTYPES


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def _from_bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def encode(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating arrays in ``dtype`` for sending; other arrays as they are."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"update dtype {dtype!r}: choose one of {', '.join(WIRE_DTYPES)}")
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, np.floating) or dtype == "float32":
            out[k] = v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) else v
        elif dtype == "float16":
            out[k] = v.astype(np.float16)
        else:
            out[k] = _to_bf16_bits(v)
    return out


def decode(arrays: Mapping[str, np.ndarray], dtype: str, reference: Mapping[str, np.ndarray] | None = None
           ) -> dict[str, np.ndarray]:
    """Back to float32 (integer buffers unchanged). With ``reference``, uint16 arrays are
    decoded as bfloat16 only where the reference array is floating."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        ref_float = reference is None or (k in reference and np.issubdtype(np.asarray(reference[k]).dtype,
                                                                          np.floating))
        if dtype == "bfloat16" and v.dtype == np.uint16 and ref_float:
            out[k] = _from_bf16_bits(v)
        elif np.issubdtype(v.dtype, np.floating):
            out[k] = v.astype(np.float32, copy=False)
        else:
            out[k] = v
    return out


def view(a: Array) -> np.ndarray:
    """The array inside ``a`` without copying it (read-only). Falls back to
    ``Array.numpy()`` for anything but a plain C-order ``.npy`` payload."""
    data = a.data
    dtype = np.dtype(a.dtype) if a.stype == "numpy.ndarray" else None
    count = math.prod(a.shape)
    offset = len(data) - count * (dtype.itemsize if dtype is not None else 0)
    if dtype is None or dtype.hasobject or offset < 10 or data[:6] != b"\x93NUMPY":
        return a.numpy()
    head = io.BytesIO(data[:offset])
    try:
        version = np.lib.format.read_magic(head)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, stored = read(head)
    except ValueError:
        return a.numpy()  # raises the same error Flower would
    if fortran or stored != dtype or tuple(shape) != tuple(a.shape) or head.tell() != offset:
        return a.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def to_array(v: np.ndarray) -> Array:
    """A Flower ``Array`` of ``v`` (the same bytes ``Array(v)`` makes) with one copy."""
    v = v if v.flags.c_contiguous else v.copy(order="C")  # (np.ascontiguousarray makes 0-d 1-d)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(v))
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12 (we target 3.11)
    payload = memoryview(v).cast("B") if v.size else b""  # type: ignore[arg-type]
    return Array(dtype=str(v.dtype), shape=tuple(v.shape), stype="numpy.ndarray",
                 data=b"".join([head.getvalue(), payload]))


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: to_array(np.asarray(v)) for k, v in arrays.items()})


def views(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: view(v) for k, v in record.items()}


def scalar(value: ConfigRecordValues) -> ConfigScalar:
    """One value of a Flower record (its values are typed as scalars or lists) that must be a scalar.

    Raises
    ------
    TypeError
        If ``value`` is a list (a malformed message: ``int()`` or ``float()`` of it would fail too).
    """
    if isinstance(value, list):
        raise TypeError(f"expected a single value in the record, got a list of {len(value)}")
    return value


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
