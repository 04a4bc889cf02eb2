"""Audio encoders: frame alignment, real wav2vec2 and Whisper checkpoint round trips, and windowing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from pipeline.audio_encoders import (
    AudioEncoder,
    MelEncoder,
    Wav2Vec2Encoder,
    WhisperEncoder,
    audio_windows,
    build_audio_encoder,
    fit_to_frames,
    interpolate_time,
)

SR, FPS = 16000, 25
SPF = SR // FPS  # samples per video frame


def tone_burst(num_frames: int, first: int, last: int, seed: int = 0) -> np.ndarray:
    """Faint noise with a loud 440 Hz tone in video frames [first, last]."""
    rng = np.random.default_rng(seed)
    wave = (1e-3 * rng.standard_normal(num_frames * SPF)).astype(np.float32)
    t = np.arange((last - first + 1) * SPF) / SR
    wave[first * SPF : (last + 1) * SPF] += 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return wave


def test_mel_shape_dtype_and_protocol():
    enc = build_audio_encoder("mel")
    assert isinstance(enc, AudioEncoder)
    assert (enc.id, enc.K, enc.D) == ("mel-80", 4, 80)
    out = enc.encode(tone_burst(30, 10, 14), 30, FPS)
    assert out.shape == (30, 4, 80) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # Silence hits the log floor exactly: (ln(1e-5) + 4) / 4.
    silent = enc.encode(np.zeros(SPF * 3, np.float32), 3, FPS)
    np.testing.assert_allclose(silent, (np.log(1e-5) + 4) / 4, rtol=1e-6)


def test_mel_alignment_tone_burst_lands_in_its_frames():
    enc = MelEncoder()
    wave = tone_burst(30, 10, 14)
    peak = enc.encode(wave, 30, FPS).max(axis=2)  # [T, K]: loudest mel band per vector
    energy = peak.mean(axis=1)  # [T]
    assert energy[10:15].min() > energy[5] + 2.0 and energy[10:15].min() > energy[20] + 2.0
    assert np.abs(energy[[5, 20]] - energy[0]).max() < 0.3  # away from the burst: background level
    # Each vector's window is centred on its slot, so the only leak is the window overlap,
    # and it is symmetric: the last vector of frame 9 sees as much tone as the first of frame 15,
    # while the vectors before and after those see none.
    assert abs(peak[9, -1] - peak[15, 0]) < 0.05 and peak[9, -1] > peak[0].max() + 1.0
    assert peak[9, -2] < peak[0].max() + 0.3 and peak[15, 1] < peak[0].max() + 0.3
    # Frames well before the burst encode exactly as the burst-free signal does.
    quiet = enc.encode(wave[: 10 * SPF], 30, FPS)
    np.testing.assert_array_equal(enc.encode(wave, 30, FPS)[:9], quiet[:9])


def test_mel_matches_torchaudio_reference_and_pads_short_audio():
    enc = MelEncoder()
    wave = np.random.default_rng(1).standard_normal(7 * SPF).astype(np.float32) * 0.1
    out = enc.encode(wave, 7, FPS)
    ref = torchaudio.transforms.MelSpectrogram(SR, n_fft=400, hop_length=160, n_mels=80, center=False)(
        torch.nn.functional.pad(torch.from_numpy(wave), (120, 120))
    )
    np.testing.assert_allclose(out.reshape(28, 80), ((ref.clamp_min(1e-5).log() + 4) / 4).T.numpy(), atol=1e-5)
    # Audio a little short is zero-padded; too long is trimmed: both equal the exact-length encoding.
    np.testing.assert_array_equal(enc.encode(wave[:-100], 7, FPS), enc.encode(np.pad(wave[:-100], (0, 100)), 7, FPS))
    np.testing.assert_array_equal(enc.encode(np.concatenate([wave, wave]), 7, FPS), out)


def test_fit_to_frames_and_bad_input():
    assert fit_to_frames(np.ones(10, np.float32), 2, FPS).shape == (2 * SPF,)
    with pytest.raises(ValueError, match="mono"):
        fit_to_frames(np.zeros((2, 100), np.float32), 1, FPS)
    with pytest.raises(ValueError, match="fps 30"):
        MelEncoder(fps=30)
    with pytest.raises(ValueError, match="built for 25"):
        MelEncoder().encode(np.zeros(100, np.float32), 1, 30)


def test_build_audio_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="mel, wav2vec2"):
        build_audio_encoder("whisperx")
    with pytest.raises(ValueError, match="needs a path"):
        build_audio_encoder("wav2vec2")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_audio_encoder("wav2vec2", str(tmp_path))


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory):
    """A random tiny Wav2Vec2Model saved like a hub checkpoint (with the feature extractor config)."""
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 4, 16),  # stride 320 -> 50 Hz
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    model = Wav2Vec2Model(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny-w2v2"
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True).save_pretrained(path)
    return model, path


def test_wav2vec2_checkpoint_round_trip_matches_in_memory_model(tiny_wav2vec2):
    model, path = tiny_wav2vec2
    enc = build_audio_encoder("wav2vec2", str(path))
    assert isinstance(enc, Wav2Vec2Encoder)
    assert (enc.id, enc.K, enc.D, enc.stride) == ("tiny-w2v2", 2, 32, 320)
    assert enc.receptive == 1 + 9 + 2 * 5 + 1 * 20  # conv receptive field in samples

    T = 20
    wave = tone_burst(T, 5, 9)
    out = enc.encode(wave, T, FPS)
    assert out.shape == (T, 2, 32) and out.dtype == np.float32

    # Reference: the in-memory model on the same normalised audio, interpolated the same way.
    x = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
    with torch.inference_mode():
        hidden = model(torch.from_numpy(x)[None], output_hidden_states=True).hidden_states[-1][0]
    centres = torch.arange(hidden.shape[0], dtype=torch.float64) * 320 + (enc.receptive - 1) / 2
    targets = (torch.arange(T * 2, dtype=torch.float64) + 0.5) * 320
    ref = interpolate_time(hidden, centres, targets).reshape(T, 2, 32).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)

    # Averaging layers: mean of the two chosen hidden states.
    both = Wav2Vec2Encoder(path, layers=[1, 2])
    assert both.id == "tiny-w2v2:layers=1+2" and both.D == 32
    with torch.inference_mode():
        states = model(torch.from_numpy(x)[None], output_hidden_states=True).hidden_states
    mean = interpolate_time((states[1][0] + states[2][0]) / 2, centres, targets).reshape(T, 2, 32).numpy()
    np.testing.assert_allclose(both.encode(wave, T, FPS), mean, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        Wav2Vec2Encoder(path, layers=5)


def test_wav2vec2_chunking_runs_each_window_independently(tiny_wav2vec2):
    model, path = tiny_wav2vec2
    enc = Wav2Vec2Encoder(path, chunk_seconds=0.4)  # 6400 samples = 20 outputs per chunk
    assert enc.chunk == 6400
    T = 25  # 16000 samples: chunks [0, 6400), [6400, 12800), [12800, 16000)
    wave = tone_burst(T, 10, 14)
    x = torch.from_numpy((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7))
    with torch.inference_mode():
        hidden = torch.cat([model(x[s : s + 6400][None]).last_hidden_state[0] for s in (0, 6400, 12800)])
    centres = torch.cat(
        [s + torch.arange(n) * 320 + (enc.receptive - 1) / 2 for s, n in ((0, 20), (6400, 20), (12800, 10))]
    ).double()
    targets = (torch.arange(T * 2, dtype=torch.float64) + 0.5) * 320
    ref = interpolate_time(hidden, centres, targets).reshape(T, 2, 32).numpy()
    np.testing.assert_allclose(enc.encode(wave, T, FPS), ref, atol=1e-5)


def test_wav2vec2_corrupt_weights_name_the_folder(tiny_wav2vec2, tmp_path):
    _, path = tiny_wav2vec2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((path / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors" * 4)
    with pytest.raises(ValueError, match=f"{broken}: cannot load a wav2vec2 model"):
        build_audio_encoder("wav2vec2", str(broken))


def test_interpolate_time_exact_values():
    values = torch.tensor([[0.0], [10.0], [20.0]])
    src = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    dst = torch.tensor([-1.0, 0.25, 1.5, 2.0, 3.0], dtype=torch.float64)
    assert interpolate_time(values, src, dst)[:, 0].tolist() == [0.0, 2.5, 15.0, 20.0, 20.0]


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_audio_windows_matches_loop_reference(radius):
    feats = torch.randn(2, 5, 3, 4)  # [B, T, K, D]
    out = audio_windows(feats, radius)
    assert out.shape == (2, 5, (2 * radius + 1) * 3, 4)
    T = feats.shape[1]
    for t in range(T):
        ref = torch.cat([feats[:, min(max(s, 0), T - 1)] for s in range(t - radius, t + radius + 1)], dim=1)
        assert torch.equal(out[:, t], ref)
    if radius == 0:
        assert torch.equal(out, feats.reshape(2, 5, 3, 4))


def test_audio_windows_unbatched_and_errors():
    feats = torch.arange(3 * 1 * 2, dtype=torch.float32).reshape(3, 1, 2)  # [T=3, K=1, D=2]
    out = audio_windows(feats, 1)
    assert out[0].tolist() == [[0, 1], [0, 1], [2, 3]]  # left edge replicated
    assert out[2].tolist() == [[2, 3], [4, 5], [4, 5]]  # right edge replicated
    with pytest.raises(ValueError, match="radius"):
        audio_windows(feats, -1)
    with pytest.raises(ValueError, match="T, K, D"):
        audio_windows(torch.zeros(3, 4), 1)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A random tiny WhisperModel saved like a hub checkpoint, with 1-second windows (chunk_length=1) so
    that a few seconds of audio exercise several windows quickly."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
        num_mel_bins=80, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=50, max_target_positions=8,  # 50 states = 1 s of 100 mel frames
    )
    model = WhisperModel(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny-whisper"
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(path)
    return model, path


def test_whisper_checkpoint_round_trip_matches_the_encoder_window_by_window(tiny_whisper):
    model, path = tiny_whisper
    enc = build_audio_encoder("whisper", str(path), layers=[1, 2])
    assert isinstance(enc, WhisperEncoder)
    assert (enc.id, enc.K, enc.D, enc.stride, enc.window) == ("tiny-whisper:layers=1+2", 2, 16, 320, 16000)
    T = 62  # 2.48 s: windows [0, 1), [1, 2), [2, 2.48) s
    wave = tone_burst(T, 30, 40)
    out = enc.encode(wave, T, FPS)
    assert out.shape == (T, 2, 16) and out.dtype == np.float32

    # Reference: the in-memory encoder on each 1 s window (padded by the extractor), the states
    # covering real audio kept, centred at 320 i + 160, interpolated onto the frame slots.
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    feats, centres = [], []
    for start, keep in ((0, 50), (16000, 50), (32000, 24)):
        mel = extractor(wave[start : start + 16000], sampling_rate=SR, return_tensors="pt").input_features
        with torch.inference_mode():
            states = model.encoder(mel, output_hidden_states=True).hidden_states
        feats.append(((states[1][0] + states[2][0]) / 2)[:keep])
        centres.append(start + torch.arange(keep) * 320 + 160)
    targets = (torch.arange(T * 2, dtype=torch.float64) + 0.5) * 320
    ref = interpolate_time(torch.cat(feats), torch.cat(centres).double(), targets).reshape(T, 2, 16).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        WhisperEncoder(path, layers=3)


def test_hf_encoders_run_in_bfloat16_and_return_float32(tiny_wav2vec2, tiny_whisper):
    for name, (_, path) in (("wav2vec2", tiny_wav2vec2), ("whisper", tiny_whisper)):
        full = build_audio_encoder(name, str(path))
        half = build_audio_encoder(name, str(path), dtype=torch.bfloat16)
        assert full.model.dtype == torch.float32 and half.model.dtype == torch.bfloat16
        wave = tone_burst(25, 5, 15)
        a, b = full.encode(wave, 25, FPS), half.encode(wave, 25, FPS)
        assert b.dtype == np.float32
        assert np.abs(a - b).max() < 0.1 * np.abs(a).max()  # bf16 keeps ~3 significant digits


def test_generation_rebuilds_the_training_encoder_with_its_layers_once(tiny_wav2vec2):
    """`TrainedNetwork.audio_encoder` follows the manifest's encoder entry (path and hidden layers), built once."""
    from pipeline.generate import TrainedNetwork

    _, path = tiny_wav2vec2
    info = {"fps": FPS, "audio_encoder": {"name": "wav2vec2", "path": str(path), "layers": [1, 2]}}
    gen = TrainedNetwork(net=None, diffusion=None, data_info=info)
    encoder = gen.audio_encoder()
    assert encoder.id == "tiny-w2v2:layers=1+2" and gen.audio_encoder() is encoder
    legacy = TrainedNetwork(net=None, diffusion=None, data_info={**info, "audio_encoder": {"name": "mel"}})
    assert legacy.audio_encoder().id == "mel-80"  # manifests without "layers" (mel, older datasets)
