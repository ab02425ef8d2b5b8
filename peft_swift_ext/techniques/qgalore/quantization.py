"""Group-wise integer quantisation in plain torch (any device), with optional stochastic rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedTensor:
    """Unsigned integer codes with one scale and zero point per group of `group_size` values.

    4-bit codes are packed two per byte, so the codes take `numel × bits / 8` bytes. A value is
    `code * scale + zero` of its group.

    Args:
        codes: the flat `uint8` codes.
        scales: one float32 step size per group.
        zeros: one float32 offset (the group's minimum) per group.
        shape: shape of the quantised tensor.
        bits: 4 or 8.
        group_size: values per group.
        dtype: dtype of the tensor that was quantised (what `dequantize` returns by default).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: torch.Size
    bits: int
    group_size: int
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Bytes of the codes, scales and zero points."""
        return sum(t.nbytes for t in (self.codes, self.scales, self.zeros))


def quantize(tensor: torch.Tensor, bits: int = 4, group_size: int = 256, stochastic: bool = False) -> QuantizedTensor:
    """Asymmetric min-max quantisation of `tensor` per group of consecutive values.

    Nearest rounding errs by at most half a step (`scale / 2`) per value; stochastic rounding errs by less
    than one step and is unbiased (its expectation is the input), so small updates survive on average.

    Args:
        tensor: values to quantise; its element count must be a multiple of `group_size`.
        bits: 4 or 8.
        group_size: values sharing one scale and zero point.
        stochastic: round up with probability equal to the fractional part instead of to nearest.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if tensor.numel() % group_size:
        raise ValueError(f"{tensor.numel()} values do not split into groups of {group_size}")
    groups = tensor.detach().float().reshape(-1, group_size)
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    levels = 2**bits - 1
    scales = ((high - low) / levels).clamp(min=1e-12)
    # In place after the first subtraction: a weight-sized float temporary, not four.
    scaled = (groups - low).div_(scales)
    scaled = scaled.add_(torch.rand_like(scaled)).floor_() if stochastic else scaled.round_()
    codes = scaled.clamp_(0, levels).to(torch.uint8).flatten()
    if bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    return QuantizedTensor(codes, scales.squeeze(1), low.squeeze(1), tensor.shape, bits, group_size, tensor.dtype)


def dequantize(quantized: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float values of a `QuantizedTensor`.

    Args:
        quantized: what `quantize` returned.
        dtype: dtype of the result; default the original tensor's dtype.
    """
    codes = quantized.codes
    if quantized.bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=1).flatten()
    groups = codes.float().reshape(-1, quantized.group_size)
    values = groups.mul_(quantized.scales[:, None]).add_(quantized.zeros[:, None])
    return values.reshape(quantized.shape).to(dtype or quantized.dtype)


def pick_group_size(numel: int, preferred: int) -> int:
    """The largest group size not above `preferred` that divides `numel` (so any matrix can be quantised).

    Args:
        numel: number of values to quantise.
        preferred: the group size wanted.
    """
    return next((size for size in range(min(preferred, numel), 0, -1) if numel % size == 0), 1)
