"""Provenance marks on generated videos: an invisible watermark, container metadata and C2PA.

Watermark: a 32-bit payload plus a 16-bit CRC, embedded by quantisation index modulation (QIM)
in the 96 lowest-frequency DCT coefficients (DC excluded) of each frame's luma, area-resized to a
fixed 32 x 32 grid. Each of the 48 bits sits on 2 coefficients chosen by a keyed permutation,
with a keyed dither, so a flat image decodes to noise rather than to a fixed pattern. Because the
grid is defined on the resized frame and holds only low frequencies, the mark survives H.264
re-encoding and resizing (detection resizes whatever it gets to the same grid), and detection
needs neither the original nor the frame size. Votes are summed over coefficients and frames;
a mark is reported only when the CRC matches and the votes agree strongly (an unmarked video
decodes to random bits whose CRC matches with probability 2^-16 and whose votes are weak).

Metadata: ffmpeg `-metadata` tags, stored as mp4 `mdta` keys (`-movflags use_metadata_tags`).
C2PA: an optional manifest signed with the user's certificate chain and key (`c2pa-python`).
"""

from __future__ import annotations

import binascii
import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import media

GRID = 32  # canonical luma grid the watermark lives in
PAYLOAD_BITS = 32
CRC_BITS = 16
REPEATS = 2  # coefficients per bit
STEP = 24.0  # QIM step in orthonormal-DCT units of the 0..255 luma grid (PSNR ~42 dB; 20: 43.5 dB, weaker)
MIN_STRENGTH = 0.5  # mean vote agreement (1 = perfect, ~0.3 for an unmarked video) needed to report a mark
_KEY = 0x4C65747354616C6B  # "LetsTalk": seeds the coefficient permutation and dither
_BITS = PAYLOAD_BITS + CRC_BITS
_CHUNK = 32  # frames processed at once: bounds memory for long, large videos
_LUMA = torch.tensor([0.299, 0.587, 0.114])

_CONTAINER_TAGS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder"})
AI_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


class ProvenanceError(ValueError):
    """A provenance step that cannot be done; the message names the file and what to do."""


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n, n]: coefficients = D @ X @ D.T."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    d[0] /= 2**0.5
    return d.float()


