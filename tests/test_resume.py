"""Kill a training run with SIGKILL mid-epoch, resume it, and get exactly the uninterrupted result."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from cohort_fixtures import write_small_cohort
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config


def training_config(annotations: Path, output_dir: Path) -> dict:
    return {"model": {"arch": "medblip", "model_type": "tiny"},
            "datasets": dataset_config(annotations, ["train", "val"]),
            "run": run_config(output_dir, "medblip_pretrain", max_epoch=3, train_splits=["train"], valid_splits=["val"])}


def start_and_kill_during_epoch(config: dict, config_path: Path, epoch: int) -> None:
    """Start training, and SIGKILL it once epoch ``epoch`` has taken a step (earlier epochs are saved)."""
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "lavis_medblip.train", "--cfg-path", str(config_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    for line in process.stdout:
        if re.search(rf"Train: data epoch: \[{epoch}\]\s+\[\s*1/", line):
            process.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "training never reached the epoch to interrupt"
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def test_a_killed_run_resumes_from_its_last_checkpoint_with_the_same_data_order(tmp_path):
    annotations = write_small_cohort(tmp_path / "cohort", {"train": 12, "val": 3})

    launch("lavis_medblip.train", training_config(annotations, tmp_path / "uninterrupted"), tmp_path / "a.yaml")
    reference = torch.load(only_job_dir(tmp_path / "uninterrupted") / "checkpoint_latest.pth", weights_only=True)

    start_and_kill_during_epoch(training_config(annotations, tmp_path / "killed"), tmp_path / "b.yaml", epoch=2)
    killed_dir = only_job_dir(tmp_path / "killed")
    assert torch.load(killed_dir / "checkpoint_latest.pth", weights_only=True)["epoch"] == 1  # epoch 2 never finished
    assert not list(killed_dir.glob(".*.tmp"))

    result = launch("lavis_medblip.train", training_config(annotations, tmp_path / "resumed"), tmp_path / "c.yaml",
                    f"run.resume_ckpt_path={killed_dir / 'checkpoint_latest.pth'}")
    assert "continuing at epoch 2" in result.stderr
    assert "Train: data epoch: [0]" not in result.stdout and "Train: data epoch: [2]" in result.stdout
    resumed = torch.load(only_job_dir(tmp_path / "resumed") / "checkpoint_latest.pth", weights_only=True)
    assert resumed["epoch"] == reference["epoch"] == 2
    for name, weights in reference["model"].items():
        torch.testing.assert_close(resumed["model"][name], weights, rtol=0, atol=0, msg=name)
