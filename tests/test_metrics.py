"""pipeline.metrics: Fréchet distance, and the FID Inception, FVD I3D and SyncNet against their reference layouts.

No weights can be downloaded, so each network gets random weights saved under the key names of
the published checkpoint; our loader must read that file, and its outputs must equal a reference
forward written here, independently, from the published architecture (torchvision / pytorch-fid
Inception-v3, piergiaj/pytorch-i3d, syncnet_python). The MFCC front end is checked against
python_speech_features itself (a test dependency).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import python_speech_features
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics import MetricWeightsError
from pipeline.metrics.frechet import feature_distance, frechet_distance, gaussian_stats
from pipeline.metrics.i3d import i3d_features, load_i3d, video_clips
from pipeline.metrics.inception import inception_features, load_fid_inception
from pipeline.metrics.syncnet import av_offset, crop_face, load_syncnet, mel_filterbank, mfcc, sync_scores

# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _rotation(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)
    # commuting covariances (same eigenvectors, not diagonal): the same formula in the eigenbasis
    q = _rotation(4, 0)
    d = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert d == pytest.approx(expected, abs=1e-10)
    # identical Gaussians: 0
    sigma = q @ np.diag(a) @ q.T
    assert abs(frechet_distance(mu1, sigma, mu1, sigma)) < 1e-12


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)  # full rank, not commuting
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    shift = rng.normal(size=6)  # moving one mean adds exactly |shift|^2 when the means coincided
    assert frechet_distance(mu1 + shift, s1, mu1, s2) - frechet_distance(mu1, s1, mu1, s2) == pytest.approx(
        shift @ shift, rel=1e-9)


@pytest.mark.parametrize("shape", [(400, 64), (40, 256)])  # well-conditioned; fewer samples than dimensions
def test_fid_of_a_set_with_itself_is_zero(shape):
    features = np.random.default_rng(2).gamma(2.0, 0.3, size=shape)  # non-negative like pool features
    assert abs(feature_distance(features, features)) < 1e-6
    other = features + 0.05
    assert feature_distance(features, other) == pytest.approx(0.05**2 * shape[1], rel=1e-6)


def test_gaussian_stats_and_bad_features():
    x = np.random.default_rng(3).normal(size=(50, 3))
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.where(x > 2, np.nan, x))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


# ---------------------------------------------------------------------------------------------
# Random weights in a reference layout


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """He-initialised convs/linears, BatchNorm with non-trivial statistics; no num_batches_tracked (old files)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("weight") and len(shape) > 1:
            value = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif name.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif name.endswith("weight"):  # BatchNorm scale
            value = torch.rand(shape, generator=g) * 0.5 + 0.75
        else:  # biases and running means
            value = torch.randn(shape, generator=g) * 0.1
        state[name] = value
    return state


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")}


def _bn(x: torch.Tensor, sd: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=eps)


def _image_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random colour fields (uint8), so resizing and pooling see image-like input."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 5, 6, generator=g) * 255
    return F.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 255).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).numpy()


# --- Inception-v3 (torchvision's Inception3, num_classes=1008, aux_logits=False, pytorch-fid patches) ---

