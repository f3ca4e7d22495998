"""Does the demo's text-only LM read the EHR as well as a regression? Both measured on many fresh EHRs, beside the
Bayes-optimal reader of the simulator's EHR (what the text holds at most).

The demo's held-out sets hold 75 subjects each, and a difference in balanced accuracy between two models moves
by 10-17 points either way with the subjects drawn (the demo prints these intervals). Neither the text-only LM
nor the EHR regression reads a scan, and the simulator's EHR depends on the class alone (not on the scanner
site or the anatomy), so both can be measured on as many new subjects as wanted without simulating a scan:
every subject of a cohort planned with another seed (``simulate_ehr_records``). The demo's trained text-only
model (``.cache/demo/runs/text_only``) is evaluated on them through ``python -m lavis_medblip.evaluate``,
calibrated on the demo's validation split as in the demo; the regression is fitted on the demo's training
split. It prints both, and their difference with a 95% paired-bootstrap interval. The Bayes-optimal reader
predicts the class whose EHR model (the simulator's ``ehr_log_likelihood``) makes the recorded fields most
likely; it is printed on the fresh EHRs and, with the demo's own two rows, on the demo's 75-subject held-out sets.

    python benchmarks/text_only_vs_regression.py [--root .cache/demo] [--subjects-per-class 300] [--seed 7]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.special import softmax  # noqa: E402

from dataset_builders.simulate_cohort import ehr_log_likelihood, simulate_ehr_records  # noqa: E402
from lavis_medblip.annotations.schema import (  # noqa: E402
    CLASS_NAMES, AnnotationRecord, read_annotations, write_annotations,
)
from lavis_medblip.baselines import EHRLogisticRegression, evaluation_of_probabilities  # noqa: E402
from lavis_medblip.cli.demo import HELD_OUT, MODELS, Demo, job_dir, paired_difference, read_evaluation  # noqa: E402


def bayes_optimal_evaluation(records: list[AnnotationRecord], kappa: float) -> dict:
    """The class whose EHR model makes each record's fields most likely (equal priors, as balanced accuracy has
    them), as an evaluation (metrics and predictions)."""
    log_likelihoods = np.array([[ehr_log_likelihood(record.ehr, label, kappa) for label in CLASS_NAMES]
                                for record in records])
    return evaluation_of_probabilities(records, softmax(log_likelihoods, axis=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/demo"), help="a finished make demo's folder")
    parser.add_argument("--subjects-per-class", type=int, default=300,
                        help="the fresh cohort's plan (all its splits are used: 375 subjects per 100)")
    parser.add_argument("--seed", type=int, default=7, help="the fresh cohort's seed (the demo's is 0)")
    args = parser.parse_args(argv)
    demo = Demo(args.root)
    parameters = json.loads((demo.cohort / "cohort.json").read_text())["parameters"]
    if args.seed == parameters["seed"]:
        parser.error(f"--seed {args.seed} is the demo cohort's: its subjects are the ones the models trained on")
    records = simulate_ehr_records(args.subjects_per_class, args.seed,
                                   ehr_informativeness=parameters["ehr_informativeness"],
                                   missing_prob=parameters["missing_prob"])
    fresh = demo.root / "fresh_ehr.jsonl"
    write_annotations(fresh, [replace(record, split="test") for record in records])  # all evaluated

    # the LM: the demo's text-only checkpoint, calibrated on the demo's validation split, as the demo evaluates it
    checkpoint = job_dir(demo.runs / "text_only") / "checkpoint_latest.pth"
    language_model = demo.evaluate("text_only_fresh_ehr", checkpoint, MODELS["text_only"], {"test": fresh})["test"]
    # the regression, fitted on the demo's training split
    fitted = EHRLogisticRegression().fit(list(read_annotations(demo.cohort / "train.jsonl")))
    regression = fitted.evaluation(records)
    kappa = parameters["ehr_informativeness"]
    bayes = bayes_optimal_evaluation(records, kappa)
    difference = paired_difference(language_model, regression)
    language_model_accuracy = language_model["metrics"]["balanced_accuracy"]
    regression_accuracy = regression["metrics"]["balanced_accuracy"]
    print(f"\n{len(records)} fresh simulated EHRs (cohort seed {args.seed}, {args.subjects_per_class} per class "
          f"planned; informativeness {parameters['ehr_informativeness']}, fields missing with probability "
          f"{parameters['missing_prob']}), balanced accuracy:")
    print(f"  text only (LM), the demo's checkpoint   {language_model_accuracy:.3f}")
    print(f"  EHR fields (log. regression)            {regression_accuracy:.3f}")
    print(f"  EHR, Bayes-optimal                      {bayes['metrics']['balanced_accuracy']:.3f}")
    print(f"  text only - regression, points          {100 * difference.estimate:+.1f} "
          f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] (95% paired bootstrap)")

    # the same three on the demo's own held-out sets
    held_out = {split: list(read_annotations(demo.cohort / f"{split}.jsonl")) for split in HELD_OUT}
    rows = {"text only (LM)": read_evaluation(demo.runs / "text_only_eval", list(HELD_OUT)),
            "EHR fields (log. regression)": {split: fitted.evaluation(held) for split, held in held_out.items()},
            "EHR, Bayes-optimal": {split: bayes_optimal_evaluation(held, kappa) for split, held in held_out.items()}}
    print(f"\nThe demo's held-out sets, balanced accuracy{''.join(f'{HELD_OUT[split]:>26}' for split in HELD_OUT)}")
    for name, evaluations in rows.items():
        print(f"  {name:<41}" + "".join(f"{evaluations[split]['metrics']['balanced_accuracy']:>26.3f}"
                                        for split in HELD_OUT))


if __name__ == "__main__":
    main()
