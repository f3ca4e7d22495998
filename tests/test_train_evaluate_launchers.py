"""Train and evaluate through the launchers, as a user does: YAML in, checkpoints and metrics out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cohort_fixtures import write_small_cohort

TINY_VOLUMES = {"vis_processor": {"train": {"name": "mri_volume_train", "image_size": 32},
                                  "eval": {"name": "mri_volume_eval", "image_size": 32}}}


def dataset_config(annotations: Path, splits: list[str], on_error: str = "raise") -> dict:
    return {"brain_mri": {**TINY_VOLUMES, "on_error": on_error, "build_info": {
        "annotations": {split: {"storage": str(annotations / f"{split}.jsonl")} for split in splits}}}}


def run_config(output_dir: Path, task: str, **extra) -> dict:
    return {"task": task, "runner": "medblip_runner", "device": "cpu", "distributed": False, "seed": 7,
            "output_dir": str(output_dir), "batch_size_train": 2, "batch_size_eval": 3, "num_workers": 0,
            "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-3, "min_lr": 1e-5, "warmup_lr": 1e-6,
            "warmup_steps": 2, "weight_decay": 0.05, "log_freq": 1, **extra}


def launch(module: str, config: dict, path: Path, *options: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", module, "--cfg-path", str(path), *(["--options", *options] if options else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_job_dir(output_dir: Path) -> Path:
    (job_dir,) = [path for path in output_dir.iterdir() if path.is_dir()]
    return job_dir


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    annotations = write_small_cohort(root, {"train": 6, "val": 3, "test": 3})
    for name in ("truncated", "not_an_image"):  # two unreadable training scans, skipped every epoch
        (root / "scans" / f"{name}.nii.gz").write_bytes(b"\x1f\x8b broken")
        with (annotations / "train.jsonl").open("a") as handle:
            handle.write(json.dumps({"image": f"../scans/{name}.nii.gz", "subject_id": name, "label": "AD",
                                     "split": "train", "text": "A 70-year-old male."}) + "\n")
    return annotations


@pytest.fixture(scope="module")
def pretrained_run(annotations, tmp_path_factory) -> Path:
    """Two epochs of pretraining the ``tiny`` model, validating each epoch."""
    work = tmp_path_factory.mktemp("pretrain")
    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "val", "test"], on_error="skip"),
              "run": run_config(work / "output", "medblip_pretrain", max_epoch=2, train_splits=["train"],
                                valid_splits=["val"], test_splits=["test"])}
    launch("lavis_medblip.train", config, work / "pretrain.yaml")
    return only_job_dir(work / "output")


def test_pretraining_logs_each_loss_term_counts_skipped_scans_and_keeps_checkpoints(pretrained_run):
    assert (pretrained_run / "checkpoint_latest.pth").is_file() and (pretrained_run / "checkpoint_best.pth").is_file()
    assert not list(pretrained_run.glob("*.tmp"))
    logs = [json.loads(line) for line in (pretrained_run / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert [entry["train_epoch"] for entry in logs] == [0, 1]
    for entry in logs:
        assert {"train_loss", "train_loss_itc_text", "train_loss_itc_qa", "train_loss_lm"} <= set(entry)
        assert entry["train_num_skipped"] == 2  # the two unreadable scans, counted each epoch

    checkpoint = torch.load(pretrained_run / "checkpoint_latest.pth", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert not any(key.startswith("visual_encoder.blocks.") for key in checkpoint["model"])  # frozen: not saved
    assert not any(key.startswith("language_model.") and "lora_" not in key for key in checkpoint["model"])


def test_zero_shot_classification_writes_metrics_predictions_and_confusion_png(pretrained_run, annotations, tmp_path):
    config = {"model": {"arch": "medblip", "model_type": "tiny", "load_finetuned": True,
                        "finetuned": str(pretrained_run / "checkpoint_best.pth")},
              "datasets": dataset_config(annotations, ["test"]),
              "run": run_config(tmp_path / "output", "medblip_classification", evaluate=True, test_splits=["test"])}
    launch("lavis_medblip.evaluate", config, tmp_path / "eval.yaml", "run.classification_mode=generate")

    result_dir = only_job_dir(tmp_path / "output") / "result"
    metrics = json.loads((result_dir / "test_epochbest_metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["mode"] == "generate"
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and set(metrics["auroc"]) == {"NC", "MCI", "AD"}
    assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == 3
    predictions = json.loads((result_dir / "test_epochbest_predictions.json").read_text())
    assert {"instance_id", "label", "prediction", "scores", "probs", "generated"} <= set(predictions[0])
    assert (result_dir / "test_epochbest_confusion.png").stat().st_size > 1000
