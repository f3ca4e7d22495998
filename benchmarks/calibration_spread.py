"""How far the demo's calibration, fitted on its 33 validation subjects, moves each model's held-out accuracy.

Every demo model (``.cache/demo/runs/<model>``) is evaluated once without calibration on ``val`` and both
held-out sets (``python -m lavis_medblip.evaluate``, raw scores). The calibration is then refitted
(:func:`~lavis_medblip.models.calibration.fit_calibration`, as ``run.calibration_split`` does) on the whole of
``val`` and on ``--resamples`` bootstrap resamples of it, and each fit is applied to the held-out scores.
It prints, per model and held-out set, the balanced accuracy raw, with the demo's calibration, and over the
resampled fits (mean, standard deviation, 10th and 90th percentiles).

    python benchmarks/calibration_spread.py [--root .cache/demo] [--resamples 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from lavis_medblip.cli.demo import HELD_OUT, MODELS, Demo, job_dir  # noqa: E402
from lavis_medblip.models.calibration import Calibration, fit_calibration  # noqa: E402


def raw_scores(demo: Demo, model: str, options: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split → (scores (N, classes), labels (N,)) of the demo's trained ``model``, without calibration."""
    checkpoint = job_dir(demo.runs / model) / "checkpoint_latest.pth"
    output_dir = demo.root / "calibration_spread" / model
    shutil.rmtree(output_dir, ignore_errors=True)
    splits = {split: demo.cohort / f"{split}.jsonl" for split in ("val", *HELD_OUT)}
    demo.launch("lavis_medblip.evaluate", "demo_eval.yaml",
                [f"run.output_dir={output_dir}", f"model.finetuned={checkpoint}",
                 f"run.test_splits=[{','.join(splits)}]", *demo.data_options(splits), *options])
    result = job_dir(output_dir) / "result"
    found = {}
    for split in splits:
        predictions = json.loads((result / f"{split}_epochbest_predictions.json").read_text())
        found[split] = (np.array([p["scores"] for p in predictions]), np.array([p["label"] for p in predictions]))
    return found


def balanced_accuracy(calibration: Calibration, scores: np.ndarray, labels: np.ndarray) -> float:
    predictions = calibration.logits(torch.as_tensor(scores)).argmax(dim=1)
    return float(balanced_accuracy_score(labels, predictions.numpy()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/demo"), help="a finished make demo's folder")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the validation split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demo = Demo(args.root)
    rows = []
    for model, options in MODELS.items():
        scores = raw_scores(demo, model, options)
        val_scores, val_labels = scores["val"]
        rng = np.random.default_rng(args.seed)
        resampled = []
        while len(resampled) < args.resamples:
            index = rng.integers(0, len(val_labels), len(val_labels))
            if len(set(val_labels[index])) == val_scores.shape[1]:  # every class, as the demo's split has
                resampled.append(fit_calibration(val_scores[index], val_labels[index]))
        demo_fit = fit_calibration(val_scores, val_labels)
        for split in HELD_OUT:
            spread = np.array([balanced_accuracy(fit, *scores[split]) for fit in resampled])
            rows.append((model, HELD_OUT[split], balanced_accuracy(Calibration(), *scores[split]),
                         balanced_accuracy(demo_fit, *scores[split]), spread))
    print(f"\nbalanced accuracy, calibration refitted on {args.resamples} bootstrap resamples of val "
          f"(n={len(val_labels)})")
    print(f"{'model':<12}{'held-out set':<24}{'raw':>7}{'demo':>7}{'mean':>7}{'sd':>7}{'p10':>7}{'p90':>7}")
    for model, split, raw, calibrated, spread in rows:
        print(f"{model:<12}{split:<24}{raw:>7.3f}{calibrated:>7.3f}{spread.mean():>7.3f}{spread.std():>7.3f}"
              f"{np.percentile(spread, 10):>7.3f}{np.percentile(spread, 90):>7.3f}")


if __name__ == "__main__":
    main()
