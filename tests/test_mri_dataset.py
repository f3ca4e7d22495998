"""The schema dataset: bad scans and bad annotation lines are errors naming the file, or counted skips."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml
from lavis.common.config import Config
from lavis.common.registry import registry

from cohort_fixtures import write_small_cohort
from lavis_medblip.datasets import MRIAnnotationDataset
from lavis_medblip.datasets.builders import processor_config
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


def build_config(tmp_path, vis_processor: dict):
    """LAVIS's Config of a project file: the tiny model, one brain_mri dataset with this vis_processor block."""
    project = {"model": {"arch": "medblip", "model_type": "tiny"},
               "datasets": {"brain_mri": {"vis_processor": vis_processor}}, "run": {"task": "medblip_pretrain"}}
    (tmp_path / "project.yaml").write_text(yaml.safe_dump(project))
    return Config(argparse.Namespace(cfg_path=str(tmp_path / "project.yaml"), options=None))


def test_datasets_preprocess_as_the_model_does_plus_their_own_settings(tmp_path):
    config = build_config(tmp_path, {"train": {"cache_dir": str(tmp_path / "cache")}})
    train = processor_config(config.datasets_cfg.brain_mri, "vis_processor", "train")
    assert (train.name, train.image_size, train.cache_dir) == ("mri_volume_train", config.config.model.image_size,
                                                               str(tmp_path / "cache"))


def test_a_dataset_image_size_other_than_the_models_is_an_error(tmp_path):
    config = build_config(tmp_path, {"eval": {"image_size": 64}})
    with pytest.raises(ValueError, match="vis_processor.eval.image_size is 64 but model.image_size is 32"):
        processor_config(config.datasets_cfg.brain_mri, "vis_processor", "eval")
