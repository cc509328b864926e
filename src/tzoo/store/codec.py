"""Compact binary blobs for named numpy arrays.

Analyses return dicts of arrays (attention is ``(layers, heads, T, T)``); storing them as
JSON lists is ten to twenty times larger than needed. A blob is::

    b"TZB1" + zstd( uint32-le header length + JSON header + raw little-endian buffers )

The header lists, per array: ``name``, ``dtype`` (as stored), ``orig_dtype``, ``shape``,
``offset`` and ``length`` (into the buffer area), and for ``uint8`` storage ``scale`` and
``min`` so that values come back as ``q * scale + min``.

Precision applies to floating-point arrays only; integer and bool arrays are always stored
losslessly, and an array is never stored wider than it came in (float16 input stays float16
under ``precision="float32"``). Decoding restores each array's original dtype.

Non-finite values: ``float32``/``float16`` keep NaN and +-Inf as they are; ``uint8`` refuses
them with a ValueError, because a NaN or Inf has no place on a linear 0..255 scale and
silently clipping it would lose data. A finite value too large for the chosen float type
raises a ValueError rather than turning into Inf.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Literal

import numpy as np
import zstandard

Precision = Literal["float32", "float16", "uint8"]

MAGIC = b"TZB1"
FORMAT_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_ZSTD_LEVEL = 3  # level 9+ saves ~1% on attention tensors at 5x the time
_PRECISIONS: tuple[str, ...] = ("float32", "float16", "uint8")
_ALLOWED_KINDS = "biuf"  # bool, signed int, unsigned int, float


class BlobFormatError(ValueError):
    """A blob is not a valid Transformer Zoo array blob (corrupt, truncated, foreign)."""


def encode_arrays(arrays: dict[str, np.ndarray], *, precision: Precision = "float16") -> bytes:
    """Pack named arrays into one compressed blob; floats are reduced to ``precision``."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, not {precision!r}")
    entries: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.kind not in _ALLOWED_KINDS:
            raise ValueError(
                f"array {name!r} has dtype {array.dtype}; only bool, integer and float "
                "arrays can be stored"
            )
        stored, extra = _to_storage(name, array, precision)
        raw = np.ascontiguousarray(stored).tobytes()
        entries.append(
            {
                "name": name,
                "dtype": stored.dtype.str,
                "orig_dtype": array.dtype.name,
                "shape": list(array.shape),
                "offset": offset,
                "length": len(raw),
                **extra,
            }
        )
        buffers.append(raw)
        offset += len(raw)
    header = json.dumps({"version": FORMAT_VERSION, "arrays": entries}).encode("utf-8")
    payload = b"".join([_HEADER_LEN.pack(len(header)), header, *buffers])
    # The frame checksum turns a flipped byte into an error instead of silently wrong values.
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
    return MAGIC + compressor.compress(payload)


def decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Unpack a blob from :func:`encode_arrays`, restoring names, shapes and dtypes."""
    entries, data = _read(blob)
    return {entry["name"]: _from_storage(entry, data) for entry in entries}


def decode_array_header(blob: bytes) -> list[dict[str, Any]]:
    """The per-array header entries (name, dtype, shape, ...), e.g. to describe a blob."""
    entries, _ = _read(blob)
    return entries


# --- encoding -------------------------------------------------------------------------


def _to_storage(
    name: str, array: np.ndarray, precision: str
) -> tuple[np.ndarray, dict[str, float]]:
    """The array as it will be stored (little-endian), plus header fields it needs."""
    if array.dtype.kind != "f":
        return array.astype(array.dtype.newbyteorder("<"), copy=False), {}
    if precision == "uint8":
        return _quantise_uint8(name, array)
    target = np.dtype(precision)
    if array.dtype.itemsize <= target.itemsize:
        target = array.dtype  # never widen: float16 input stays float16
    with np.errstate(over="ignore"):  # overflow is detected and reported just below
        stored = array.astype(target.newbyteorder("<"))
    overflowed = np.isinf(stored) & np.isfinite(array)
    if overflowed.any():
        largest = float(np.abs(array[overflowed]).max())
        raise ValueError(
            f"array {name!r} holds {largest:g}, beyond the {target.name} range "
            f"(max {float(np.finfo(target).max):g}); use a wider precision"
        )
    return stored, {}


def _quantise_uint8(name: str, array: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Linear 8-bit quantisation over [min, max]; error at most scale / 2."""
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.uint8), {"scale": 0.0, "min": 0.0}
    if not np.isfinite(array).all():
        raise ValueError(
            f"array {name!r} holds NaN or Inf, which uint8 precision cannot store; "
            "use precision='float16' or 'float32'"
        )
    values = array.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scale = (high - low) / 255.0
    if scale == 0.0 or not np.isfinite(scale):
        # Constant array (or a range too wide for float64): every value is `low`.
        if high != low:
            raise ValueError(f"array {name!r} spans a range too wide to quantise")
        return np.zeros(array.shape, dtype=np.uint8), {"scale": 0.0, "min": low}
    quantised = np.clip(np.rint((values - low) / scale), 0, 255).astype(np.uint8)
    return quantised, {"scale": scale, "min": low}


