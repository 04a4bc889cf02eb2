"""Provenance marks: watermark robustness, container metadata, C2PA signing, and `letstalk verify`."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline import media
from pipeline import provenance as pv
from pipeline.cli import main
from pipeline.synth import draw_clip

PAYLOAD = 0xC0FFEE12


def _reencode(src: Path, dst: Path, scale: str | None = None) -> Path:
    """Re-encode with libx264 CRF 23 (optionally resized), as a platform that recompresses uploads would."""
    command = [media.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(src)]
    command += (["-vf", f"scale={scale}"] if scale else []) + ["-c:v", "libx264", "-crf", "23", "-pix_fmt", "yuv420p"]
    subprocess.run([*command, str(dst)], check=True)
    return dst


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 256² synthetic talking face, 1 s: marked, unmarked, marked then re-encoded at CRF 23 and at half size."""
    root = tmp_path_factory.mktemp("videos")
    clip = draw_clip(7, seconds=1.0, size=256)
    marked = root / "marked.mp4"
    media.write_video(marked, pv.embed_watermark(clip.frames, PAYLOAD), 25, clip.audio)
    media.write_video(root / "plain.mp4", clip.frames, 25, clip.audio)
    return {"marked": marked, "plain": root / "plain.mp4", "crf23": _reencode(marked, root / "crf23.mp4"),
            "half": _reencode(marked, root / "half.mp4", "iw/2:ih/2"), "frames": clip.frames}


def test_watermark_is_invisible_and_exact_before_encoding():
    frames = draw_clip(3, seconds=0.4, size=64).frames
    marked = pv.embed_watermark(frames, PAYLOAD)
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - frames) ** 2))
    assert psnr > 40
    assert np.array_equal((pv.bit_votes(marked) < 0).astype(np.uint8), np.tile(pv.payload_bits(PAYLOAD), (10, 1)))
    result = pv.detect_watermark(marked)
    assert result.found and result.payload == PAYLOAD and result.strength > 0.9


@pytest.mark.parametrize("name", ["marked", "crf23", "half"])
def test_watermark_survives_reencoding_and_half_resize(videos: dict, name: str):
    frames = media.read_video(videos[name])
    per_frame = ((pv.bit_votes(frames) < 0) == pv.payload_bits(PAYLOAD)).mean()
    assert per_frame >= 0.85  # single frames; the vote over frames below must be exact
    result = pv.detect_watermark(frames)
    assert (result.found, result.payload, result.crc_ok) == (True, PAYLOAD, True)
    if name == "half":
        assert frames.shape[1:3] == (128, 128)


def test_unmarked_video_has_no_watermark(videos: dict):
    result = pv.detect_watermark(media.read_video(videos["plain"]))
    assert not result.found and result.payload is None and result.strength < pv.MIN_STRENGTH / 2


def test_payload_encoding_and_refusals():
    bits = pv.payload_bits(0x12345678)
    assert len(bits) == 48 and int("".join(map(str, bits[:32])), 2) == 0x12345678
    assert pv.payload_id("ab" * 32, 1) != pv.payload_id("ab" * 32, 2)
    assert 0 <= pv.payload_id("ab" * 32, 1) < 2**32
    with pytest.raises(pv.ProvenanceError, match="32-bit"):
        pv.payload_bits(2**32)
    with pytest.raises(pv.ProvenanceError, match="smaller than the 32x32"):
        pv.embed_watermark(np.zeros((2, 16, 16, 3), np.uint8), 1)
    with pytest.raises(pv.ProvenanceError, match="uint8"):
        pv.embed_watermark(np.zeros((2, 64, 64, 3), np.float32), 1)


