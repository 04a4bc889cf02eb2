"""Progress lines for logs without a terminal (`pipeline.progress`), and the training's bar and lines
(`lightning_modules.progress`), driven by a clock the test moves."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch

from lightning_modules.progress import ProgressLog, StepProgressBar
from pipeline.progress import ProgressLines, duration


def test_duration_reads_like_a_log_line():
    assert [duration(s) for s in (0, 42.4, 425, 11520, float("inf"))] == ["0s", "42s", "7m05s", "3h12m", "?"]


def test_a_resumed_run_is_paced_by_its_own_steps_and_an_open_ended_one_has_no_eta():
    now, out = [0.0], io.StringIO()
    lines = ProgressLines(1000, "fit: step", first=900, clock=lambda: now[0], stream=out)
    now[0] = 10.0
    assert lines.update(10) == "fit: step 910/1000, 10s elapsed, ETA 1m30s"  # 1 s a step since the resume
    now[0] = 20.0
    assert lines.update(5) is None  # within the interval
    open_ended = ProgressLines(None, "fit: step", clock=lambda: now[0], stream=out)
    assert open_ended.update(3, ", loss 0.5") == "fit: step 3, loss 0.5, 0s elapsed"


def test_training_prints_from_rank_zero_at_its_pace():
    """ProgressLog: a line at the first step, then every `every_s` seconds, and at max_steps; none on other ranks."""
    now, out = [0.0], io.StringIO()
    log = ProgressLog(every_s=60.0, clock=lambda: now[0], out=out)
    metrics = {"train/loss": torch.tensor(0.5), "train/clips_per_s": torch.tensor(12.25)}
    trainer = SimpleNamespace(max_steps=100, global_step=0, is_global_zero=True, current_epoch=0,
                              callback_metrics=metrics)
    log.on_train_start(trainer, None)
    other_rank = SimpleNamespace(**{**vars(trainer), "is_global_zero": False})
    for step in range(1, 101):
        now[0] += 10.0
        trainer.global_step = other_rank.global_step = step
        log.on_train_batch_end(other_rank, None)
        log.on_train_batch_end(trainer, None)
    lines = out.getvalue().splitlines()
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [1, *range(7, 100, 6), 100]
    assert lines[0] == "letstalk fit: step 1/100, epoch 0, loss 0.5000, 12.2 clips/s, 10s elapsed, ETA 16m30s"


def test_a_step_limited_run_reads_epoch_n_not_n_of_minus_two():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(3).strip() == "Epoch 3"
    bar._trainer = SimpleNamespace(max_epochs=10)
    assert bar._get_train_description(3).strip() == "Epoch 3/9"
