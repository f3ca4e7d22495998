"""The CPU demo (``make demo``): MedBLIP learns NC / MCI / AD from a simulated cohort in minutes.

1. simulate a cohort from the real ICBM-2009c brain (cached): every subject its own anatomy, atrophy on top
   of it (exaggerated ``--atrophy-scale`` times), four scanner sites; two held-out sets: ``test`` (a scanner
   site training never saw) and ``test_anatomy`` (training sites, an anatomy family training never saw);
   the scans are preprocessed into the volume cache (``python -m lavis_medblip.warm_cache``) before the first
   image model trains;
2. image + text: pretrain a small MedBLIP through ``python -m lavis_medblip.train``
   (projects/medblip/demo_pretrain.yaml) in two stages, as BLIP-2: an LM-free Q-Former stage, then the full loss;
3. the baselines, trained the same way: text only (the LM and LoRA on the EHR prompt alone, no visual prefix,
   Table 2) and image only (the EHR text emptied); a logistic regression on the EHR fields measures what the
   text holds;
4. evaluate zero-shot (projects/medblip/demo_eval.yaml), calibrated on the training sites' validation split,
   on both held-out sets, and the image + text model again with the images shuffled across subjects (does it
   read the images?);
5. print the table and write a PNG report (confusion matrices, reliability diagram, slices, loss curves).

Steps 2-4 run in two lanes at once (``--jobs 2``, the default on two or more cores): image + text in one, the
two baselines in the other, their output lines prefixed with the lane's name. The first image model's lane
preprocesses the scans while text only, which reads none, already trains. Each launch keeps the thread count of a
lone run, so the arithmetic, and the table, are those of ``--jobs 1`` to the digit (README, demo).

Every step goes through the same launchers, builders, processors, model and tasks as real cohorts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

from lavis_medblip.annotations.schema import CLASS_NAMES, read_annotations, write_annotations
from lavis_medblip.tasks.metrics import (
    Interval, balanced_accuracy_difference, classification_metrics, expected_calibration_error,
)

PROJECT_DIR = Path("projects/medblip")
HELD_OUT = {"test": "held-out scanner site", "test_anatomy": "held-out anatomy"}
BLANK_IMAGE = [f"datasets.brain_mri.vis_processor.{split}.name=mri_volume_blank" for split in ("train", "eval")]
TEXT_ONLY = ["model.prompt_order=[text,question]", *BLANK_IMAGE]
#: The image-only model: no EHR text (so no ITC(image, EHR) either).
IMAGE_ONLY = ["model.loss.lambda_itc_text=0",
              *[f"datasets.brain_mri.text_processor.{split}.name=medblip_text_blank" for split in ("train", "eval")]]
#: Stage 1 of the image models on top of demo_pretrain.yaml: no LM forward, only the ITC losses (cheap steps), 16
#: epochs. The image path learns at the yaml's tenth of the lr here too: at the full lr the random ViT's changes can
#: drive the image features to collapse, and then the ITC never leaves chance (README, Limitations).
LM_FREE_STAGE = ["model.loss.lambda_lm=0", "run.max_epoch=16"]
#: Stage 1 has learned when the epoch mean of its image-Q&A ITC fell at least this much from its first epoch to its
#: last: 0.21-0.52 in the runs that learned, 0.002 and 0.010 in two that never left chance (README, Limitations).
STAGE1_MIN_DROP = 0.05
#: The three models' options on top of demo_pretrain.yaml / demo_eval.yaml.
MODELS = {"image_text": [], "text_only": TEXT_ONLY, "image_only": IMAGE_ONLY}
#: The models that read the scans: two stages each, and the volume cache first.
IMAGE_MODELS = ("image_text", "image_only")
#: Models trained and evaluated one after another in one lane; with --jobs 2 the lanes run at once (two trainings
#: side by side get more done on 2 cores than one after the other). Balanced by their measured cost: image + text
#: alone takes about as long as the two baselines together.
LANES = (("image_text",), ("text_only", "image_only"))
#: The comparisons printed under the table, each (row, the row it is compared with); "better_baseline": whichever of
#: text only and image only scores higher on that held-out set.
COMPARISONS = {"image + text - text only": ("image_text", "text_only"),
               "image + text - better of text, image only": ("image_text", "better_baseline"),
               "image + text - images shuffled": ("image_text", "images_shuffled"),
               "text only (LM) - EHR regression": ("text_only", "ehr_regression")}
ROWS = {"image_text": "image + text", "text_only": "text only (LM)", "ehr_regression": "EHR fields (log. regression)",
        "image_only": "image only (no EHR text)", "images_shuffled": "image + text, images shuffled"}


class Demo:
    """Paths and launches of one demo run under ``root`` (``.cache/demo``)."""

    def __init__(self, root: Path, train_options: Sequence[str] = ()):
        self.root, self.cohort, self.runs = root, root / "cohort", root / "runs"
        self.train_options = list(train_options)
        self.lane_name: str | None = None  # set on a lane's copy (:meth:`lane`)
        self.volumes = VolumeCache()  # shared by the lanes' copies

    def lane(self, name: str) -> "Demo":
        """This demo's launches as one of lanes that run at once, their output lines prefixed ``[name]``."""
        twin = copy.copy(self)
        twin.lane_name = name
        return twin

    def data_options(self, splits: dict[str, Path]) -> list[str]:
        annotations = [f"datasets.brain_mri.build_info.annotations.{split}.storage={path}" for split, path in splits.items()]
        volumes = [f"datasets.brain_mri.vis_processor.{kind}.cache_dir={self.root / 'volumes'}" for kind in ("train", "eval")]
        return [*annotations, *volumes]

    def launch(self, module: str, yaml_name: str, options: Sequence[str]) -> None:
        self.run([sys.executable, "-m", module, "--cfg-path", str(PROJECT_DIR / yaml_name), "--options", *options])

    def run(self, command: Sequence[str]) -> None:
        """Run ``command`` to completion (an error if it fails); in a lane, its lines prefixed."""
        if self.lane_name is None:  # the child writes to our terminal: its progress bars redraw in place
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True)
            return
        prefix = f"[{self.lane_name}]"
        print(prefix, "$", " ".join(command), flush=True)
        # Both lanes' threads share the cores: idle ones sleep instead of spinning (spinning made a step 1.7x slower).
        # One thread per lane was faster still (11.0 against 12.3 min), but the thread count sets the order of float
        # sums, and the image models' results moved with it (README, demo).
        environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=environment) as process:
            for line in process.stdout:
                print(prefix, line, end="", flush=True)
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command)

    def train(self, name: str, options: Sequence[str]) -> Path:
        """Train into ``runs/<name>`` (emptied first); returns the run folder."""
        output_dir = self.runs / name
        shutil.rmtree(output_dir, ignore_errors=True)
        self.launch("lavis_medblip.train", "demo_pretrain.yaml",
                    [f"run.output_dir={output_dir}", *self.data_options({"train": self.cohort / "train.jsonl"}),
                     *options, *self.train_options])
        return job_dir(output_dir)

    def evaluate(self, name: str, checkpoint: Path, options: Sequence[str], test_sets: dict[str, Path]) -> dict:
        """Calibrate on ``val``, then metrics and predictions per test set, in one evaluation run."""
        output_dir = self.runs / name
        shutil.rmtree(output_dir, ignore_errors=True)
        splits = {"val": self.cohort / "val.jsonl", **test_sets}
        self.launch("lavis_medblip.evaluate", "demo_eval.yaml",
                    [f"run.output_dir={output_dir}", f"model.finetuned={checkpoint}", "run.calibration_split=val",
                     f"run.test_splits=[{','.join(test_sets)}]", *self.data_options(splits), *options])
        return read_evaluation(output_dir, test_sets)

    def train_image_model(self, name: str, options: Sequence[str], epochs: Sequence[str]) -> Path:
        """The two stages of the image models, as BLIP-2: LM-free ITC, then the full loss from its checkpoint."""
        stage1 = self.train(f"{name}_stage1", [*LM_FREE_STAGE, *options])
        return self.train(name, ["model.load_finetuned=true", f"model.finetuned={stage1 / 'checkpoint_latest.pth'}",
                                 *options, *epochs])

    def warm_volumes(self) -> None:
        """Preprocess every split's scans into the volume cache (``python -m lavis_medblip.warm_cache``), once."""
        splits = {split: self.cohort / f"{split}.jsonl" for split in ("train", "val", *HELD_OUT)}
        self.volumes.warm_once(lambda: self.launch("lavis_medblip.warm_cache", "demo_pretrain.yaml",
                                                   self.data_options(splits)))

    def train_and_evaluate(self, variant: str, epochs: Sequence[str], test_sets: dict[str, Path]) -> tuple[Path, dict]:
        """One model of the table: its run folder and its evaluation (:meth:`evaluate`)."""
        options = MODELS[variant]
        if variant in IMAGE_MODELS:
            self.warm_volumes()
            run = self.train_image_model(variant, options, epochs)
        else:
            run = self.train(variant, [*options, *epochs])
        return run, self.evaluate(f"{variant}_eval", run / "checkpoint_latest.pth", options, test_sets)


