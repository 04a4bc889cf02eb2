"""The `letstalk` command line answers typos: a mistyped command or option, and every unknown key of a training
config (files and flags), named at once with the nearest known one, before anything runs."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from pipeline.cli import _parser, main
from pipeline.cli.commands import COMMANDS
from pipeline.cli.config_keys import unknown_keys
from pipeline.cli.options import build, field_docs
from pipeline.options import EncoderPaths, Encoders, Frames, Framing, Provenance, Sampling, Segments, Tasks
from pipeline.shipped import CONFIGS



def _error(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


def test_a_mistyped_command_or_option_gets_the_nearest_one(capsys):
    code, err = _error(["generat"], capsys)
    assert code == 2 and "invalid choice: 'generat'" in err and "did you mean generate?" in err
    code, err = _error(["generate", "--chekpoint", "x.ckpt", "--audoi", "a.wav"], capsys)
    assert code == 2 and "the following arguments are required: --checkpoint" in err
    assert "unknown option --chekpoint (did you mean --checkpoint?)" in err
    assert "unknown option --audoi (did you mean --audio?)" in err
    code, err = _error(["prepare", "videos", "--out", "o", "--vae", "v", "--sise", "3"], capsys)
    assert code == 2 and "unknown option --sise (did you mean --size?)" in err


def test_every_unknown_training_key_is_named_at_once_before_anything_runs(tmp_path: Path, capsys):
    typos = tmp_path / "typos.yaml"
    typos.write_text("trainer:\n  max_step: 10\n  callbacks:\n"
                     "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "      init_args: {every_n_train_step: 3}\n"
                     "model:\n  net: {sise: tiny}\n  optim: {lr: 1.0e-3}\ndata:\n  batchsize: 4\n")
    run = tmp_path / "run"
    code, err = _error(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(typos), "--trainer.max_stpes",
                        "3", "--model.net.moton_frames", "2", "--trainer.default_root_dir", str(run)], capsys)
    assert code == 2 and "letstalk fit: error: 6 unknown keys:" in err, err
    for line in (f"{typos}: trainer.max_step: unknown key (did you mean max_steps?)",
                 f"{typos}: trainer.callbacks.init_args.every_n_train_step: not an argument of ModelCheckpoint "
                 "(did you mean every_n_train_steps?)",
                 f"{typos}: model.net.sise: unknown key (did you mean size?)",
                 f"{typos}: data.batchsize: unknown key (did you mean batch_size?)",
                 "command line: --trainer.max_stpes: unknown key (did you mean --trainer.max_steps?)",
                 "command line: --model.net.moton_frames: unknown key (did you mean --model.net.motion_frames?)"):
        assert line in err, (line, err)
    assert not run.exists()


def test_the_shipped_configs_and_abbreviated_flags_have_no_unknown_keys():
    """No false alarm on any config in configs/ (class_path entries included), nor on a unique prefix of a flag,
    which LightningCLI accepts as argparse does."""
    for path in sorted(CONFIGS.rglob("*.yaml")):
        assert unknown_keys(["--config", str(path)]) == [], path
    assert unknown_keys(["--data.batch", "2", "--trainer.max_step=7", "--evaluation", "false", "--ckpt_path", "last",
                         "--trainer.callbacks+=lightning.pytorch.callbacks.Timer", "--print_config"]) == []


def test_a_prefix_of_a_model_config_field_is_a_typo():
    """`--model.net.*` is a dict handed to DiTConfig, which LightningCLI does not abbreviate: a prefix there is a
    typo, named before the run starts (it used to pass here and fail later as "unknown DiTConfig keys")."""
    assert unknown_keys(["--model.net.latent_channel", "4", "--model.optim.l", "1e-3"]) == [
        "command line: --model.net.latent_channel: unknown key (did you mean --model.net.latent_channels?)",
        "command line: --model.optim.l: unknown key (did you mean --model.optim.lr?)"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_command_has_its_help_line():
    """The help comes from each option dataclass field's docstring: a field without one is a flag `--help` cannot
    explain."""

    def undocumented(cls: type) -> list[str]:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        return [name for f in dataclasses.fields(cls) for name in (
            undocumented(hints[f.name]) if dataclasses.is_dataclass(hints[f.name])
            else [] if docs.get(f.name) else [f"{cls.__name__}.{f.name}"])]

    assert [name for command in COMMANDS.values() for name in undocumented(command.options)] == []
    assert all(action.help for parser in _subparsers().values() for action in parser._actions)


def test_options_parse_into_the_dataclasses_the_library_takes():
    parse = lambda argv: build(COMMANDS[argv[0]].options, _parser().parse_args(argv))  # noqa: E731
    args = parse(["prepare", "videos", "--out", "shards", "--vae", "vae", "--audio-encoder", "wav2vec2",
                  "--audio-encoder-layers", "0,-1", "--size", "128", "--crop", "face", "--segment-seconds", "2",
                  "--task-index", "1", "--num-tasks", "4", "--retry-failed"])
    assert args.encoders == Encoders(vae="vae", audio_encoder="wav2vec2", audio_encoder_layers=(0, -1))
    assert args.frames == Frames(size=128, crop="face")
    assert args.segments == Segments(segment_seconds=2.0)
    assert args.tasks == Tasks(task_index=1, num_tasks=4, retry_failed=True)
    assert (args.io.inputs, args.io.out, args.io.strict) == ("videos", "shards", False)
    args = parse(["generate", "--checkpoint", "m.ckpt", "--steps", "4", "--audio-scale", "1.5", "--seed", "7",
                  "--no-ema", "--no-provenance", "--consent", "ref-1", "--crop", "none"])
    assert args.sampling == Sampling(steps=4, audio_scale=1.5, seed=7, ema=False)
    assert args.marks == Provenance(marks=False, consent="ref-1")
    assert args.framing == Framing(crop="none") and args.encoders == EncoderPaths()
    assert parse(["generate", "--checkpoint", "m.ckpt"]).sampling == Sampling()  # the library's defaults


def test_a_malformed_option_value_is_refused_with_the_flag_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "videos", "--out", "o", "--vae", "v", "--audio-encoder-layers", "0,last"])
    assert exit_.value.code == 2
    assert "--audio-encoder-layers: '0,last' is not a comma-separated list of integers" in capsys.readouterr().err
