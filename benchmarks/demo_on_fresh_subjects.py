"""The demo's table again, its trained models unchanged, on fresh held-out subjects of another cohort seed.

The demo's held-out sets hold 75 subjects each: a difference of two rows moves by 10-17 points with the subjects
drawn, as much as the margins the demo is judged by. This simulates new subjects for both held-out sets (the
held-out scanner site and the held-out anatomy family, each subject drawn as a cohort planned with ``--seed``
would draw it; no training set is simulated), evaluates the demo's three trained models on them through
``python -m lavis_medblip.evaluate`` (calibrated on the demo's validation split, as the demo does), fits the EHR
regression on the demo's training split, and prints the demo's table for them. Run it with a few seeds to see how
far the demo's 75-subject rows are from what its models do on the population.

    python benchmarks/demo_on_fresh_subjects.py [--root .cache/demo] [--seed 7] [--per-class 50]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_builders.simulate_cohort import simulate_cohort  # noqa: E402
from lavis_medblip.cli.demo import (  # noqa: E402
    HELD_OUT, MODELS, Demo, differences, ehr_regression, job_dir, print_table, table_rows, test_sets, write_results,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/demo"), help="a finished make demo's folder")
    parser.add_argument("--seed", type=int, default=7, help="the fresh subjects' cohort seed (the demo's is 0)")
    parser.add_argument("--per-class", type=int, default=50, help="fresh subjects per class in each held-out set")
    args = parser.parse_args(argv)
    start = time.time()
    demo = Demo(args.root)
    parameters = json.loads((demo.cohort / "cohort.json").read_text())["parameters"]
    if args.seed == parameters["seed"]:
        parser.error(f"--seed {args.seed} is the demo cohort's: its held-out subjects are the demo's own")

    # a plan whose held-out sets hold --per-class subjects per class; only those are simulated
    test_fraction = parameters["test_fraction"]
    fresh = simulate_cohort(
        demo.root / f"fresh_subjects_seed{args.seed}", round(args.per_class / test_fraction), args.seed,
        test_fraction=test_fraction, voxel_mm=parameters["voxel_mm"], atrophy_scale=parameters["atrophy_scale"],
        ehr_informativeness=parameters["ehr_informativeness"], missing_prob=parameters["missing_prob"],
        workers=2, splits=tuple(HELD_OUT))
    held_out = {split: fresh.annotation_files[split] for split in HELD_OUT}
    evaluated_on = test_sets(held_out, args.seed)

    results = {}
    for variant, options in MODELS.items():
        checkpoint = job_dir(demo.runs / variant) / "checkpoint_latest.pth"
        results[variant] = demo.evaluate(f"{variant}_fresh_seed{args.seed}", checkpoint, options,
                                         evaluated_on[variant])
    results["ehr_regression"] = ehr_regression(demo.cohort / "train.jsonl", held_out)

    rows, intervals = table_rows(results), differences(results)
    print(f"\nThe demo's trained models on fresh subjects (cohort seed {args.seed}, {fresh.counts})")
    print_table(rows, intervals)
    path = demo.root / f"fresh_subjects_seed{args.seed}.json"
    write_results(path, rows, intervals)
    print(f"metrics: {path}  ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
