"""A head's parameters as bytes: a numpy ``.npz`` archive holding ``weight`` and ``bias``.

``.npz`` is readable by any numpy without polyray (a client can download and inspect its head)
and loads without pickle, so a stored artifact can never execute code. The archive is written
with fixed zip timestamps, so the same parameters always give the same bytes and the same
``sha256``: the digest identifies the parameters, not the moment they were saved.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np

from polyray.heads.kinds import HeadParams

_FIELDS = ("weight", "bias")
_DTYPE = np.dtype("<f4")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no wall-clock time in the bytes


def dump_params(params: HeadParams) -> bytes:
    """Serialize as ``.npz`` (uncompressed: float weights barely compress) with stable bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name in _FIELDS:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            array = np.ascontiguousarray(getattr(params, name), dtype=_DTYPE)
            with archive.open(info, mode="w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def load_params(data: bytes) -> HeadParams:
    """Parse ``dump_params`` output; anything else (truncated, corrupt, foreign) raises ValueError."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded as archive:
            if sorted(archive.files) != sorted(_FIELDS):
                raise ValueError(f"expected arrays {_FIELDS}, found {archive.files}")
            weight, bias = (np.asarray(archive[name]) for name in _FIELDS)
    except Exception as err:  # foreign bytes can fail in any zip or npy layer (e.g. RuntimeError: "encrypted")
        raise ValueError(f"malformed head artifact: {err}") from err
    if weight.dtype != _DTYPE or bias.dtype != _DTYPE:
        raise ValueError(f"malformed head artifact: dtypes {weight.dtype}, {bias.dtype} are not float32")
    if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
        raise ValueError("malformed head artifact: non-finite parameters")
    try:
        return HeadParams(weight, bias)  # checks that the shapes fit
    except ValueError as err:
        raise ValueError(f"malformed head artifact: {err}") from err


def sha256(data: bytes) -> str:
    """Hex digest of an artifact, stored beside it to detect corruption and name identical heads."""
    return hashlib.sha256(data).hexdigest()
