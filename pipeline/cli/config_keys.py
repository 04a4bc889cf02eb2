"""Every unknown key of a `letstalk fit|validate` command, in its config files and flags, named at once.

LightningCLI stops at the first key it does not know and suggests nothing. Before it parses, `unknown_keys`
walks each `--config` file and each `--section.key` flag against what the run accepts: the Trainer's,
LetsTalkModule's and LetsTalkDataModule's arguments, the fields of the model's config dataclasses, and the
`init_args` of each `class_path` entry (callbacks, loggers, strategy) against that class's signature. Each unknown
key comes with the nearest known one. Values are left to LightningCLI, which checks their types.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

CLI_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path", "weights_only",
            "evaluation", "config", "print_config")
_ANY = None  # a key whose value is not checked further


def _arguments(target: Any) -> dict[str, Any] | None:
    """Argument names of a class's __init__ (None when it takes **kwargs: anything goes)."""
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return {name: _ANY for name in parameters if name != "self"}


class _Exact(dict):
    """A section that takes its keys whole: a config dataclass, passed as a dict (argparse abbreviates only options)."""


def _dataclass_keys(cls: type) -> dict[str, Any]:
    return _Exact({f.name: _ANY for f in fields(cls)})


def schema() -> dict[str, Any]:
    """Known keys as a nested dict: a dict value is a section checked further, None a leaf."""
    import lightning as L

    from datamodules import LetsTalkDataModule
    from lightning_modules.letstalk import LetsTalkModule, OptimConfig
    from pipeline.diffusion import DiffusionConfig
    from pipeline.models.dit import DiTConfig
    from pipeline.models.pretrained import InitFrom

    model = _arguments(LetsTalkModule)
    for name, cls in (("net", DiTConfig), ("diffusion", DiffusionConfig), ("optim", OptimConfig),
                      ("init_from", InitFrom)):
        model[name] = _dataclass_keys(cls)
    return {**dict.fromkeys(CLI_KEYS, _ANY), "trainer": _arguments(L.Trainer), "model": model,
            "data": _arguments(LetsTalkDataModule)}


def _suggest(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def _class_entry(value: Any, path: str, problems: list[str], where: str) -> None:
    """A `class_path` entry (or a list of them): its init_args checked against the class's signature."""
    for entry in value if isinstance(value, list) else [value]:
        if not isinstance(entry, dict) or "class_path" not in entry:
            continue
        module, _, name = str(entry["class_path"]).rpartition(".")
        try:
            known = _arguments(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError, TypeError):
            continue  # LightningCLI names a class it cannot import
        args = entry.get("init_args") or {}
        if known is None or not isinstance(args, dict):
            continue
        for key in args:
            if key not in known:
                problems.append(f"{where}: {path}.init_args.{key}: not an argument of {name}"
                                f"{_suggest(key, list(known))}")


def _walk(tree: dict[str, Any], known: dict[str, Any], path: str, problems: list[str], where: str) -> None:
    for key, value in tree.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in known:
            problems.append(f"{where}: {here}: unknown key{_suggest(str(key), list(known))}")
        elif isinstance(known[key], dict) and isinstance(value, dict):
            _walk(value, known[key], here, problems, where)
        elif isinstance(value, (dict, list)):
            _class_entry(value, here, problems, where)


def _flag_key(flag: str, known: dict[str, Any]) -> str | None:
    """Why a `--a.b.c` flag names no key (None if it does); a unique prefix of an option is accepted, as argparse
    does, but not of a config dataclass's field (`--model.net.latent_channel`)."""
    section, path = known, []
    for part in flag.split("."):
        if not isinstance(section, dict):
            return None  # below a leaf or a class_path entry: LightningCLI's to judge
        if part not in section:
            matches = [] if isinstance(section, _Exact) else [key for key in section if key.startswith(part)]
            if len(matches) != 1:
                near = difflib.get_close_matches(part, list(section), n=1, cutoff=0.6)
                hint = f" (did you mean --{'.'.join([*path, near[0]])}?)" if near else ""
                return f"command line: --{flag}: unknown key{hint}"
            part = matches[0]
        path.append(part)
        section = section[part]
    return None


def unknown_keys(argv: list[str]) -> list[str]:
    """One line per unknown key of a `letstalk fit|validate` argv (after the subcommand): its config files' keys and
    its `--key` flags. A file that cannot be read is left to LightningCLI."""
    known = schema()
    problems: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--") or arg in ("--help", "-h"):
            continue
        flag, _, value = arg[2:].partition("=")
        if flag == "config":
            path = Path(value or next(args, ""))
            try:
                tree = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(tree, dict):
                _walk(tree, known, "", problems, str(path))
        elif "+" not in flag and (problem := _flag_key(flag, known)):
            problems.append(problem)
    return problems