# --- decoding -------------------------------------------------------------------------


def _read(blob: bytes) -> tuple[list[dict[str, Any]], memoryview]:
    """Check magic, decompress, parse and validate the header; return it and the buffers."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise BlobFormatError(f"expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if blob[: len(MAGIC)] != MAGIC:
        raise BlobFormatError(
            f"not an array blob: expected magic {MAGIC!r}, found {blob[: len(MAGIC)]!r}"
        )
    try:
        payload = zstandard.ZstdDecompressor().decompress(blob[len(MAGIC) :])
    except zstandard.ZstdError as error:
        raise BlobFormatError(f"array blob is corrupt or truncated ({error})") from None
    if len(payload) < _HEADER_LEN.size:
        raise BlobFormatError("array blob is truncated: no header length")
    (header_len,) = _HEADER_LEN.unpack_from(payload)
    header_end = _HEADER_LEN.size + header_len
    if header_end > len(payload):
        raise BlobFormatError("array blob is truncated: header runs past the end")
    try:
        header = json.loads(payload[_HEADER_LEN.size : header_end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BlobFormatError(f"array blob header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
        found = header.get("version") if isinstance(header, dict) else None
        raise BlobFormatError(
            f"unsupported array blob version {found!r}; this build reads {FORMAT_VERSION}"
        )
    data = memoryview(payload)[header_end:]
    entries = header.get("arrays")
    if not isinstance(entries, list):
        raise BlobFormatError("array blob header has no 'arrays' list")
    for entry in entries:
        _check_entry(entry, len(data))
    return entries, data


def _check_entry(entry: Any, data_len: int) -> None:
    """Refuse header entries that would make numpy fail or read out of bounds."""
    try:
        name = entry["name"]
        stored = np.dtype(entry["dtype"])
        original = np.dtype(entry["orig_dtype"])
        shape = [int(n) for n in entry["shape"]]
        offset, length = int(entry["offset"]), int(entry["length"])
        if stored == np.uint8 and original.kind == "f":
            entry["scale"], entry["min"] = float(entry["scale"]), float(entry["min"])
    except (KeyError, TypeError, ValueError) as error:
        raise BlobFormatError(f"array blob header entry is malformed ({error!r})") from None
    if not isinstance(name, str):
        raise BlobFormatError("array blob header entry has a non-string name")
    if stored.kind not in _ALLOWED_KINDS or original.kind not in _ALLOWED_KINDS:
        raise BlobFormatError(f"array {name!r} has an unsupported dtype in the header")
    if any(n < 0 for n in shape) or offset < 0:
        raise BlobFormatError(f"array {name!r} has a negative shape or offset")
    if length != int(np.prod(shape, dtype=np.int64)) * stored.itemsize:
        raise BlobFormatError(f"array {name!r} length does not match its shape and dtype")
    if offset + length > data_len:
        raise BlobFormatError(f"array blob is truncated: array {name!r} runs past the end")


def _from_storage(entry: dict[str, Any], data: memoryview) -> np.ndarray:
    stored_dtype = np.dtype(entry["dtype"])
    original = np.dtype(entry["orig_dtype"])
    raw = data[entry["offset"] : entry["offset"] + entry["length"]]
    stored = np.frombuffer(raw, dtype=stored_dtype).reshape(entry["shape"])
    if stored_dtype == np.uint8 and original.kind == "f":
        restored = stored.astype(np.float64) * float(entry["scale"]) + float(entry["min"])
        return restored.astype(original)
    return stored.astype(original)  # astype copies: the result is writable, native order
