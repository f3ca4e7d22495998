"""The schema dataset: bad scans and bad annotation lines are errors naming the file, or counted skips."""
from __future__ import annotations

import json

import pytest
import torch
from lavis.common.registry import registry

from cohort_fixtures import write_small_cohort
from lavis_medblip.datasets import MRIAnnotationDataset
from lavis_medblip.processors.volume_types import VolumeReadError


def dataset(annotation_file, on_error: str) -> MRIAnnotationDataset:
    return MRIAnnotationDataset(registry.get_processor_class("mri_volume_eval")(image_size=16),
                                registry.get_processor_class("medblip_text")(), [annotation_file], on_error=on_error)


@pytest.fixture
def cohort_with_problems(tmp_path):
    annotations = write_small_cohort(tmp_path, {"train": 3})
    (tmp_path / "scans" / "sub-001.nii.gz").write_bytes(b"\x1f\x8b truncated gzip")
    with (annotations / "train.jsonl").open("a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"image": "x.nii.gz", "subject_id": "s9", "label": "FTD", "split": "train"}) + "\n")
    return annotations / "train.jsonl"


def test_on_error_raise_names_the_file_and_line(cohort_with_problems):
    with pytest.raises(ValueError, match=r"train\.jsonl:4: not valid JSON"):
        dataset(cohort_with_problems, "raise")


def test_on_error_skip_counts_bad_lines_and_drops_unreadable_scans_from_batches(cohort_with_problems):
    data = dataset(cohort_with_problems, "skip")
    assert len(data) == 3 and len(data.skipped_annotations) == 2  # bad JSON, unknown label "FTD"
    batch = data.collater([data[i] for i in range(3)])
    assert batch["num_skipped"] == 1 and batch["image"].shape == (2, 1, 16, 16, 16)
    assert batch["label"].tolist() == [0, 2] and batch["text_output"][0] == "not demented"


def test_an_unreadable_scan_with_on_error_raise_names_it(cohort_with_problems):
    clean = cohort_with_problems.with_name("clean.jsonl")
    clean.write_text("".join(cohort_with_problems.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(VolumeReadError, match=r"sub-001\.nii\.gz: sample 1 of this dataset"):
        dataset(clean, "raise")[1]
    assert isinstance(dataset(clean, "raise")[0]["image"], torch.Tensor)
