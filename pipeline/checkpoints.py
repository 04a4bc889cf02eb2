"""Reading trained weights safely, and exporting them for generation.

A `letstalk fit` checkpoint holds the network (`net.*`), its EMA copy (`ema.*`), the optimizer
and the configs (`hyper_parameters`: net, diffusion, data_info). A DeepSpeed ZeRO checkpoint is a
folder of per-rank shards: the fp32 master weights and the EMA (kept by the optimizer, see
`lightning_modules/ema.py`) are flat partitions in the optimizer shards, and are put back together
here with DeepSpeed's own layout code (`deepspeed.utils.zero_to_fp32`). `letstalk export` turns
either into `model.safetensors` (the network only) plus `model.json` (the configs), which
`letstalk generate` loads like a checkpoint (the JSON, written last, records the safetensors' size and sha256); it holds the EMA weights unless asked for the live ones, and may
re-home the encoders (`pipeline.locate`). Nothing is unpickled: files are read with
`torch.load(weights_only=True)`, DeepSpeed's too (`no_unpickling`).

Integrity: every checkpoint `letstalk fit` writes carries a manifest, written last (`write_manifest`, called by
`lightning_modules.trainer.LetsTalkTrainer.save_checkpoint`): each file's relative path, size and sha256, the
global step and the rank count. It sits inside a DeepSpeed folder (`letstalk-manifest.json`, removed with the
folder) and beside a file (`<name>.ckpt.manifest.json`). `verify_checkpoint` checks it (sizes, then hashes) before
anything reads the checkpoint: resume, export, generate, evaluate. An export's JSON, written after its
safetensors, records that file's size and sha256 (`integrity`). Cost: one sequential read and sha256 of the
checkpoint, ~0.9 GB/s on one core (`benchmarks/checkpoint_integrity.py`: 0.8 s for the S model's 724 MB), so
seconds for a multi-GB one.

Resume takes the newest checkpoint that is complete and intact (`newest_complete`: `judge` looks at its structure,
then its manifest); `written_by` says how many ranks wrote a DeepSpeed folder, which a resume must match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickletools
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.locate import fingerprint, locate_encoders

CONFIG_KEYS = ("net", "diffusion", "data_info")
EMA_KEY = "ema"  # the optimizer state entry that holds a parameter's EMA (lightning_modules/ema.py), in every shard
REQUEUE_PREFIX = "requeue-step="  # <default_root_dir>/requeue-step=<global step>.ckpt (SlurmRequeue); the newest kept
MANIFEST = "letstalk-manifest.json"  # inside a DeepSpeed checkpoint folder
SIDECAR = ".manifest.json"  # beside a checkpoint file: <name>.ckpt.manifest.json
MANIFEST_FORMAT = "letstalk-checkpoint-manifest/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not written by `letstalk fit`."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint whose files differ from its manifest (truncated, changed, missing), or whose manifest is unreadable."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint or export without an integrity record (written before manifests, or by another tool)."""


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    """Where the manifest of `checkpoint` is: inside a DeepSpeed folder, beside a file."""
    path = Path(checkpoint)
    return path / MANIFEST if path.is_dir() else path.with_name(path.name + SIDECAR)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _entry(path: Path, name: str) -> dict[str, Any]:
    return {"path": name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def make_manifest(written: str | os.PathLike, global_step: int, world_size: int, name: str | None = None) -> dict:
    """The manifest of the checkpoint at `written` (a file, or a folder: every file under it but the manifest, by
    relative path); a file is listed as `name` (its final name, when it was written under a temporary one)."""
    written = Path(written)
    if written.is_dir():
        files = [_entry(p, p.relative_to(written).as_posix()) for p in sorted(written.rglob("*"))
                 if p.is_file() and p.relative_to(written).as_posix() != MANIFEST]
    else:
        files = [_entry(written, name or written.name)]
    return {"format": MANIFEST_FORMAT, "kind": "deepspeed" if written.is_dir() else "file",
            "global_step": int(global_step), "world_size": int(world_size),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bytes": sum(f["bytes"] for f in files),
            "files": files}


def write_manifest(manifest: dict, target: str | os.PathLike) -> Path:
    """Write `manifest` to `target` atomically (a temporary name, then a rename)."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, target)
    return target


def read_manifest(checkpoint: str | os.PathLike) -> dict | None:
    """The manifest of `checkpoint`, or None when it has none; CheckpointIntegrityError when it is unreadable."""
    path = manifest_path(checkpoint)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), list):
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
    except (OSError, ValueError) as err:
        raise CheckpointIntegrityError(f"{path}: unreadable integrity manifest ({err})") from None
    return manifest


def _file_problem(path: Path, entry: dict, hashes: bool = True) -> str | None:
    if not path.is_file():
        return "missing (its manifest lists it)"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, its manifest recorded {entry['bytes']} ({'truncated' if size < entry['bytes'] else 'grown'})"
    if hashes and _sha256(path) != entry["sha256"]:
        return "its bytes differ from the sha256 its manifest recorded (corrupted or changed after the save)"
    return None


def verify_checkpoint(checkpoint: str | os.PathLike) -> dict | None:
    """Check `checkpoint` against its manifest: every file's size first (cheap), then its sha256. Returns the
    manifest, or None when there is none (the caller decides: warn, or treat as incomplete); raises
    CheckpointIntegrityError naming the first file that fails and why."""
    path = Path(checkpoint)
    manifest = read_manifest(path)
    if manifest is None:
        return None
    if path.is_dir():
        files = [(path / entry["path"], entry) for entry in manifest["files"]]
    elif len(manifest["files"]) == 1:  # a file is its own single entry, whatever name it was saved under
        files = [(path, manifest["files"][0])]
    else:
        raise CheckpointIntegrityError(f"{manifest_path(path)}: lists {len(manifest['files'])} files for one file")
    for hashes in (False, True):
        for file, entry in files:
            if problem := _file_problem(file, entry, hashes):
                raise CheckpointIntegrityError(f"{file}: {problem}")
    return manifest


def _zip_problem(path: Path) -> str | None:
    """Why `path` is not a complete torch zip (read: its central directory, written last), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"not a readable torch file ({err})"
    return None if any(n.endswith("/data.pkl") for n in names) else "a zip without a torch pickle"


def _pickled_int(path: Path, key: str) -> int | None:
    """The int stored under `key` in a torch file's pickle, read from its opcodes (nothing is unpickled)."""
    with zipfile.ZipFile(path) as archive:
        ops = pickletools.genops(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    for _, arg, _ in ops:
        if arg == key:
            value = next((a for op, a, _ in ops if "PUT" not in op.name and op.name != "MEMOIZE"), None)
            return value if isinstance(value, int) else None
    return None


def _deepspeed_shards(folder: Path) -> tuple[Path, list[Path], list[Path]] | None:
    """(tag folder, model state files, optimizer state files) of a DeepSpeed checkpoint folder named by its
    `latest` file; None without one."""
    latest = folder / "latest"
    if not latest.is_file():
        return None
    tag = folder / latest.read_text().strip()
    return tag, sorted(tag.glob("*model_states.pt")), sorted(tag.glob("*_optim_states.pt"))


def written_by(checkpoint: str | os.PathLike) -> int | None:
    """How many ranks wrote a DeepSpeed checkpoint folder (the `dp_world_size` its model states record: ZeRO
    partitions the optimizer state by rank); None for a file or when unknown."""
    shards = _deepspeed_shards(Path(checkpoint)) if Path(checkpoint).is_dir() else None
    if not shards or not shards[1] or _zip_problem(shards[1][0]):
        return None
    return _pickled_int(shards[1][0], "dp_world_size")


def structure_problem(path: Path) -> str | None:
    """A file must be a whole torch zip; a DeepSpeed folder needs `latest`, whole model and optimizer shards, and one
    optimizer shard per rank that wrote it (`written_by`)."""
    if not path.is_dir():
        return _zip_problem(path)
    shards = _deepspeed_shards(path)
    if shards is None:
        return "no `latest` file"
    tag, models, optims = shards
    if not models:
        return f"no model states in {tag.name}/"
    for shard in models + optims:
        if problem := _zip_problem(shard):
            return f"{shard.name}: {problem}"
    world = written_by(path)  # None (not recorded): not judged
    return None if world in (None, len(optims)) else f"{len(optims)} optimizer shards, written by {world} ranks"


def judge(path: Path, manifest_expected: bool) -> tuple[str, str] | None:
    """("incomplete" | "damaged", why) for a checkpoint resume must not take, or None. Its structure first (cheap,
    `structure_problem`: a save cut short), then its manifest (`verify_checkpoint`: every file's size and sha256 as
    saved; the first that differs is named). Without a manifest it is incomplete if `manifest_expected` (the run's
    other checkpoints have one: a save that did not finish); else (a run from before checkpoints carried manifests,
    another tool) its structure is all that is judged."""
    if problem := structure_problem(path):
        return "incomplete", problem
    try:
        manifest = verify_checkpoint(path)
    except CheckpointIntegrityError as err:
        return "damaged", str(err)
    if manifest is None and manifest_expected:
        return "incomplete", f"no integrity manifest {manifest_path(path).name} (its save did not finish)"
    return None


def written_at(path: Path) -> float:
    """Last write of a checkpoint: of its newest file for a DeepSpeed folder (a folder's own mtime does not change
    when its shards are overwritten in place, as ModelCheckpoint does with `last.ckpt`)."""
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime)


def newest_complete(candidates: Iterable[Path],
                    manifest_expected: bool) -> tuple[Path | None, list[tuple[Path, str, str]]]:
    """The newest complete and intact checkpoint of `candidates` (`written_at`, `judge`), or None; and the newer
    ones it passed over, as (path, "incomplete" | "damaged", why)."""
    skipped = []
    for path in sorted(candidates, key=written_at, reverse=True):
        judged = judge(path, manifest_expected)
        if judged is None:
            return path, skipped
        skipped.append((path, *judged))
    return None, skipped


def warn_unverified(checkpoint: str | os.PathLike, what: str = "no integrity manifest") -> None:
    warnings.warn(f"{checkpoint}: {what} (written before checkpoints carried one, or by another tool): its files "
                  "are used unverified", UnverifiedCheckpointWarning, stacklevel=3)


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """Every `torch.load` inside loads tensors and plain containers only (`weights_only=True`), even where a library
    asks for less (DeepSpeed's loaders pass False), plus the three plain classes DeepSpeed's shards hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _zero_ema_flats(optim: dict[str, Any], fp32_key: str) -> list[torch.Tensor] | None:
    """One rank's EMA partitions, shaped like its fp32 master partitions `optim[fp32_key]`; None before any update."""
    base = optim.get("base_optimizer_state") or optim.get("optimizer_state_dict")  # ZeRO-1/2 | ZeRO-3
    states = [base["state"][i] for i in sorted(base["state"])] if isinstance(base, dict) else list(base)
    if len(states) != len(optim[fp32_key]) or not all(EMA_KEY in st for st in states):
        return None
    flats = []
    for st, master in zip(states, optim[fp32_key]):
        ema = st[EMA_KEY].float().flatten()
        flats.append(torch.cat([ema, ema.new_zeros(master.numel() - ema.numel())]))  # alignment padding
    return flats


def _load_deepspeed(path: Path) -> dict[str, Any]:
    """A Lightning DeepSpeed checkpoint folder as one checkpoint dict: its client state (hyper-parameters, ...) and
    a state dict of the gathered fp32 weights (`net.*`) and EMA (`ema.*`)."""
    try:
        from deepspeed.utils import zero_to_fp32 as z
    except ImportError as err:
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint folder needs `pip install deepspeed`") from err
    latest = path / "latest"
    folder = path / (latest.read_text().strip() if latest.is_file() else "checkpoint")
    model_files, optim_files = z.get_model_state_files(str(folder)), z.get_optim_files(str(folder))
    with no_unpickling():
        client = torch.load(model_files[0], map_location="cpu", weights_only=True)
        model_states = z.parse_model_states(model_files)
        optims = [torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"] for f in optim_files]
    stage, world = int(optims[0]["zero_stage"]), optims[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optims):
        raise CheckpointError(f"{folder}: {len(optims)} optimizer shards, but it was written by {world} ranks "
                              "(an unfinished or overwritten save)")
    fp32_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"

    def gather(flats: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:  # DeepSpeed's layout, without its prints
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            if stage <= 2:
                paddings = optims[0].get("param_alignment_paddings")
                state = z._get_fp32_state_dict_from_zero2_checkpoint(world, flats, model_states, False, paddings)
            else:
                state = z._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, False)
            return {k: v.detach() for k, v in z.to_torch_tensor(state).items()}

    net = gather([o[fp32_key] for o in optims])
    emas = [_zero_ema_flats(o, fp32_key) for o in optims]
    ema = gather(emas) if all(e is not None for e in emas) else net  # before the first update: the weights
    state_dict = {f"{prefix}.{k.removeprefix('net.')}": v for prefix, part in (("net", net), ("ema", ema))
                  for k, v in part.items() if k.startswith("net.")}
    lightning = {k: v for k, v in client.items() if k not in ("module", "optimizer")}  # DeepSpeed's own copies
    return {**lightning, "state_dict": state_dict}


def _load_lightning(path: Path) -> dict[str, Any]:
    if path.is_dir():  # a DeepSpeed checkpoint folder: gather the shards into one fp32 state dict
        try:
            return _load_deepspeed(path)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - torch/DeepSpeed raise many kinds for a bad folder
            raise CheckpointError(f"{path}: not a readable DeepSpeed checkpoint ({type(err).__name__}: {err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err


def read_weights(checkpoint: str | os.PathLike, ema: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(configs {net, diffusion, data_info}, network state dict) from a `.ckpt`, a DeepSpeed folder or an export.

    `ema` picks the EMA weights of a training checkpoint; an export holds the weights it was made with. Verified
    first: a checkpoint against its manifest, an export against the size and sha256 its JSON records (a mismatch:
    CheckpointIntegrityError naming the file; no record: UnverifiedCheckpointWarning, and it is read anyway).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        config_path = path.with_suffix(".json")
        if not config_path.is_file():
            raise CheckpointError(f"{path}: its config {config_path.name} is missing (export writes both)")
        try:
            config = json.loads(config_path.read_text())
        except Exception as err:  # noqa: BLE001 - json raises several kinds
            raise CheckpointError(f"{path}: cannot read the export's config {config_path.name} "
                                  f"({type(err).__name__}: {err})") from err
        record = config.pop("integrity", None)
        if record is None:
            warn_unverified(path, f"no sha256 in {config_path.name}")
        elif problem := _file_problem(path, record):
            raise CheckpointIntegrityError(f"{path}: {problem.replace('its manifest', config_path.name)}")
        try:
            return config, load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds
            raise CheckpointError(f"{path}: cannot read the export ({type(err).__name__}: {err})") from err
    if verify_checkpoint(path) is None:
        warn_unverified(path)
    ckpt = _load_lightning(path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "net" not in hparams or not hparams.get("data_info"):
        raise CheckpointError(f"{path}: no LetsTalk model config in the checkpoint (was it written by `letstalk fit`?)")
    prefix = "ema." if ema else "net."
    state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: no `{prefix}*` weights in the checkpoint")
    return {key: hparams[key] for key in CONFIG_KEYS if key in hparams}, state


def recorded_in(checkpoint: str | os.PathLike) -> str:
    """Where a checkpoint's encoder paths were written, for messages about them (`pipeline.locate`)."""
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        return f"{path.with_suffix('.json')} (the export's data_info)"
    return f"checkpoint {path} (its data_info, copied from the dataset manifest letstalk prepare wrote)"


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, ema: bool = True,
           vae: str | os.PathLike | None = None, audio_encoder: str | os.PathLike | None = None) -> Path:
    """Write the network weights (the EMA ones unless `ema=False`) to `out` (.safetensors) and the configs beside
    it (.json), each atomically. `vae` / `audio_encoder` re-home the model: the JSON records these folders
    instead of the checkpoint's, keeping the encoder's name and sha1 (taken from the folder where the checkpoint
    has none), so a moved model is pointed at its encoders once."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the export must be a .safetensors file")
    config, state = read_weights(checkpoint, ema=ema)
    if vae is not None or audio_encoder is not None:
        info = locate_encoders(config["data_info"], recorded_in(checkpoint), vae, audio_encoder, recorded=False)
        for key, given in (("vae", vae), ("audio_encoder", audio_encoder)):
            if given is not None and not info[key].get("sha1"):
                info[key]["sha1"] = fingerprint(info[key]["path"])
        config["data_info"] = info
    config["source"] = {"checkpoint": str(Path(checkpoint).resolve()), "weights": "ema" if ema else "live"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    config["integrity"] = {"file": out.name, **{k: v for k, v in _entry(tmp, out.name).items() if k != "path"}}
    os.replace(tmp, out)
    config_path = out.with_suffix(".json")
    config_path.with_name(config_path.name + ".tmp").write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(config_path.with_name(config_path.name + ".tmp"), config_path)
    size = out.stat().st_size / 2**20
    print(f"exported {len(state)} tensors ({size:.1f} MiB, {config['source']['weights']} weights) -> {out} + {config_path.name}")
    return out
