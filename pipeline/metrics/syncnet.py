"""Sync-C / Sync-D (a.k.a. LSE-C / LSE-D) with the SyncNet of syncnet_python (joonson/syncnet_python).

Weights: `syncnet_v2.model` of syncnet_python, a state dict whose keys are those of its
`SyncNetModel.S` (`netcnnaud.*`, `netfcaud.*`, `netcnnlip.*`, `netfclip.*`: `nn.Sequential`
indices, e.g. `netcnnlip.0.weight` [96, 3, 5, 7, 7]); `SyncNet` here has the same modules.

The measurement follows `SyncNetInstance.evaluate` step by step:
- video: 25 fps face crops resized to 224x224, BGR, pixel values 0..255 (no normalisation); with a
  face box per frame, `crop_face` cuts the crop syncnet_python's `crop_video` cuts (crop scale 0.4,
  padding value 110); without one, the frame is taken to be the face crop already;
- audio: 16 kHz mono as int16 sample values, `python_speech_features.mfcc` with its defaults
  (25 ms rectangular frames every 10 ms, 512-point FFT, 26 mel filters on integer FFT bins,
  pre-emphasis 0.97, 13 cepstra, lifter 22, c0 replaced by the log frame energy), computed here
  with torchaudio (`mfcc`; agreement with python_speech_features is tested);
- windows of 5 frames (0.2 s) against 20 MFCC frames, for frames 0 .. min(T, N / 640) - 6;
- `calc_pdist`: the distance of each video embedding to the audio embeddings shifted by
  -vshift..+vshift frames (zero-padded), averaged over frames; the offset with the smallest mean
  distance is the AV offset, Sync-D is that smallest mean distance and Sync-C the median of the
  mean distances minus it. Published tables average both over videos (vshift 15).

Not reproduced: syncnet_python finds and tracks the face with S3FD and re-encodes the crops as
mp4 before scoring; here crops come from the caller and are scored without re-encoding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn

from pipeline.metrics import load_reference_weights

LAYOUT = "syncnet_python SyncNetModel.S (syncnet_v2.model)"
FPS = 25.0
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 640  # 16000 / 25, as `evaluate` hard-codes
MFCC_PER_FRAME = 4  # 100 MFCC frames/s at 25 fps
WINDOW = 5  # video frames per SyncNet input
CROP_SIZE = 224
VSHIFT = 15
EMBEDDING = 1024

# python_speech_features.mfcc defaults (syncnet_python calls it with only the signal and the rate)
_WIN, _HOP, _NFFT, _NFILT, _NCEP, _PREEMPH, _LIFTER = 400, 160, 512, 26, 13, 0.97, 22


class SyncNet(nn.Module):
    """syncnet_python's `S`: audio MFCC [N, 1, 13, 20] and lips [N, 3, 5, 224, 224] -> embeddings [N, 1024]."""

    def __init__(self, embedding: int = EMBEDDING):
        super().__init__()

        def conv2(cin: int, cout: int, kernel: tuple[int, int], padding: tuple[int, int]) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def conv3(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1),
                  padding: tuple[int, int, int] = (0, 0, 0)) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding), nn.BatchNorm3d(cout),
                    nn.ReLU(inplace=True)]

        def head() -> nn.Sequential:
            return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))

        self.netcnnaud = nn.Sequential(
            *conv2(1, 64, (3, 3), (1, 1)), nn.MaxPool2d((1, 1), (1, 1)),
            *conv2(64, 192, (3, 3), (1, 1)), nn.MaxPool2d((3, 3), (1, 2)),
            *conv2(192, 384, (3, 3), (1, 1)),
            *conv2(384, 256, (3, 3), (1, 1)),
            *conv2(256, 256, (3, 3), (1, 1)), nn.MaxPool2d((3, 3), (2, 2)),
            *conv2(256, 512, (5, 4), (0, 0)),
        )  # fmt: skip
        self.netfcaud = head()
        self.netfclip = head()
        self.netcnnlip = nn.Sequential(
            *conv3(3, 96, (5, 7, 7), (1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *conv3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *conv3(256, 512, (1, 6, 6)),
        )  # fmt: skip

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))  # [N, 1, 13, 20] -> [N, 512] -> [N, 1024]

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))  # [N, 3, 5, 224, 224] -> [N, 512] -> [N, 1024]


