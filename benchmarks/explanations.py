"""Are the relevance maps faithful? Two checks on the demo's held-out scanner site with the trained demo model.

* **Region check.** The simulator atrophies known CerebrA regions (``dataset_builders.simulate_cohort``): the
  medial temporal lobe (hippocampus, amygdala, entorhinal and parahippocampal cortex) shrinks and the lateral
  and inferior-lateral ventricles enlarge, both hemispheres. The check is the share of the relevance mass
  inside those 12 regions over their share of the brain's volume (1 = no better than spread evenly over
  the brain). The simulator also thins the whole cortex (and widens the sulci), in proportion to the same
  atrophy index, and moves the walls of the structures it resizes: class evidence these 12 regions' labels do
  not hold. So the check has a *reference*: the atrophy's own change, |the scan - the same subject simulated
  without atrophy|, used as the map (on the subject's own labels): what a map showing exactly the simulator's
  evidence scores. Measured two ways:

  - *template space* (what ``explain_scan``'s region summary reads): the map on the model's cube, which with
    ``register_to_template`` is ICBM 2009c space after an affine fit, against the vendored CerebrA atlas;
    the regions' share of the brain is theirs in the atlas over the ICBM brain mask. The subjects' own
    anatomy differs from the template's by their warps (a few mm), which an affine fit does not undo;
  - *the subject's own labels*: the map carried back onto the scan's grid (``to_scan_grid``, through the
    inverse registration) against the subject's warped CerebrA labels, which the cohort was generated
    without (``save_labels=False``) and which are regenerated here, bit-identical, by
    ``simulate_subject(save_labels=True)`` from the cohort's seed and parameters (the image it makes is
    checked to equal the stored scan). The regions' share of the brain is their voxels over the subject's
    brain volume (``brain_mm3``, the warped ICBM brain mask).

* **Deletion check.** The top ``--fraction`` (5%) most relevant of the brain's voxels (the input cube's
  non-zero voxels) are set to 0 (with ``template_deviation_scale``: the template's intensity), then as many
  random brain voxels (``--random-draws`` draws, the same for both methods), and the drop of the predicted
  class's (calibrated) probability is compared: the mean drop for the top voxels over the mean size of the change
  random deletion makes (its absolute value per case: random deletion barely moves p, and as often up as down), and
  the share of cases where the top voxels' drop is the larger.

    python benchmarks/explanations.py [--cohort .cache/demo/cohort] [--checkpoint PATH] [--split test]
        [--per-class N] [--methods gradient attention] [--fraction 0.05] [--random-draws 3] [--jsonl out.jsonl]
    python benchmarks/explanations.py --from-jsonl out.jsonl    # the summary of (part of) an earlier run

The default checkpoint is the demo's calibrated image + text model (``runs/image_text_eval/*/checkpoint_calibrated.pth``).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dataset_builders, from a checkout

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataset_builders.simulate_cohort import (  # noqa: E402
    AMYGDALA, ENTORHINAL, HIPPOCAMPUS, INFERIOR_LATERAL_VENTRICLE, LATERAL_VENTRICLE, PARAHIPPOCAMPAL, plan_cohort,
    simulate_subject,
)
from lavis_medblip.annotations.schema import CLASS_NAMES, read_annotations  # noqa: E402
from lavis_medblip.assets import CEREBRA_LABELS, ICBM_BRAIN_MASK  # noqa: E402
from lavis_medblip.inference import Predictor, load_config, load_model  # noqa: E402
from lavis_medblip.relevance import cerebra_region_names, read_scan, region_shares, to_scan_grid  # noqa: E402

ATROPHIED_IDS = tuple(sorted(label for region in (HIPPOCAMPUS, AMYGDALA, ENTORHINAL, PARAHIPPOCAMPAL,
                                                  LATERAL_VENTRICLE, INFERIOR_LATERAL_VENTRICLE)
                             for label in region.values()))
DEFAULT_CHECKPOINT = ".cache/demo/runs/image_text_eval/*/checkpoint_calibrated.pth"


def template_volume_share() -> float:
    """The atrophied regions' share of the brain in template space (CerebrA over the ICBM brain mask, 1 mm)."""
    labels = np.asarray(nib.load(CEREBRA_LABELS).dataobj)
    brain = np.asarray(nib.load(ICBM_BRAIN_MASK).dataobj) > 0.5
    return float(np.isin(labels, ATROPHIED_IDS).sum() / brain.sum())


@functools.lru_cache(maxsize=4)
def cohort_plan(cohort: Path) -> tuple[dict, dict]:
    """The cohort's generation parameters (``cohort.json``) and its subjects' specs by id, read once per cohort."""
    parameters = json.loads((cohort / "cohort.json").read_text())["parameters"]
    specs = {spec.subject_id: spec for spec in plan_cohort(
        parameters["subjects_per_class"], parameters["seed"], test_fraction=parameters["test_fraction"],
        val_fraction=parameters["val_fraction"])}
    return parameters, specs


