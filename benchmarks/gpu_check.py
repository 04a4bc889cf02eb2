"""Helpers of benchmarks/gpu_check.sh: print the environment, make a random SD-VAE-size VAE, write the summary.

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py sd-vae DIR
    python benchmarks/gpu_check.py summary STATUS_FILE OUTDIR
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata
import json
import platform
from pathlib import Path

PACKAGES = ("torch", "torchaudio", "lightning", "diffusers", "transformers", "deepspeed", "webdataset", "decord",
            "jsonargparse", "omegaconf", "flash_attn")


def env() -> None:
    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
    for name in PACKAGES:
        try:
            print(f"  {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {name} missing")
    for module in ("datamodules", "lightning_modules.letstalk", "pipeline.generate"):  # ours, with what is installed
        importlib.import_module(module)
    print("letstalk imports")


def sd_vae(folder: Path, small: bool) -> None:
    """A random-weight AutoencoderKL of SD's VAE architecture (f8, 4 channels), saved with save_pretrained;
    `small`: the same downsampling at an eighth of the width, for a CPU rehearsal."""
    from diffusers import AutoencoderKL
    from vae_encode import SD_VAE

    config = {**SD_VAE, "block_out_channels": (32, 32, 64, 64)} if small else SD_VAE
    AutoencoderKL(**config).save_pretrained(folder)
    print(f"wrote {folder}")


def _figures(out: Path) -> dict[str, str]:
    """One line of headline figures per part, from the files the parts wrote."""
    figures = {}
    path = out / "train_throughput.json"
    if path.is_file():
        rows = []
        for r in json.loads(path.read_text())["rows"]:
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
            rows.append(f"{r['size']} {'compiled' if r['compiled'] else 'eager'} {r['backend']} {r['precision']}: "
                        f"{r['clips_per_s']:.2f} clips/s, MFU {mfu}, peak {peak}")
        figures["train_throughput"] = "; ".join(rows)
    path = out / "fit_metrics.csv"
    if path.is_file():
        rows = [r for r in csv.DictReader(path.open()) if r.get("train/clips_per_s")]
        if rows:
            last = rows[-1]
            figures["zero2_fit"] = (f"step {last['step']}: {float(last['train/clips_per_s']):.2f} clips/s, "
                                    f"{float(last['train/tflops_per_s']):.1f} TFLOP/s"
                                    + (f", MFU {100 * float(last['train/mfu']):.1f} %" if last.get("train/mfu") else ""))
    path = out / "generate_speed.json"
    if path.is_file():
        rows = json.loads(path.read_text())["rows"]
        figures["generate_speed"] = "; ".join(f"{r['sampler']} {r['steps']} steps: RTF {r['rtf']:.3f}" for r in rows)
    path = out / "vae_encode.json"
    if path.is_file():
        rates = json.loads(path.read_text())
        figures["vae_encode"] = ", ".join(f"{k} {v:.0f} frames/s" for k, v in rates.get("frames_per_s", {}).items())
    return figures


def summary(status_file: Path, out: Path) -> None:
    parts = [line.split() for line in status_file.read_text().splitlines() if line.strip()]
    figures = _figures(out)
    lines = ["| part | result | seconds | figures |", "|---|---|---|---|"]
    lines += [f"| {name} | {state} | {seconds} | {figures.get(name, '')} |" for name, state, seconds in parts]
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps(
        {"parts": [{"part": n, "result": s, "seconds": int(t)} for n, s, t in parts], "figures": figures}, indent=2))
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    p = sub.add_parser("sd-vae")
    p.add_argument("folder", type=Path)
    p.add_argument("--small", action="store_true")
    p = sub.add_parser("summary")
    p.add_argument("status", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "env":
        env()
    elif args.command == "sd-vae":
        sd_vae(args.folder, args.small)
    else:
        summary(args.status, args.out)


if __name__ == "__main__":
    main()
