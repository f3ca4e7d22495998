"""Diagnose brain MRI scans with a trained MedBLIP: ``python -m lavis_medblip.predict``.

One scan (prints the diagnosis and class probabilities; ``--explain`` adds a generated explanation,
``--report`` a PNG with three slices and the probabilities)::

    python -m lavis_medblip.predict --model-type biomedlm_lora --checkpoint ckpt.pth --explain --report out.png \\
        --image scan.nii.gz --text "A 75-year-old female. MMSE 24/30 (6 points below the maximum, mild dementia range)."

Many scans (writes a CSV ``id,image,prediction,answer,p_<class>...[,explanation],error,warning``)::

    python -m lavis_medblip.predict --model-type demo --checkpoint ckpt.pth --image scans_dir/ --output results.csv
    python -m lavis_medblip.predict --model-type demo --checkpoint ckpt.pth --csv cases.csv --output results.csv

A model bundle folder (:mod:`lavis_medblip.models.bundle`) replaces ``--model-type``/``--checkpoint``::

    python -m lavis_medblip.predict --model bundles/demo --image scan.nii.gz \\
        --text "A 75-year-old female. MMSE 24/30 (6 points below the maximum, mild dementia range)."

``--relevance DIR`` writes each case's relevance map (``DIR/<id>_relevance.nii.gz``, the scan's grid and affine; with
``--report``, drawn on the slices) and a ``top_regions`` column: :mod:`lavis_medblip.relevance`.

The probabilities, and what counts as a scan: :mod:`lavis_medblip.inference`. A checkpoint that holds a
calibration (``checkpoint_calibrated.pth`` of a run with ``run.calibration_split``) gives calibrated probabilities
and predictions; ``--uncalibrated`` shows the raw ones.

The results file is written whole or not at all (:func:`write_results`): a run that stops (``--on-error raise``,
a crash, Ctrl-C) leaves an existing file as it was.
An ``error`` row is a scan that could not be read; a ``warning`` is a scan that was read and diagnosed but is
unlikely to be usable (constant, mostly NaN/Inf: a ``DegenerateVolumeWarning`` of the volume processor).

``--image`` names one scan when it is a file or a DICOM-series folder with no other scans in it;
any other folder is a folder of scans.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO, TypeVar

from tqdm import tqdm

from lavis_medblip.annotations.ehr import EXPLAIN_QUESTION
from lavis_medblip.annotations.schema import CLASS_NAMES
from lavis_medblip.cli.arguments import check_checkpoint

if TYPE_CHECKING:
    from lavis_medblip.inference import Case, Prediction, Predictor
    from lavis_medblip.processors.volume_types import VolumeReadError

# LAVIS and torch load where used, after the command line is checked (cli/arguments.py says why).

# ---- running ----------------------------------------------------------------------------------------


def result_columns(classes: Sequence[str], explain: bool, relevance: bool = False) -> list[str]:
    return (["id", "image", "prediction", "answer"] + [f"p_{code}" for code in classes]
            + (["explanation"] if explain else []) + (["top_regions"] if relevance else []) + ["error", "warning"])


@dataclass
class RelevanceOutput:
    """``--relevance DIR``: each diagnosed case's map as ``DIR/<id>_relevance.nii.gz``, and its top regions."""

    directory: Path
    method: str = "gradient"

    def write(self, predictor: Predictor, case: Case, prediction: Prediction) -> Any:
        """Explain ``prediction`` of ``case`` and write the map; returns the ``ScanRelevance``."""
        from lavis_medblip.relevance import explain_scan, relevance_path
        relevance = explain_scan(predictor, case.path, case.text, self.method, prediction=prediction)
        relevance.image.to_filename(str(relevance_path(self.directory, case.case_id, make_folders=True)))
        return relevance


def result_row(case: Case, prediction: Prediction | None = None, error: str = "", warning: str = "") -> dict[str, str]:
    row = {"id": case.case_id, "image": case.image, "error": error, "warning": warning}
    if prediction is not None:
        row.update(prediction=prediction.code, answer=prediction.answer,
                   **{f"p_{code}": f"{p:.6f}" for code, p in prediction.probabilities.items()})
        if prediction.explanation is not None:
            row["explanation"] = prediction.explanation
    return row


def results_writer(predictor: Predictor, output: TextIO, relevance: bool = False) -> csv.DictWriter:
    writer = csv.DictWriter(output, fieldnames=result_columns(predictor.classes, predictor.explain, relevance),
                            restval="")
    writer.writeheader()
    return writer


def write_rows(predictor: Predictor, output: TextIO, rows: Sequence[dict[str, str]], relevance: bool = False) -> int:
    results_writer(predictor, output, relevance).writerows(rows)
    return len(rows)


