"""`prepare`'s task manifest bookkeeping: seconds spent keeping the manifest in step with the shards, for a task
of `--inputs` one-segment inputs at 4 samples a shard (tiny segments, so the shard writing itself is small).
Before the change log, the whole manifest (which grows with every input) was rewritten after every event.

    python benchmarks/task_log.py [--inputs 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.prepare import _TaskLog
from pipeline.shards import AtomicShardWriter, Manifest, Segment, sample_key

VAE = {"id": "random", "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": 4, "downsample": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    def segment(i: int) -> Segment:
        latents, audio = rng.standard_normal((2, 4, 2, 2)), rng.standard_normal((2, 1, 4))
        return Segment(sample_key(f"video{i:06d}", 0), latents.astype(np.float16), audio.astype(np.float16), b"fLaC",
                       {"frames": 2})

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        manifest = Manifest(vae=VAE, audio_encoder={"id": "random", "K": 1, "D": 4}, complete=False)
        start = time.perf_counter()
        with AtomicShardWriter(out, max_samples=4) as writer:
            log = _TaskLog(out, "manifest.json", manifest, writer)
            for i in range(args.inputs):
                source = f"/data/video{i:06d}.mp4"
                log.write(source, 0, segment(i))
                log.input_done({"path": source, "id": f"video{i:06d}", "speaker": f"s{i // 10}", "split": "train",
                                "segments": 1, "frames": 2})
            log.finish()
        seconds = time.perf_counter() - start
        assert len(Manifest.load(out).inputs) == args.inputs
    print(f"| task of {args.inputs} inputs, {args.inputs // 4} shards | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