def _inception_spec() -> dict[str, tuple[int, int, tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """name -> (cin, cout, kernel, stride, padding) of every BasicConv2d, from torchvision's inception.py."""
    spec = {}

    def conv(name, cin, cout, kernel, stride=1, padding=0):
        as2 = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
        spec[name] = (cin, cout, as2(kernel), as2(stride), as2(padding))

    conv("Conv2d_1a_3x3", 3, 32, 3, 2)
    conv("Conv2d_2a_3x3", 32, 32, 3)
    conv("Conv2d_2b_3x3", 32, 64, 3, padding=1)
    conv("Conv2d_3b_1x1", 64, 80, 1)
    conv("Conv2d_4a_3x3", 80, 192, 3)
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):  # InceptionA
        conv(f"{name}.branch1x1", cin, 64, 1)
        conv(f"{name}.branch5x5_1", cin, 48, 1)
        conv(f"{name}.branch5x5_2", 48, 64, 5, padding=2)
        conv(f"{name}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{name}.branch3x3dbl_2", 64, 96, 3, padding=1)
        conv(f"{name}.branch3x3dbl_3", 96, 96, 3, padding=1)
        conv(f"{name}.branch_pool", cin, pool, 1)
    conv("Mixed_6a.branch3x3", 288, 384, 3, 2)  # InceptionB
    conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, padding=1)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 2)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):  # InceptionC
        conv(f"{name}.branch1x1", 768, 192, 1)
        conv(f"{name}.branch7x7_1", 768, c7, 1)
        conv(f"{name}.branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
        conv(f"{name}.branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
        conv(f"{name}.branch7x7dbl_1", 768, c7, 1)
        conv(f"{name}.branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
        conv(f"{name}.branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
        conv(f"{name}.branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
        conv(f"{name}.branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
        conv(f"{name}.branch_pool", 768, 192, 1)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1)  # InceptionD
    conv("Mixed_7a.branch3x3_2", 192, 320, 3, 2)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
    conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
    conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, 2)
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):  # InceptionE
        conv(f"{name}.branch1x1", cin, 320, 1)
        conv(f"{name}.branch3x3_1", cin, 384, 1)
        conv(f"{name}.branch3x3_2a", 384, 384, (1, 3), padding=(0, 1))
        conv(f"{name}.branch3x3_2b", 384, 384, (3, 1), padding=(1, 0))
        conv(f"{name}.branch3x3dbl_1", cin, 448, 1)
        conv(f"{name}.branch3x3dbl_2", 448, 384, 3, padding=1)
        conv(f"{name}.branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1))
        conv(f"{name}.branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0))
        conv(f"{name}.branch_pool", cin, 192, 1)
    return spec


def _inception_reference_file(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = {}
    for name, (cin, cout, kernel, _, _) in _inception_spec().items():
        shapes[f"{name}.conv.weight"] = (cout, cin, *kernel)
        shapes.update(_bn_shapes(f"{name}.bn", cout))
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    state = _random_state(shapes, seed)
    torch.save(state, path)
    return state


def _inception_reference_forward(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's InceptionV3(output_blocks=[3]) over fid_inception_v3(), written functionally."""
    spec = _inception_spec()

    def c(name, x):
        _, _, _, stride, padding = spec[name]
        y = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
        return F.relu(_bn(y, sd, f"{name}.bn", 1e-3))

    def tf_avg(x):  # FIDInceptionA/C/E_1 patch: padding excluded from the average
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    x = F.max_pool2d(c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x))), 3, 2)
    x = F.max_pool2d(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)), 3, 2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat([c(f"{m}.branch1x1", x), c(f"{m}.branch5x5_2", c(f"{m}.branch5x5_1", x)),
                       c(f"{m}.branch3x3dbl_3", c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x))),
                       c(f"{m}.branch_pool", tf_avg(x))], 1)
    m = "Mixed_6a"
    x = torch.cat([c(f"{m}.branch3x3", x),
                   c(f"{m}.branch3x3dbl_3", c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x))),
                   F.max_pool2d(x, 3, 2)], 1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        b7 = c(f"{m}.branch7x7_3", c(f"{m}.branch7x7_2", c(f"{m}.branch7x7_1", x)))
        d = x
        for i in range(1, 6):
            d = c(f"{m}.branch7x7dbl_{i}", d)
        x = torch.cat([c(f"{m}.branch1x1", x), b7, d, c(f"{m}.branch_pool", tf_avg(x))], 1)
    m = "Mixed_7a"
    b7 = x
    for i in range(1, 5):
        b7 = c(f"{m}.branch7x7x3_{i}", b7)
    x = torch.cat([c(f"{m}.branch3x3_2", c(f"{m}.branch3x3_1", x)), b7, F.max_pool2d(x, 3, 2)], 1)
    for m, pool in (("Mixed_7b", tf_avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):  # E_1, E_2 patches
        b3 = c(f"{m}.branch3x3_1", x)
        d = c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x))
        x = torch.cat([c(f"{m}.branch1x1", x), c(f"{m}.branch3x3_2a", b3), c(f"{m}.branch3x3_2b", b3),
                       c(f"{m}.branch3x3dbl_3a", d), c(f"{m}.branch3x3dbl_3b", d), c(f"{m}.branch_pool", pool(x))], 1)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def test_inception_matches_reference_forward(tmp_path: Path):
    sd = _inception_reference_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    net = load_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    frames = _image_frames(2, 40, 56, seed=1)  # not square, not 299: the resize is part of the reference
    ours = inception_features(net, frames)
    with torch.no_grad():
        ref = _inception_reference_forward(sd, torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).double()
    assert ours.shape == (2, 2048) and ours.dtype == np.float64
    assert ref.abs().max() > 1e-3 and (ref[0] - ref[1]).abs().max() > 1e-4  # non-degenerate features
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_weight_files_in_the_wrong_layout_are_refused_with_the_file_named(tmp_path: Path):
    good = _inception_reference_file(tmp_path / "ok.pth")
    cases = {
        "missing.pth": None,
        "garbage.pth": b"not a checkpoint",
        "renamed.pth": {("module." + k): v for k, v in good.items()},  # DataParallel prefix
        "aux.pth": {**good, "AuxLogits.fc.weight": torch.zeros(1008, 768)},  # torchvision aux_logits=True
        "shape.pth": {**good, "fc.weight": torch.zeros(1000, 2048)},  # torchvision ImageNet weights
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(MetricWeightsError, match=str(path)):
            load_fid_inception(path)
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: refused by weights_only
    with pytest.raises(MetricWeightsError, match="not a readable"):
        load_fid_inception(tmp_path / "module.pth")
    with pytest.raises(MetricWeightsError, match="unexpected.*AuxLogits"):
        load_fid_inception(tmp_path / "aux.pth")


# --- I3D (piergiaj/pytorch-i3d InceptionI3d, 400 classes) ---

_I3D_MIXED = {  # name -> (cin, [b0, b1a, b1b, b2a, b2b, b3b])
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]), "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]), "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]), "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]), "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}


