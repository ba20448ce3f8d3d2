"""Storage codecs for cached hidden states: bf16, fp16, fp8 (e4m3) and int8.

A tensor of shape (N, G, d) is stored row by row, a row being one token's d-vector of one group
(a group is one target layer; the final hidden state has one group). bf16/fp16 store the values
as they are (exact for inputs already in that dtype). fp8 and int8 store one fp32 scale per row:

    fp8:  scale = absmax / 448,  q = e4m3(x / scale)    |x - x'| <= 2^-4 |x| + scale * 2^-10
    int8: scale = absmax / 127,  q = round(x / scale)   |x - x'| <= scale / 2

A row scale rather than a tensor scale because the target's layers (and tokens) differ in
magnitude by orders of magnitude (massive activations), which one shared scale would crush.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SCALE_BYTES = {"bf16": 0, "fp16": 0, "fp8": 4, "int8": 4}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}


def row_bytes(storage_dtype: str, d: int) -> int:
    """Bytes one stored row of width d takes (values + its scale)."""
    return d * VALUE_BYTES[storage_dtype] + SCALE_BYTES[storage_dtype]


def encode(x: torch.Tensor, storage_dtype: str) -> tuple[bytes, bytes]:
    """Encode x (N, G, d) -> (values bytes, scales bytes); scales are fp32 (N, G), empty for bf16/fp16."""
    x = x.detach().cpu()
    if storage_dtype in ("bf16", "fp16"):
        return _to_bytes(x.to(_TORCH_DTYPE[storage_dtype])), b""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # (N, G, 1)
    qmax = FP8_MAX if storage_dtype == "fp8" else INT8_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if storage_dtype == "fp8":
        q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        q = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return _to_bytes(q), _to_bytes(scale.squeeze(-1).contiguous())


def decode(values: bytes, scales: bytes, shape: tuple[int, int, int], storage_dtype: str,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``encode``: bytes -> tensor of ``shape`` (N, G, d) in ``out_dtype``."""
    n, g, d = shape
    expected = n * g * d * VALUE_BYTES[storage_dtype]
    if len(values) != expected:
        raise ValueError(f"hidden-state blob has {len(values)} bytes, expected {expected} for shape {shape} in {storage_dtype}")
    q = _from_bytes(values, _TORCH_DTYPE[storage_dtype]).view(n, g, d)
    if storage_dtype in ("bf16", "fp16"):
        return q.to(out_dtype)
    if len(scales) != n * g * 4:
        raise ValueError(f"scale blob has {len(scales)} bytes, expected {n * g * 4} for {n}x{g} rows")
    scale = _from_bytes(scales, torch.float32).view(n, g, 1)
    return (q.float() * scale).to(out_dtype)


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(b: bytes, dtype: torch.dtype) -> torch.Tensor:
    if len(b) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dtype)
