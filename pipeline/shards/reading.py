"""Reading shards: `read_samples` is the one tar reader (optionally only some members), `read_segments` the one
decoding stream."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Collection, Iterable
from typing import Any, Iterator


from pipeline.shards.faults import BadSamples
from pipeline.shards.npy import NPY_HEADER_ERRORS, NpyMember
from pipeline.shards.schema import MEMBERS, WAVEFORM, Segment, ShardFormatError

def read_samples(path: str | os.PathLike, members: Collection[str] | None = None,
                 keep: Callable[[str], bool] | None = None, lazy: Collection[str] = ()) -> Iterator[dict[str, Any]]:
    """The one tar reader: a shard's samples {__key__, __url__, member: bytes} in tar order.

    `members`: read only these (the others' payloads are seeked past, not read), e.g. training skips the FLAC;
    `keep`: read only the samples whose key passes it; `lazy`: `.npy` members given as `NpyMember` (header read
    and checked, data read on demand). A shard that cannot be opened or is damaged part-way
    yields its complete samples before the damage and then raises ShardFormatError naming the shard and the
    sample being read (its `key`; None when the damage lies outside every sample read).
    """
    url, sample = str(path), None
    try:
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _, ext = member.name.partition(".")
                if keep is not None and not keep(key):
                    continue
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key, "__url__": url}
                if ext in lazy:
                    try:
                        sample[ext] = NpyMember.from_tar(url, member, tar.extractfile(member))
                    except ShardFormatError as err:  # this sample is damaged, the shard reads on
                        sample["__error__"] = str(err)
                elif members is None or ext in members:
                    sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
    except (OSError, tarfile.TarError) as err:
        if sample is not None and set(members or MEMBERS) <= sample.keys():  # read whole: the damage comes after it
            yield sample
            sample = None
        key = sample["__key__"] if sample is not None else None
        at = f"sample {key}: " if key is not None else ""
        raise ShardFormatError(f"{url}: {at}unreadable shard ({type(err).__name__}: {err})", key) from err


def iter_tar(path: str | os.PathLike) -> Iterator[Segment]:
    """Every sample of a shard, decoded; the first damage raises (tools and tests; training uses `read_segments`)."""
    for sample in read_samples(path):
        yield decode(sample)


def decode(sample: dict[str, Any]) -> Segment:
    """Raw member bytes -> Segment; any decoding failure (an object array, a bad header, a wrong shape or dtype)
    becomes a ShardFormatError naming shard and key. Nothing is unpickled."""
    if "__error__" in sample:
        raise ShardFormatError(sample["__error__"], sample.get("__key__"))
    try:
        return Segment.from_wds(sample)
    except ShardFormatError:
        raise
    except (*NPY_HEADER_ERRORS, EOFError, OSError) as err:
        raise ShardFormatError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {err}") from err


def read_segments(paths: Iterable[str], faults: BadSamples, keep: Callable[[str], bool] | None = None,
                  members: Collection[str] | None = None, lazy: Collection[str] = ()) -> Iterator[Segment]:
    """Shards -> decoded Segments, under `faults`: each damaged shard or sample is skipped, named and counted.

    keep, members: see `read_samples`; without WAVEFORM among the members the Segment's `waveform_flac` is
    empty. With `keep`, damage outside every kept sample (what the index already found and counted, such as
    the rest of a truncated shard) is not counted again.
    """
    for path in paths:
        try:
            for sample in read_samples(path, members, keep, lazy):
                if members is not None and WAVEFORM not in members:
                    sample[WAVEFORM] = b""
                try:
                    yield decode(sample)
                except ShardFormatError as err:
                    faults.skip(err, err.key or sample.get("__key__"))
        except ShardFormatError as err:
            if keep is None or err.key is not None:
                faults.skip(err, err.key)
