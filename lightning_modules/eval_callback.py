"""EvalCallback: `letstalk evaluate` inside a training run, every N steps, with the EMA weights, on every rank.

The clips, their generation and their scores are `pipeline.evaluate`'s (`select_segments`,
`ClipLoader`, `generate_clip`, `MetricSuite`), so a score logged at step N equals what
`letstalk evaluate` reports for the step-N checkpoint on the same clips. The clips are chosen once,
at fit start, from the run's validation split (or from `data`, e.g. held-out shards); clip i is
generated with seed `seed + i` by rank i % world_size.

Fit start does only cheap work: the dataset's manifest, its frame size and fps against the model, the VAE
folder and the metric weights are checked (one error naming the setting), and the clips are chosen (their
samples are read from the shards; nothing is decoded). Their ground truth (source video decoding, the
training crop, the VAE reconstruction: minutes on a large run) is loaded at the first evaluation, each rank
its share, through a `pipeline.evaluate.ClipCache` in `<default_root_dir>/eval_cache/` (or `cache_dir`),
so a resumed or requeued run, or another run on the same data, reads it back instead. Rank 0 prints a
line on stderr when the loading starts, progress lines (`pipeline.progress.ProgressLines`: the first clip,
then every quarter of its share or 30 s, with an ETA), a line when it ends, and one line per evaluation
with its duration and main scores.

Per-clip statistics and the first `log_videos` videos (as mp4 bytes with their audio) and their
contact sheets (portrait | real | generated, every 10th frame) are gathered on rank 0, which logs
`eval/<metric>` to every logger, writes the videos and sheets under `<default_root_dir>/eval_videos/`
and logs them to W&B. Every rank runs the same collectives in the same order (the EMA gather under
ZeRO, one `all_gather_object`), whatever its share of clips; the loading of the clips at the first
evaluation holds none, so ranks that take longer over it only make the others wait at the first
collective. Training is not disturbed: the
network is a float32 copy of the EMA weights, the diffusion object is a fresh one, and the
python/numpy/torch random states are restored afterwards.

Timing: the callback runs in `on_train_batch_end`, after the optimizer's EMA update of that step
and when `ModelCheckpoint` saves, so both see the same EMA weights.
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.letstalk import LetsTalkModule, _coerce
from pipeline import media
from pipeline.diffusion import AUDIO_SCALE, REF_SCALE, Diffusion, DiffusionConfig
from pipeline.evaluate import (METRICS, ClipCache, ClipLoader, EvalClip, MetricsConfig, MetricSuite, generate_clip,
                                select_segments)
from pipeline.generate import TrainedNetwork
from pipeline.locate import fingerprint
from pipeline.metrics.appearance import comparison_sheet
from pipeline.progress import ProgressLines, duration
from pipeline.shards import BadSamples, DataWarning, Manifest, Segment, ShardFormatError
from pipeline.vae import load_vae


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block and put the python, numpy and torch (CPU and `device`'s CUDA) random states back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _mp4_bytes(frames: np.ndarray, clip: EvalClip) -> bytes:
    """The frames as an H.264 mp4 with the clip's audio muxed in (`media.write_video`), as bytes to gather."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        media.write_video(path, frames, clip.fps, audio=clip.waveform, sample_rate=media.SAMPLE_RATE)
        return path.read_bytes()


