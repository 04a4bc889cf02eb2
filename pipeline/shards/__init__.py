"""The shard format: the one contract between `letstalk prepare` and training.

One WebDataset sample is one segment of one source video (DESIGN.md section 2):

    __key__       "<video id>/<segment index>"
    latents.npy   float16 [T, C, h, w]  VAE posterior mean, unscaled, one per frame
    audio.npy     float16 [T, K, D]     audio features, K vectors per video frame
    audio.flac    the segment's 16 kHz mono waveform
    json          fps, sample_rate, frames, face_box, source (absolute path), encoder ids

Arrays are stored with ``numpy.save(allow_pickle=False)`` and read back the same
way, so nothing in a shard is ever unpickled. Nothing outside this package knows the
member names or opens a shard; each concern has its module, and everything is
importable from `pipeline.shards`:

    schema.py    member names, keys, `.npy` encoding, `Segment` (writer and reader import it)
    npy.py       `NpyMember`: a `.npy` member read by offset, only the rows a clip needs
    reading.py   `read_samples`, the one tar reader; `read_segments`, the one decoding stream
    writing.py   `AtomicShardWriter`: complete shards only, with their index rows
    index.py     `index_shards`, the one walk over headers; `write_index` / `index_dataset`
    manifest.py  `Manifest` (encoders, sizes, inputs, shards) and the speaker splits
    faults.py    `BadSamples`, the one fault policy (a damaged sample is skipped, named and
                 counted; past a budget the run stops with a message)

Splits are by speaker (`speaker_split`; `prepare` records each input's speaker and
split in the manifest, a list's `split` column winning), so no speaker is in both.
"""

from pipeline.shards.faults import BadSamples, DataWarning, TooManyBadSamples
from pipeline.shards.index import (INDEX, INDEX_COLUMNS, INDEX_LOG, IndexedSample, index_dataset, index_shards,
                                   write_index)
from pipeline.shards.manifest import MANIFEST, MANIFEST_VERSION, Manifest, log_path, speaker_split, split_warning
from pipeline.shards.npy import NPY_HEADER_ERRORS, NpyMember
from pipeline.shards.reading import decode, iter_tar, read_samples, read_segments
from pipeline.shards.schema import (AUDIO, LATENTS, MEMBERS, META, SHARD_PATTERN, TRAINING_MEMBERS, WAVEFORM, Segment,
                                    ShardFormatError, npy_bytes, npy_load, sample_key, video_id)
from pipeline.shards.writing import AtomicShardWriter

__all__ = [
    "AUDIO",
    "INDEX",
    "INDEX_COLUMNS",
    "INDEX_LOG",
    "LATENTS",
    "MANIFEST",
    "MANIFEST_VERSION",
    "MEMBERS",
    "META",
    "NPY_HEADER_ERRORS",
    "SHARD_PATTERN",
    "TRAINING_MEMBERS",
    "WAVEFORM",
    "AtomicShardWriter",
    "BadSamples",
    "DataWarning",
    "IndexedSample",
    "Manifest",
    "NpyMember",
    "Segment",
    "ShardFormatError",
    "TooManyBadSamples",
    "decode",
    "index_dataset",
    "index_shards",
    "iter_tar",
    "log_path",
    "npy_bytes",
    "npy_load",
    "read_samples",
    "read_segments",
    "sample_key",
    "speaker_split",
    "split_warning",
    "video_id",
    "write_index",
]