def load_syncnet(path: str | os.PathLike, device: str | torch.device = "cpu") -> SyncNet:
    """SyncNet with weights from `path` (syncnet_python's `syncnet_v2.model`)."""
    return load_reference_weights(SyncNet(), path, LAYOUT).to(device)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595 * np.log10(1 + hz / 700.0)


def mel_filterbank(sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """python_speech_features' 26 triangular mel filters float64 [26, 257], edges floored to FFT bins.

    torchaudio's `melscale_fbanks` places the edges at exact frequencies instead, which changes the
    features by several percent; SyncNet was trained on these.
    """
    mels = np.linspace(_hz_to_mel(np.float64(0)), _hz_to_mel(np.float64(sample_rate / 2)), _NFILT + 2)
    edges = np.floor((_NFFT + 1) * (700 * (10 ** (mels / 2595.0) - 1)) / sample_rate)
    bins = np.arange(_NFFT // 2 + 1, dtype=np.float64)[None]  # [1, 257]
    low, mid, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [26, 1] each
    rising = np.where((bins >= low) & (bins < mid), (bins - low) / np.maximum(mid - low, 1e-12), 0.0)
    falling = np.where((bins >= mid) & (bins < high), (high - bins) / np.maximum(high - mid, 1e-12), 0.0)
    return torch.from_numpy(rising + falling)


def mfcc(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCC float64 [13, M] of mono float audio in [-1, 1], as syncnet_python computes them.

    The audio is first quantised to int16 sample values (syncnet_python reads a pcm_s16le wav with
    scipy, unnormalised; ffmpeg converts float to s16 as round(x * 32768)). M = 1 + ceil((N - 400) / 160).
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1 or len(waveform) == 0:
        raise ValueError(f"waveform must be mono [N] with N > 0, got shape {waveform.shape}")
    signal = torch.from_numpy(np.clip(np.rint(waveform.astype(np.float64) * 32768), -32768, 32767))
    signal = AF.preemphasis(signal[None], _PREEMPH)  # [1, N]
    n = signal.shape[1]
    frames = 1 if n <= _WIN else 1 + math.ceil((n - _WIN) / _HOP)
    # torch.stft centres the 400-sample window in each 512-sample frame: shift by 56 so that
    # frame t covers samples t*160 + [0, 400), as python_speech_features' framing does
    offset = (_NFFT - _WIN) // 2
    signal = F.pad(signal, (offset, (frames - 1) * _HOP + _WIN - n + offset))
    power = AF.spectrogram(signal, pad=0, window=torch.ones(_WIN, dtype=torch.float64), n_fft=_NFFT, hop_length=_HOP,
                           win_length=_WIN, power=2.0, normalized=False, center=False)[0] / _NFFT  # [257, M]
    eps = np.finfo(np.float64).eps
    energy = power.sum(0)  # [M]
    energy = torch.where(energy == 0, eps, energy)
    bands = mel_filterbank(sample_rate) @ power  # [26, M]
    bands = torch.where(bands == 0, eps, bands)
    cepstra = AF.create_dct(_NCEP, _NFILT, norm="ortho").double().T @ bands.log()  # [13, M]
    lift = 1 + (_LIFTER / 2.0) * torch.sin(math.pi * torch.arange(_NCEP, dtype=torch.float64) / _LIFTER)
    cepstra = cepstra * lift[:, None]
    cepstra[0] = energy.log()
    return cepstra.numpy()


def crop_face(frames: np.ndarray, boxes: np.ndarray | None = None, crop_scale: float = 0.4) -> np.ndarray:
    """uint8 RGB [T, 224, 224, 3] face crops of frames [T, H, W, 3], as syncnet_python's `crop_video`.

    `boxes` [4] or [T, 4] (x0, y0, x1, y1, a face detection per frame): the crop spans the box
    size s = max(w, h) / 2 around its centre, s * (1 + crop_scale) left and right, s above and
    s * (1 + 2 crop_scale) below, padded with value 110 where it leaves the frame. Without boxes
    the whole frame is the crop. Resizing is bilinear (cv2.resize's INTER_LINEAR sampling).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}")
    if boxes is None:
        crops = [torch.from_numpy(frames)]
    else:
        boxes = np.broadcast_to(np.asarray(boxes, dtype=np.float64), (len(frames), 4))
        crops = []
        for frame, (x0, y0, x1, y1) in zip(frames, boxes):
            size = max(y1 - y0, x1 - x0) / 2
            pad = int(size * (1 + 2 * crop_scale))
            padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
            cy, cx = (y0 + y1) / 2 + pad, (x0 + x1) / 2 + pad
            face = padded[int(cy - size):int(cy + size * (1 + 2 * crop_scale)),
                          int(cx - size * (1 + crop_scale)):int(cx + size * (1 + crop_scale))]
            if face.size == 0:
                raise ValueError(f"face box {[x0, y0, x1, y1]} gives an empty crop")
            crops.append(torch.from_numpy(np.ascontiguousarray(face))[None])
    out = []
    for crop in crops:
        x = crop.permute(0, 3, 1, 2).float()  # [n, 3, h, w]
        x = F.interpolate(x, size=(CROP_SIZE, CROP_SIZE), mode="bilinear", align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def sync_embeddings(net: SyncNet, crops: np.ndarray, waveform: np.ndarray,
                    batch_size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Lip and audio embeddings float32 [W, 1024] each, W = min(T, N // 640) - 5, as `evaluate` windows them.

    `crops` are uint8 RGB face crops [T, 224, 224, 3] at 25 fps; `waveform` is 16 kHz mono in [-1, 1].
    """
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"crops must be uint8 [T, {CROP_SIZE}, {CROP_SIZE}, 3], got {crops.dtype} {crops.shape}")
    windows = min(len(crops), len(waveform) // SAMPLES_PER_FRAME) - WINDOW
    if windows < 1:
        raise ValueError(f"SyncNet needs at least {WINDOW + 1} frames of video and audio; got {len(crops)} frames "
                         f"and {len(waveform) / SAMPLE_RATE:.3f} s of audio")
    device = next(net.parameters()).device
    cepstra = torch.from_numpy(mfcc(waveform)).float()  # [13, M]
    video = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1]))  # BGR, as cv2.imread gives
    lips, auds = [], []
    for start in range(0, windows, batch_size):
        index = range(start, min(windows, start + batch_size))
        lip = torch.stack([video[v:v + WINDOW] for v in index]).to(device)  # [n, 5, 224, 224, 3]
        lip = lip.permute(0, 4, 1, 2, 3).float()  # [n, 3, 5, 224, 224], 0..255
        aud = torch.stack([cepstra[:, MFCC_PER_FRAME * v:MFCC_PER_FRAME * (v + WINDOW)] for v in index])
        lips.append(net.forward_lip(lip).cpu())
        auds.append(net.forward_aud(aud[:, None].to(device)).cpu())  # [n, 1, 13, 20] -> [n, 1024]
    return torch.cat(lips), torch.cat(auds)


