"""The array blob codec: round trips within stated error bounds, and clear errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import zstandard

from tzoo.store.codec import (
    FORMAT_VERSION,
    MAGIC,
    BlobFormatError,
    decode_array_header,
    decode_arrays,
    encode_arrays,
)

SHAPES = [(), (1,), (7,), (5, 6), (2, 3, 4, 5), (3, 4, 9, 9)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def attention_like(rng: np.random.Generator, layers: int, heads: int, tokens: int) -> np.ndarray:
    """Causal softmax weights, (layers, heads, T, T), rows summing to 1 like real attention."""
    scores = rng.normal(scale=3.0, size=(layers, heads, tokens, tokens))
    future = np.triu(np.ones((tokens, tokens), dtype=bool), k=1)
    scores[..., future] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def round_trip(array: np.ndarray, precision: str) -> np.ndarray:
    decoded = decode_arrays(encode_arrays({"x": array}, precision=precision))  # type: ignore[arg-type]
    assert list(decoded) == ["x"]
    result = decoded["x"]
    assert result.shape == array.shape
    assert result.dtype == array.dtype
    return result


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_precision_is_exact_for_float32(rng: np.random.Generator, shape: tuple) -> None:
    array = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(round_trip(array, "float32"), array)


def test_float32_precision_rounds_float64_to_float32(rng: np.random.Generator) -> None:
    array = rng.normal(size=(4, 5))
    result = round_trip(array, "float32")
    np.testing.assert_array_equal(result, array.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_float16_error_within_float16_precision(rng: np.random.Generator, shape: tuple) -> None:
    array = (rng.normal(size=shape) * 100).astype(np.float32)
    result = round_trip(array, "float16")
    # Round-to-nearest: relative error at most 2**-11 for normal numbers, an absolute
    # 2**-25 (half the smallest subnormal step) near zero.
    bound = np.maximum(np.abs(array) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(result - array) <= bound)


@pytest.mark.parametrize("shape", SHAPES)
def test_uint8_error_within_half_a_step(rng: np.random.Generator, shape: tuple) -> None:
    array = (rng.normal(size=shape) * 5 + 2).astype(np.float32)
    result = round_trip(array, "uint8")
    if array.size > 1:
        scale = (float(array.max()) - float(array.min())) / 255
        eps = 4 * np.finfo(np.float32).eps * float(np.abs(array).max())
        assert np.abs(result - array).max() <= scale / 2 + eps
    else:
        np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize(
    ("precision", "relative_bound"), [("float32", 0.0), ("float16", 2.0**-11), ("uint8", None)]
)
def test_attention_tensor_round_trip(
    rng: np.random.Generator, precision: str, relative_bound: float | None
) -> None:
    attention = attention_like(rng, layers=2, heads=3, tokens=17)  # (L, H, T, T)
    result = round_trip(attention, precision)
    error = np.abs(result - attention)
    if relative_bound is None:  # uint8 over [0, 1]: half a step of 1/255
        assert error.max() <= (1 / 255) / 2 + 1e-6
    else:
        assert np.all(error <= np.maximum(attention * relative_bound, 2.0**-25))
    # Masked (future) positions stay exactly zero whatever the precision.
    future = np.triu(np.ones((17, 17), dtype=bool), k=1)
    assert np.all(result[..., future] == 0)


@pytest.mark.parametrize("precision", ["float32", "float16", "uint8"])
@pytest.mark.parametrize(
    "dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint64, np.bool_]
)
def test_integers_and_bools_are_lossless(
    rng: np.random.Generator, precision: str, dtype: type
) -> None:
    array: np.ndarray
    if dtype is np.bool_:
        array = rng.random(size=(3, 5)) > 0.5
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(3, 5), dtype=dtype, endpoint=True)
        array[0, 0], array[0, 1] = info.min, info.max
    np.testing.assert_array_equal(round_trip(array, precision), array)


@pytest.mark.parametrize("precision", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_empty_arrays_keep_shape_and_dtype(precision: str, shape: tuple, dtype: type) -> None:
    round_trip(np.zeros(shape, dtype=dtype), precision)


@pytest.mark.parametrize("precision", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("value", [0.0, 1.0, -3.5, 1e-3])
def test_constant_arrays(precision: str, value: float) -> None:
    array = np.full((4, 4), value, dtype=np.float32)
    expected = array.astype(np.float16).astype(np.float32) if precision == "float16" else array
    np.testing.assert_array_equal(round_trip(array, precision), expected)


def test_several_named_arrays_keep_order_and_dtypes(rng: np.random.Generator) -> None:
    arrays = {
        "attention": attention_like(rng, 2, 2, 5),
        "token_ids": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "logits": rng.normal(size=(5, 11)).astype(np.float64),
    }
    decoded = decode_arrays(encode_arrays(arrays, precision="float16"))
    assert list(decoded) == list(arrays)
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype
        assert decoded[name].shape == array.shape
    np.testing.assert_array_equal(decoded["token_ids"], arrays["token_ids"])
    np.testing.assert_array_equal(decoded["mask"], arrays["mask"])


def test_empty_dict_round_trips() -> None:
    assert decode_arrays(encode_arrays({})) == {}


def test_big_endian_and_non_contiguous_inputs(rng: np.random.Generator) -> None:
    big_endian = rng.normal(size=(3, 4)).astype(">f4")
    transposed = rng.normal(size=(3, 4)).astype(np.float32).T
    decoded = decode_arrays(encode_arrays({"be": big_endian, "t": transposed}, precision="float32"))
    np.testing.assert_array_equal(decoded["be"], big_endian)
    np.testing.assert_array_equal(decoded["t"], transposed)
    assert decoded["t"].flags.writeable


def test_float16_input_is_never_widened() -> None:
    array = np.linspace(0, 1, 10, dtype=np.float16)
    blob = encode_arrays({"x": array}, precision="float32")
    assert decode_array_header(blob)[0]["dtype"] == "<f2"
    np.testing.assert_array_equal(decode_arrays(blob)["x"], array)


def test_header_describes_arrays() -> None:
    blob = encode_arrays({"a": np.ones((2, 3), np.float32)}, precision="uint8")
    (entry,) = decode_array_header(blob)
    assert entry["name"] == "a"
    assert entry["shape"] == [2, 3]
    assert entry["dtype"] == "|u1"
    assert entry["orig_dtype"] == "float32"
    assert entry["min"] == 1.0
    assert entry["scale"] == 0.0


def test_attention_blob_is_far_smaller_than_json(rng: np.random.Generator) -> None:
    attention = attention_like(rng, layers=12, heads=12, tokens=50).astype(np.float16)
    blob = encode_arrays({"attention": attention}, precision="float16")
    json_bytes = len(json.dumps(attention.tolist()).encode())
    ratio = len(blob) / json_bytes
    assert ratio < 0.1, f"blob is {ratio:.3f} of the JSON size"


# --- non-finite values and overflow ----------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_nan_and_inf_survive_float_precisions(precision: str) -> None:
    array = np.array([0.5, np.nan, np.inf, -np.inf, -2.0], dtype=np.float32)
    result = round_trip(array, precision)
    np.testing.assert_array_equal(np.isnan(result), np.isnan(array))
    np.testing.assert_array_equal(result[[0, 2, 3, 4]], array[[0, 2, 3, 4]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_uint8_refuses_nan_and_inf(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_arrays({"x": np.array([0.0, bad, 1.0])}, precision="uint8")


def test_float16_refuses_values_beyond_its_range() -> None:
    with pytest.raises(ValueError, match=r"'big' holds 70000.*float16 range"):
        encode_arrays({"big": np.array([1.0, 70000.0], dtype=np.float32)}, precision="float16")
    # The largest float16 (65504) itself is fine.
    assert round_trip(np.array([65504.0, -65504.0], dtype=np.float32), "float16").tolist() == [
        65504.0,
        -65504.0,
    ]


def test_float32_refuses_float64_values_beyond_its_range() -> None:
    with pytest.raises(ValueError, match="float32 range"):
        encode_arrays({"x": np.array([1e300])}, precision="float32")


# --- bad inputs to encode --------------------------------------------------------------


def test_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        encode_arrays({"x": np.zeros(2)}, precision="int4")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "array", [np.array(["a", "b"]), np.array([1 + 2j]), np.array([object()], dtype=object)]
)
def test_unsupported_dtypes(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="only bool, integer and float"):
        encode_arrays({"x": array})


def test_empty_name() -> None:
    with pytest.raises(ValueError, match="non-empty strings"):
        encode_arrays({"": np.zeros(2)})


# --- corrupt blobs ---------------------------------------------------------------------


def make_blob(payload: bytes) -> bytes:
    return MAGIC + zstandard.ZstdCompressor().compress(payload)


def make_payload(header: object, data: bytes = b"") -> bytes:
    header_bytes = json.dumps(header).encode()
    return struct.pack("<I", len(header_bytes)) + header_bytes + data


@pytest.fixture
def good_blob(rng: np.random.Generator) -> bytes:
    return encode_arrays(
        {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": np.arange(6)}, precision="uint8"
    )


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "expected magic"),
        (b"PK\x03\x04zipfile", "expected magic"),
        (b"TZB2" + b"\x00" * 20, "expected magic"),
        (MAGIC, "corrupt or truncated"),
        (MAGIC + b"not zstd at all", "corrupt or truncated"),
        (make_blob(b"\x01\x00"), "no header length"),
        (make_blob(b"\xff\x00\x00\x00{}"), "header runs past the end"),
        (make_blob(b"\x03\x00\x00\x00{x}"), "not valid JSON"),
        (make_blob(make_payload({"version": 99, "arrays": []})), "unsupported array blob version"),
        (make_blob(make_payload([1, 2])), "unsupported array blob version"),
        (make_blob(make_payload({"version": FORMAT_VERSION})), "no 'arrays' list"),
        (make_blob(make_payload({"version": FORMAT_VERSION, "arrays": [{}]})), "malformed"),
        (make_blob(make_payload({"version": FORMAT_VERSION, "arrays": ["x"]})), "malformed"),
    ],
)
def test_corrupt_blobs_raise_blob_format_error(blob: bytes, message: str) -> None:
    with pytest.raises(BlobFormatError, match=message):
        decode_arrays(blob)


def entry(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "x",
        "dtype": "<f4",
        "orig_dtype": "float32",
        "shape": [2],
        "offset": 0,
        "length": 8,
    }
    return base | overrides


@pytest.mark.parametrize(
    ("bad_entry", "message"),
    [
        (entry(length=12), "length does not match"),
        (entry(shape=[-2]), "negative shape"),
        (entry(offset=4), "runs past the end"),
        (entry(dtype="<U2", length=16), "unsupported dtype"),
        (entry(orig_dtype="no-such-dtype"), "malformed"),
        (entry(name=5), "non-string name"),
        (entry(dtype="|u1", length=2), "malformed"),  # uint8 float without scale/min
    ],
)
def test_inconsistent_header_entries(bad_entry: dict[str, object], message: str) -> None:
    blob = make_blob(make_payload({"version": FORMAT_VERSION, "arrays": [bad_entry]}, b"\0" * 8))
    with pytest.raises(BlobFormatError, match=message):
        decode_arrays(blob)


def test_every_truncation_raises_blob_format_error(good_blob: bytes) -> None:
    for end in range(len(good_blob)):
        with pytest.raises(BlobFormatError):
            decode_arrays(good_blob[:end])


def test_every_flipped_byte_raises_blob_format_error(good_blob: bytes) -> None:
    for position in range(len(good_blob)):
        corrupt = bytearray(good_blob)
        corrupt[position] ^= 0x5A
        with pytest.raises(BlobFormatError):
            decode_arrays(bytes(corrupt))


def test_non_bytes_input() -> None:
    with pytest.raises(BlobFormatError, match="expected bytes"):
        decode_arrays("TZB1...")  # type: ignore[arg-type]


def test_blob_format_error_is_a_value_error() -> None:
    assert issubclass(BlobFormatError, ValueError)
