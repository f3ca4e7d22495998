"""TensorBoard as a user turns it on: ``tensorboard: true`` in the run's YAML, then its events read back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cohort_fixtures import write_small_cohort
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

LOSS_TAGS = ("train/loss", "train/loss_itc_text", "train/loss_itc_qa", "train/loss_lm")
STEPS = [0, 1, 2]  # one epoch: 6 training scans, 2 a batch


def train_tiny_for_one_epoch(annotations: Path, output_dir: Path, **run_options) -> Path:
    """Pretrain the ``tiny`` model for one epoch, validate and test it; returns the run's job folder."""
    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "val", "test"]),
              "run": run_config(output_dir, "medblip_pretrain", max_epoch=1, train_splits=["train"],
                                valid_splits=["val"], test_splits=["test"], **run_options)}
    launch("lavis_medblip.train", config, output_dir.with_suffix(".yaml"))
    return only_job_dir(output_dir)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard would plot from ``log_dir``: tag -> [(step, value), ...]."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    return write_small_cohort(tmp_path_factory.mktemp("cohort"), {"train": 6, "val": 3, "test": 3})


def test_a_run_with_tensorboard_logs_each_steps_losses_and_lr_and_each_evaluation(annotations, tmp_path):
    job_dir = train_tiny_for_one_epoch(annotations, tmp_path / "output", tensorboard=True)
    scalars = read_scalars(job_dir / "tensorboard")

    for tag in (*LOSS_TAGS, "train/lr"):
        assert [step for step, _ in scalars[tag]] == STEPS, tag
    steps = [json.loads(line) for line in (job_dir / "train_steps.jsonl").read_text().splitlines()]
    for tag in (*LOSS_TAGS, "train/lr"):  # the same numbers as the step log
        assert [value for _, value in scalars[tag]] == pytest.approx([row[tag[6:]] for row in steps], rel=1e-6)

    for split in ("val", "test"):  # the pretraining task's evaluation: its loss terms and agg_metrics
        for name in ("agg_metrics", "loss", "loss_itc_text", "loss_itc_qa", "loss_lm", "num_samples"):
            assert [step for step, _ in scalars[f"{split}/{name}"]] == [0], f"{split}/{name}"
        assert scalars[f"{split}/agg_metrics"][0][1] == pytest.approx(-scalars[f"{split}/loss"][0][1])


def test_a_run_without_the_option_writes_no_tensorboard_folder(annotations, tmp_path):
    job_dir = train_tiny_for_one_epoch(annotations, tmp_path / "output")
    assert (job_dir / "checkpoint_latest.pth").is_file()
    assert not (job_dir / "tensorboard").exists()