@dataclass
class Tally:
    diagnosed: int = 0
    failed: int = 0  # could not be read
    warned: int = 0  # diagnosed, with a warning


class PredictionStopped(Exception):
    """``--on-error raise`` met an unreadable scan: ``errors`` of its batch, ``diagnosed`` of ``total`` done."""

    def __init__(self, errors: Sequence[VolumeReadError], diagnosed: int, total: int) -> None:
        self.errors, self.diagnosed, self.total = list(errors), diagnosed, total
        others = "".join(f"; also unreadable: {error}" for error in errors[1:])
        super().__init__(f"cannot read scan {errors[0]}{others}; stopped with {diagnosed} of {total} scans diagnosed")


def run_batch(predictor: Predictor, cases: Sequence[Case], output: TextIO, batch_size: int, on_error: str,
              relevance: RelevanceOutput | None = None, workers: int = 0) -> Tally:
    """Write one result row per case to ``output`` (and with ``relevance`` each diagnosed case's map);
    ``workers`` processes read and preprocess the next batches meanwhile.

    With ``on_error="raise"`` the batch holding the first unreadable scan is still read and scored
    whole, its diagnosed rows written, and then :class:`PredictionStopped` names every failure in it.
    """
    from lavis_medblip.relevance import format_regions
    writer = results_writer(predictor, output, relevance is not None)
    tally = Tally()
    with tqdm(total=len(cases), unit="scan", desc="diagnosing", file=sys.stderr) as progress:
        for batch, scans in predictor.read_batches(cases, batch_size, workers):
            readable = [index for index, scan in enumerate(scans) if scan.error is None]
            predictions: dict[int, Prediction] = {}
            if readable:
                scored = predictor.predict([scans[index].volume for index in readable],
                                           [batch[index].text for index in readable])
                predictions = dict(zip(readable, scored))
            rows = [result_row(case, predictions[index], warning=scan.warning) if index in predictions
                    else result_row(case, error=str(scan.error))
                    for index, (case, scan) in enumerate(zip(batch, scans))]
            for index, prediction in predictions.items() if relevance is not None else ():
                explained = relevance.write(predictor, batch[index], prediction)
                rows[index]["top_regions"] = format_regions(explained.top_regions)
            for scan in scans:
                if scan.error is not None:
                    progress.write(f"could not read {scan.error}", file=sys.stderr)
                elif scan.warning:
                    progress.write(f"warning: {scan.warning}", file=sys.stderr)
            errors = [scan.error for scan in scans if scan.error is not None]
            tally.diagnosed += len(readable)
            tally.warned += sum(1 for index in readable if scans[index].warning)
            if errors and on_error == "raise":
                writer.writerows(rows[index] for index in readable)
                raise PredictionStopped(errors, tally.diagnosed, len(cases))
            tally.failed += len(errors)
            writer.writerows(rows)
            output.flush()  # rows on stdout show up as they are done
            progress.update(len(batch))
    return tally


Written = TypeVar("Written")


def write_results(path: Path | None, write: Callable[[TextIO], Written]) -> Written:
    """Call ``write`` with the results file at ``path`` (stdout when None); returns its result.

    The file is replaced only when ``write`` succeeds (see :func:`lavis_medblip.storage.atomic_file`).
    """
    from lavis_medblip.storage import atomic_file
    if path is None:
        return write(sys.stdout)
    with atomic_file(path, "w", newline="", encoding="utf-8") as output:
        return write(output)


def run_single(predictor: Predictor, case: Case, report: Path | None, output: TextIO,
               relevance: RelevanceOutput | None = None) -> dict[str, str]:
    """Print the diagnosis of one scan and return its results row (raises ``VolumeReadError`` naming the file)."""
    from lavis_medblip.relevance import format_regions, relevance_path
    from lavis_medblip.visualize import plot_volume_report
    scan = predictor.read(case)
    if scan.error is not None:
        raise scan.error
    (prediction,) = predictor.predict([scan.volume], [case.text])
    print(f"scan: {case.image}", file=output)
    if scan.warning:
        print(f"warning: {scan.warning}", file=output)
    print(f"diagnosis: {prediction.code} ({prediction.answer})", file=output)
    print("probabilities:", file=output)
    width = max(len(answer) for answer in predictor.answers)
    for code, answer in zip(predictor.classes, predictor.answers):
        print(f"  {code:<4} {answer:<{width}}  {prediction.probabilities[code]:.4f}", file=output)
    if prediction.explanation is not None:
        print(f"explanation: {prediction.explanation}", file=output)
    explained = None if relevance is None else relevance.write(predictor, case, prediction)
    if explained is not None:
        print(f"relevance ({explained.method}, of {explained.answer!r}): {relevance_path(relevance.directory, case.case_id)}"
              f"\ntop regions: {format_regions(explained.top_regions[:5])}", file=output)
    if report is not None:
        probabilities = [prediction.probabilities[code] for code in predictor.classes]
        title = f"{Path(case.image).name}: {prediction.code} ({prediction.answer}), p={max(probabilities):.2f}"
        overlay = None if explained is None else explained.model_space.numpy()  # both on the model's grid
        plot_volume_report(scan.volume[0].float().cpu().numpy(), probabilities, predictor.classes, report, title,
                           overlay)
        print(f"report: {report}", file=output)
    row = result_row(case, prediction, warning=scan.warning)
    return row if explained is None else {**row, "top_regions": format_regions(explained.top_regions)}