def _layout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat grid indices [B·R] of the carrier coefficients, their bit index [B·R], their dither [B·R])."""
    order = sorted(((u, v) for u in range(GRID) for v in range(GRID) if u + v > 0), key=lambda p: (p[0] + p[1], p[0]))
    carriers = torch.tensor([u * GRID + v for u, v in order[: _BITS * REPEATS]])
    rng = np.random.default_rng(_KEY)
    bit_of = torch.from_numpy(rng.permutation(np.repeat(np.arange(_BITS), REPEATS)))
    dither = torch.from_numpy(rng.uniform(0, STEP, size=_BITS * REPEATS)).float()
    return carriers, bit_of, dither


_D = _dct_matrix(GRID)
_CARRIERS, _BIT_OF, _DITHER = _layout()


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """float [T, H, W, 3] RGB -> [T, 1, H, W] luma (BT.601 weights)."""
    return (frames @ _LUMA)[:, None]


def _to_grid(luma: torch.Tensor) -> torch.Tensor:
    """[T, 1, H, W] -> [T, GRID, GRID], antialiased (area-like) resize."""
    return F.interpolate(luma, size=(GRID, GRID), mode="bilinear", antialias=True, align_corners=False)[:, 0]


def _coefficients(frames: torch.Tensor) -> torch.Tensor:
    """Carrier coefficients [T, B·R] of float RGB frames [T, H, W, 3]."""
    grid = _to_grid(_luma(frames))  # [T, G, G]
    return (_D @ grid @ _D.T).flatten(1)[:, _CARRIERS]


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ProvenanceError(f"frames must be uint8 [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}")
    if min(frames.shape[1:3]) < GRID:
        raise ProvenanceError(f"frames of {frames.shape[2]}x{frames.shape[1]} are smaller than the {GRID}x{GRID} "
                              "watermark grid")


def payload_bits(payload: int) -> np.ndarray:
    """The 48 embedded bits (uint8): 32 payload bits then a CRC-16 of the payload, most significant first."""
    if not 0 <= payload < 2**PAYLOAD_BITS:
        raise ProvenanceError(f"watermark payload must be a {PAYLOAD_BITS}-bit unsigned integer, got {payload}")
    raw = payload.to_bytes(PAYLOAD_BITS // 8, "big")
    word = (payload << CRC_BITS) | binascii.crc_hqx(raw, 0)
    return np.array([(word >> (_BITS - 1 - i)) & 1 for i in range(_BITS)], dtype=np.uint8)


def payload_id(checkpoint_sha256: str, seed: int) -> int:
    """A 32-bit id for one generation: the first 4 bytes of sha256("<checkpoint sha256>:<seed>")."""
    return int.from_bytes(hashlib.sha256(f"{checkpoint_sha256}:{seed}".encode()).digest()[:4], "big")


def embed_watermark(frames: np.ndarray, payload: int, iterations: int = 3) -> np.ndarray:
    """Frames uint8 [T, H, W, 3] carrying `payload` in every frame.

    The carrier coefficients are moved to their QIM lattice point; the change is drawn back to
    full size by bilinear upsampling and added equally to R, G and B. A few iterations correct what
    the resize, clipping and uint8 rounding took away.
    """
    frames = np.asarray(frames)
    _check_frames(frames)
    height, width = frames.shape[1:3]
    offset = torch.from_numpy(payload_bits(payload)).float()[_BIT_OF] * (STEP / 2) + _DITHER  # [B·R]
    out = np.empty_like(frames)
    for start in range(0, len(frames), _CHUNK):
        x = torch.from_numpy(frames[start : start + _CHUNK]).float()  # [t, H, W, 3]
        for _ in range(iterations):
            c = _coefficients(x)  # [t, B·R]
            target = torch.round((c - offset) / STEP) * STEP + offset
            delta = torch.zeros(x.shape[0], GRID * GRID)
            delta[:, _CARRIERS] = target - c
            pixels = _D.T @ delta.view(-1, GRID, GRID) @ _D  # [t, G, G]
            up = F.interpolate(pixels[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            x = (x + up[..., None]).round_().clamp_(0, 255)  # [t, H, W, 3]
        out[start : start + _CHUNK] = x.to(torch.uint8).numpy()
    return out


def bit_votes(frames: np.ndarray) -> np.ndarray:
    """Soft votes float [T, 48] in [-1, 1] per frame: +1 says bit 0, -1 says bit 1."""
    frames = np.asarray(frames)
    _check_frames(frames)
    coefficients = torch.cat([_coefficients(torch.from_numpy(frames[start : start + _CHUNK]).float())
                              for start in range(0, len(frames), _CHUNK)])  # [T, B·R]
    phase = (coefficients - _DITHER) / STEP
    votes = torch.cos(2 * torch.pi * phase)  # bit 0 at whole lattice steps, bit 1 at half steps
    per_bit = torch.zeros(votes.shape[0], _BITS).index_add_(1, _BIT_OF, votes) / REPEATS
    return per_bit.numpy()


@dataclass
class WatermarkResult:
    found: bool
    payload: int | None  # the 32-bit id when found
    strength: float  # mean agreement of the votes with the decoded bits (1 = perfect)
    crc_ok: bool
    frames: int


def detect_watermark(frames: np.ndarray) -> WatermarkResult:
    """Decode the majority bits over all frames and decide whether they are a mark (CRC and strength)."""
    votes = bit_votes(frames)  # [T, 48]
    total = votes.sum(axis=0)
    bits = (total < 0).astype(np.uint8)
    strength = float(np.abs(total).sum() / votes.size)
    word = int("".join(map(str, bits)), 2)
    payload = word >> CRC_BITS
    crc_ok = bool(np.array_equal(payload_bits(payload), bits))
    found = crc_ok and strength >= MIN_STRENGTH
    return WatermarkResult(found, payload if found else None, strength, crc_ok, len(votes))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(checkpoint: str | os.PathLike) -> str:
    """sha256 of the file(s) generation reads: a .ckpt's own hash; for an export (.safetensors + .json)
    or a DeepSpeed folder, the sha256 of "<relative path> <sha256>" lines, sorted by path."""
    path = Path(checkpoint)
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    elif path.suffix == ".safetensors":
        files = {p.name: p for p in (path, path.with_suffix(".json"))}
    else:
        return _file_sha256(path)
    lines = "".join(f"{name} {_file_sha256(files[name])}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def generator_version() -> str:
    """`letstalk <package version>`, as recorded in metadata and C2PA manifests."""
    try:
        return f"letstalk {importlib.metadata.version('letstalk')}"
    except importlib.metadata.PackageNotFoundError:
        return "letstalk (not installed)"


def provenance_metadata(model_id: str, checkpoint_sha256: str, seed: int, payload: int | None,
                        consent: str | None = None) -> dict[str, str]:
    """Container tags saying the video is AI-generated, by what, from which weights and seed, and when.

    `comment` repeats everything in one line because plain remuxing keeps it while dropping custom keys.
    """
    tags = {
        "ai_generated": "true",
        "generator": generator_version(),
        "model_id": model_id,
        "checkpoint_sha256": checkpoint_sha256,
        "seed": str(int(seed)),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "digital_source_type": AI_SOURCE_TYPE,
    }
    if payload is not None:
        tags["watermark_payload"] = f"{payload:08x}"
    if consent:
        tags["portrait_consent"] = consent
    summary = "; ".join(f"{key}={value}" for key, value in tags.items() if key != "ai_generated")
    return {**tags, "comment": f"AI-generated video. {summary}", "description": "AI-generated talking-head video"}


def _signing_algorithm(key: Path):
    """The C2PA signing algorithm for a PEM private key (EC P-256/384/521, Ed25519 or RSA-PSS)."""
    import c2pa
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        private = load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        raise ProvenanceError(f"{key}: not an unencrypted PEM private key ({err})") from err
    if isinstance(private, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": c2pa.C2paSigningAlg.ES256, "secp384r1": c2pa.C2paSigningAlg.ES384,
                "secp521r1": c2pa.C2paSigningAlg.ES512}
        if private.curve.name in algs:
            return algs[private.curve.name]
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    if isinstance(private, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256
    raise ProvenanceError(f"{key}: unsupported key type for C2PA (use EC P-256/384/521, Ed25519 or RSA)")


def sign_c2pa(source: Path, dest: Path, cert: str | os.PathLike, key: str | os.PathLike,
              tags: dict[str, str] | None = None) -> None:
    """Write `source` (mp4) to `dest` with a signed C2PA manifest: `c2pa.created` by a trained algorithm.

    `cert` is a PEM chain, signing certificate first. C2PA refuses a self-signed signing
    certificate: it must be issued by a CA (which may be your own), be no CA itself, and carry
    digitalSignature key usage and an accepted extended key usage (e.g. emailProtection).
    No timestamp authority is contacted (works offline).
    """
    import c2pa

    cert, key = Path(cert), Path(key)
    for path in (cert, key):
        if not path.is_file():
            raise ProvenanceError(f"{path}: C2PA certificate/key file not found")
    action = {"action": "c2pa.created", "digitalSourceType": AI_SOURCE_TYPE, "softwareAgent": generator_version()}
    assertions = [{"label": "c2pa.actions", "data": {"actions": [action]}}]
    if tags:
        assertions.append({"label": "org.letstalk.generation", "data": tags})
    manifest = {"claim_generator_info": [{"name": "letstalk", "version": generator_version().split()[-1]}],
                "title": dest.name, "format": "video/mp4", "assertions": assertions}
    info = c2pa.C2paSignerInfo(_signing_algorithm(key), cert.read_bytes(), key.read_bytes(), None)
    try:
        signer = c2pa.Signer.from_info(info)
        with c2pa.Builder(manifest) as builder, open(source, "rb") as src, open(dest, "w+b") as dst:
            builder.sign(signer, "video/mp4", src, dst)
    except c2pa.C2paError as err:
        raise ProvenanceError(f"{cert}: C2PA signing failed ({err}); the chain must start with a CA-issued, "
                              "non-CA signing certificate with digitalSignature and emailProtection usage") from err


def check_c2pa_signer(cert: str | os.PathLike, key: str | os.PathLike) -> None:
    """Sign a two-frame video with `cert` and `key`, so a chain C2PA refuses fails before minutes of generation."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.mp4"
        media.write_video(probe, np.zeros((2, GRID, GRID, 3), np.uint8), media.FPS)
        sign_c2pa(probe, Path(tmp) / "signed.mp4", cert, key)