def subject_truth(cohort: Path, subject_id: str, image_path: Path) -> tuple[np.ndarray, float, np.ndarray]:
    """The subject's own warped CerebrA labels (on its scan's grid), its brain volume in voxels, and where its
    atrophy changed the scan: |the scan - the same subject simulated with ``atrophy_scale=0``| (the same draws,
    noise included, so only the atrophy differs)."""
    parameters, specs = cohort_plan(cohort)
    options = {"voxel_mm": parameters["voxel_mm"], "ehr_informativeness": parameters["ehr_informativeness"],
               "missing_prob": parameters["missing_prob"]}
    subject = simulate_subject(specs[subject_id], save_labels=True, atrophy_scale=parameters["atrophy_scale"], **options)
    if not np.array_equal(subject.image, np.asarray(nib.load(image_path).dataobj)):
        raise RuntimeError(f"{subject_id}: the regenerated image differs from {image_path}; not the cohort's subject")
    healthy = simulate_subject(specs[subject_id], atrophy_scale=0.0, **options).image
    change = np.abs(subject.image.astype(np.float64) - healthy.astype(np.float64))
    voxel_mm3 = float(abs(np.linalg.det(subject.affine[:3, :3])))
    return subject.labels, subject.truth["volumes"]["brain_mm3"] / voxel_mm3, change


