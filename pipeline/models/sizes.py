"""The size registry: every model size by name, in one place.

Attention heads are not part of a size: they follow from ``DiTConfig.head_dim`` (heads =
hidden / head_dim), so one size can run at head_dim 64 or 128, the widths FlashAttention and
the fused SDPA kernels are fastest at; every hidden below is divisible by both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    hidden: int  # token width
    depth: int  # number of blocks, alternating spatial and temporal attention (as in Latte)
    mlp_ratio: float = 4.0


SIZES: dict[str, Size] = {
    "tiny": Size(hidden=128, depth=4),
    "S": Size(hidden=384, depth=12),
    "B": Size(hidden=768, depth=12),
    "L": Size(hidden=1024, depth=24),
    "XL": Size(hidden=1152, depth=28),
}


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}") from None