def _i3d_spec() -> dict[str, tuple[int, int, int, int]]:
    """Unit3D name -> (cin, cout, kernel, stride) (cubic kernels and strides in this network)."""
    spec = {"Conv3d_1a_7x7": (3, 64, 7, 2), "Conv3d_2b_1x1": (64, 64, 1, 1), "Conv3d_2c_3x3": (64, 192, 3, 1)}
    for name, (cin, w) in _I3D_MIXED.items():
        spec.update({f"{name}.b0": (cin, w[0], 1, 1), f"{name}.b1a": (cin, w[1], 1, 1),
                     f"{name}.b1b": (w[1], w[2], 3, 1), f"{name}.b2a": (cin, w[3], 1, 1),
                     f"{name}.b2b": (w[3], w[4], 3, 1), f"{name}.b3b": (cin, w[5], 1, 1)})
    return spec


def _tf_same(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """TensorFlow SAME padding: out = ceil(in / stride), total pad = max((out - 1) * stride + k - in, 0)."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _i3d_reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    spec = _i3d_spec()

    def unit(name, x):
        _, _, k, s = spec[name]
        y = F.conv3d(_tf_same(x, (k,) * 3, (s,) * 3), sd[f"{name}.conv3d.weight"], stride=s)
        return F.relu(_bn(y, sd, f"{name}.bn", 1e-3))

    def pool(x, k, s):
        return F.max_pool3d(_tf_same(x, k, s), k, s)

    x = pool(unit("Conv3d_1a_7x7", x), (1, 3, 3), (1, 2, 2))
    x = pool(unit("Conv3d_2c_3x3", unit("Conv3d_2b_1x1", x)), (1, 3, 3), (1, 2, 2))
    for name in _I3D_MIXED:
        if name == "Mixed_4b":
            x = pool(x, (3, 3, 3), (2, 2, 2))
        if name == "Mixed_5b":
            x = pool(x, (2, 2, 2), (2, 2, 2))
        x = torch.cat([unit(f"{name}.b0", x), unit(f"{name}.b1b", unit(f"{name}.b1a", x)),
                       unit(f"{name}.b2b", unit(f"{name}.b2a", x)),
                       unit(f"{name}.b3b", pool(x, (3, 3, 3), (1, 1, 1)))], 1)
    x = F.avg_pool3d(x, (2, 7, 7), 1)
    logits = F.conv3d(x, sd["logits.conv3d.weight"], sd["logits.conv3d.bias"])  # [B, 400, t, 1, 1]
    return logits.squeeze(4).squeeze(3).mean(2)


def test_i3d_matches_reference_forward(tmp_path: Path):
    shapes = {}
    for name, (cin, cout, k, _) in _i3d_spec().items():
        shapes[f"{name}.conv3d.weight"] = (cout, cin, k, k, k)
        shapes.update(_bn_shapes(f"{name}.bn", cout))
    shapes["logits.conv3d.weight"], shapes["logits.conv3d.bias"] = (400, 1024, 1, 1, 1), (400,)
    sd = _random_state(shapes, seed=1)
    torch.save(sd, tmp_path / "i3d_pretrained_400.pt")
    net = load_i3d(tmp_path / "i3d_pretrained_400.pt")
    video = _image_frames(20, 36, 36, seed=2)  # 20 frames -> one 16-frame clip, 4 dropped
    clips = video_clips(video)
    assert clips.shape == (1, 16, 36, 36, 3) and np.array_equal(clips[0], video[:16])
    ours = i3d_features(net, clips)
    x = torch.from_numpy(clips).float().permute(0, 1, 4, 2, 3).flatten(0, 1)  # [16, 3, H, W]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (2 * x / 255 - 1).unflatten(0, (1, 16)).transpose(1, 2)  # [1, 3, 16, 224, 224] in [-1, 1]
    with torch.no_grad():
        ref = _i3d_reference_forward(sd, x).double().numpy()
    assert ours.shape == (1, 400) and np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


# --- SyncNet (syncnet_python's SyncNetModel.S) ---

class ReferenceS(nn.Module):
    """SyncNetModel.S of joonson/syncnet_python, as published (num_layers_in_fc_layers=1024)."""

    def __init__(self):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
            nn.Conv2d(64, 192, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.BatchNorm2d(192),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
            nn.Conv2d(192, 384, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            nn.Conv2d(256, 512, kernel_size=(5, 4), padding=(0, 0)), nn.BatchNorm2d(512), nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0), nn.BatchNorm3d(96),
            nn.ReLU(inplace=True), nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(256),
            nn.ReLU(inplace=True), nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0), nn.BatchNorm3d(512), nn.ReLU(inplace=True),
        )

    def forward_aud(self, x):
        mid = self.netcnnaud(x)
        return self.netfcaud(mid.view((mid.size()[0], -1)))

    def forward_lip(self, x):
        mid = self.netcnnlip(x)
        return self.netfclip(mid.view((mid.size()[0], -1)))


def _reference_evaluate(s: ReferenceS, frames_bgr: list[np.ndarray], audio: np.ndarray, vshift: int = 15):
    """SyncNetInstance.evaluate from its loaded images and wav onwards, batch_size 20."""
    im = np.transpose(np.expand_dims(np.stack(frames_bgr, axis=3), axis=0), (0, 3, 4, 1, 2))
    imtv = torch.from_numpy(im.astype(float)).float()
    mfcc_ = np.stack([np.array(i) for i in zip(*python_speech_features.mfcc(audio, 16000))])
    cct = torch.from_numpy(np.expand_dims(np.expand_dims(mfcc_, axis=0), axis=0).astype(float)).float()
    min_length = min(len(frames_bgr), math.floor(len(audio) / 640))
    lastframe = min_length - 5
    im_feat, cc_feat = [], []
    for i in range(0, lastframe, 20):
        im_in = torch.cat([imtv[:, :, v:v + 5, :, :] for v in range(i, min(lastframe, i + 20))], 0)
        im_feat.append(s.forward_lip(im_in))
        cc_in = torch.cat([cct[:, :, :, v * 4:v * 4 + 20] for v in range(i, min(lastframe, i + 20))], 0)
        cc_feat.append(s.forward_aud(cc_in))
    im_feat, cc_feat = torch.cat(im_feat, 0), torch.cat(cc_feat, 0)
    win_size = vshift * 2 + 1
    feat2p = torch.nn.functional.pad(cc_feat, (0, 0, vshift, vshift))
    dists = [torch.nn.functional.pairwise_distance(im_feat[[i], :].repeat(win_size, 1), feat2p[i:i + win_size, :])
             for i in range(len(im_feat))]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return vshift - int(minidx), float(minval), float(torch.median(mdist) - minval), mdist.numpy()


@pytest.fixture(scope="module")
def syncnet_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReferenceS, Path]:
    """A ReferenceS with random weights saved as syncnet_v2.model (without num_batches_tracked, like the 2017 file)."""
    ref = ReferenceS()
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = _random_state(shapes, seed=3)
    ref.load_state_dict(state, strict=False)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(state, path)
    return ref.eval(), path


def _speech(seconds: float, seed: int) -> np.ndarray:
    """Voiced, syllable-modulated audio with a stretch of digital silence (exercises the log-energy floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.3 * t))
    wave += 0.03 * rng.normal(size=len(t))
    wave[len(t) // 3:len(t) // 3 + 2400] = 0.0
    return wave.astype(np.float32)


def test_syncnet_matches_reference_evaluate(syncnet_files):
    ref, path = syncnet_files
    net = load_syncnet(path)
    frames = _image_frames(12, 224, 224, seed=4)  # already 224x224 face crops
    audio = _speech(12 / 25, seed=5)
    ours = sync_scores(net, frames, audio)
    pcm = np.clip(np.rint(audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)  # ffmpeg pcm_s16le
    with torch.no_grad():
        offset, minval, conf, mdist = _reference_evaluate(ref, [f[..., ::-1] for f in frames], pcm)
    assert ours.offset == offset
    assert ours.sync_d == pytest.approx(minval, rel=1e-4)
    assert ours.sync_c == pytest.approx(conf, rel=1e-3, abs=1e-4 * minval)
    np.testing.assert_allclose(ours.distances, mdist, rtol=1e-4)
    assert ours.distances.shape == (31,) and np.ptp(mdist) > 0


def test_syncnet_refuses_a_non_syncnet_file(syncnet_files, tmp_path: Path):
    _, path = syncnet_files
    state = torch.load(path, weights_only=True)
    state.pop("netfclip.3.bias")
    torch.save(state, tmp_path / "partial.model")
    with pytest.raises(MetricWeightsError, match=r"partial\.model.*missing.*netfclip\.3\.bias"):
        load_syncnet(tmp_path / "partial.model")


@pytest.mark.parametrize("shift", [s for d in range(1, 11) for s in (d, -d)])
def test_offset_search_recovers_known_shifts(shift: int):
    g = torch.Generator().manual_seed(100 + shift)
    audio = torch.randn(60, 1024, generator=g)
    lip = torch.roll(audio, shift, 0) + 0.3 * torch.randn(60, 1024, generator=g)  # lip[i] = audio[i - shift] + noise
    result = av_offset(lip, audio)
    assert result.offset == shift
    assert result.sync_d == float(result.distances.min()) == result.distances[15 - shift]
    assert result.sync_c > 10  # far more confident than for unrelated streams (below)
    unrelated = av_offset(torch.randn(60, 1024, generator=g), audio)
    assert unrelated.sync_c < 3


def test_offset_search_range_is_vshift():
    audio = torch.randn(80, 64, generator=torch.Generator().manual_seed(0))
    assert av_offset(torch.roll(audio, 4, 0), audio, vshift=5).offset == 4
    assert av_offset(torch.roll(audio, 7, 0), audio, vshift=5).offset != 7  # outside the search range


# ---------------------------------------------------------------------------------------------
# MFCC and face crops


def test_mel_filterbank_is_python_speech_features():
    np.testing.assert_allclose(mel_filterbank().numpy(), python_speech_features.get_filterbanks(26, 512, 16000),
                               atol=1e-12)


@pytest.mark.parametrize("samples", [31234, 16000, 401, 399, 160])  # partial last frame, exact, <= one frame
def test_mfcc_agrees_with_python_speech_features(samples: int):
    """Tolerance: 1e-3 absolute on values up to ~40 (relative ~3e-5), from torchaudio's float32 DCT matrix."""
    audio = _speech(2.0, seed=samples)[:samples]
    pcm = np.clip(np.rint(audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    reference = python_speech_features.mfcc(pcm, 16000).T  # [13, M], what syncnet_python feeds SyncNet
    ours = mfcc(audio)
    assert ours.shape == reference.shape == (13, 1 + max(0, math.ceil((samples - 400) / 160)))
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def test_crop_face_geometry():
    frames = np.full((2, 50, 50, 3), 200, np.uint8)
    crops = crop_face(frames, np.array([0, 0, 40, 40]))  # face at the top-left corner: the crop leaves the frame
    # half-size 20: rows -20..56 -> 0..56 of the frame (pad 110 below row 50); cols -8..48 (pad 110 left of col 0)
    assert crops.shape == (2, 224, 224, 3)
    assert (crops[:, 100:110, :24] == 110).all() and (crops[:, 100:110, 40:200] == 200).all()
    assert (crops[:, 212:, 100] == 110).all() and (crops[:, :190, 100] == 200).all()
    whole = _image_frames(3, 224, 224, seed=6)
    assert np.array_equal(crop_face(whole), whole)  # no box: the frames are the crops
    with pytest.raises(ValueError, match="uint8"):
        crop_face(whole.astype(np.float32))


def test_sync_scores_need_six_frames(syncnet_files):
    net = load_syncnet(syncnet_files[1])
    with pytest.raises(ValueError, match="at least 6 frames"):
        sync_scores(net, _image_frames(5, 64, 64, seed=0), _speech(0.2, seed=0))
