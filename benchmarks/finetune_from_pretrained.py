"""Does starting from pretrained weights (`model.init_from`) reach the demo's lip sync in fewer steps?

A stand-in for Latte's released weights, made on the demo's own data: the demo's network trained
unconditionally (portrait and audio always dropped, no motion frames, as Latte has none) for
`--pretrain-steps`, its EMA weights written in Latte's layout (`pipeline.models.pretrained.to_latte`)
and read back through `init_from`, as a real Latte file would be. Then the demo's fit (configs/demo.yaml
+ configs/long_video.yaml) runs twice with the same seed and the Latte-compatible positions
(`pos_encoding: latte`, no QK-norm): once from those weights, once from scratch. Every `--every` steps
each checkpoint is scored as `letstalk demo` scores (lip sync on the 3 held-out faces, default sampler).

    python benchmarks/finetune_from_pretrained.py --data runs/ablations/data-demo --out runs/finetune

`--data` is a folder made by benchmarks/fidelity_ablations.py (its "demo" data: shards, VAE, held-out
clips), made here if missing. Prints both curves and the first scored step at or above `--target` (the
demo's lip sync in the README) and writes <out>/finetune_from_pretrained.json; finished points are read
back, so the script can be re-run to extend the curves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.cli.demo import CONFIGS, FULL, fit_model, prepare_shards, score_heldout, summarize, synth_data, train_vae
from pipeline.cli.train import run_lightning_cli
from pipeline.generate import load_network
from pipeline.models.pretrained import to_latte

LATTE = ["--model.net.pos_encoding", "latte", "--model.net.qk_norm", "false"]  # what Latte's weights need
UNCONDITIONAL = ["--model.diffusion.both_dropout", "1.0", "--model.diffusion.audio_dropout", "0.0",
                 "--model.diffusion.ref_dropout", "0.0"]
NO_CAP = "00:04:00:00"  # step counts, not a busy machine's wall time, decide where each run stops


def demo_data(root: Path) -> tuple[Path, list[Path]]:
    if not (root / "shards" / "manifest.json").is_file():
        plan = {**FULL, "vae_time": 1e9}
        synth_data(root, plan, 64, 25.0)
        train_vae(root, plan, 64)
        prepare_shards(root, plan, 64, 25.0)
    return root / "shards", sorted((root / "heldout").glob("*.mp4"))


def pretrain(shards: Path, out: Path, steps: int) -> Path:
    """The unconditional model, written as a Latte release ({"ema": state dict}); returns its path."""
    release = out / "pretrained_latte.pt"
    if release.is_file():
        return release
    run_lightning_cli(["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(shards),
                       "--trainer.default_root_dir", str(out / "pretrain"), "--trainer.max_steps", str(steps),
                       "--trainer.max_time", NO_CAP, *LATTE, *UNCONDITIONAL])
    gen = load_network(out / "pretrain" / "checkpoints" / "last.ckpt", ema=True)
    info = gen.data_info
    side = int(info["size"]) // int(info["vae"]["downsample"]) // gen.net.config.patch_size  # patches per side
    torch.save({"ema": to_latte(gen.net, frames=int(info["clip_frames"]), side=side)}, release)
    return release


def curve(name: str, shards: Path, heldout: list[Path], out: Path, steps: int, every: int,
          extra: list[str]) -> list[dict]:
    """Fit (demo config, checkpoints every 100 steps) and score every `every` steps."""
    run = out / name
    last = run / "train" / "checkpoints" / "last.ckpt"
    done = torch.load(last, map_location="cpu", weights_only=True)["global_step"] if last.is_file() else 0
    if done < steps:  # a longer --steps resumes the run where it stopped
        t0 = time.perf_counter()
        fit_model(shards, run / "train", {**FULL, "fit_steps": steps, "fit_time": NO_CAP},
                  [*LATTE, *extra, *(["--ckpt_path", "last"] if done else [])])
        (run / f"fit_seconds_{done}_{steps}").write_text(f"{time.perf_counter() - t0:.0f}")
    points = []
    for step in range(every, steps + 1, every):
        folder = run / f"eval-{step}"
        if not (folder / "score.json").is_file():
            (checkpoint,) = (run / "train" / "checkpoints").glob(f"*-step={step}.ckpt")
            clips = score_heldout(folder, checkpoint, heldout, 25.0)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "score.json").write_text(json.dumps({"step": step, **summarize(clips)}, indent=2))
        score = json.loads((folder / "score.json").read_text())
        points.append({"step": step, "sync_true": score["sync_true_audio"],
                       "sync_mismatched": score["sync_mismatched_audio"]})
        print(f"{name:>10} step {step:>5}: lip sync {points[-1]['sync_true']:+.3f} "
              f"(mismatched {points[-1]['sync_mismatched']:+.3f})", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/ablations/data-demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of each fit")
    parser.add_argument("--every", type=int, default=100,
                        help="score a checkpoint every this many steps (a multiple of the demo's 100)")
    parser.add_argument("--target", type=float, default=0.915, help="lip sync to reach (the README's demo figure)")
    args = parser.parse_args()
    if args.every % 100:
        parser.error("--every must be a multiple of 100: configs/demo.yaml checkpoints every 100 steps")
    shards, heldout = demo_data(args.data)
    release = pretrain(shards, args.out, args.pretrain_steps)
    curves = {"pretrained": curve("pretrained", shards, heldout, args.out, args.steps, args.every,
                                  ["--model.init_from.path", str(release), "--model.init_from.kind", "latte"]),
              "scratch": curve("scratch", shards, heldout, args.out, args.steps, args.every, [])}
    thresholds = sorted({0.5, 0.75, 0.85, 0.875, args.target})
    reached = {f"{level:+.3f}": {name: next((p["step"] for p in points if p["sync_true"] >= level), None)
                                 for name, points in curves.items()} for level in thresholds}
    print(f"\nlip sync (true audio) of the held-out faces, target {args.target:+.3f}")
    print(f"{'step':>6}  {'from pretrained':>16}  {'from scratch':>13}")
    for a, b in zip(curves["pretrained"], curves["scratch"]):
        print(f"{a['step']:>6}  {a['sync_true']:>+16.3f}  {b['sync_true']:>+13.3f}")
    print(f"\nfirst scored step at or above each lip-sync level (- : not within {args.steps} steps)")
    print(f"{'level':>7}  {'from pretrained':>16}  {'from scratch':>13}")
    for level, steps in reached.items():
        print(f"{level:>7}  {steps['pretrained'] or '-':>16}  {steps['scratch'] or '-':>13}")
    result = {"target": args.target, "pretrain_steps": args.pretrain_steps, "curves": curves, "reached": reached}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune_from_pretrained.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'finetune_from_pretrained.json'}")


if __name__ == "__main__":
    main()