class EvalCallback(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of fit if `at_fit_end`), generate the fixed,
    seeded evaluation clips with the EMA weights and log every configured metric and a few videos.

    metrics: which metrics run (`pipeline.evaluate.MetricsConfig` or its fields as a dict); a metric
    without weights is skipped with one note, never estimated.
    data: dataset root to pick clips from (all its samples, as `letstalk evaluate --data`); None: the
    DataModule's validation split (its training split, with a warning, when that is empty).
    sampler, steps, audio_scale, ref_scale: generation settings, as `letstalk evaluate`.
    log_videos: how many of the clips (the first ones) are logged as videos.
    cache_dir: where the clips' ground truth is cached (module docstring); None: `<default_root_dir>/eval_cache/`.
    A folder shared by runs on the same dataset is safe: files are keyed by all they depend on and written
    atomically.
    """

    clock = staticmethod(time.monotonic)  # seconds, for the loading's progress lines (a test sets its own)
    progress_seconds = 30.0  # the longest gap between two progress lines while clips are loaded

    def __init__(self, every_n_steps: int = 500, num_clips: int = 8, metrics: MetricsConfig | dict | None = None,
                 data: str | None = None, sampler: str | None = None, steps: int | None = None,
                 audio_scale: float = AUDIO_SCALE, ref_scale: float = REF_SCALE, log_videos: int = 2, seed: int = 0,
                 at_fit_end: bool = True, cache_dir: str | None = None):
        checks = {"every_n_steps": (every_n_steps, every_n_steps >= 1), "num_clips": (num_clips, num_clips >= 1),
                  "steps": (steps, steps is None or steps >= 1), "log_videos": (log_videos, log_videos >= 0),
                  "seed": (seed, seed >= 0)}
        bad = [f"{name}={value!r}" for name, (value, ok) in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid EvalCallback arguments: {', '.join(bad)} "
                             "(need every_n_steps>=1, num_clips>=1, steps>=1, log_videos>=0, seed>=0)")
        self.every_n_steps, self.num_clips, self.data = every_n_steps, num_clips, data
        self.metrics = _coerce(MetricsConfig, metrics or {})
        self.sampler, self.steps, self.audio_scale, self.ref_scale = sampler, steps, audio_scale, ref_scale
        self.log_videos, self.seed, self.at_fit_end, self.cache_dir = log_videos, seed, at_fit_end, cache_dir
        self.keys: list[str] = []  # the chosen clips, in index order (the same on every rank)
        self.results: list[dict[str, Any]] = []  # rank 0: step, metrics, skipped, videos of each evaluation
        self.preload: dict[str, Any] | None = None  # this rank's loading of its clips: built, cached, seconds, cache
        self._segments: dict[int, Segment] = {}  # this rank's share, by index, until its ground truth is loaded
        self._clips: dict[int, EvalClip] | None = None  # this rank's share once loaded, by index
        self._source: tuple[str, Manifest, str, BadSamples] | None = None  # root, manifest, VAE path, fault policy
        self._suite: MetricSuite | None = None
        self._vae = None
        self._notes: dict[str, str] | None = None
        self._last_step = -1

    def _candidate_keys(self, trainer: L.Trainer) -> tuple[str, set[str] | None]:
        """(dataset root, keys to choose from): `data` whole, or the DataModule's validation split."""
        if self.data is not None:
            return self.data, None
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_samples"):
            raise ValueError("EvalCallback needs a LetsTalkDataModule (for its validation split) or `data`: "
                             "a dataset root to take evaluation clips from")
        samples = datamodule.val_samples
        if not samples:
            rank_zero_warn(f"{datamodule.root}: the validation split is empty (val_percent={datamodule.val_percent}); "
                           "EvalCallback evaluates on training segments", category=DataWarning)
            samples = datamodule.train_samples
        return str(datamodule.root), {s.key for s in samples}

    def on_fit_start(self, trainer: L.Trainer, pl_module: LetsTalkModule) -> None:
        """Cheap checks only (module docstring) and the choice of clips; their ground truth is loaded at the first
        evaluation (`_load_clips`)."""
        root, keys = self._candidate_keys(trainer)
        info = pl_module.hparams["data_info"]
        manifest = Manifest.load(root)
        if int(manifest.size) != int(info["size"]) or float(manifest.fps) != float(info["fps"]):
            raise ValueError(f"EvalCallback: {root}: frames are {manifest.size}px at {manifest.fps:g} fps, but the "
                             f"model trains on {info['size']}px at {info['fps']:g} fps")
        vae_path = info["vae"].get("path")
        if not vae_path:
            raise ValueError(f"EvalCallback: {root}: the training data's manifest names no VAE path "
                             "(data_info.vae.path); EvalCallback needs its decoder")
        if not Path(vae_path).is_dir():
            raise ValueError(f"EvalCallback: {vae_path}: no such VAE folder (data_info.vae.path, from the training "
                             "data's manifest)")
        self._suite = MetricSuite(self.metrics, device=str(pl_module.device))  # a bad weights file fails here
        # damaged data is skipped, named and counted by the training run's fault policy (the DataModule's)
        faults = getattr(trainer.datamodule, "faults", None) or BadSamples(total=manifest.num_samples)
        segments = select_segments(root, self.num_clips, self.seed, keys, faults)
        rank, world = trainer.global_rank, trainer.world_size
        self.keys = [s.key for s in segments]
        self._segments = {i: s for i, s in enumerate(segments) if i % world == rank}
        self._source = (root, manifest, vae_path, faults)
        self._clips, self._vae = None, None

    def _load_clips(self, trainer: L.Trainer, pl_module: LetsTalkModule) -> None:
        """This rank's clips: read from the cache, or decoded, cropped and VAE-reconstructed and cached; the VAE.
        Rank 0 reports progress on its share (every rank loads its own alongside)."""
        root, manifest, vae_path, faults = self._source
        start = self.clock()
        self._vae = load_vae(vae_path, device=pl_module.device)
        folder = Path(self.cache_dir) if self.cache_dir else Path(trainer.default_root_dir) / "eval_cache"
        load = ClipLoader(manifest, int(pl_module.hparams["data_info"]["size"]),
                          self._vae if self.metrics.appearance else None, root=root, decoder=self._vae,
                          cache=ClipCache(folder, {"vae_sha1": fingerprint(vae_path)}))
        share = len(self._segments)
        self._say(trainer, f"EvalCallback: loading the ground truth of {len(self.keys)} evaluation clips, {share} of "
                           f"them on rank 0 (cache: {folder})")
        lines = ProgressLines(share, "EvalCallback: ground truth", " clips", interval=self.progress_seconds,
                              fraction=0.25, clock=self.clock) if trainer.is_global_zero else None
        self._clips = {}
        for i, segment in self._segments.items():
            try:
                self._clips[i] = load(segment)
            except ShardFormatError as err:  # e.g. an undecodable waveform: this clip is left out
                faults.skip(err)
            if lines is not None:
                lines.update()
        seconds = self.clock() - start
        self.preload = {"built": load.built, "cached": load.cached, "seconds": seconds, "cache": str(folder)}
        self._say(trainer, f"EvalCallback: ground truth ready in {duration(seconds)} (rank 0: {load.built} built, "
                           f"{load.cached} read from the cache)")
        self._segments = {}

    @staticmethod
    def _say(trainer: L.Trainer, line: str) -> None:
        """One line on stderr, from rank 0 only (a batch job's log)."""
        if trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: LetsTalkModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: LetsTalkModule) -> None:
        if self.at_fit_end:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: LetsTalkModule) -> None:
        """One evaluation at the current step (once per step); every rank must call it."""
        step = trainer.global_step
        if step == 0 or step == self._last_step:
            return
        self._last_step = step
        device = pl_module.device
        local: list[tuple[int, dict[str, Any], tuple[bytes, np.ndarray] | None]] = []
        clip_frames = int(pl_module.hparams["data_info"]["clip_frames"])
        with preserved_rng(device):
            if self._clips is None:  # the first evaluation: no collective inside, so ranks may differ in time
                self._load_clips(trainer, pl_module)
            t0 = time.perf_counter()
            gen = TrainedNetwork(pl_module.ema_network(), Diffusion(DiffusionConfig(**pl_module.hparams["diffusion"])),
                            dict(pl_module.hparams["data_info"]))
            for i, clip in self._clips.items():
                frames = generate_clip(gen, self._vae, clip, self.seed + i, self.sampler, self.steps,
                                       self.audio_scale, self.ref_scale, str(device))
                shown = (_mp4_bytes(frames, clip), comparison_sheet(clip.real, frames)) if i < self.log_videos else None
                local.append((i, self._suite.clip_stats(frames, clip, clip_frames), shown))
        gathered = local
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[list[tuple[int, dict[str, Any], tuple[bytes, np.ndarray] | None]] | None] = \
                [None] * trainer.world_size
            dist.all_gather_object(parts, local)
            gathered = [item for part in parts for item in part]
        if trainer.is_global_zero:
            self._log(trainer, step, sorted(gathered, key=lambda item: item[0]), time.perf_counter() - t0)
        pl_module.restart_rate_window()

    def _log(self, trainer: L.Trainer, step: int,
             results: list[tuple[int, dict[str, Any], tuple[bytes, np.ndarray] | None]], seconds: float) -> None:
        """Rank 0: summarize, log `eval/*` to every logger, write the videos and sheets and log them to W&B."""
        values, skipped = self._suite.summarize([stats for _, stats, _ in results])
        if skipped != self._notes:
            self._notes = skipped
            for name, note in skipped.items():
                self._say(trainer, f"EvalCallback: skipped {METRICS[name][0]}: {note}")
        main = [n for n in (*METRICS, *(f"appearance/generated/{r}/psnr" for r in ("frame", "mouth"))) if n in values]
        references = Counter(stats["reference"] for _, stats, _ in results)
        self._say(trainer, f"EvalCallback: step {step}: {len(results)} clips in {duration(seconds)} ("
                           + ", ".join(f"{n} from {ref}" for ref, n in references.items()) + "); "
                           + ", ".join(f"{n} {values[n]:.4g}" for n in main))
        metrics = {f"eval/{name}": value for name, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "eval/seconds": seconds}, step=step)
            logger.save()
        folder = Path(trainer.default_root_dir) / "eval_videos" / f"step_{step:07d}"
        videos: list[tuple[str, Path]] = []
        sheets: list[Path] = []
        for i, stats, shown in results:
            if shown is not None:
                path = folder / f"{i:03d}_{stats['key'].replace('/', '_')}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(shown[0])
                media.write_image(path.with_suffix(".png"), shown[1])
                videos.append((stats["key"], path))
                sheets.append(path.with_suffix(".png"))
        if videos:
            captions = [key for key, _ in videos]
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_video("eval/videos", [str(p) for _, p in videos], step=step, caption=captions,
                                     format=["mp4"] * len(videos))
                    logger.log_image("eval/contact_sheets", [str(p) for p in sheets], step=step,
                                     caption=[f"{key}: portrait | real | generated" for key in captions])
        self.results.append({"step": step, "metrics": values, "skipped": skipped, "seconds": seconds,
                             "reference_frames": dict(references),
                             "videos": [str(p) for _, p in videos], "contact_sheets": [str(p) for p in sheets]})
