"""Calibrated probabilities end to end: the model applies its calibration, checkpoints carry it, the
predict CLI and the classification task use it (``run.calibration_split``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from cohort_fixtures import write_small_cohort
from lavis_medblip.annotations.schema import CLASS_ANSWERS
from lavis_medblip.assets import ICBM_T1
from lavis_medblip.cli.predict import main as predict
from lavis_medblip.models import MedBLIP
from lavis_medblip.models.calibration import Calibration
from lavis_medblip.models.weights import CheckpointError
from lavis_medblip.tasks.calibrate import CalibrationSplit
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

ANSWERS = list(CLASS_ANSWERS.values())  # not demented, mild cognitive impairment, Alzheimer's disease
#: Sure of Alzheimer's disease whatever the scores: easy to see in probabilities and predictions.
FAVOURS_AD = Calibration(temperature=0.5, class_bias=[0.0, 0.0, 50.0], answers=ANSWERS, num_samples=9)


@pytest.fixture
def model(tiny_config):
    return MedBLIP.from_config(tiny_config).eval()


def test_predict_answers_applies_the_calibration_to_probabilities_and_predictions_not_to_scores(model, samples):
    raw = model.predict_answers(samples, ANSWERS)
    model.calibration = FAVOURS_AD
    calibrated = model.predict_answers(samples, ANSWERS)

    torch.testing.assert_close(calibrated.scores, raw.scores)
    torch.testing.assert_close(calibrated.probs, (raw.scores / 0.5 + torch.tensor([0.0, 0.0, 50.0])).softmax(dim=1))
    assert calibrated.predictions == ["Alzheimer's disease"] * 2
    # a subset of the classes keeps each class's bias; other candidates (VQA options) are ranked raw
    binary = model.predict_answers(samples, ["Alzheimer's disease", "not demented"])
    assert binary.predictions == ["Alzheimer's disease"] * 2
    options = model.predict_answers(samples, ["yes", "no"])
    torch.testing.assert_close(options.probs, options.scores.softmax(dim=1))


def test_without_calibration_predict_answers_is_the_raw_likelihood_ranking(model, samples):
    ranking = model.predict_answers(samples, ANSWERS)
    assert model.calibration.is_identity
    assert torch.equal(ranking.probs, ranking.scores.softmax(dim=1))
    assert ranking.predictions == [ANSWERS[i] for i in ranking.scores.argmax(dim=1).tolist()]


def test_the_calibration_round_trips_through_a_weights_only_checkpoint(tiny_config, model, samples, tmp_path):
    plain = tmp_path / "plain.pth"
    model.save_checkpoint(plain)
    assert set(torch.load(plain, weights_only=True)) == {"model", "config"}  # as before calibration existed
    model.calibration = FAVOURS_AD
    calibrated = tmp_path / "calibrated.pth"
    model.save_checkpoint(calibrated)

    stored = torch.load(calibrated, weights_only=True)["calibration"]
    assert stored == {"temperature": 0.5, "class_bias": [0.0, 0.0, 50.0], "answers": ANSWERS, "num_samples": 9}
    restored = MedBLIP.from_config(tiny_config).eval()
    restored.load_checkpoint(str(calibrated))
    assert restored.calibration == FAVOURS_AD
    torch.testing.assert_close(restored.predict_answers(samples, ANSWERS).probs, model.predict_answers(samples, ANSWERS).probs)
    restored.load_checkpoint(str(plain))  # other weights: their calibration, here none
    assert restored.calibration.is_identity


def test_a_checkpoint_with_a_bad_calibration_is_an_error_naming_the_file(model, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": model.checkpoint_state_dict(), "calibration": {"temperature": 0.0}}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: 'calibration' is not a valid calibration: .*positive"):
        model.load_checkpoint(str(path))
    assert model.calibration.is_identity  # refused before anything changed


def test_the_predict_cli_shows_calibrated_probabilities_unless_asked_for_the_raw_ones(model, tmp_path, capsys):
    model.calibration = FAVOURS_AD
    checkpoint = tmp_path / "calibrated.pth"
    model.save_checkpoint(checkpoint)
    arguments = ["--model-type", "tiny", "--checkpoint", str(checkpoint), "--image", str(ICBM_T1), "--text", "A 70-year-old male."]

    assert predict(arguments) == 0
    calibrated = capsys.readouterr()
    assert "diagnosis: AD (Alzheimer's disease)" in calibrated.out
    assert "calibrated probabilities: temperature 0.500" in calibrated.err
    assert predict([*arguments, "--uncalibrated"]) == 0
    raw = capsys.readouterr()
    probabilities = [float(line.split()[-1]) for line in raw.out.splitlines() if line.startswith("  ")]
    assert max(probabilities) < 0.9 and "calibrated probabilities" not in raw.err  # the untrained model is unsure


def test_the_calibration_split_must_be_held_out_data_of_one_dataset():
    datasets = {"brain_mri": {"train": object(), "val": object(), "test": object()}}
    run = {"train_splits": ["train"], "test_splits": ["test"]}
    with pytest.raises(ValueError, match="run.calibration_split 'test' is one of run.test_splits"):
        CalibrationSplit.from_datasets("test", datasets, run)
    with pytest.raises(ValueError, match="'train' is a training split"):
        CalibrationSplit.from_datasets("train", datasets, run)
    with pytest.raises(ValueError, match=r"'valid': 0 datasets have that split .*\['test', 'train', 'val'\]"):
        CalibrationSplit.from_datasets("valid", datasets, run)


def test_training_with_a_calibration_split_fits_on_val_and_applies_it_to_every_test_split(tmp_path):
    annotations = write_small_cohort(tmp_path / "cohort", {"train": 3, "val": 6, "test": 3})
    datasets = dataset_config(annotations, ["train", "val", "test"])
    datasets["brain_mri"]["build_info"]["annotations"]["test_b"] = {"storage": str(annotations / "test.jsonl")}
    config = {"model": {"arch": "medblip", "model_type": "tiny"}, "datasets": datasets,
              "run": run_config(tmp_path / "output", "medblip_classification", max_epoch=1, train_splits=["train"],
                                valid_splits=["val"], test_splits=["test", "test_b"], calibration_split="val")}
    launch("lavis_medblip.train", config, tmp_path / "run.yaml")
    job = only_job_dir(tmp_path / "output")

    checkpoint = torch.load(job / "checkpoint_calibrated.pth", weights_only=True)  # the best weights + calibration
    calibration = Calibration.from_checkpoint(checkpoint)
    assert calibration.num_samples == 6 and calibration.answers == ANSWERS and not calibration.is_identity
    best = torch.load(job / "checkpoint_best.pth", weights_only=True)["model"]
    assert all(torch.equal(best[key], tensor) for key, tensor in checkpoint["model"].items())

    val = json.loads((job / "result" / "val_epoch0_metrics.json").read_text())
    assert val["calibration"] is None and "raw" not in val  # model selection sees the raw ranking
    for split in ("test", "test_b"):
        metrics = json.loads((job / "result" / f"{split}_epochbest_metrics.json").read_text())
        assert metrics["calibration"]["split"] == "val" and metrics["calibration"]["temperature"] == calibration.temperature
        assert metrics["calibration"]["fit_nll"] <= metrics["calibration"]["fit_nll_raw"]
        assert {"accuracy", "balanced_accuracy", "macro_f1", "ece", "nll"} <= set(metrics["raw"])
        assert 0 <= metrics["ece"] <= 1
        rows = json.loads((job / "result" / f"{split}_epochbest_predictions.json").read_text())
        expected = calibration.apply(torch.tensor([row["scores"] for row in rows], dtype=torch.float64))
        torch.testing.assert_close(torch.tensor([row["probs"] for row in rows], dtype=torch.float64), expected,
                                   atol=1e-4, rtol=0)
        assert [row["prediction"] for row in rows] == expected.argmax(dim=1).tolist()
        assert (job / "result" / f"{split}_epochbest_reliability.png").stat().st_size > 1000
