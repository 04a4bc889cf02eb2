"""The `letstalk` command line answers typos: a mistyped command or option, and every unknown key of a training
config (files and flags), named at once with the nearest known one, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.config_keys import unknown_keys

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
