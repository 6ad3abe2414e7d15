"""Weights on the wire: float32, or half the bytes as float16 or bfloat16.

numpy has no bfloat16, so bfloat16 travels as the upper 16 bits of each float32
(round-to-nearest-even) in a uint16 array. Integer buffers (BatchNorm's counters)
travel unchanged. Decoding always gives float32 back, so aggregation runs in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

WIRE_DTYPES = ("float32", "float16", "bfloat16")


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
            out[k] = v.astype(np.float32)
        else:
            out[k] = v
    return out


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
