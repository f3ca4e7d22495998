"""Nothing is dropped or doubted silently: every skipped line and scan, and every degenerate scan,
is counted per split in the run log, the metrics JSON and the console."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from cohort_fixtures import write_small_cohort
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

MALFORMED_LINES = [
    "this is not JSON",
    "[1, 2, 3]",
    "{}",
    json.dumps({"subject_id": "no-image", "label": "AD", "split": "train", "text": "A 70-year-old male."}),
    json.dumps({"image": "../scans/x.nii.gz", "label": "AD", "split": "train", "text": "no subject id"}),
    json.dumps({"image": "../scans/x.nii.gz", "subject_id": "bad-label", "label": "Martian", "split": "train",
                "text": "A 70-year-old male."}),
    '{"image": "../scans/x.nii.gz", "subject_id": "cut-short", ',
]


def append_lines(path: Path, lines: list[str]) -> None:
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def test_skipped_lines_and_scans_and_degenerate_scans_are_counted_per_split(tmp_path):
    annotations = write_small_cohort(tmp_path / "cohort", {"train": 3, "test": 3})  # + 1 missing: 2 full batches
    append_lines(annotations / "train.jsonl", MALFORMED_LINES + [json.dumps(
        {"image": "../scans/missing.nii.gz", "subject_id": "missing", "label": "NC", "split": "train",
         "text": "A 70-year-old male."})])
    constant = np.full((32, 32, 32), 7.0, dtype=np.float32)
    nib.save(nib.Nifti1Image(constant, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / "cohort" / "scans" / "constant.nii.gz")
    append_lines(annotations / "test.jsonl", MALFORMED_LINES[:2] + [json.dumps(
        {"image": "../scans/constant.nii.gz", "subject_id": "constant", "label": "NC", "split": "test",
         "text": "A 70-year-old male."})])

    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "test"], on_error="skip"),
              "run": run_config(tmp_path / "output", "medblip_classification", max_epoch=1, train_splits=["train"],
                                test_splits=["test"])}
    result = launch("lavis_medblip.train", config, tmp_path / "run.yaml")
    job = only_job_dir(tmp_path / "output")

    (train_log,) = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert train_log["train_num_skipped"] == 8
    assert (train_log["train_num_skipped_annotations"], train_log["train_num_skipped_samples"]) == (7, 1)
    assert "split train: 7 annotation line(s) skipped" in result.stderr

    (metrics_file,) = (job / "result").glob("test_epoch*_metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert (metrics["num_skipped"], metrics["num_skipped_annotations"], metrics["num_skipped_samples"]) == (2, 2, 0)
    assert metrics["num_degenerate"] == 1
    assert "constant volume" in result.stderr


def test_an_epoch_whose_every_scan_is_unreadable_is_counted_not_a_crash(tmp_path):
    annotations = write_small_cohort(tmp_path / "cohort", {"train": 2, "test": 3})
    for scan in (tmp_path / "cohort" / "scans").glob("sub-00[01].nii.gz"):  # the two training scans
        scan.write_bytes(b"\x1f\x8b not a scan")
    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "test"], on_error="skip"),
              "run": run_config(tmp_path / "output", "medblip_classification", max_epoch=1, train_splits=["train"],
                                test_splits=["test"])}
    launch("lavis_medblip.train", config, tmp_path / "run.yaml")
    (train_log,) = [json.loads(line) for line in (only_job_dir(tmp_path / "output") / "log.txt").read_text().splitlines()
                    if line.startswith('{"train')]
    assert (train_log["train_num_skipped"], train_log["train_num_steps"]) == (2, 0)
