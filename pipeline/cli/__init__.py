"""`letstalk` command line: a thin layer over the library.

    letstalk synth     draw a synthetic talking-head dataset (mp4 + ground truth)
    letstalk fit-vae   train the small demo VAE on a video folder
    letstalk prepare   videos -> WebDataset shards + manifest.json
    letstalk check     verify a dataset against its manifest and index before a launch
    letstalk fit       train (LightningCLI: --config, --print_config, --ckpt_path last)
    letstalk validate  validate a checkpoint (LightningCLI)
    letstalk generate  portrait + audio -> talking video (provenance-marked; --batch for a CSV)
    letstalk verify    is a video marked as generated? (watermark, metadata, C2PA)
    letstalk evaluate  FID / FVD / Sync-C / Sync-D of a checkpoint on a seeded subset of a dataset
    letstalk sweep     one SLURM training job per grid point (model sizes by default)
    letstalk export    a training checkpoint -> model.safetensors + its config (for generate)
    letstalk demo      the whole pipeline end to end on synthetic data
    letstalk paths     where the shipped configs and SLURM scripts are
    letstalk app       a web page (Gradio) to make videos from uploads

`fit` and `validate` are LightningCLI's (pipeline/cli/train.py); every other command's options are a dataclass next
to its handler in pipeline/cli/commands.py, whose COMMANDS map builds the parser here.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import re
import sys

from pipeline.cli.commands import COMMANDS
from pipeline.cli.options import add_options, build

LIGHTNING_COMMANDS = ("fit", "validate")


class SuggestingParser(argparse.ArgumentParser):
    """argparse that answers a mistyped command or option with the nearest known one ("did you mean ...?").

    `argv` (of the class, so that the command's sub-parser sees it too): the arguments being parsed, set by `main`,
    so that an error names every unknown option at once, even when argparse stops first at a missing argument."""

    argv: list[str] = []

    def error(self, message: str):
        commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
        hints = []
        bad = re.search(r"invalid choice: '([^']*)'", message)
        if bad and commands:
            hints += [f"did you mean {near}?" for near in difflib.get_close_matches(bad.group(1), list(commands), 1)]
        command = commands.get(self.argv[0]) if self.argv and commands else self
        if command is not None:
            known = list(command._option_string_actions)
            for arg in self.argv[1:] if commands else self.argv:
                option = arg.split("=", 1)[0]
                if option.startswith("--") and not any(k.startswith(option) for k in known):
                    near = difflib.get_close_matches(option, known, 1)
                    hints.append(f"unknown option {option}" + (f" (did you mean {near[0]}?)" if near else ""))
        super().error("; ".join([message, *dict.fromkeys(hints)]))


def _parser() -> argparse.ArgumentParser:
    """The parser of every command but `fit` and `validate` (LightningCLI's), built from `commands.COMMANDS`."""
    parser = SuggestingParser(prog="letstalk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"letstalk {importlib.metadata.version('letstalk')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        add_options(sub.add_parser(name, help=command.help, description=command.help), command.options)
    return parser


def name_deepspeed_accelerator() -> None:
    """DeepSpeed (imported by our ZeRO strategy, and by transformers whenever it is installed) picks its accelerator
    at import and, falling back to the CPU, prints a warning to stdout, where it corrupts `--print_config > file` and
    every rank's log; naming the accelerator it would pick anyway silences it."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths only
    os.environ.setdefault("WANDB_MODE", "offline")
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from pipeline.cli.train import run_lightning_cli

        name_deepspeed_accelerator()
        run_lightning_cli(argv)
        return 0
    SuggestingParser.argv = argv
    args = _parser().parse_args(argv)
    name_deepspeed_accelerator()
    try:
        command = COMMANDS[args.command]
        return command.run(build(command.options, args))
    except (ValueError, OSError) as err:  # bad input: our errors subclass ValueError and name the file
        if os.environ.get("LETSTALK_DEBUG"):
            raise
        print(f"letstalk {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
