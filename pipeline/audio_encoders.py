"""Audio features aligned to video frames: K feature vectors of dimension D per frame.

Alignment (every encoder): audio is padded with zeros or trimmed to exactly
``round(num_frames * sr / fps)`` samples, and frame t owns samples
``[t * sr / fps, (t + 1) * sr / fps)``. That span is cut into K equal slots; vector k
of frame t describes the audio centred on the middle of slot k. So the features of
frame t come from its own audio (plus the analysis window's overlap into the
neighbouring slots), never from a shifted position.

`audio_windows` is the one place that gathers a window of neighbouring frames'
features for each frame; the datamodule and generation both call it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torchaudio

from pipeline.media import SAMPLE_RATE
from pipeline.progress import hf_loading_bars


@runtime_checkable
class AudioEncoder(Protocol):
    """What `prepare` and `generate` need from an audio encoder."""

    id: str
    K: int
    D: int

    def encode(self, waveform: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
        """float32 [N] mono 16 kHz -> float32 [num_frames, K, D]."""
        ...


def fit_to_frames(waveform: np.ndarray, num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Zero-pad or trim a mono waveform to exactly the samples of `num_frames` video frames."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"audio must be a mono waveform [N], got shape {waveform.shape}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n = round(num_frames * sample_rate / fps)
    if waveform.shape[0] >= n:
        return waveform[:n]
    return np.pad(waveform, (0, n - waveform.shape[0]))


class MelEncoder:
    """Log-mel spectrogram, K=4 vectors per frame (hop 10 ms at 25 fps), no weights.

    Each vector is a 25 ms (400-sample) Hann window centred on its slot. Values are
    ``(ln(max(mel_power, 1e-5)) + 4) / 4``: a fixed normalisation that needs no dataset
    statistics, so every utterance is encoded independently and identically.
    """

    K = 4
    N_FFT = 400
    FLOOR = 1e-5

    def __init__(self, n_mels: int = 80, fps: float = 25):
        hop = SAMPLE_RATE / (fps * self.K)
        if hop != int(hop) or hop > self.N_FFT:
            raise ValueError(
                f"MelEncoder needs {SAMPLE_RATE}/({self.K}*fps) to be a whole number of samples <= {self.N_FFT} "
                f"(e.g. fps 25 -> hop 160); fps {fps} gives {hop:.2f}"
            )
        self.fps = fps
        self.D = n_mels
        self.id = f"mel-{n_mels}"
        self.hop = int(hop)
        # Centre window i on sample i*hop + hop/2: pad so window i starts at i*hop.
        self._pad_left = (self.N_FFT - self.hop) // 2
        self._pad_right = self.N_FFT - self.hop - self._pad_left
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=self.N_FFT, win_length=self.N_FFT, hop_length=self.hop,
            n_mels=n_mels, center=False, power=2.0,
        )

    def encode(self, waveform: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
        _check_fps(self, fps)
        audio = torch.from_numpy(fit_to_frames(waveform, num_frames, fps))
        audio = torch.nn.functional.pad(audio, (self._pad_left, self._pad_right))
        with torch.inference_mode():
            mel = self._mel(audio)  # [D, num_frames*K]
        feats = (torch.log(mel.clamp_min(self.FLOOR)) + 4.0) / 4.0
        return feats.T.reshape(num_frames, self.K, self.D).numpy().astype(np.float32)


class _HFEncoder:
    """Shared by the Hugging Face encoders: layer choice, K vectors per frame, interpolation onto frame slots.

    `layers` indexes ``output_hidden_states`` (0 = the input embedding, -1 = last layer); several
    layers are averaged, so D is always the hidden size. The model's outputs (50 Hz for the
    standard checkpoints) are linearly interpolated in time, by the centre of each output's
    receptive field, onto the frame slots (K=2 at 25 fps). Subclasses give `hidden_states`.
    """

    def _configure(self, path: Path, num_states: int, layers: int | list[int], stride: int, hidden: int,
                   fps: float, device: str) -> None:
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        bad = [i for i in self.layers if not -num_states <= i < num_states]
        if not self.layers or bad:
            raise ValueError(f"{path}: layers {self.layers} out of range for {num_states} hidden states")
        self.device, self.fps, self.stride = device, fps, stride  # stride: samples per model output
        self.K = max(1, round(SAMPLE_RATE / stride / fps))
        self.D = hidden
        name = path.resolve().name
        self.id = name if self.layers == [-1] else f"{name}:layers={'+'.join(map(str, self.layers))}"

    def _mean_layers(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean of the chosen layers of a batch-of-one model output -> float32 [L, D] on the CPU."""
        return torch.stack([hidden_states[i][0] for i in self.layers]).float().mean(0).cpu()

    def hidden_states(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Model features [L, D] for a whole waveform and each one's centre in samples [L]."""
        raise NotImplementedError

    def encode(self, waveform: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
        _check_fps(self, fps)
        audio = fit_to_frames(waveform, num_frames, fps)
        feats, centres = self.hidden_states(audio)
        slot = SAMPLE_RATE / (fps * self.K)
        targets = (torch.arange(num_frames * self.K, dtype=torch.float64) + 0.5) * slot
        out = interpolate_time(feats, centres, targets)  # [num_frames*K, D]
        return out.reshape(num_frames, self.K, self.D).numpy().astype(np.float32)


def _check_folder(path: Path, kind: str) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a {kind} checkpoint folder (no config.json)")


class Wav2Vec2Encoder(_HFEncoder):
    """Hidden states of a local wav2vec2 checkpoint (base or large), resampled to K vectors per frame.

    Input is normalised as the checkpoint's `preprocessor_config.json` says (zero mean, unit
    variance when absent). Long audio runs in non-overlapping `chunk_seconds` windows to bound
    memory. `dtype`: bfloat16 on a GPU halves memory and time; features come back as float32.
    """

    def __init__(self, path: str | Path, layers: int | list[int] = -1, fps: float = 25, device: str = "cpu",
                 chunk_seconds: float = 20.0, dtype: torch.dtype = torch.float32):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        path = Path(path)
        _check_folder(path, "wav2vec2")
        try:
            self.model = Wav2Vec2Model.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
            if (path / "preprocessor_config.json").is_file():
                self.extractor = Wav2Vec2FeatureExtractor.from_pretrained(path, local_files_only=True)
            else:
                self.extractor = Wav2Vec2FeatureExtractor(sampling_rate=SAMPLE_RATE, do_normalize=True)
        except Exception as err:  # transformers/safetensors raise many unrelated types for a bad folder
            raise ValueError(f"{path}: cannot load a wav2vec2 model ({err})") from err
        if self.extractor.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"{path}: model expects {self.extractor.sampling_rate} Hz audio, this pipeline uses {SAMPLE_RATE}")
        config = self.model.config
        self._configure(path, config.num_hidden_layers + 1, layers, math.prod(config.conv_stride), config.hidden_size,
                        fps, device)
        self.receptive = 1 + sum((k - 1) * math.prod(config.conv_stride[:i]) for i, k in enumerate(config.conv_kernel))
        chunk = max(int(chunk_seconds * SAMPLE_RATE) // self.stride, 1) * self.stride
        self.chunk = max(chunk, self.receptive)

    def hidden_states(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
        values = torch.from_numpy(np.asarray(values, dtype=np.float32))
        feats, centres = [], []
        for start in range(0, values.shape[0], self.chunk):
            piece = values[start : start + self.chunk]
            if piece.shape[0] < self.receptive:
                piece = torch.nn.functional.pad(piece, (0, self.receptive - piece.shape[0]))
            with torch.inference_mode():
                out = self.model(piece[None].to(self.device, self.model.dtype), output_hidden_states=True)
            states = self._mean_layers(out.hidden_states)  # [L, D]
            feats.append(states)
            centres.append(start + torch.arange(states.shape[0]) * self.stride + (self.receptive - 1) / 2)
        return torch.cat(feats), torch.cat(centres).double()


class WhisperEncoder(_HFEncoder):
    """Hidden states of the encoder of a local Whisper checkpoint (any size, Hugging Face format).

    Whisper's encoder reads log-mel windows of exactly 30 s (its feature extractor pads each
    window) and gives one state per 320 samples (20 ms: mel hop 160, then a stride-2 conv); state
    i of a window starting at sample s is centred on s + 320·i + 160. Long audio runs window by
    window and only the states that cover real audio are kept.
    """

    def __init__(self, path: str | Path, layers: int | list[int] = -1, fps: float = 25, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import WhisperFeatureExtractor, WhisperModel

        path = Path(path)
        _check_folder(path, "whisper")
        try:
            self.model = WhisperModel.from_pretrained(path, local_files_only=True, dtype=dtype).get_encoder()
            self.model.to(device).eval()
            if (path / "preprocessor_config.json").is_file():
                self.extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
            else:
                self.extractor = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        except Exception as err:  # transformers/safetensors raise many unrelated types for a bad folder
            raise ValueError(f"{path}: cannot load a Whisper model ({err})") from err
        if self.extractor.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"{path}: model expects {self.extractor.sampling_rate} Hz audio, this pipeline uses {SAMPLE_RATE}")
        config = self.model.config
        self._configure(path, config.encoder_layers + 1, layers, 2 * self.extractor.hop_length, config.d_model,
                        fps, device)
        self.window = self.extractor.n_samples  # 30 s

    def hidden_states(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        feats, centres = [], []
        for start in range(0, len(waveform), self.window):
            piece = waveform[start : start + self.window]
            mel = self.extractor(piece, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features  # [1, M, 3000]
            with torch.inference_mode():
                out = self.model(mel.to(self.device, self.model.dtype), output_hidden_states=True)
            keep = math.ceil(len(piece) / self.stride)
            feats.append(self._mean_layers(out.hidden_states)[:keep])  # [keep, D]
            centres.append(start + torch.arange(keep) * self.stride + self.stride / 2)
        return torch.cat(feats), torch.cat(centres).double()


def interpolate_time(values: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of values [L, D] at increasing times src [L] onto times dst [M] -> [M, D].

    Times outside [src[0], src[-1]] take the nearest end value.
    """
    if values.shape[0] == 1:
        return values.expand(dst.shape[0], -1).clone()
    right = torch.searchsorted(src, dst).clamp(1, src.shape[0] - 1)
    left = right - 1
    frac = ((dst - src[left]) / (src[right] - src[left])).clamp(0.0, 1.0).to(values.dtype)[:, None]
    return values[left] * (1 - frac) + values[right] * frac


def _check_fps(encoder: MelEncoder | _HFEncoder, fps: float) -> None:
    if fps != encoder.fps:
        raise ValueError(f"audio encoder {encoder.id} was built for {encoder.fps} fps, asked to encode at {fps} fps")


ENCODERS = ("mel", "wav2vec2", "whisper")


def build_audio_encoder(name: str, path: str | None = None, fps: float = 25, device: str = "cpu",
                        layers: int | list[int] = -1, dtype: torch.dtype | None = None) -> AudioEncoder:
    """An encoder by name: "mel" (no weights), "wav2vec2" or "whisper" (a local Hugging Face folder in `path`).

    `layers`: hidden states averaged (Hugging Face encoders); `dtype`: their weights' dtype, by default
    bfloat16 on a GPU and float32 on the CPU.
    """
    if name == "mel":
        return MelEncoder(fps=fps)
    if name in ("wav2vec2", "whisper"):
        if not path:
            raise ValueError(f"audio encoder {name} needs a path to a local checkpoint folder (--audio-encoder-path)")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        cls = Wav2Vec2Encoder if name == "wav2vec2" else WhisperEncoder
        with hf_loading_bars(sys.stderr.isatty()):
            return cls(path, layers=layers, fps=fps, device=device, dtype=dtype)
    raise ValueError(f"unknown audio encoder {name!r}; choose one of {', '.join(ENCODERS)}")


def audio_windows(features: torch.Tensor, radius: int) -> torch.Tensor:
    """Each frame's features with those of its `radius` neighbours on both sides, in time order.

    [..., T, K, D] -> [..., T, (2*radius+1)*K, D]; frames past either end repeat the edge frame.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if features.ndim < 3:
        raise ValueError(f"features must be [..., T, K, D], got shape {tuple(features.shape)}")
    T, K, D = features.shape[-3:]
    offsets = torch.arange(-radius, radius + 1, device=features.device)
    index = (torch.arange(T, device=features.device)[:, None] + offsets).clamp(0, max(T - 1, 0))  # [T, W]
    windows = features[..., index, :, :]  # [..., T, W, K, D]
    return windows.reshape(*features.shape[:-3], T, (2 * radius + 1) * K, D)