class VolumeCache:
    """The demo's volume cache, warmed once by whichever lane needs it first; the other lane waits for it (and
    gets its error, if warming failed, rather than warming again)."""

    def __init__(self):
        self._lock, self._warm, self._error = threading.Lock(), False, None

    def warm_once(self, warm: Callable[[], None]) -> None:
        with self._lock:
            if self._error is not None:
                raise self._error
            if not self._warm:
                try:
                    warm()
                except Exception as error:
                    self._error = error
                    raise
                self._warm = True


def write_shuffled(annotations: Path, seed: int) -> Path:
    """``<name>_images_shuffled.jsonl`` beside ``annotations``: the images permuted across subjects, EHR text and
    labels kept. The image-evidence control: a model whose gain over text only comes from the images gets worse on it.
    """
    records = list(read_annotations(annotations))
    images = [record.image for record in records]
    random.Random(seed).shuffle(images)
    path = annotations.with_name(f"{annotations.stem}_images_shuffled.jsonl")
    write_annotations(path, (replace(record, image=image) for record, image in zip(records, images)))
    return path


def test_sets(held_out: dict[str, Path], seed: int) -> dict[str, dict[str, Path]]:
    """Model → the sets it is evaluated on: the held-out sets, and for image + text also each with its images
    shuffled (:func:`write_shuffled`, read back by :func:`evaluation_of`)."""
    shuffled = {f"{split}_images_shuffled": write_shuffled(path, seed) for split, path in held_out.items()}
    return {variant: {**held_out, **shuffled} if variant == "image_text" else held_out for variant in MODELS}