def test_metadata_round_trips_through_the_mp4(tmp_path: Path):
    tags = pv.provenance_metadata("letstalk-tiny-64px:last.ckpt", "ab" * 32, 5, PAYLOAD, consent="form #12; a=b")
    out = tmp_path / "tagged.mp4"
    media.write_video(out, np.zeros((3, 32, 32, 3), np.uint8), 25, metadata=tags)
    read = media.read_tags(out)
    assert {key: read[key] for key in tags} == tags
    assert read["ai_generated"] == "true" and read["watermark_payload"] == "c0ffee12"
    assert read["portrait_consent"] == "form #12; a=b" and read["comment"].startswith("AI-generated video.")
    remuxed = tmp_path / "remuxed.mp4"  # a plain remux drops custom keys but keeps the comment
    subprocess.run([media.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(out), "-c", "copy", str(remuxed)],
                   check=True)
    assert "checkpoint_sha256=" + "ab" * 32 in media.read_tags(remuxed)["comment"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LetsTalk tests")])


def _cert(subject: str, issuer: str, key, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert + CRL signing
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digitalSignature
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        if issuer != subject:  # C2PA wants the issuer identified
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
            builder = builder.add_extension(aki, critical=False)
    return builder.add_extension(usage, critical=True).sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_signing_files(folder: Path) -> dict[str, Path]:
    """A test CA and a leaf signing certificate it issued (C2PA refuses self-signed signing certificates).

    PEM files: chain (leaf then root), key (the leaf's), root (a trust anchor), self (a self-signed leaf).
    """
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("LetsTalk test root", "LetsTalk test root", ca_key, ca_key, ca=True)
    leaf = _cert("LetsTalk test signer", "LetsTalk test root", key, ca_key, ca=False)
    self_signed = _cert("self", "self", key, key, ca=False)
    files = {"chain": _pem(leaf) + _pem(ca), "key": _pem(key), "root": _pem(ca), "self": _pem(self_signed)}
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return {name: folder / f"{name}.pem" for name in files}


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_signing_files(tmp_path_factory.mktemp("pki"))


def test_c2pa_manifest_is_signed_and_read_back(videos: dict, signing: dict, tmp_path: Path):
    signed = tmp_path / "signed.mp4"
    tags = {"model_id": "tiny", "seed": "3"}
    pv.sign_c2pa(videos["marked"], signed, signing["chain"], signing["key"], tags)
    manifest = pv.read_c2pa(signed)
    assert manifest["state"] == "Valid" and manifest["ai_generated"]
    assert manifest["failures"] == ["signingCredential.untrusted"]  # our test root is on no trust list
    assert manifest["signer"] == "LetsTalk test signer"
    labels = {a["label"]: a["data"] for a in manifest["manifest"]["assertions"]}
    assert labels["org.letstalk.generation"] == tags
    assert pv.read_c2pa(signed, trust_anchors=signing["root"])["state"] == "Trusted"
    assert pv.read_c2pa(videos["marked"]) is None
    assert pv.detect_watermark(media.read_video(signed)).payload == PAYLOAD  # signing leaves the frames alone
    tampered = tmp_path / "tampered.mp4"
    data = bytearray(signed.read_bytes())
    mdat = data.index(b"mdat") + 64
    data[mdat] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert pv.read_c2pa(tampered)["state"] == "Invalid"


def test_c2pa_refuses_a_self_signed_certificate(videos: dict, signing: dict, tmp_path: Path):
    with pytest.raises(pv.ProvenanceError, match="self.pem: C2PA signing failed"):
        pv.sign_c2pa(videos["marked"], tmp_path / "x.mp4", signing["self"], signing["key"])
    with pytest.raises(pv.ProvenanceError, match="not found"):
        pv.sign_c2pa(videos["marked"], tmp_path / "x.mp4", tmp_path / "missing.pem", signing["key"])


def test_cli_verify_exit_codes_and_report(videos: dict, capsys):
    assert main(["verify", str(videos["crf23"])]) == 0
    out = capsys.readouterr().out
    assert "watermark FOUND, payload c0ffee12" in out and "C2PA: no manifest" in out
    assert main(["verify", str(videos["plain"])]) == 1
    assert "no watermark found" in capsys.readouterr().out
    not_video = videos["plain"].with_name("notes.txt")
    not_video.write_text("hello")
    assert main(["verify", str(not_video)]) == 1
    assert "notes.txt" in capsys.readouterr().err


def test_checkpoint_hash_covers_every_file_read(tmp_path: Path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"weights")
    assert pv.checkpoint_sha256(ckpt) == hashlib.sha256(b"weights").hexdigest()
    export = tmp_path / "model.safetensors"
    export.write_bytes(b"tensors")
    export.with_suffix(".json").write_text('{"net": {}}')
    first = pv.checkpoint_sha256(export)
    export.with_suffix(".json").write_text('{"net": {"size": "B"}}')  # same weights, other config
    assert pv.checkpoint_sha256(export) != first
    folder = tmp_path / "deepspeed"
    for name in ("a/state.pt", "b/state.pt"):
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_bytes(name.encode())
    digest = pv.checkpoint_sha256(folder)
    (folder / "b/state.pt").write_bytes(b"changed")
    assert pv.checkpoint_sha256(folder) != digest