def masked(cube: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    out = cube.clone()
    out.view(-1)[voxels] = 0.0
    return out


def measure_case(predictor: Predictor, record, cohort: Path, methods, fraction: float, draws: int,
                 seed: int) -> dict:
    image_path = cohort / record.image
    cube, geometry, _ = read_scan(predictor.volume_processor, image_path)
    (prediction,) = predictor.predict([cube], [record.text])
    predicted = prediction.code
    p_before = prediction.probabilities[predicted]
    labels, brain_voxels, change = subject_truth(cohort, record.subject_id, image_path)
    atrophied = np.isin(labels, ATROPHIED_IDS)
    brain = (cube[0] != 0).view(-1).nonzero().squeeze(1)  # the voxels the model sees (the rest is 0 already)
    count = max(1, round(fraction * len(brain)))
    generator = torch.Generator().manual_seed(seed)
    random_sets = [brain[torch.randperm(len(brain), generator=generator)[:count]] for _ in range(draws)]
    samples = predictor.samples([cube], [record.text], predictor.question)
    names = cerebra_region_names()
    atrophied_names = {names[label] for label in ATROPHIED_IDS}
    result = {"subject_id": record.subject_id, "label": record.label, "predicted": predicted, "p": p_before,
              "subject_volume_share": float(atrophied.sum() / brain_voxels),
              "change_share": float(change[atrophied].sum() / max(change.sum(), 1e-30)), "methods": {}}
    top_sets = {}
    for method in methods:
        start = time.perf_counter()
        cube_map = predictor.model.explain(samples, answer=prediction.answer, method=method)[0].cpu()
        seconds = time.perf_counter() - start
        shares = region_shares(cube_map, geometry.cube_affine)
        on_scan = to_scan_grid(cube_map, geometry)
        values = cube_map.reshape(-1)[brain]
        top_sets[method] = brain[torch.argsort(values, descending=True, stable=True)[:count]]
        result["methods"][method] = {
            "template_share": sum(share for name, share in shares.items() if name in atrophied_names),
            "subject_share": float(on_scan[atrophied].sum() / max(on_scan.sum(), 1e-30)), "seconds": seconds}
    volumes = [masked(cube, top_sets[method]) for method in methods] + [masked(cube, voxels) for voxels in random_sets]
    after = [p.probabilities[predicted] for p in predictor.predict(volumes, [record.text] * len(volumes))]
    for index, method in enumerate(methods):
        result["methods"][method]["drop_top"] = p_before - after[index]
    result["drop_random"] = statistics.fmean(p_before - p for p in after[len(methods):])
    return result


def summarise(results: list[dict], methods, volume_share: float) -> dict:
    subject_volume_share = statistics.fmean(r["subject_volume_share"] for r in results)
    drop_random = statistics.fmean(r["drop_random"] for r in results)
    # the ratio's denominator: how much random deletion moves p at all (a rise counts as much as a drop)
    change_random = statistics.fmean(abs(r["drop_random"]) for r in results)
    change_shares = [r["change_share"] for r in results if "change_share" in r]
    summary = {"cases": len(results), "template_volume_share": volume_share,
               "subject_volume_share": subject_volume_share, "drop_random": drop_random,
               "change_random": change_random, "methods": {}}
    if len(change_shares) == len(results):
        summary["change_share"] = statistics.fmean(change_shares)
        summary["change_ratio"] = summary["change_share"] / subject_volume_share
    for method in methods:
        rows = [r["methods"][method] for r in results]
        template_share = statistics.fmean(row["template_share"] for row in rows)
        subject_share = statistics.fmean(row["subject_share"] for row in rows)
        drop_top = statistics.fmean(row["drop_top"] for row in rows)
        summary["methods"][method] = {
            "template_share": template_share, "template_ratio": template_share / volume_share,
            "subject_share": subject_share, "subject_ratio": subject_share / subject_volume_share,
            "drop_top": drop_top, "deletion_ratio": drop_top / change_random if change_random > 0 else float("nan"),
            "top_beats_random": statistics.fmean(float(row["drop_top"] > r["drop_random"]) for row, r in zip(rows, results)),
            "seconds_median": statistics.median(row["seconds"] for row in rows)}
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n{summary['cases']} cases; atrophied regions (MTL + lateral/inferior-lateral ventricles) are "
          f"{summary['template_volume_share']:.2%} of the template brain, {summary['subject_volume_share']:.2%} "
          f"of the subjects' (mean); random 5% deletion drops p(predicted) by {summary['drop_random']:+.4f} on average "
          f"(mean |change| per case {summary['change_random']:.4f}, the ratio's denominator)")
    print(f"{'method':<10} {'region share (template)':>24} {'ratio':>6} {'region share (own labels)':>26} "
          f"{'ratio':>6} {'top-5% drop':>12} {'/ |random|':>10} {'top > random':>12} {'s/map':>6}")
    for method, row in summary["methods"].items():
        print(f"{method:<10} {row['template_share']:>24.3f} {row['template_ratio']:>5.2f}x {row['subject_share']:>26.3f} "
              f"{row['subject_ratio']:>5.2f}x {row['drop_top']:>+12.4f} {row['deletion_ratio']:>9.1f}x "
              f"{row['top_beats_random']:>12.0%} {row['seconds_median']:>6.2f}")
    if "change_ratio" in summary:  # older --jsonl runs lack it
        print(f"{'reference':<10} {'':>24} {'':>6} {summary['change_share']:>26.3f} {summary['change_ratio']:>5.2f}x"
              "   <- the atrophy's own change |scan - scan without atrophy| as the map: what a map showing exactly "
              "the simulator's evidence scores")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=Path(".cache/demo/cohort"))
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a path or a glob (default: %(default)s)")
    parser.add_argument("--model-type", default="demo")
    parser.add_argument("--split", default="test", help="annotation file of the cohort (default: test, the held-out site)")
    parser.add_argument("--per-class", type=int, default=None, help="at most this many cases per class (default: all)")
    parser.add_argument("--methods", nargs="+", default=["gradient", "attention"], choices=["gradient", "attention"])
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", type=Path, help="also write one line per case here")
    parser.add_argument("--from-jsonl", type=Path, help="only summarise the cases of an earlier run's --jsonl")
    args = parser.parse_args(argv)
    if args.from_jsonl is not None:  # e.g. of a run stopped part-way
        lines = [json.loads(line) for line in args.from_jsonl.read_text().splitlines() if line.strip()]
        results = [line for line in lines if "summary" not in line]
        print_summary(summarise(results, list(results[0]["methods"]), template_volume_share()))
        return 0

    checkpoints = sorted(glob.glob(args.checkpoint))
    if not checkpoints:
        parser.error(f"no checkpoint matches {args.checkpoint}; run `make demo` first")
    model, volume_processor, text_processor = load_model(load_config(args.model_type, []), checkpoints[-1], "cpu")
    predictor = Predictor(model, volume_processor, text_processor, list(CLASS_NAMES), "cpu")
    records = [record for record in read_annotations(args.cohort / f"{args.split}.jsonl") if record.label]
    if args.per_class is not None:  # the first ones of each class, in file order
        records = [record for index, record in enumerate(records)
                   if sum(other.label == record.label for other in records[:index]) < args.per_class]
    print(f"{len(records)} cases of {args.cohort / args.split}.jsonl, checkpoint {checkpoints[-1]}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    volume_share = template_volume_share()
    results = []
    start = time.perf_counter()
    output = args.jsonl.open("w") if args.jsonl else None
    for index, record in enumerate(records):
        result = measure_case(predictor, record, args.cohort, args.methods, args.fraction, args.random_draws,
                              args.seed * 100_003 + index)
        results.append(result)
        if output:
            output.write(json.dumps(result) + "\n")
            output.flush()
        shown = "  ".join(f"{method}: region {row['template_share']:.3f}/{row['subject_share']:.3f}, "
                          f"drop {row['drop_top']:+.3f}" for method, row in result["methods"].items())
        print(f"[{index + 1}/{len(records)} {time.perf_counter() - start:6.0f}s] {record.subject_id} {record.label}->"
              f"{result['predicted']} p={result['p']:.3f} random drop {result['drop_random']:+.3f}  {shown}", flush=True)
    summary = summarise(results, args.methods, volume_share)
    print_summary(summary)
    if output:
        output.write(json.dumps({"summary": summary}) + "\n")
        output.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