def read_c2pa(path: str | os.PathLike, trust_anchors: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The active C2PA manifest of a video and its validation, or None when it has none.

    Keys: state ("Trusted" with a matching `trust_anchors` PEM, "Valid" when the signature and
    hashes check out but the signer is not on a trust list, "Invalid"), ai_generated (a
    `c2pa.created` action with the trained-algorithm source type), signer, failures (codes), manifest.
    """
    import c2pa

    settings = {"verify": {"verify_trust": True}}
    if trust_anchors:
        settings["trust"] = {"user_anchors": Path(trust_anchors).read_text()}
    try:
        context = c2pa.Context.from_dict(settings)
        with open(path, "rb") as handle, c2pa.Reader("video/mp4", handle, context=context) as reader:
            store, state = json.loads(reader.json()), reader.get_validation_state()
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as err:
        if "ManifestNotFound" in type(err).__name__ or "no JUMBF" in str(err) or "not found" in str(err).lower():
            return None
        raise ProvenanceError(f"{path}: unreadable C2PA data ({err})") from err
    manifest = store["manifests"][store["active_manifest"]]
    actions = [a for assertion in manifest.get("assertions", []) if assertion["label"].startswith("c2pa.actions")
               for a in assertion["data"].get("actions", [])]
    failures = [item["code"] for item in results.get("activeManifest", {}).get("failure", [])]
    return {
        "state": state,
        "ai_generated": any(a.get("action") == "c2pa.created" and a.get("digitalSourceType") == AI_SOURCE_TYPE
                            for a in actions),
        "signer": manifest.get("signature_info", {}).get("common_name"),
        "failures": failures,
        "manifest": manifest,
    }


def _verify_frames(path: Path) -> np.ndarray:
    """Frames for watermark detection: at most ~250, evenly spread over the video (bounded memory)."""
    try:
        info = media.probe_video(path)
        fps = min(float(info.fps) or media.FPS, 250 / max(info.duration_s, 1e-3))
        return media.read_video(path, fps=fps)
    except RuntimeError as err:  # decord's frame access on a file that opened but holds no decodable video
        raise media.MediaError(f"{path}: not a readable video ({str(err).splitlines()[0]})") from err


def verify(path: str | os.PathLike, trust_anchors: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything a receiver can check on a video: watermark, container metadata and C2PA manifest."""
    path = Path(path)
    frames = _verify_frames(path)
    if min(frames.shape[1:3]) < GRID:
        mark = WatermarkResult(False, None, 0.0, False, len(frames))
    else:
        mark = detect_watermark(frames)
    return {"file": str(path), "watermark": asdict(mark), "metadata": media.read_tags(path),
            "c2pa": read_c2pa(path, trust_anchors)}


def print_verification(result: dict[str, Any], as_json: bool = False) -> None:
    """Print `verify`'s result for a person (or as JSON)."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    mark = result["watermark"]
    if mark["found"]:
        print(f"{result['file']}: watermark FOUND, payload {mark['payload']:08x} "
              f"(strength {mark['strength']:.2f} over {mark['frames']} frames)")
    else:
        print(f"{result['file']}: no watermark found (strength {mark['strength']:.2f}, CRC "
              f"{'ok' if mark['crc_ok'] else 'mismatch'}, {mark['frames']} frames)")
    ours = {key: value for key, value in result["metadata"].items() if key not in _CONTAINER_TAGS}
    print("metadata:" if ours else "metadata: none beyond the container's own")
    for key, value in ours.items():
        print(f"  {key}: {value}")
    manifest = result["c2pa"]
    if manifest is None:
        print("C2PA: no manifest")
    else:
        print(f"C2PA: {manifest['state']}, signed by {manifest['signer']}, "
              f"AI-generated: {'yes' if manifest['ai_generated'] else 'no'}"
              + (f", failures: {', '.join(manifest['failures'])}" if manifest["failures"] else ""))
