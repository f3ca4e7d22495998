"""Calibrated probabilities: fitting a temperature and a class bias, the calibration error, the diagram."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lavis_medblip.models.calibration import Calibration, CalibrationFitOptions, fit_calibration
from lavis_medblip.models.weights import CheckpointError
from lavis_medblip.tasks.metrics import expected_calibration_error, mean_negative_log_likelihood, reliability_bins
from lavis_medblip.visualize import plot_reliability_diagram

ANSWERS = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]


def over_confident_scores(temperature: float, samples: int = 3000, shift=(0.0, 0.0, 0.0), seed: int = 0):
    """Labels drawn from softmax(true logits); the model's scores are the true logits × ``temperature`` + ``shift``."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(samples, 3, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.multinomial(true_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return true_logits * temperature + torch.tensor(shift, dtype=torch.float64), labels


def test_fitting_recovers_a_known_temperature_and_lowers_nll_and_ece():
    scores, labels = over_confident_scores(temperature=3.0)
    calibration = fit_calibration(scores, labels, answers=ANSWERS)

    assert calibration.temperature == pytest.approx(3.0, rel=0.1)
    assert max(map(abs, calibration.class_bias)) < 0.2  # the scores carry no class bias (sampling noise only)
    raw, calibrated = scores.softmax(dim=1), calibration.apply(scores)
    assert mean_negative_log_likelihood(calibrated, labels) < mean_negative_log_likelihood(raw, labels) - 0.2
    assert expected_calibration_error(calibrated, labels) < 0.03 < 0.15 < expected_calibration_error(raw, labels)
    assert calibration.num_samples == 3000 and calibration.answers == ANSWERS
    # the ranking of each sample's candidates is unchanged by a temperature alone
    assert torch.equal(fit_calibration(scores, labels, options=CalibrationFitOptions(fit_bias=False))
                       .logits(scores).argmax(dim=1), scores.argmax(dim=1))


def test_a_per_class_bias_undoes_a_model_that_favours_one_class():
    scores, labels = over_confident_scores(temperature=1.0, shift=(-1.0, 2.0, -1.0))  # "MCI" for everyone
    calibration = fit_calibration(scores, labels, answers=ANSWERS)

    assert calibration.temperature == pytest.approx(1.0, rel=0.1)
    assert calibration.class_bias == pytest.approx([1.0, -2.0, 1.0], abs=0.25)  # up to sampling noise
    raw_accuracy = (scores.argmax(dim=1) == labels).double().mean()
    assert (calibration.logits(scores).argmax(dim=1) == labels).double().mean() > raw_accuracy + 0.1


def test_fitting_is_deterministic_and_stays_bounded_on_tiny_sets():
    scores = torch.tensor([[-0.5, -2.0, -3.0], [-0.4, -1.0, -2.5]])
    labels = torch.tensor([0, 0])  # perfectly separated, one class missing: unbounded without the safeguards
    first, second = fit_calibration(scores, labels), fit_calibration(scores, labels)

    assert first == second
    assert CalibrationFitOptions().min_temperature <= first.temperature <= CalibrationFitOptions().max_temperature
    assert all(np.isfinite(first.class_bias)) and max(map(abs, first.class_bias)) < 20
    with pytest.raises(ValueError, match="labels must index the 3 candidates"):
        fit_calibration(scores, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(samples, candidates >= 2\)"):
        fit_calibration(torch.zeros(0, 3), torch.zeros(0))


def test_the_default_calibration_is_the_identity():
    scores = torch.tensor([[-1.0, -2.0, -0.5]])
    identity = Calibration()
    assert identity.is_identity and identity.logits(scores) is scores
    assert torch.equal(identity.apply(scores), scores.softmax(dim=1))
    assert Calibration.from_checkpoint({"model": {}}) == identity  # a checkpoint without calibration


def test_the_bias_follows_the_answers_whatever_subset_or_order_is_ranked():
    calibration = Calibration(temperature=2.0, class_bias=[0.5, 0.0, -0.5], answers=ANSWERS)
    scores = torch.tensor([[-1.0, -3.0]])
    logits = calibration.logits(scores, [["Alzheimer's disease", "not demented"]])
    assert logits.tolist() == [[-1.0 / 2 - 0.5, -3.0 / 2 + 0.5]]
    assert calibration.logits(scores, [["yes", "no"]]).tolist() == scores.tolist()  # other candidates: raw


def test_a_bad_stored_calibration_is_an_error_naming_the_file():
    with pytest.raises(CheckpointError, match="ckpt.pth: 'calibration' is not a valid calibration: .*temperature"):
        Calibration.from_checkpoint({"calibration": {"temperature": -1.0}}, "ckpt.pth")
    with pytest.raises(CheckpointError, match="ckpt.pth: 'calibration' has unknown keys \\['scale'\\]"):
        Calibration.from_checkpoint({"calibration": {"scale": 2.0}}, "ckpt.pth")
    with pytest.raises(ValueError, match="2 class_bias values for 3 answers"):
        Calibration(class_bias=[0.0, 1.0], answers=ANSWERS)


def test_ece_of_a_perfectly_calibrated_case_is_zero_and_of_an_over_confident_one_large():
    # ten samples at confidence 0.8, eight of them right: accuracy equals confidence
    calibrated = np.tile([0.8, 0.1, 0.1], (10, 1))
    labels = [0] * 8 + [1, 2]
    assert expected_calibration_error(calibrated, labels) == pytest.approx(0.0, abs=1e-12)
    # sure (0.99) of every answer, right half of the time
    over_confident = np.tile([0.99, 0.005, 0.005], (10, 1))
    assert expected_calibration_error(over_confident, [0] * 5 + [1] * 5) == pytest.approx(0.49)
    # two bins: 0.6 (1 of 2 right) and 0.9 (2 of 2 right): (2·0.1 + 2·0.1) / 4
    probs = [[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.1, 0.9]]
    bins = reliability_bins(probs, [0, 1, 0, 1], n_bins=10)
    assert bins.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 1 + 1, 0]
    assert expected_calibration_error(probs, [0, 1, 0, 1]) == pytest.approx(0.1)


def test_the_reliability_diagram_shows_the_ece_in_its_title(tmp_path):
    from matplotlib.figure import Figure

    from lavis_medblip.visualize import draw_reliability_diagram

    probs = np.tile([0.99, 0.005, 0.005], (10, 1))
    axes = Figure().subplots()
    ece = draw_reliability_diagram(axes, probs, [0] * 5 + [1] * 5, "test")
    assert ece == pytest.approx(0.49) and axes.get_title() == "test: ECE 0.490 (n=10)"
    assert plot_reliability_diagram(probs, [0] * 10, tmp_path / "r.png").stat().st_size > 1000
