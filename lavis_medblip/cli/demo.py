"""The CPU demo (``make demo``): MedBLIP learns NC / MCI / AD from a simulated cohort in minutes.

1. simulate an atrophy cohort from the real ICBM-2009c brain (cached), with a held-out scanner site
   (the atrophy exaggerated ``--atrophy-scale`` times, 2.5 by default: see README, limitations), and
   preprocess its scans into the volume cache (``python -m lavis_medblip.warm_cache``, on every core);
2. pretrain a small MedBLIP through ``python -m lavis_medblip.train`` (projects/medblip/demo_pretrain.yaml)
   in two stages, as BLIP-2: an LM-free Q-Former stage (ITC only), then the full loss from its checkpoint;
3. train the same model the same way with the image blanked (``mri_volume_blank``): the text-only baseline;
4. evaluate both zero-shot on the held-out site (projects/medblip/demo_eval.yaml), and the image + text
   model once more with the images shuffled across subjects (does its gain come from the images?);
5. print a table and write a PNG report (confusion matrices, example slices with probabilities, loss curves).

Every step goes through the same launchers, builders, processors, model and tasks as real cohorts.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lavis_medblip.annotations.schema import read_annotations, write_annotations

DEMO_ROOT = Path(".cache/demo")
COHORT_DIR = DEMO_ROOT / "cohort"
RUNS_DIR = DEMO_ROOT / "runs"
PROJECT_DIR = Path("projects/medblip")
BLANK_IMAGE = [f"datasets.brain_mri.vis_processor.{split}.name=mri_volume_blank" for split in ("train", "eval")]
VARIANTS = {"image_text": [], "text_only": BLANK_IMAGE}
#: Stage 1 on top of demo_pretrain.yaml: no LM forward, only the two ITC losses (cheap steps, many of them).
LM_FREE_STAGE = ["model.loss.lambda_lm=0", "run.max_epoch=8"]


def run(module: str, cfg_path: Path, options: list[str]) -> None:
    command = [sys.executable, "-m", module, "--cfg-path", str(cfg_path), "--options", *options]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def job_dir(output_dir: Path) -> Path:
    """The run folder the launcher made under ``output_dir`` (we empty it before each run)."""
    (folder,) = [path for path in output_dir.iterdir() if path.is_dir()]
    return folder


def write_shuffled_test(seed: int) -> Path:
    """The held-out annotations with the images permuted across subjects (EHR text and labels kept).

    The image-evidence control: a model whose gain over text only comes from the images gets worse
    on it; a gain that survives it comes from something else (e.g. any non-blank visual prefix).
    """
    records = list(read_annotations(COHORT_DIR / "test.jsonl"))
    images = [record.image for record in records]
    random.Random(seed).shuffle(images)
    path = COHORT_DIR / "test_images_shuffled.jsonl"
    write_annotations(path, (replace(record, image=image) for record, image in zip(records, images)))
    return path


def evaluate(checkpoint: Path, options: list[str], name: str, more_test_sets: dict[str, Path] | None = None) -> dict:
    """Metrics and predictions on the held-out site (``test``), and on ``more_test_sets`` in the same run."""
    eval_dir = RUNS_DIR / name
    shutil.rmtree(eval_dir, ignore_errors=True)
    splits = {"test": None, **(more_test_sets or {})}
    annotations = [f"datasets.brain_mri.build_info.annotations.{split}.storage={path}"
                   for split, path in splits.items() if path is not None]
    run("lavis_medblip.evaluate", PROJECT_DIR / "demo_eval.yaml",
        [f"run.output_dir={eval_dir}", f"model.finetuned={checkpoint}", *options, *annotations,
         f"run.test_splits=[{','.join(splits)}]"])
    result_dir = job_dir(eval_dir) / "result"
    return {split: {"metrics": json.loads((result_dir / f"{split}_epochbest_metrics.json").read_text()),
                    "predictions": json.loads((result_dir / f"{split}_epochbest_predictions.json").read_text())}
            for split in splits}


def warm_volume_cache() -> None:
    """Register and resample every scan once, on every core, before training reads them from the cache."""
    test = f"datasets.brain_mri.build_info.annotations.test.storage={COHORT_DIR / 'test.jsonl'}"
    run("lavis_medblip.warm_cache", PROJECT_DIR / "demo_pretrain.yaml", [test])


def train_and_evaluate(variant: str, options: list[str], max_epoch: int | None, shuffled_test: Path) -> dict:
    stage1_dir, train_dir = RUNS_DIR / f"{variant}_stage1", RUNS_DIR / variant
    for folder in (stage1_dir, train_dir):
        shutil.rmtree(folder, ignore_errors=True)
    run("lavis_medblip.train", PROJECT_DIR / "demo_pretrain.yaml",
        [f"run.output_dir={stage1_dir}", *LM_FREE_STAGE, *options])
    stage1 = job_dir(stage1_dir) / "checkpoint_latest.pth"
    epochs = [f"run.max_epoch={max_epoch}"] if max_epoch else []
    run("lavis_medblip.train", PROJECT_DIR / "demo_pretrain.yaml",
        [f"run.output_dir={train_dir}", "model.load_finetuned=true", f"model.finetuned={stage1}", *epochs, *options])
    checkpoint = job_dir(train_dir) / "checkpoint_latest.pth"
    # the image + text model is evaluated on the shuffled images too, in the same run
    more_test_sets = {"test_images_shuffled": shuffled_test} if variant == "image_text" else None
    results = evaluate(checkpoint, options, f"{variant}_eval", more_test_sets)
    result = results["test"]
    if variant == "image_text":
        result["shuffled_metrics"] = results["test_images_shuffled"]["metrics"]
    steps = [json.loads(line) for line in (job_dir(train_dir) / "train_steps.jsonl").read_text().splitlines()]
    return {**result, "steps": steps}


def print_table(results: dict[str, dict]) -> None:
    rows = {variant: result["metrics"] for variant, result in results.items()}
    rows["image_text, images shuffled"] = results["image_text"]["shuffled_metrics"]
    print("\nZero-shot NC / MCI / AD on the held-out scanner site")
    print(f"{'model':<28}{'accuracy':>10}{'balanced acc':>14}{'macro-F1':>10}{'macro AUROC':>13}{'n':>5}")
    for name, m in rows.items():
        print(f"{name:<28}{m['accuracy']:>10.3f}{m['balanced_accuracy']:>14.3f}{m['macro_f1']:>10.3f}"
              f"{m['macro_auroc']:>13.3f}{m['num_samples']:>5d}")
    image_text = rows["image_text"]["balanced_accuracy"]
    print(f"image + text over text only: {100 * (image_text - rows['text_only']['balanced_accuracy']):+.1f} points of "
          f"balanced accuracy; over the same model with shuffled images: "
          f"{100 * (image_text - rows['image_text, images shuffled']['balanced_accuracy']):+.1f}\n")


def write_report(results: dict[str, dict], path: Path) -> Path:
    from matplotlib.figure import Figure
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    from lavis_medblip.models.config import load_model_config
    from lavis_medblip.visualize import draw_confusion_matrix, draw_loss_curves, draw_probabilities, draw_slices

    records = {record.subject_id: record for record in read_annotations(COHORT_DIR / "test.jsonl")}
    # the demo model's preprocessing, at twice the size for the pictures, in intensities (not deviations)
    preprocess = load_model_config("demo").preprocess
    processor_cfg = OmegaConf.create(OmegaConf.to_container(preprocess.vis_processor.eval, resolve=True))
    processor_cfg.image_size, processor_cfg.template_deviation_scale = 96, None
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    class_names = results["image_text"]["metrics"]["confusion_matrix"]["labels"]

    figure = Figure(figsize=(15, 11))
    grid = figure.add_gridspec(4, 4)
    for column, (variant, result) in enumerate(results.items()):
        draw_confusion_matrix(figure.add_subplot(grid[0, column]), result["metrics"]["confusion_matrix"],
                              f"{variant}: balanced accuracy {result['metrics']['balanced_accuracy']:.2f}")
    draw_loss_curves(figure.add_subplot(grid[0, 2:]),
                     {f"{variant} LM loss": [step["loss_lm"] for step in result["steps"]]
                      for variant, result in results.items()})
    for row, example in enumerate(results["image_text"]["predictions"][:3], start=1):
        record = records[example["instance_id"].split("/")[0]]
        volume = processor(str(COHORT_DIR / record.image))[0].numpy()
        draw_slices([figure.add_subplot(grid[row, column]) for column in range(3)], volume,
                    f"{record.subject_id} ({record.label})")
        draw_probabilities(figure.add_subplot(grid[row, 3]), example["probs"], class_names,
                           f"image + text: {class_names[example['prediction']]}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atrophy-scale", type=float, default=2.5, help="exaggerates the simulated atrophy")
    parser.add_argument("--max-epoch", type=int, default=None, help="override demo_pretrain.yaml's run.max_epoch")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="override the yaml's run.seed (training order and dropout; the cohort keeps --seed)")
    args = parser.parse_args(argv)
    start = time.time()

    # The simulator is a checkout tool (dataset_builders/), never imported by the package: run its CLI.
    simulate = [sys.executable, "-m", "dataset_builders.simulate_cohort", "--out", str(COHORT_DIR),
                "--subjects-per-class", str(args.subjects_per_class), "--seed", str(args.seed),
                "--atrophy-scale", str(args.atrophy_scale), "--workers", "2"]
    print("$", " ".join(simulate), flush=True)
    subprocess.run(simulate, check=True)
    shuffled_test = write_shuffled_test(args.seed)
    warm_volume_cache()
    seed = [f"run.seed={args.train_seed}"] if args.train_seed is not None else []
    results = {variant: train_and_evaluate(variant, [*options, *seed], args.max_epoch, shuffled_test)
               for variant, options in VARIANTS.items()}
    print_table(results)
    report = write_report(results, DEMO_ROOT / "report.png")
    metrics = {variant: result["metrics"] for variant, result in results.items()}
    metrics["image_text_images_shuffled"] = results["image_text"]["shuffled_metrics"]
    (DEMO_ROOT / "results.json").write_text(json.dumps(metrics, indent=2))
    print(f"report: {report}  metrics: {DEMO_ROOT / 'results.json'}  ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
