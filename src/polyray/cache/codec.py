"""Compact vector values: float16 when it keeps the direction, float32 otherwise.

A 1-byte header names the dtype; the rest is the little-endian array. Embeddings are compared
by cosine, so the test for fp16 is the cosine between the original and its fp16 round trip
(>= 1 - ``MAX_COSINE_LOSS``), plus every value inside fp16's finite range. Vectors with huge
dynamic range (tiny components flush to zero in fp16) or non-finite values stay float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_COSINE_LOSS = 1e-3
HEADER_F16 = 0x01
HEADER_F32 = 0x02
FP16_MAX = float(np.finfo(np.float16).max)
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")


class CodecError(ValueError):
    """Bytes that are not a value this codec wrote (a corrupt or foreign shared-tier entry)."""


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def fits_fp16(vector: np.ndarray) -> bool:
    v = np.asarray(vector, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)) or (v.size and float(np.max(np.abs(v))) > FP16_MAX):
        return False
    back = v.astype(np.float16).astype(np.float64)
    return _cosine(v, back) >= 1.0 - MAX_COSINE_LOSS


def encode_vector(vector: np.ndarray) -> bytes:
    """One 1-D vector to header + payload."""
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1:
        raise ValueError(f"encode_vector takes a 1-D vector, got shape {v.shape}")
    if fits_fp16(v):
        return bytes([HEADER_F16]) + v.astype(_F16).tobytes()
    return bytes([HEADER_F32]) + v.astype(_F32).tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    """Header + payload back to a float32 vector (a fresh, writable array)."""
    if not data:
        raise CodecError("empty cache value")
    header = data[0]
    dtype: np.dtype[np.floating[Any]]
    if header == HEADER_F16:
        dtype = _F16
    elif header == HEADER_F32:
        dtype = _F32
    else:
        raise CodecError(f"unknown cache value header {header:#04x}")
    if (len(data) - 1) % dtype.itemsize:
        raise CodecError(f"cache value payload of {len(data) - 1} bytes is not a whole {dtype} array")
    return np.frombuffer(data, dtype=dtype, offset=1).astype(np.float32)
