"""Evaluation's ground truth on face-cropped, production-shaped data: the frames training saw, or the stored latents.

Data: `tests/production.py` videos (640x480 30 fps, a real face panning and zooming over a busy scene) prepared
with `--crop face --size 128` and a tiny random SD-layout VAE; a tiny checkpoint built on it (not trained).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.letstalk import LetsTalkDataModule
from lightning_modules.letstalk import LetsTalkModule
from pipeline import media
from pipeline.evaluate import (_CHUNK, LATENT_DECODE, SOURCE_VIDEO, ClipCache, ClipLoader, EvalClip, MetricsConfig,
                               evaluate, select_segments)
from pipeline.metrics.appearance import face_mouth_box
from pipeline.options import Encoders, Frames, Sampling, Segments
from pipeline.prepare import prepare
from pipeline.shards import AtomicShardWriter, DataWarning, Manifest, Segment, iter_tar, write_index
from pipeline.synth import synthesize
from pipeline.vae import decode_latents, encode_frames, load_vae
from production import sd_vae, talking_video

SIZE, FPS = 128, 25.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 1.6 s videos, prepared with face crops into 0.8 s segments (two per video), and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("ground_truth")
    for i in range(2):
        talking_video(root / "videos" / f"rec{i}.mp4", seconds=1.6, seed=i)
    sd_vae(root / "sd-vae")
    prepare(root / "videos", root / "shards", encoders=Encoders(vae=str(root / "sd-vae")),
            frames=Frames(size=SIZE, crop="face", detect_every=3),
            segments=Segments(segment_seconds=0.8, min_segment_seconds=0.4), progress=False)
    info = LetsTalkDataModule(str(root / "shards"), clip_frames=8, audio_radius=2).data_info
    net = {"size": "tiny", "patch_size": 4, **{k: info[k] for k in ("latent_channels", "audio_dim", "audio_tokens")}}
    module = LetsTalkModule(net=net, data_info=info)
    state = module.state_dict()
    state.update({f"ema.{k[len('net.'):]}": v for k, v in module.state_dict().items()})
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": state}, root / "tiny.ckpt")
    return root


def _segments(corpus: Path) -> list[Segment]:
    return select_segments(corpus / "shards", 10, seed=0)


def test_ground_truth_is_the_training_crop_not_the_scene(corpus: Path):
    """VAE-encoding the loader's frames gives back the stored latents (to fp16 rounding): the very crop training
    encoded. The centre crop of the scene, which evaluation used to read, is far from it."""
    segments = _segments(corpus)
    assert [s.key for s in segments] == ["rec0/0000", "rec0/0001", "rec1/0000", "rec1/0001"]
    assert all(s.meta["crop"] == "face" and len(s.meta["face_boxes"]) == s.meta["frames"] for s in segments)
    vae = load_vae(corpus / "sd-vae")
    load = ClipLoader(Manifest.load(corpus / "shards"), SIZE, root=corpus / "shards")
    for segment in segments:
        clip = load(segment)
        assert clip.reference == SOURCE_VIDEO and clip.note == ""
        assert clip.real.shape == (segment.meta["frames"], SIZE, SIZE, 3)
        stored = segment.latents.astype(np.float32)
        again = encode_frames(vae, clip.real).astype(np.float32)
        np.testing.assert_allclose(again, stored, rtol=2**-10, atol=1e-4, err_msg=segment.key)
        start, frames = segment.meta["start_frame"], segment.meta["frames"]
        scene = media.read_video(segment.meta["source"], fps=FPS, size=SIZE)[start : start + frames]
        assert np.abs(scene.astype(int) - clip.real).mean() > 30, segment.key  # another picture altogether
        assert np.abs(encode_frames(vae, scene).astype(np.float32) - stored).max() > 0.5, segment.key


def test_source_is_decoded_once_per_video_and_only_up_to_the_segment(corpus: Path, monkeypatch):
    decoded: list[list[int]] = []
    real_iter = media.iter_video

    def counting(path, fps, size=None, chunk=64):
        decoded.append([])
        for frames in real_iter(path, fps, size, chunk):
            decoded[-1].append(len(frames))
            yield frames

    monkeypatch.setattr(media, "iter_video", counting)
    segments = _segments(corpus)
    first, second = segments[0], segments[1]  # rec0's frames [2, 22) and [22, 40) of 40
    load = ClipLoader(Manifest.load(corpus / "shards"), SIZE)
    load(first)
    end = first.meta["start_frame"] + first.meta["frames"]
    assert sum(decoded[0]) == -(-end // _CHUNK) * _CHUNK < 40  # stopped at the chunk holding the segment's end
    load(second)
    assert len(decoded) == 1 and sum(decoded[0]) == 40  # the next segment of the video: the same pass, read on
    load(first)
    assert len(decoded) == 2  # an earlier segment: decoded afresh


def _old_dataset(corpus: Path, out: Path, sources: dict[str, str]) -> Path:
    """The corpus's shards rewritten as an older `prepare` left them: each video's `json.source` as given
    (`sources`: video id -> path)."""
    with AtomicShardWriter(out) as writer:
        for segment in iter_tar(corpus / "shards" / "shard-000000.tar"):
            segment.meta["source"] = sources[segment.key.split("/")[0]]
            writer.write(segment)
    manifest = Manifest.load(corpus / "shards")
    manifest.shards = writer.shards
    manifest.save(out)
    write_index(out, manifest)
    return out


def test_evaluate_says_where_its_ground_truth_came_from(corpus: Path, tmp_path: Path, monkeypatch):
    """An older dataset with relative sources, evaluated from another folder: rec0's video is found beside the
    dataset folder, rec1's is gone. Each rec1 clip is warned about with the paths tried and scored against the
    VAE decode of its latents; the table and the result count both kinds; the contact sheets show the face crop."""
    folder = tmp_path / "corpus"
    (folder / "videos").mkdir(parents=True)
    shutil.copy(corpus / "videos" / "rec0.mp4", folder / "videos" / "rec0.mp4")
    shards = _old_dataset(corpus, folder / "shards", {"rec0": "videos/rec0.mp4", "rec1": "videos/rec1.mp4"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    printed = io.StringIO()
    with pytest.warns(DataWarning) as caught, contextlib.redirect_stdout(printed):
        result = evaluate(corpus / "tiny.ckpt", shards, sampling=Sampling(seed=0, steps=1), num_clips=4,
                          out=tmp_path / "eval.json",
                          metrics=MetricsConfig(appearance=False))  # appearance's SSIM: minutes on 2 CPU cores
    tried = f"videos/rec1.mp4 nor {shards}/videos/rec1.mp4 nor {folder}/videos/rec1.mp4"
    notes = [f"rec1/000{i}: no source video at {tried}; its ground truth is the {LATENT_DECODE}" for i in (0, 1)]
    assert [str(w.message) for w in caught if "rec1/" in str(w.message)] == notes
    assert result["reference_frames"] == {SOURCE_VIDEO: 2, LATENT_DECODE: 2}
    assert [c["reference"] for c in result["clips"]] == [SOURCE_VIDEO, SOURCE_VIDEO, LATENT_DECODE, LATENT_DECODE]
    table = printed.getvalue()
    assert f"ground truth: 2 from {SOURCE_VIDEO}, 2 from {LATENT_DECODE})" in table
    assert all(note in table.splitlines() for note in notes)

    training = ClipLoader(Manifest.load(corpus / "shards"), SIZE)  # the original dataset: the training crops
    crops = {s.key: training(s).real for s in _segments(corpus)}
    vae = load_vae(corpus / "sd-vae")
    latents = {s.key: s.latents for s in _segments(corpus)}
    for i, key in enumerate(["rec0/0000", "rec0/0001", "rec1/0000", "rec1/0001"]):
        sheet = media.read_image(tmp_path / "eval_sheets" / f"{i:03d}_{key.replace('/', '_')}.png")
        real = crops[key] if key.startswith("rec0") else decode_latents(vae, latents[key].astype(np.float32))
        tile = SIZE + 2  # portrait | real | generated rows, every 10th frame, 2 px apart
        assert np.array_equal(sheet[:SIZE, :SIZE], real[0]), key  # the portrait: the first frame, cropped
        assert np.array_equal(sheet[tile : tile + SIZE, tile : tile + SIZE], real[10]), key


def test_synthetic_mouth_box_follows_each_frames_crop(tmp_path: Path):
    """A mouth that moves 2 px a frame inside a crop that moves with it stays put in the crop's pixels: the box
    is the mouth's own (plus the 2 px margin), not smeared over the first frame's crop."""
    synthesize(tmp_path, clips=1, seconds=0.8, size=128, fps=25, seed=0)
    video = tmp_path / "clip_0000.mp4"
    frames = 20
    crops = [[2 * t, 20, 2 * t + 64, 84] for t in range(frames)]  # 64 px squares, shown at 64 px: scale 1
    mouths = [[2 * t + 22, 60, 2 * t + 42, 70] for t in range(frames)]  # [22, 40, 42, 50] in every crop
    video.with_suffix(".json").write_text(json.dumps({"size": 128, "mouth_box": mouths}))
    segment = Segment("clip_0000/0000", np.zeros((frames, 4, 8, 8), np.float16), np.zeros((frames, 1, 1), np.float16),
                      media.flac_bytes(np.zeros(frames * 640, np.float32), media.SAMPLE_RATE),
                      {"source": str(video), "start_frame": 0, "frames": frames, "fps": FPS, "crop": "face",
                       "face_box": crops[0], "face_boxes": crops})
    clip = ClipLoader(Manifest(fps=FPS, size=64, settings={"crop": "face"}), 64)(segment)
    assert clip.reference == SOURCE_VIDEO and clip.mouth_box == (20, 38, 44, 52)


def test_face_mouth_box_holds_the_mouth_of_a_face_crop(corpus: Path):
    """MTCNN's mouth-corner landmarks on the training crops fall inside `face_mouth_box` in every frame (the crop
    follows a smoothed track, so the mouth moves a little in it)."""
    from facenet_pytorch import MTCNN

    detector = MTCNN(device="cpu", min_face_size=20)
    load = ClipLoader(Manifest.load(corpus / "shards"), SIZE)
    corners = []
    for segment in _segments(corpus):
        _, _, landmarks = detector.detect(list(load(segment).real), landmarks=True)
        corners += [np.asarray(found[0][3:], dtype=np.float64) for found in landmarks]  # [2, 2] (x, y)
    corners = np.stack(corners)  # [frames, 2 corners, 2]
    x0, y0, x1, y1 = face_mouth_box(SIZE)
    assert len(corners) == 76
    assert ((corners[..., 0] >= x0) & (corners[..., 0] < x1)).all()
    assert ((corners[..., 1] >= y0) & (corners[..., 1] < y1)).all(), (corners[..., 1].min(), corners[..., 1].max())


def test_clip_cache_keeps_clips_exactly_and_trusts_no_other_file(tmp_path: Path):
    folder = tmp_path / "cache"
    cache = ClipCache(folder, {"vae_sha1": "abc"})
    description = {"key": "v/0000", "meta": {"frames": 3}, "size": 8, "reconstruction": True}
    rng = np.random.default_rng(0)
    clip = EvalClip("v/0000", rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
                    rng.standard_normal(1920).astype(np.float32), 25.0, LATENT_DECODE, (1, 2, 5, 6),
                    rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), "v/0000: gone")
    path = cache.save(description, clip)
    assert sorted(folder.iterdir()) == [path] and path.stat().st_mode & 0o777 == 0o644  # no temporary left
    back = cache.load(description)
    for name in ("key", "fps", "reference", "mouth_box", "note"):
        assert getattr(back, name) == getattr(clip, name), name
    for name in ("real", "waveform", "reconstruction"):
        assert np.array_equal(getattr(back, name), getattr(clip, name)) and getattr(back, name).dtype == \
            getattr(clip, name).dtype, name
    assert ClipCache(folder, {"vae_sha1": "def"}).load(description) is None  # another VAE: another file

    os.replace(cache.save({**description, "size": 9}, clip), path)  # a file made for other settings, renamed
    with pytest.warns(DataWarning, match=rf"{path.name}: evaluation cache file ignored and rebuilt .*other data"):
        assert cache.load(description) is None
    text = json.dumps({**description, "vae_sha1": "abc"}, sort_keys=True)
    with open(path, "wb") as file:  # the right description, but a pickled object where the frames belong
        np.savez(file, description=np.array(text), key=np.array("v/0000"), real=np.array([{"x": 1}], dtype=object))
    with pytest.warns(DataWarning, match="allow_pickle=False"):
        assert cache.load(description) is None
