"""Storage codecs: round trips within the error bounds stated in deepspec/data/cache/quantize.py."""
from __future__ import annotations

import pytest
import torch

from deepspec.data.cache import quantize

DTYPES = ("bf16", "fp16", "fp8", "int8")
# Bytes per stored value and per row scale, as documented (2-byte floats; 1-byte codes + one fp32 scale per row).
VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SCALE_BYTES = {"bf16": 0, "fp16": 0, "fp8": 4, "int8": 4}
QMAX = {"fp8": 448.0, "int8": 127.0}
SHAPES = [(1, 1, 8), (7, 3, 64), (33, 5, 48)]


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def _row_scale(x: torch.Tensor, dt: str) -> torch.Tensor:
    """Documented per-row scale: absmax over d / qmax, shape (N, G, 1)."""
    return x.float().abs().amax(-1, keepdim=True) / QMAX[dt]


def _bound(x: torch.Tensor, dt: str) -> torch.Tensor:
    """The documented bound on |x - x'| for each element."""
    scale = _row_scale(x, dt)
    if dt == "fp8":
        return 2.0 ** -4 * x.abs() + scale * 2.0 ** -10
    return scale / 2


def _roundtrip(x, dt, out_dtype=torch.float32):
    values, scales = quantize.encode(x, dt)
    return values, scales, quantize.decode(values, scales, tuple(x.shape), dt, out_dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dt,tdtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_dtypes_exact_for_inputs_in_that_dtype(dt, tdtype, shape):
    x = _randn(shape, seed=sum(shape), dtype=tdtype)
    values, scales, y = _roundtrip(x, dt, out_dtype=tdtype)
    assert len(values) == x.numel() * 2 and scales == b""
    assert y.dtype == tdtype and torch.equal(y, x)
    # The float32 view is the same numbers, and a float32 input is encoded as its cast.
    assert torch.equal(_roundtrip(x, dt)[2], x.float())
    assert _roundtrip(x.float(), dt)[0] == values


@pytest.mark.parametrize("dt,tdtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_dtypes_round_float32_to_nearest(dt, tdtype):
    x = _randn((5, 2, 32), seed=3)
    y = _roundtrip(x, dt)[2]
    assert torch.equal(y, x.to(tdtype).float())
    mant = 8 if dt == "bf16" else 11  # significand bits: half-ulp relative error <= 2^-mant
    assert ((y - x).abs() <= 2.0 ** -mant * x.abs()).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dt", ["fp8", "int8"])
def test_scaled_dtypes_within_stated_bound(dt, shape):
    x = _randn(shape, seed=10 + sum(shape))
    values, scales, y = _roundtrip(x, dt)
    n, g, d = shape
    assert len(values) == n * g * d * VALUE_BYTES[dt]
    assert len(scales) == n * g * SCALE_BYTES[dt]
    stored_scale = torch.frombuffer(bytearray(scales), dtype=torch.float32).view(n, g, 1)
    torch.testing.assert_close(stored_scale, _row_scale(x, dt), rtol=1e-6, atol=0)
    err = (y - x).abs()
    assert (err <= _bound(x, dt)).all(), f"max excess {(err - _bound(x, dt)).max().item()}"
    # Not trivially within bound: the codec actually loses information at this precision.
    assert err.max() > 0
    # The largest element of each row is reproduced (it maps to +-qmax, which both codes hold exactly).
    idx = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(y.gather(-1, idx), x.gather(-1, idx), rtol=1e-6, atol=0)


def test_fp8_codes_are_e4m3_values():
    x = _randn((4, 2, 64), seed=5)
    values, scales = quantize.encode(x, "fp8")
    codes = torch.frombuffer(bytearray(values), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.isfinite(codes).all() and codes.abs().max() <= 448.0
    y = quantize.decode(values, scales, (4, 2, 64), "fp8")
    scale = torch.frombuffer(bytearray(scales), dtype=torch.float32).view(4, 2, 1)
    assert torch.equal(y, codes.view(4, 2, 64) * scale)


def test_int8_codes_are_rounded_ratios():
    x = _randn((6, 3, 40), seed=6)
    values, scales = quantize.encode(x, "int8")
    codes = torch.frombuffer(bytearray(values), dtype=torch.int8).view(6, 3, 40).float()
    assert codes.abs().max() <= 127
    ratio = x / _row_scale(x, "int8")
    assert ((codes - ratio).abs() <= 0.5 + 1e-4).all()


@pytest.mark.parametrize("dt", DTYPES)
def test_zero_rows(dt):
    x = _randn((4, 3, 16), seed=7)
    x[1] = 0.0          # a whole token
    x[2, 1] = 0.0       # one group of one token
    x_in = x.to(torch.bfloat16) if dt == "bf16" else x.to(torch.float16) if dt == "fp16" else x
    _, _, y = _roundtrip(x_in, dt)
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all() and (y[2, 1] == 0).all()
    nonzero = y[0].abs().sum()
    assert nonzero > 0
    if dt in QMAX:
        assert ((y - x).abs() <= _bound(x, dt)).all()


def test_all_zero_tensor():
    for dt in DTYPES:
        x = torch.zeros(3, 2, 8)
        _, _, y = _roundtrip(x, dt)
        assert torch.equal(y, x), dt


@pytest.mark.parametrize("dt", ["fp8", "int8"])
def test_per_row_scales_keep_relative_precision_across_magnitudes(dt):
    # Group 0 ~1e-3, group 1 ~1e3, group 2 mixes per token: a shared scale would flush the small rows.
    x = _randn((16, 3, 64), seed=8)
    x[:, 0] *= 1e-3
    x[:, 1] *= 1e3
    x[::2, 2] *= 1e-3
    x[1::2, 2] *= 1e3
    _, _, y = _roundtrip(x, dt)
    err = (y - x).abs()
    assert (err <= _bound(x, dt)).all()
    rowmax = x.abs().amax(-1)                      # (N, G)
    rel = err.amax(-1) / rowmax                    # worst error relative to its row's magnitude
    limit = 2.0 ** -4 + 2.0 ** -10 / 448 if dt == "fp8" else 0.5 / 127
    assert (rel <= limit * (1 + 1e-5)).all(), rel.max().item()
    # Small rows keep the same relative precision as the large ones (within a factor of a few).
    assert rel[:, 0].mean() < 4 * rel[:, 1].mean() and rel[:, 1].mean() < 4 * rel[:, 0].mean()
    # And they are not flushed to zero.
    assert (y[:, 0] != 0).float().mean() > 0.9


@pytest.mark.parametrize("dt", DTYPES)
def test_wrong_blob_length_raises(dt):
    x = _randn((3, 2, 16), seed=9)
    values, scales = quantize.encode(x, dt)
    shape = (3, 2, 16)
    with pytest.raises(ValueError):
        quantize.decode(values[:-1], scales, shape, dt)
    with pytest.raises(ValueError):
        quantize.decode(values + b"\x00" * VALUE_BYTES[dt], scales, shape, dt)
    with pytest.raises(ValueError):
        quantize.decode(values, scales, (3, 2, 17), dt)
    if SCALE_BYTES[dt]:
        with pytest.raises(ValueError):
            quantize.decode(values, scales[:-4], shape, dt)
        with pytest.raises(ValueError):
            quantize.decode(values, b"", shape, dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_row_bytes_matches_encoding(dt):
    d = 24
    values, scales = quantize.encode(_randn((5, 2, d), seed=11), dt)
    assert len(values) + len(scales) == 10 * quantize.row_bytes(dt, d)
    assert quantize.row_bytes(dt, d) == d * VALUE_BYTES[dt] + SCALE_BYTES[dt]


def test_empty_tensor_roundtrip():
    for dt in DTYPES:
        x = torch.zeros(0, 1, 16)
        values, scales = quantize.encode(x, dt)
        assert values == b"" and scales == b""
        assert quantize.decode(values, scales, (0, 1, 16), dt).shape == (0, 1, 16)