def write_results(path: Path, rows: dict, intervals: dict[str, dict[str, Interval]], **more: dict) -> None:
    """The table's rows and differences as JSON (``results.json``), and ``more`` sections (intervals as dicts)."""
    def plain(value):
        if isinstance(value, Interval):
            return asdict(value)
        raise TypeError(f"{path}: cannot write a {type(value).__name__} as JSON")

    sections = {"rows": rows, "differences": intervals, **more}
    path.write_text(json.dumps(sections, indent=2, default=plain))


def job_dir(output_dir: Path) -> Path:
    """The run folder the launcher made under ``output_dir`` (emptied before each run)."""
    (folder,) = [path for path in output_dir.iterdir() if path.is_dir()]
    return folder


def read_evaluation(output_dir: Path, splits: Sequence[str]) -> dict:
    """An evaluation run's metrics and predictions per split (:meth:`Demo.evaluate`)."""
    result_dir = job_dir(output_dir) / "result"
    return {split: {"metrics": json.loads((result_dir / f"{split}_epochbest_metrics.json").read_text()),
                    "predictions": json.loads((result_dir / f"{split}_epochbest_predictions.json").read_text())}
            for split in splits}


def read_steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]


def stage1_warning(run_dir: Path) -> str | None:
    """A warning if stage 1's image-Q&A ITC never left chance (:data:`STAGE1_MIN_DROP`), else None."""
    steps = read_steps(run_dir)
    first, last = (statistics.fmean(step["loss_itc_qa"] for step in steps if step["epoch"] == epoch)
                   for epoch in (steps[0]["epoch"], steps[-1]["epoch"]))
    if first - last >= STAGE1_MIN_DROP:
        return None
    return (f"WARNING: stage 1 did not learn ({run_dir}: its image-Q&A ITC averaged {first:.3f} in its first epoch and "
            f"{last:.3f} in its last; chance is ln(batch size)), so the image rows are those of an untrained image "
            f"path. Its first learning can fail with some seeds (README, Limitations): rerun with another --train-seed.")


def ehr_regression(train: Path, test_sets: dict[str, Path]) -> dict:
    """The EHR regression row: fitted on ``train``, an evaluation (metrics, predictions) per test set."""
    from lavis_medblip.baselines import EHRLogisticRegression

    model = EHRLogisticRegression().fit(list(read_annotations(train)))
    return {split: model.evaluation(list(read_annotations(path))) for split, path in test_sets.items()}


