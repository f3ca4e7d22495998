"""The demo's table again, its trained models unchanged, on fresh held-out subjects of another cohort seed.

The demo's held-out sets hold 75 subjects each: a difference of two rows moves by 10-17 points with the subjects
drawn, as much as the margins the demo is judged by. This simulates new subjects for both held-out sets (the
held-out scanner site and the held-out anatomy family, each subject drawn as a cohort planned with ``--seed``
would draw it; no training set is simulated), evaluates the demo's three trained models on them through
``python -m lavis_medblip.evaluate`` (calibrated on the demo's validation split, as the demo does), fits the EHR
regression on the demo's training split, and prints the demo's table for them, per seed. Then one table pools the
demo's own held-out subjects with every seed's (each subject once; metrics and paired differences recomputed over
all of them): with the defaults, 375 subjects per held-out set, how far the demo's 75-subject rows are from what
its models do on the population.

Under the table, two references that are not models: logistic regressions on the volumes the simulator measured in
each subject's image (brain, hippocampus, ventricles; what a perfect segmentation reads), without and with the EHR
fields, fitted on the demo's training split. They show how much of the margins the image could give through them.

    python benchmarks/demo_on_fresh_subjects.py [--root .cache/demo] [--seed 7 8] [--per-class 50]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_builders.simulate_cohort import simulate_cohort  # noqa: E402
from lavis_medblip.annotations.schema import CLASS_NAMES, AnnotationRecord, read_annotations  # noqa: E402
from lavis_medblip.baselines import ehr_features, evaluation_of_probabilities, logistic_regression  # noqa: E402
from lavis_medblip.cli.demo import (  # noqa: E402
    HELD_OUT, MODELS, Demo, difference_line, differences, ehr_regression, job_dir, paired_difference,
    pooled_evaluation, print_table, read_evaluation, table_line, table_rows, test_sets, write_results,
)
from lavis_medblip.tasks.metrics import Interval  # noqa: E402

#: The reference readers: name → whether they read the EHR fields too.
MEASUREMENT_READERS = {"volumes (log. regression)": False, "volumes + EHR (log. regression)": True}
#: The differences printed for them: name → (row, the row it is compared with); rows of the table or references.
REFERENCE_COMPARISONS = {"image only - volumes": ("image_only", "volumes (log. regression)"),
                         "image + text - volumes + EHR": ("image_text", "volumes + EHR (log. regression)"),
                         "volumes + EHR - text only": ("volumes + EHR (log. regression)", "text_only")}


def volume_features(annotations: Path, records: Sequence[AnnotationRecord]) -> np.ndarray:
    """Per record: log brain volume, and log hippocampus and ventricle volumes relative to it, as the simulator
    measured them in the subject's image (``subjects.jsonl`` beside the cohort's ``annotations``)."""
    subjects = (json.loads(line) for line in (annotations.parent / "subjects.jsonl").read_text().splitlines())
    volumes = {subject["subject_id"]: subject["volumes"] for subject in subjects}
    return np.asarray([[math.log(v["brain_mm3"]), math.log(v["hippocampus_mm3"] / v["brain_mm3"]),
                        math.log(v["ventricles_mm3"] / v["brain_mm3"])]
                       for v in (volumes[record.subject_id] for record in records)])


def measurement_readers(train: Path, test_sets: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """The reference readers, fitted on ``train``: name → test set → evaluation (as :func:`ehr_regression`)."""
    def columns(annotations: Path) -> tuple[list[AnnotationRecord], np.ndarray, np.ndarray]:
        records = list(read_annotations(annotations))
        return records, volume_features(annotations, records), ehr_features(records)

    def features(volumes: np.ndarray, ehr: np.ndarray, with_ehr: bool) -> np.ndarray:
        return np.hstack([volumes, ehr]) if with_ehr else volumes

    train_records, *train_columns = columns(train)
    tests = {split: columns(path) for split, path in test_sets.items()}
    readers = {}
    for name, with_ehr in MEASUREMENT_READERS.items():
        model = logistic_regression().fit(features(*train_columns, with_ehr),
                                          [CLASS_NAMES.index(record.label) for record in train_records])
        readers[name] = {split: evaluation_of_probabilities(records, model.predict_proba(features(*test, with_ehr)))
                         for split, (records, *test) in tests.items()}
    return readers


def reference_differences(readers: dict[str, dict[str, dict]], results: dict) -> dict[str, dict[str, Interval]]:
    """Comparison (:data:`REFERENCE_COMPARISONS`) → held-out set → the difference in balanced accuracy."""
    evaluations = {**readers, **results}
    return {name: {split: paired_difference(evaluations[row][split], evaluations[other][split]) for split in HELD_OUT}
            for name, (row, other) in REFERENCE_COMPARISONS.items()}


def print_references(readers: dict[str, dict[str, dict]], compared: dict[str, dict[str, Interval]]) -> None:
    print("References, not models: readers of the volumes the simulator measured in each image, fitted on the "
          "demo's training split")
    for name, per_split in readers.items():
        print(table_line(name, {split: evaluation["metrics"] for split, evaluation in per_split.items()}))
    print()
    for name, per_split in compared.items():
        print(difference_line(name, per_split))
    print()


def fresh_held_out_sets(demo: Demo, parameters: dict, seed: int, per_class: int) -> dict[str, Path]:
    """Both held-out sets of a cohort planned with ``seed`` and the demo's other parameters, with ``per_class``
    subjects per class; only they are simulated. Their annotation files."""
    test_fraction = parameters["test_fraction"]
    fresh = simulate_cohort(
        demo.root / f"fresh_subjects_seed{seed}", round(per_class / test_fraction), seed,
        test_fraction=test_fraction, voxel_mm=parameters["voxel_mm"], atrophy_scale=parameters["atrophy_scale"],
        ehr_informativeness=parameters["ehr_informativeness"], missing_prob=parameters["missing_prob"],
        workers=2, splits=tuple(HELD_OUT))
    print(f"cohort seed {seed}: {fresh.counts}")
    return {split: fresh.annotation_files[split] for split in HELD_OUT}


def evaluate_models(demo: Demo, held_out: dict[str, Path], seed: int, evaluated: bool = False) -> dict:
    """The table's evaluations on ``held_out`` (a cohort of seed ``seed``): the three trained models through the
    evaluation task (or, ``evaluated``, as a finished run of theirs wrote them), the EHR regression refitted."""
    results = {}
    for variant, sets in test_sets(held_out, seed).items():
        if evaluated:
            results[variant] = read_evaluation(demo.runs / f"{variant}_eval", list(sets))
        else:
            checkpoint = job_dir(demo.runs / variant) / "checkpoint_latest.pth"
            results[variant] = demo.evaluate(f"{variant}_fresh_seed{seed}", checkpoint, MODELS[variant], sets)
    results["ehr_regression"] = ehr_regression(demo.cohort / "train.jsonl", held_out)
    return results


def pooled(per_set: dict[str, dict]) -> dict:
    """Name → the table's evaluations on one cohort's held-out sets, as one table's over all of them."""
    first = next(iter(per_set.values()))
    return {row: {split: pooled_evaluation({name: results[row][split] for name, results in per_set.items()})
                  for split in first[row]} for row in first}


