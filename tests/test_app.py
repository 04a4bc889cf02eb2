"""The web app: `letstalk app` served for real and driven by a real headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline import media
from pipeline.cli import _parser

gr = pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'letstalk[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")

from pipeline.app import AUTO_SAMPLER, ModelCache, run_generation  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 120_000  # generation on a busy 2-core machine


@pytest.fixture(scope="module")
def inputs(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good portrait (png) and audio (wav, 0.4 s), and bad files of each kind."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(media.read_video(demo["videos"][0])[0]).save(folder / "portrait.png")
    t = np.arange(int(0.4 * 16000)) / 16000
    sf.write(folder / "speech.wav", (0.5 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    sf.write(folder / "silence.wav", np.zeros(16000, np.float32), 16000)
    (folder / "notes.png").write_text("not an image")
    (folder / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)).save(folder / "noface.png")
    return {path.name: path for path in folder.iterdir()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`letstalk app --checkpoint CKPT` in a subprocess on a free port; its URL and video folder."""
    out, port = tmp_path_factory.mktemp("app"), _free_port()
    log = out / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(out / "uploads"),
           "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "app", "--checkpoint", demo["checkpoint"],
                                    "--port", str(port), "--out", str(out / "videos")],
                                   cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not come up on {url}:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield {"url": url, "videos": out / "videos"}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def _open(browser, url: str):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def _fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input[type=number], #{elem_id} textarea").first
    field.fill(value)
    field.press("Tab")


def _upload(page, portrait: Path, audio: Path, crop: str = "center") -> None:
    """Choose the two files and the portrait crop (the synthetic demo faces are not real faces: centre crop)."""
    page.locator("#portrait input[type=file]").set_input_files(portrait)
    page.locator("#audio input[type=file]").set_input_files(audio)
    page.locator("#settings").get_by_text("Settings", exact=True).click()
    page.locator("#crop").get_by_text(crop, exact=True).click()


def _error_text(page) -> str:
    """The text of the error toast Gradio shows for a `gr.Error`."""
    toast = page.locator(".toast-body").last
    toast.wait_for()
    return toast.inner_text()


def test_upload_generate_play_and_download(browser, server: dict, inputs: dict[str, Path], tmp_path: Path):
    page = _open(browser, server["url"])
    _upload(page, inputs["portrait.png"], inputs["speech.wav"])
    _fill(page, "steps", "2")
    _fill(page, "seed", "3")
    page.locator("#generate").click()

    video = page.locator("#result video")
    video.wait_for()
    duration = video.evaluate("""v => new Promise((resolve, reject) => {
        if (v.readyState >= 1) return resolve(v.duration);
        v.addEventListener('loadedmetadata', () => resolve(v.duration));
        v.addEventListener('error', () => reject(new Error('video error ' + (v.error && v.error.code))));
    })""")  # the browser itself decodes the mp4's header: it is playable
    assert duration == pytest.approx(0.4, abs=0.05)
    assert re.search(r"10 frames, 0\.40 s, 2 steps, seed 3", page.locator("#summary").inner_text())

    response = page.request.get(video.get_attribute("src"))
    assert response.ok
    downloaded = tmp_path / "downloaded.mp4"
    downloaded.write_bytes(response.body())
    streams = media.media_streams(downloaded)
    assert (streams["video_codec"], streams["audio_codec"], streams["num_frames"]) == ("h264", "aac", 10)
    [written] = server["videos"].glob("letstalk-*.mp4")
    assert written.read_bytes() == downloaded.read_bytes()
    page.close()


BAD_INPUTS = {  # case: (portrait, audio, crop, checkpoint typed in, message shown)
    "no face": ("noface.png", "speech.wav", "face", "", "noface.png: no face found"),
    "silent audio": ("portrait.png", "silence.wav", "center", "", "silence.wav: audio is silent"),
    "corrupt portrait": ("notes.png", "speech.wav", "center", "", "notes.png: unreadable or corrupt image"),
    "missing checkpoint": ("portrait.png", "speech.wav", "center", "/nowhere/missing.ckpt",
                           "/nowhere/missing.ckpt: checkpoint not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_shows_a_clear_error_on_the_page(browser, server: dict, inputs: dict[str, Path], case: str):
    portrait, audio, crop, checkpoint, expected = BAD_INPUTS[case]
    if crop == "face":
        pytest.importorskip("facenet_pytorch", reason="the face detector (facenet-pytorch) is not installed")
    page = _open(browser, server["url"])
    _upload(page, inputs[portrait], inputs[audio], crop)
    if checkpoint:
        _fill(page, "other-checkpoint", checkpoint)
    page.locator("#generate").click()
    text = _error_text(page)
    assert expected in text and "Traceback" not in page.content()
    named = expected.split(":")[0]
    if "/" not in named:  # an uploaded file is named as the user chose it, not by its server path
        assert f"/{named}" not in text
    page.close()


def test_handler_refuses_bad_input_naming_the_uploaded_file(demo: dict, inputs: dict[str, Path], tmp_path: Path):
    models = ModelCache()

    def run(portrait: str | None, audio: str | None, checkpoint: str | None, other: str = "",
            sampler: str = AUTO_SAMPLER) -> tuple[str, str]:
        return run_generation(portrait, audio, checkpoint, other, sampler, 2, 2.0, 1.5, 0, "center",
                              out_dir=tmp_path, models=models)

    portrait, speech = str(inputs["portrait.png"]), str(inputs["speech.wav"])
    with pytest.raises(gr.Error, match="Choose a portrait"):
        run(None, speech, demo["checkpoint"])
    with pytest.raises(gr.Error, match="Choose a checkpoint"):
        run(portrait, speech, None, other="  ")
    with pytest.raises(gr.Error) as raised:
        run(portrait, str(inputs["broken.wav"]), demo["checkpoint"])
    assert raised.value.message.startswith("broken.wav: unreadable or corrupt audio")
    with pytest.raises(gr.Error, match="sampler 'ddim' does not fit"):
        run(portrait, speech, demo["checkpoint"], sampler="ddim")
    assert not list(tmp_path.iterdir())


def test_handler_reports_progress_and_reuses_the_loaded_model(demo: dict, inputs: dict[str, Path], tmp_path: Path):
    models, seen = ModelCache(), []
    for seed in (0, 1):
        path, line = run_generation(str(inputs["portrait.png"]), str(inputs["speech.wav"]), demo["checkpoint"], "",
                                    AUTO_SAMPLER, 2, 2.0, 1.5, seed, "center", out_dir=tmp_path, models=models,
                                    progress=lambda fraction, desc: seen.append((fraction, desc)))
        assert Path(path).exists() and line.startswith(f"10 frames, 0.40 s, 2 steps, seed {seed}")
        if seed == 0:
            first = models.model
    assert models.model is first
    fractions = [fraction for fraction, _ in seen]
    assert 0 <= min(fractions) and max(fractions) <= 1 and all(desc for _, desc in seen)
    assert any("denoising" in desc for _, desc in seen)


def test_cli_binds_localhost_by_default():
    args = _parser().parse_args(["app", "--checkpoint", "a.ckpt", "--checkpoint", "b.safetensors"])
    assert (args.host, args.port, args.checkpoint) == ("127.0.0.1", 7860, ["a.ckpt", "b.safetensors"])