def evaluation_of(results: dict, row: str, split: str) -> dict:
    """The metrics and predictions behind one cell of the table."""
    if row == "images_shuffled":  # the image + text model on that set with its images shuffled
        return results["image_text"][f"{split}_images_shuffled"]
    return results[row][split]


def table_rows(results: dict) -> dict[str, dict[str, dict]]:
    """Row name → held-out set → metrics."""
    return {row: {split: evaluation_of(results, row, split)["metrics"] for split in HELD_OUT} for row in ROWS}


def paired_difference(evaluation: dict, other: dict) -> Interval:
    """Balanced accuracy of one evaluation minus another's on the subjects both scored (a skipped scan: in
    neither), with its paired-bootstrap interval; each as the evaluation task writes it (metrics, predictions)."""
    predicted, other_predicted = ({p["instance_id"]: (p["label"], p["prediction"]) for p in e["predictions"]}
                                  for e in (evaluation, other))
    subjects = sorted(predicted.keys() & other_predicted.keys())
    return balanced_accuracy_difference([predicted[subject][0] for subject in subjects],
                                        [predicted[subject][1] for subject in subjects],
                                        [other_predicted[subject][1] for subject in subjects])


def pooled_evaluation(evaluations: dict[str, dict]) -> dict:
    """Evaluations of one model on several sets as one (as the evaluation task writes them: ``metrics``,
    ``predictions``), keyed by a name per set: each subject's id prefixed with its set's name (two cohorts
    number their subjects alike), the metrics recomputed as the task computes them (AUROC from the scores; a
    baseline's scores are its probabilities; ECE from the probabilities)."""
    rows = [dict(row, instance_id=f"{name}/{row['instance_id']}")
            for name, evaluation in evaluations.items() for row in evaluation["predictions"]]
    labels = [row["label"] for row in rows]
    metrics = classification_metrics(labels, [row["prediction"] for row in rows], CLASS_NAMES,
                                      scores=[row.get("scores", row["probs"]) for row in rows])
    metrics["ece"] = expected_calibration_error([row["probs"] for row in rows], labels)
    return {"metrics": metrics, "predictions": rows}


def differences(results: dict) -> dict[str, dict[str, Interval]]:
    """Held-out set → comparison (:data:`COMPARISONS`) → the difference in balanced accuracy, with its interval."""
    table = {}
    for split in HELD_OUT:
        better_baseline = max(("text_only", "image_only"),
                              key=lambda row: evaluation_of(results, row, split)["metrics"]["balanced_accuracy"])
        table[split] = {}
        for name, (row, other) in COMPARISONS.items():
            other = better_baseline if other == "better_baseline" else other
            table[split][name] = paired_difference(evaluation_of(results, row, split),
                                                   evaluation_of(results, other, split))
    return table


TABLE_COLUMNS = (("balanced_accuracy", "bal acc"), ("macro_f1", "macro-F1"), ("macro_auroc", "AUROC"), ("ece", "ECE"))


def table_line(name: str, per_split: dict[str, dict]) -> str:
    """One row of the table: its name, then its metrics on each held-out set."""
    return f"{name:<32}" + "".join("    " + "".join(f"{per_split[split][key]:>9.3f}" for key, _ in TABLE_COLUMNS)
                                   for split in HELD_OUT)


def difference_line(name: str, per_split: dict[str, Interval]) -> str:
    """One difference in balanced accuracy, in points with its interval, on each held-out set."""
    return f"{name:<44}" + "".join(f"{f'{100 * i.estimate:+.1f} [{100 * i.low:+.1f}, {100 * i.high:+.1f}]':>27}"
                                   for i in (per_split[split] for split in HELD_OUT))


