"""`letstalk app`: a Gradio page over `pipeline.generate.generate`.

Upload a portrait and an audio file, pick a checkpoint and the sampling settings, watch the
progress and play or download the video. Generation runs in Gradio's queue, one job at a time;
bad input (an unreadable file, no face, silent audio, a wrong checkpoint) is shown on the page as
the message `generate` raises. The server binds 127.0.0.1 unless told otherwise: the page reads
any checkpoint path typed into it, so expose it only to people allowed to read the machine's files.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr

from pipeline.diffusion import AUDIO_SCALE, REF_SCALE, SAMPLERS
from pipeline.generate import CROPS, LoadedModel, default_crop, generate, load_model
from pipeline.options import Framing, Sampling

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
AUTO_SAMPLER = "auto (the model's default)"
SAMPLER_CHOICES = [AUTO_SAMPLER, *dict.fromkeys(name for names in SAMPLERS.values() for name in names)]

log = logging.getLogger(__name__)


class ModelCache:
    """The last model used, kept loaded between clicks; reloaded for another checkpoint or a changed file."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.key: tuple | None = None
        self.model: LoadedModel | None = None

    def get(self, checkpoint: str) -> LoadedModel:
        path = Path(checkpoint)
        key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else None)
        if key != self.key:
            self.key, self.model = None, None  # free the old model before loading the new one
            self.model, self.key = load_model(checkpoint, device=self.device), key
        return self.model


def _short(message: str, uploads: Sequence[str | None]) -> str:
    """`message` with the upload folders cut, so it names the file the user chose, not a server path."""
    for upload in uploads:
        if upload:
            message = message.replace(f"{Path(upload).parent}/", "")
    return message


def run_generation(portrait: str | None, audio: str | None, checkpoint: str | None, other_checkpoint: str,
                   sampler: str, steps: float, audio_scale: float, ref_scale: float, seed: float, crop: str, *,
                   out_dir: Path, models: ModelCache, progress: Callable[..., None] | None = None) -> tuple[str, str]:
    """Generate one video into `out_dir`; returns (video path, summary line). Bad input raises `gr.Error`."""
    checkpoint = other_checkpoint.strip() or checkpoint
    for value, what in ((portrait, "a portrait (image or video)"), (audio, "an audio file"),
                        (checkpoint, "a checkpoint, or type its path")):
        if not value:
            raise gr.Error(f"Choose {what}.", title="Missing input")
    report = None if progress is None else (lambda fraction, message: progress(fraction, desc=message))
    out = Path(out_dir) / f"letstalk-{uuid.uuid4().hex[:12]}.mp4"
    try:
        summary = generate(models.get(checkpoint), portrait, audio, out,
                           Sampling(sampler=None if sampler == AUTO_SAMPLER else sampler, steps=int(steps) or None,
                                    audio_scale=float(audio_scale), ref_scale=float(ref_scale), seed=int(seed)),
                           Framing(crop=crop), progress=report)
    except (ValueError, OSError) as err:  # our input errors subclass ValueError and name the file
        raise gr.Error(_short(str(err), (portrait, audio)), title="Cannot generate") from err
    except Exception as err:  # anything else: a message on the page, the traceback in the server log
        log.exception("generation failed")
        raise gr.Error(f"generation failed ({type(err).__name__}: {err}); the server log has the details",
                       title="Generation failed") from err
    line = (f"{summary['frames']} frames, {summary['seconds']:.2f} s, {summary['steps']} steps, seed {int(seed)}, "
            f"real-time factor {summary['real_time_factor']:.2f}")
    return str(out), line


def build_app(checkpoints: Sequence[str | Path], out_dir: Path, device: str = "cpu") -> gr.Blocks:
    """The page: inputs and settings on the left, the video and its summary on the right."""
    choices = [str(path) for path in checkpoints]
    models = ModelCache(device)

    with gr.Blocks(title="LetsTalk", analytics_enabled=False) as app:
        gr.Markdown("# LetsTalk\nOne portrait + one audio file → a video of that person speaking. The videos "
                    "carry an invisible watermark and metadata saying they are AI-generated.")
        with gr.Row():
            with gr.Column():
                portrait = gr.File(label="Portrait (an image, or a video whose first frame is used)",
                                   file_types=["image", "video"], type="filepath", elem_id="portrait")
                audio = gr.Audio(label="Audio", sources=["upload", "microphone"], type="filepath",
                                 elem_id="audio")
                checkpoint = gr.Dropdown(choices, value=choices[0] if choices else None, label="Checkpoint",
                                         elem_id="checkpoint")
                other = gr.Textbox(label="…or another checkpoint path (.ckpt or exported .safetensors)",
                                   placeholder="/path/to/model.safetensors", elem_id="other-checkpoint")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    sampler = gr.Dropdown(SAMPLER_CHOICES, value=AUTO_SAMPLER, label="Sampler", elem_id="sampler")
                    steps = gr.Slider(0, 100, value=0, step=1, label="Denoising steps (0: the sampler's default)",
                                      elem_id="steps")
                    audio_scale = gr.Slider(1.0, 5.0, value=AUDIO_SCALE, step=0.1, label="Audio guidance",
                                            elem_id="audio-scale")
                    ref_scale = gr.Slider(1.0, 5.0, value=REF_SCALE, step=0.1, label="Reference guidance",
                                          elem_id="ref-scale")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    crop = gr.Radio(list(CROPS), value=default_crop(), label="Portrait crop", elem_id="crop",
                                    info="face: found and aligned as in training (needs facenet-pytorch); "
                                         "center: the centre square; none: the whole image")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Result", interactive=False, buttons=["download"], elem_id="result")
                summary = gr.Markdown(elem_id="summary")

        def on_click(portrait, audio, checkpoint, other, sampler, steps, audio_scale, ref_scale, seed, crop,
                     progress=gr.Progress()):
            return run_generation(portrait, audio, checkpoint, other, sampler, steps, audio_scale, ref_scale,
                                  seed, crop, out_dir=out_dir, models=models, progress=progress)

        button.click(on_click, [portrait, audio, checkpoint, other, sampler, steps, audio_scale, ref_scale, seed,
                                crop], [video, summary], concurrency_limit=1)
    return app


def serve(checkpoints: Sequence[str | Path] = (), host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          out_dir: str | Path | None = None, device: str = "cpu", block: bool = True) -> gr.Blocks:
    """Build the page and serve it on host:port (blocking unless `block=False`); videos go to `out_dir`."""
    out_dir = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "letstalk-app"
    out_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(checkpoints, out_dir, device)
    app.queue(max_size=32, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, allowed_paths=[str(out_dir)],
               show_error=False, ssr_mode=False, inbrowser=False)
    return app