def report(title: str, results: dict, readers: dict[str, dict[str, dict]], path: Path) -> None:
    """Print the table and the references for ``results`` and write them to ``path``."""
    rows, intervals = table_rows(results), differences(results)
    print(f"\n{title}")
    print_table(rows, intervals)
    compared = reference_differences(readers, results)
    print_references(readers, compared)
    write_results(path, rows, intervals, references={
        "rows": {name: {split: e["metrics"] for split, e in per_split.items()} for name, per_split in readers.items()},
        "differences": {split: {name: per_split[split] for name, per_split in compared.items()} for split in HELD_OUT}})
    print(f"metrics: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/demo"), help="a finished make demo's folder")
    parser.add_argument("--seed", type=int, nargs="+", default=[7, 8],
                        help="the fresh subjects' cohort seeds (the demo's is 0); each gets its table, then one table "
                             "pools them with the demo's own held-out subjects")
    parser.add_argument("--per-class", type=int, default=50, help="fresh subjects per class in each held-out set")
    args = parser.parse_args(argv)
    start = time.time()
    demo = Demo(args.root)
    parameters = json.loads((demo.cohort / "cohort.json").read_text())["parameters"]
    if parameters["seed"] in args.seed:
        parser.error(f"--seed {parameters['seed']} is the demo cohort's: its held-out subjects are the demo's own")
    train = demo.cohort / "train.jsonl"

    the_demos = {split: demo.cohort / f"{split}.jsonl" for split in HELD_OUT}
    results = {"demo": evaluate_models(demo, the_demos, parameters["seed"], evaluated=True)}
    readers = {"demo": measurement_readers(train, the_demos)}
    for seed in args.seed:
        held_out = fresh_held_out_sets(demo, parameters, seed, args.per_class)
        name = f"seed{seed}"
        results[name], readers[name] = evaluate_models(demo, held_out, seed), measurement_readers(train, held_out)
        report(f"The demo's trained models on fresh subjects (cohort seed {seed})", results[name], readers[name],
               demo.root / f"fresh_subjects_seed{seed}.json")
    report(f"Pooled: the demo's held-out subjects and those of cohort seeds {', '.join(map(str, args.seed))}",
           pooled(results), pooled(readers), demo.root / "fresh_subjects_pooled.json")
    print(f"({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
