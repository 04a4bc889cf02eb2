"""Portrait-fidelity ablations on the demo's data: which choices keep the generated person the person.

Every training variant fits the demo model (configs/demo.yaml + configs/long_video.yaml) for the same
number of optimizer steps (no time cap, so a busy machine changes the wall time, not the result) and
is scored exactly as `letstalk demo` scores (`pipeline.cli.demo.score_heldout`): PSNR against the
real held-out clips over the whole frame, outside and inside the mouth, beside the static portrait
and the VAE ceiling, drift from the first to the last chained clip, and lip sync. A generation
variant re-scores a trained variant's checkpoint with other sampling settings. Data (synth, VAE,
shards) is made once per data variant and shared.

    python benchmarks/fidelity_ablations.py --out runs/ablations                # every variant
    python benchmarks/fidelity_ablations.py --out runs/ablations baseline residual

Prints one row per variant (means over the held-out clips) and writes <out>/fidelity_ablations.json;
finished variants are read back from their score.json, so the script can be re-run to extend a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from pipeline.cli.demo import (FULL, TARGETS, fit_model, prepare_shards, score_clip, score_heldout, summarize,
                               synth_data, train_vae)
from pipeline.generate import load_model
from pipeline.metrics.appearance import mean_fidelity
from pipeline.options import Sampling

# data variant -> overrides of the demo's FULL plan (no VAE time cap: a busy machine must not change the VAE)
DATA = {
    "vae150s": {"vae_steps": 1500, "vae_time": 150.0},  # the demo's VAE before issue 13 (~1000 of 1500 steps in 150 s)
    "demo": {"vae_time": 1e9},  # the demo's VAE now: 3000 steps
}
OLD = {"data": "vae150s"}
# variant -> data, extra `letstalk fit` arguments, `generate` settings, parent (a generation variant re-scores it)
VARIANTS: dict[str, dict] = {
    "baseline": OLD,
    "residual": {**OLD, "fit": ["--model.net.residual", "true"]},
    "x0 output + residual": {**OLD, "fit": ["--model.diffusion.network_output", "x0", "--model.net.residual", "true"]},
    "guidance 1 / 1": {"parent": "baseline", "generation": {"audio_scale": 1.0, "ref_scale": 1.0}},
    "guidance audio 2 / ref 1": {"parent": "baseline", "generation": {"audio_scale": 2.0, "ref_scale": 1.0}},
    "sampler 50 steps": {"parent": "baseline", "generation": {"steps": 50}},
    "sampler 10 steps": {"parent": "baseline", "generation": {"steps": 10}},
    "live weights (no EMA)": {"parent": "baseline", "generation": {"ema": False}},
    "vae 3000 steps": {"data": "demo"},
    "vae 3000 steps + x0 output + residual": {"data": "demo", "fit": ["--model.diffusion.network_output", "x0",
                                                                   "--model.net.residual", "true"]},
    "vae 3000 steps + x0 output": {"data": "demo", "fit": ["--model.diffusion.network_output", "x0"]},
    "vae 3000 steps + motion noise 0.6 / 0.15": {"data": "demo", "fit": ["--model.net.cond_noise_max", "0.6",
                                                                      "--model.net.cond_noise_infer", "0.15"]},
    "x0 output + residual, audio guidance 3": {"parent": "vae 3000 steps + x0 output + residual",
                                               "generation": {"audio_scale": 3.0}},
    "x0 output + residual, audio guidance 4": {"parent": "vae 3000 steps + x0 output + residual",
                                               "generation": {"audio_scale": 4.0}},
    "patch 2 (64 tokens/frame), 300 steps": {"data": "demo", "steps": 300, "fit": ["--model.net.patch_size", "2"]},
}


def _data(out: Path, name: str) -> tuple[Path, list[Path]]:
    """The shards and held-out clips of a data variant, made on first use."""
    root, plan = out / f"data-{name}", {**FULL, **DATA[name]}
    if not (root / "shards" / "manifest.json").is_file():
        synth_data(root, plan, 64, 25.0)
        train_vae(root, plan, 64)
        prepare_shards(root, plan, 64, 25.0)
    return root, sorted((root / "heldout").glob("*.mp4"))


def _result(name: str, spec: dict, steps: int, fit_seconds: float | None, checkpoint: Path, clips: list[dict]) -> dict:
    mean = mean_fidelity([{k: c[k] for k in ("generated", "static", "still", "ceiling", "drift")} for c in clips])
    return {"variant": name, "spec": spec, "steps": steps, "fit_seconds": fit_seconds, "checkpoint": str(checkpoint),
            **summarize(clips), "mean": mean, "clips": clips}


def run_variant(out: Path, name: str, steps: int, rescore: bool = False) -> dict:
    """Fit (or take the parent's checkpoint), generate and score one variant; a finished one is read back, or with
    `rescore` scored again from its saved videos (when the metrics changed), without generating again."""
    spec = VARIANTS[name]
    folder = out / name.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
    if (folder / "score.json").is_file():
        done = json.loads((folder / "score.json").read_text())
        if not rescore:
            return done
        model = load_model(done["checkpoint"])
        _, heldout = _data(out, VARIANTS.get(spec.get("parent"), spec).get("data", "demo"))
        clips = [score_clip(Path(c["video"]), path, heldout[(i + 1) % len(heldout)], model.vae,
                            int(model.gen.data_info["clip_frames"]), 25.0)
                 for i, (c, path) in enumerate(zip(done["clips"], heldout))]
        result = _result(name, spec, done["steps"], done["fit_seconds"], Path(done["checkpoint"]), clips)
        (folder / "score.json").write_text(json.dumps(result, indent=2))
        return result
    parent = spec.get("parent")
    root, heldout = _data(out, VARIANTS.get(parent, spec).get("data", "demo"))
    fit_seconds = None
    if parent:  # read back (rescored only when named itself)
        parent_result = run_variant(out, parent, steps)
        checkpoint = Path(parent_result["checkpoint"])
    else:
        t0 = time.perf_counter()
        steps = spec.get("steps", steps)
        plan = {**FULL, "fit_steps": steps, "fit_time": "00:02:00:00"}
        fit_model(root / "shards", folder / "train", plan, spec.get("fit", []))
        fit_seconds = time.perf_counter() - t0
        checkpoint = folder / "train" / "checkpoints" / "last.ckpt"
    clips = score_heldout(folder, checkpoint, heldout, 25.0, Sampling(**spec.get("generation", {})))
    result = _result(name, spec, parent_result["steps"] if parent else steps, fit_seconds, checkpoint, clips)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.json").write_text(json.dumps(result, indent=2))
    return result


COLUMNS = ("variant", "VAE", "steps", "whole gen/static/ceil", "outside gen/ceil", "mouth gen/static", "drift first/last (ceiling)",
           "sync true/mism", "targets met", "fit s")


def row(r: dict) -> tuple[str, ...]:
    m = r["mean"]
    g, s, c, d = m["generated"], m["static"], m["ceiling"], m["drift"]
    met = sum(min(margins) >= 0 for margins in r["targets"].values())
    data = VARIANTS.get(r["spec"].get("parent"), r["spec"]).get("data", "demo")
    return (r["variant"], data, str(r["steps"]), f"{g['frame']['psnr']:.2f} / {s['frame']['psnr']:.2f} / {c['frame']['psnr']:.2f}",
            f"{g['outside_mouth']['psnr']:.2f} / {c['outside_mouth']['psnr']:.2f}",
            f"{g['mouth']['psnr']:.2f} / {s['mouth']['psnr']:.2f}",
            f"{d['first']['generated']['frame']['psnr']:.2f} / {d['last']['generated']['frame']['psnr']:.2f} "
            f"({d['first']['ceiling']['frame']['psnr']:.2f} / {d['last']['ceiling']['frame']['psnr']:.2f})",
            f"{r['sync_true_audio']:+.2f} / {r['sync_mismatched_audio']:+.2f}", f"{met} of {len(TARGETS)}",
            "-" if r["fit_seconds"] is None else f"{r['fit_seconds']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help=f"variants to run (default all): {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of every training variant")
    parser.add_argument("--rescore", action="store_true", help="score finished variants again from their videos")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    results = [run_variant(args.out, name, args.steps, args.rescore) for name in args.variants or VARIANTS]
    rows = [COLUMNS] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    print("\nPSNR dB against the real held-out clips, means over the clips (frames 1..T-1)")
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows))
    args.out.mkdir(parents=True, exist_ok=True)
    table = [{k: v for k, v in r.items() if k != "clips"} for r in results]
    (args.out / "fidelity_ablations.json").write_text(json.dumps(table, indent=2, default=float))
    print(f"wrote {args.out / 'fidelity_ablations.json'}")


if __name__ == "__main__":
    main()
