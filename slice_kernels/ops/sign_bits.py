"""The one-bit form of a sign matrix (PS-LoRA's bit history): one bit per entry, packed little-endian along
each row into uint8 (``m × ceil(n/8)``)."""

from __future__ import annotations

import torch


def pack_sign_bits(H: torch.Tensor) -> torch.Tensor:
    """One bit per entry of a 2-D tensor: bit j%8 of byte j//8 of row i is 1 when ``H[i, j] >= 0``.

    Exact zeros pack as +1: the bit form has no third state (documented departure from sign(0) = 0)."""
    m, n = H.shape
    nb = (n + 7) // 8
    pos = (H >= 0).to(torch.uint8)
    pad = nb * 8 - n
    if pad:
        pos = torch.nn.functional.pad(pos, (0, pad))
    pos = pos.view(m, nb, 8)
    out = pos[..., 0].clone()
    for k in range(1, 8):  # eight strided shifts/ors: far cheaper than a weighted sum over a size-8 dim
        out |= pos[..., k] << k
    return out


def unpack_sign_bits(bits: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """±1 matrix (m×n) from ``pack_sign_bits``'s output."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    b = (bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    b = b.reshape(bits.shape[0], -1)[:, :n]
    return b.to(dtype) * 2 - 1
