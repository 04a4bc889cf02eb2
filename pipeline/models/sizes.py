"""The size registry: every model size by name, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    hidden: int  # token width
    depth: int  # number of blocks, alternating spatial and temporal attention (as in Latte)
    heads: int  # hidden / heads is the head dim: 64 for every size (FlashAttention-friendly)
    mlp_ratio: float = 4.0


SIZES: dict[str, Size] = {
    "tiny": Size(hidden=128, depth=4, heads=2),
    "S": Size(hidden=384, depth=12, heads=6),
    "B": Size(hidden=768, depth=12, heads=12),
    "L": Size(hidden=1024, depth=24, heads=16),
    "XL": Size(hidden=1152, depth=28, heads=18),
}


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}") from None