def summary(tally: Tally, total: int, output: Path | None, skipped_rows: int) -> str:
    where = f" to {output}" if output is not None else ""
    parts = [f"{tally.diagnosed} of {total} scans diagnosed{where}",
             f"{tally.failed} could not be read" + (" (see the error column)" if tally.failed else "")]
    if tally.warned:
        parts.append(f"{tally.warned} with a warning (see the warning column)")
    if skipped_rows:
        parts.append(f"{skipped_rows} CSV row(s) skipped (listed above)")
    return "; ".join(parts)


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_medblip.predict",
        description="Diagnose 3D brain MRI scans (NC / MCI / AD) with a trained MedBLIP, "
                    "from the scan and a short EHR text.",
        epilog="Folders are searched recursively for .nii/.nii.gz/.mgh/.mgz/.npy files and DICOM-series "
               "folders (folders holding .dcm/.ima files or files with the DICM marker). "
               "Example: python -m lavis_medblip.predict --model-type demo --checkpoint ckpt.pth --image scan.nii.gz "
               "--text 'A 75-year-old female. MMSE 24/30 (6 points below the maximum, mild dementia range).'",
    )
    model = parser.add_argument_group("model (--model-type [--checkpoint], or --model)")
    which = model.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-type",
                       help="registered MedBLIP model type, e.g. biomedlm_lora, biogpt_lora, flant5xl_lora, demo, tiny")
    which.add_argument("--model", type=Path, metavar="DIR",
                       help="a model bundle folder (save_pretrained, python -m lavis_medblip.export, or a Hugging Face "
                            "snapshot): its config, trained weights and calibration; not with --checkpoint")
    model.add_argument("--checkpoint", help="trained checkpoint (.pth) of the model's trainable parameters")
    model.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                       help="override model config keys, e.g. lm.model=/models/BioMedLM qformer.bert=/models/bert "
                            "(repeatable)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--uncalibrated", action="store_true",
                       help="the raw likelihood-ranking probabilities even when the checkpoint holds a calibration")

    inputs = parser.add_argument_group("input (one of)")
    source = inputs.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path,
                        help="one scan (file or DICOM-series folder), or a folder of scans")
    source.add_argument("--csv", type=Path,
                        help="CSV with columns image,text (+ optional id); image paths relative to the CSV's folder")
    inputs.add_argument("--text", default="",
                        help="EHR text for --image (one text for every scan of a folder), worded as describe_ehr writes it")

    asking = parser.add_argument_group("what to ask")
    asking.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="classes to rank, from NC MCI AD (default: all three; e.g. NC AD for a binary cohort)")
    asking.add_argument("--question", help="question for the diagnosis (default: the model config's question)")
    asking.add_argument("--explain", action="store_true", help="also generate a free-text explanation")
    asking.add_argument("--explain-question", default=EXPLAIN_QUESTION,
                        help="question asked for --explain (default: %(default)r)")
    asking.add_argument("--max-new-tokens", type=int, default=64, help="length limit of the explanation (default: 64)")

    outputs = parser.add_argument_group("output")
    outputs.add_argument("--output", type=Path,
                         help="results CSV (id,image,prediction,answer,p_<class>...,error,warning), replaced only "
                              "when the run succeeds; for a folder or --csv the default is stdout, for one scan "
                              "the default is none")
    outputs.add_argument("--report", type=Path, help="one scan only: write a PNG with slices (with --relevance, "
                                                      "the map on them) and probabilities")
    outputs.add_argument("--relevance", type=Path, metavar="DIR",
                         help="write each case's relevance map as DIR/<id>_relevance.nii.gz (the scan's grid and "
                              "affine) and add a top_regions column (CerebrA regions, share of the relevance)")
    outputs.add_argument("--relevance-method", choices=("gradient", "attention"), default="gradient",
                         help="gradient x input of the predicted answer's score (default), or Q-Former attention")
    outputs.add_argument("--batch-size", type=int, default=4, help="scans per forward pass (default: 4)")
    outputs.add_argument("--workers", type=int, default=2,
                         help="processes that read and preprocess the next scans while the model runs (default: 2; "
                              "0 reads in this process)")
    outputs.add_argument("--cache-dir", type=Path,
                         help="keep preprocessed volumes here, keyed by file content and preprocessing settings, so "
                              "a scan seen before (in this run or another, by training or predict) is not redone")
    outputs.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                         help="a scan that cannot be read, or a --csv row with a missing or extra field: 'skip' "
                              "records the scan in the error column and the row as a line on stderr, and goes on "
                              "(default); 'raise' stops with a message naming the file (and line), leaving "
                              "--output as it was")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is not None and args.checkpoint is not None:
        parser.error("--checkpoint goes with --model-type; a --model folder holds its own weights")
    check_checkpoint(parser, args.checkpoint)
    args.classes = list(args.classes or CLASS_NAMES)
    unknown = [code for code in args.classes if code not in CLASS_NAMES]
    if unknown or len(set(args.classes)) != len(args.classes) or len(args.classes) < 2:
        parser.error(f"--classes takes two or more distinct codes from {list(CLASS_NAMES)}, got {args.classes}")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    source = args.image if args.image is not None else args.csv
    if not source.exists():
        parser.error(f"{source}: no such file or directory")
    if args.csv is not None and not args.csv.is_file():
        parser.error(f"--csv {args.csv}: not a file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    from lavis_medblip.inference import (
        Case, Predictor, cases_from_csv, cases_from_folder, load_model, model_source, names_one_scan, resolve_device,
    )
    from lavis_medblip.models.calibration import Calibration
    from lavis_medblip.models.weights import CheckpointError
    from lavis_medblip.processors.volume_types import VolumeReadError

    single = args.image is not None and names_one_scan(args.image)
    skipped_rows: list[str] = []
    if args.report is not None and not single:
        parser.error("--report works with one scan (--image FILE)")
    if single:
        cases = [Case(case_id=args.image.name, image=str(args.image), path=args.image, text=args.text)]
    elif args.image is not None:
        cases = cases_from_folder(args.image, args.text)
        if not cases:
            parser.error(f"{args.image}: no scans found (see --help for what counts as a scan)")
    else:
        try:
            from_csv = cases_from_csv(args.csv, skip_bad_rows=args.on_error == "skip")
        except ValueError as error:
            parser.error(str(error))
        cases, skipped_rows = from_csv.cases, from_csv.skipped
        for message in skipped_rows:
            print(f"skipped row {message}", file=sys.stderr)
        if not cases and skipped_rows:
            parser.error(f"{args.csv}: no usable rows ({len(skipped_rows)} skipped)")

    try:
        config, weights = model_source(args.model_type, args.checkpoint, args.model, args.options)
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    except CheckpointError as error:
        print(f"error: cannot load the model bundle {error}", file=sys.stderr)
        return 1
    if args.cache_dir is not None:
        config.preprocess.vis_processor.eval.cache_dir = str(args.cache_dir)
    try:
        model, volume_processor, text_processor = load_model(config, weights, device)
    except CheckpointError as error:
        print(f"error: cannot load the checkpoint {error}", file=sys.stderr)
        return 1
    if args.uncalibrated:
        model.calibration = Calibration()
    elif not model.calibration.is_identity:
        print(f"calibrated probabilities: {model.calibration.describe()}; --uncalibrated for the raw ones",
              file=sys.stderr)
    relevance = None if args.relevance is None else RelevanceOutput(args.relevance, args.relevance_method)
    if relevance is not None and not model.config.uses_image:
        print(f"error: --relevance needs a model that reads images (prompt_order {model.config.prompt_order})",
              file=sys.stderr)
        return 2
    predictor = Predictor(model, volume_processor, text_processor, args.classes, device, question=args.question,
                          explain=args.explain, explain_question=args.explain_question,
                          max_new_tokens=args.max_new_tokens)

    try:
        if single:
            row = run_single(predictor, cases[0], args.report, sys.stdout, relevance)
            if args.output is not None:
                write_results(args.output, lambda output: write_rows(predictor, output, [row], relevance is not None))
            return 0
        tally = write_results(args.output,
                              lambda output: run_batch(predictor, cases, output, args.batch_size, args.on_error,
                                                       relevance, args.workers))
    except VolumeReadError as error:
        print(f"error: cannot read scan {error}", file=sys.stderr)
        return 1
    except PredictionStopped as stopped:
        kept = (f"{args.output} not written (an existing file is left as it was)" if args.output is not None
                else "only the rows above were written")
        print(f"error: {stopped}; {kept}", file=sys.stderr)
        return 1
    print(summary(tally, len(cases), args.output, len(skipped_rows)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
