"""Does the demo's text-only LM read the EHR as well as a regression? Both measured on many fresh EHRs.

The demo's held-out sets hold 75 subjects each, and a difference in balanced accuracy between two models moves
by 10-17 points either way with the subjects drawn (the demo prints these intervals). Neither the text-only LM
nor the EHR regression reads a scan, and the simulator's EHR depends on the class alone (not on the scanner
site or the anatomy), so both can be measured on as many new subjects as wanted without simulating a scan:
every subject of a cohort planned with another seed (``simulate_ehr_records``). The demo's trained text-only
model (``.cache/demo/runs/text_only``) is evaluated on them through ``python -m lavis_medblip.evaluate``,
calibrated on the demo's validation split as in the demo; the regression is fitted on the demo's training
split. It prints both, and their difference with a 95% paired-bootstrap interval.

    python benchmarks/text_only_vs_regression.py [--root .cache/demo] [--subjects-per-class 300] [--seed 7]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_builders.simulate_cohort import simulate_ehr_records  # noqa: E402
from lavis_medblip.annotations.schema import CLASS_NAMES, read_annotations, write_annotations  # noqa: E402
from lavis_medblip.baselines import EHRLogisticRegression  # noqa: E402
from lavis_medblip.cli.demo import MODELS, Demo, job_dir  # noqa: E402
from lavis_medblip.tasks.metrics import balanced_accuracy_difference  # noqa: E402


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
    output_dir = demo.root / "text_only_vs_regression"
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    records = simulate_ehr_records(args.subjects_per_class, args.seed,
                                   ehr_informativeness=parameters["ehr_informativeness"],
                                   missing_prob=parameters["missing_prob"])
    fresh = output_dir / "fresh_ehr.jsonl"
    write_annotations(fresh, [replace(record, split="test") for record in records])  # all evaluated

    # the LM: the demo's text-only checkpoint, calibrated on the demo's validation split
    splits = {"val": demo.cohort / "val.jsonl", "test": fresh}
    demo.launch("lavis_medblip.evaluate", "demo_eval.yaml",
                [f"run.output_dir={output_dir / 'runs'}", "run.calibration_split=val", "run.test_splits=[test]",
                 f"model.finetuned={job_dir(demo.runs / 'text_only') / 'checkpoint_latest.pth'}",
                 *demo.data_options(splits), *MODELS["text_only"]])
    result = job_dir(output_dir / "runs") / "result"
    language_model = {p["instance_id"]: p["prediction"]
                      for p in json.loads((result / "test_epochbest_predictions.json").read_text())}
    # the regression, fitted on the demo's training split
    regression = EHRLogisticRegression().fit(list(read_annotations(demo.cohort / "train.jsonl")))
    regression_predictions = regression.predict_proba(records).argmax(axis=1)

    labels = [CLASS_NAMES.index(record.label) for record in records]
    difference = balanced_accuracy_difference(labels, [language_model[record.instance_id] for record in records],
                                              regression_predictions)
    language_model_accuracy = json.loads((result / "test_epochbest_metrics.json").read_text())["balanced_accuracy"]
    regression_accuracy = regression.evaluate(records)["balanced_accuracy"]
    print(f"\n{len(records)} fresh simulated EHRs (cohort seed {args.seed}, {args.subjects_per_class} per class "
          f"planned; informativeness {parameters['ehr_informativeness']}, fields missing with probability "
          f"{parameters['missing_prob']}), balanced accuracy:")
    print(f"  text only (LM), the demo's checkpoint   {language_model_accuracy:.3f}")
    print(f"  EHR fields (log. regression)            {regression_accuracy:.3f}")
    print(f"  difference, points                      {100 * difference.estimate:+.1f} "
          f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] (95% paired bootstrap)")


if __name__ == "__main__":
    main()