@dataclass
class SyncResult:
    """One video's SyncNet scores: AV offset (frames; the video at frame i matches the audio at i - offset),
    Sync-D (min mean distance, lower is better), Sync-C (median minus min, higher is better), mean distances."""

    offset: int
    sync_d: float
    sync_c: float
    distances: np.ndarray  # float32 [2 * vshift + 1], index j <-> audio shifted by j - vshift frames


def av_offset(lip: torch.Tensor, aud: torch.Tensor, vshift: int = VSHIFT) -> SyncResult:
    """syncnet_python's `calc_pdist` and offset/confidence of `evaluate` for embeddings [W, D] each."""
    if lip.ndim != 2 or lip.shape != aud.shape or len(lip) == 0:
        raise ValueError(f"lip and audio embeddings must both be [W, D] with W > 0, got {tuple(lip.shape)}, "
                         f"{tuple(aud.shape)}")
    span = 2 * vshift + 1
    padded = F.pad(aud, (0, 0, vshift, vshift))  # [W + 2 vshift, D]
    shifted = padded.unfold(0, span, 1).transpose(1, 2)  # [W, span, D]: row i holds padded[i : i + span]
    dists = F.pairwise_distance(lip[:, None, :].expand_as(shifted), shifted)  # [W, span]
    mean = dists.mean(0)  # [span]
    best, index = torch.min(mean, 0)
    return SyncResult(offset=vshift - int(index), sync_d=float(best), sync_c=float(torch.median(mean) - best),
                      distances=mean.numpy().astype(np.float32))


def sync_scores(net: SyncNet, frames: np.ndarray, waveform: np.ndarray, boxes: np.ndarray | None = None,
                vshift: int = VSHIFT, batch_size: int = 20) -> SyncResult:
    """Sync-C / Sync-D of one 25 fps video (uint8 RGB [T, H, W, 3]) with its 16 kHz mono audio."""
    lip, aud = sync_embeddings(net, crop_face(frames, boxes), waveform, batch_size)
    return av_offset(lip, aud, vshift)