def print_table(rows: dict[str, dict[str, dict]], intervals: dict[str, dict[str, Interval]]) -> None:
    block = "".join(f"{title:>9}" for _, title in TABLE_COLUMNS)
    print("\nZero-shot NC / MCI / AD (probabilities calibrated on the training sites' validation split)")
    print(f"{'':<32}" + "".join(f"{HELD_OUT[split] + ' (n=' + str(rows['image_text'][split]['num_samples']) + ')':>37}"
                              for split in HELD_OUT))
    print(f"{'model':<32}" + f"    {block}" * len(HELD_OUT))
    for row, per_split in rows.items():
        print(table_line(ROWS[row], per_split))
    print("\nDifferences in balanced accuracy, points [95% interval of a paired bootstrap over the held-out subjects:\n"
          "the evaluation's noise only; training seeds and the CPU move the rows too (README, demo)]")
    print(f"{'':<44}" + "".join(f"{HELD_OUT[split]:>27}" for split in HELD_OUT))
    for name in COMPARISONS:
        print(difference_line(name, {split: intervals[split][name] for split in HELD_OUT}))
    print()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/demo"), help="cohort, volume cache, runs, report")
    parser.add_argument("--subjects-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atrophy-scale", type=float, default=2.5, help="exaggerates the simulated atrophy")
    parser.add_argument("--ehr-informativeness", type=float, default=0.5,
                        help="the simulator's kappa: how much the EHR fields differ between classes (0 to 1)")
    parser.add_argument("--max-epoch", type=int, default=None, help="override demo_pretrain.yaml's run.max_epoch")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="override the yaml's run.seed (training order and dropout; the cohort keeps --seed)")
    parser.add_argument("--jobs", type=int, default=min(len(LANES), os.cpu_count() or 1),
                        help=f"lanes of models trained at once (1 to {len(LANES)}), sharing the cores")
    args = parser.parse_args(argv)
    start, timings = time.time(), {}
    demo = Demo(args.root, [f"run.seed={args.train_seed}"] if args.train_seed is not None else [])
    epochs = [f"run.max_epoch={args.max_epoch}"] if args.max_epoch else []

    # 1. the cohort (the simulator is a checkout tool, never imported by the package: run its CLI) and its scans
    simulate = [sys.executable, "-m", "dataset_builders.simulate_cohort", "--out", str(demo.cohort),
                "--subjects-per-class", str(args.subjects_per_class), "--seed", str(args.seed),
                "--atrophy-scale", str(args.atrophy_scale), "--ehr-informativeness", str(args.ehr_informativeness),
                "--workers", "2"]
    demo.run(simulate)
    held_out = {split: demo.cohort / f"{split}.jsonl" for split in HELD_OUT}
    evaluated_on = test_sets(held_out, args.seed)
    timings["cohort"] = time.time() - start

    # 2-4. preprocess the scans, train and evaluate the three models, in lanes; image + text also on shuffled images
    jobs = max(1, min(args.jobs, len(LANES)))

    def run_lane(lane: Sequence[str]) -> dict[str, tuple[Path, dict]]:
        launcher = demo if jobs == 1 else demo.lane("+".join(lane))
        return {variant: launcher.train_and_evaluate(variant, epochs, evaluated_on[variant]) for variant in lane}

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        trained = {variant: done for lane in pool.map(run_lane, LANES) for variant, done in lane.items()}
    results: dict = {variant: evaluation for variant, (_, evaluation) in trained.items()}
    results["steps"] = {variant: read_steps(run_dir) for variant, (run_dir, _) in trained.items()}
    results["ehr_regression"] = ehr_regression(demo.cohort / "train.jsonl", held_out)
    lanes = f"{jobs} lane{'s' * (jobs > 1)}"
    timings[f"scans, training and evaluation ({lanes})"] = time.time() - start - sum(timings.values())

    # 5. the table and the pictures
    rows, intervals = table_rows(results), differences(results)
    print_table(rows, intervals)
    for warning in filter(None, (stage1_warning(job_dir(demo.runs / f"{variant}_stage1")) for variant in IMAGE_MODELS)):
        print(warning, "\n")
    from omegaconf import OmegaConf

    from lavis_medblip.cli.demo_report import write_report  # here: it imports this module's names
    from lavis_medblip.models import MedBLIP, precision  # here: torch and transformers
    from lavis_medblip.models.config import MedBLIPConfig

    report = write_report(demo.cohort, results, rows, demo.root / "report.png")
    write_results(demo.root / "results.json", rows, intervals)
    demo_model = MedBLIPConfig.from_dict(OmegaConf.load(MedBLIP.default_config_path("demo")).model)
    print(precision.describe(demo_model.lm))  # the LM's arithmetic moves the rows
    print("minutes: " + ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in timings.items()))
    print(f"report: {report}  metrics: {demo.root / 'results.json'}  ({(time.time() - start) / 60:.1f} min)")
    print("the same models on 300 more held-out subjects per set: python benchmarks/demo_on_fresh_subjects.py")


if __name__ == "__main__":
    main()
