"""Diagnose brain MRI scans with a trained MedBLIP: ``python -m lavis_medblip.predict``.

One scan (prints the diagnosis and class probabilities; ``--explain`` adds a generated explanation,
``--report`` a PNG with three slices and the probabilities)::

    python -m lavis_medblip.predict --model-type biomedlm_lora --checkpoint ckpt.pth \\
        --image scan.nii.gz --text "75-year-old female, MMSE 24, CDR 0.5" --explain --report out.png

Many scans (writes a CSV ``id,image,prediction,answer,p_<class>...[,explanation],error``)::

    python -m lavis_medblip.predict --model-type demo --checkpoint ckpt.pth --image scans_dir/ --output results.csv
    python -m lavis_medblip.predict --model-type demo --checkpoint ckpt.pth --csv cases.csv --output results.csv

The class probabilities are exactly ``model.predict_answers(samples, class answers).probs``: a
deterministic ranking of the class answers by length-normalised LM likelihood, softmaxed over the
classes asked for (``--classes``). The explanation is free text from ``model.generate`` and is not
used for the diagnosis.

What counts as a scan (``--image`` folders are searched recursively, in sorted order):

- a file the volume processor has a reader for: ``.nii``, ``.nii.gz``, ``.mgh``, ``.mgz``, ``.npy``;
- a DICOM series: a folder that directly holds DICOM files, i.e. files ending in ``.dcm``/``.ima``
  or, since scanner exports often have no suffix, files with the ``DICM`` marker at byte 128
  (DICOM Part 10). A ``DICOMDIR`` index is not a slice and is ignored. The reader expects one
  series per folder and reports folders that mix series.
- names starting with "." (``.DS_Store``, macOS ``._scan.nii.gz`` copies, ``.git``) are skipped.

``--image`` names one scan when it is a file or a DICOM-series folder with no other scans in it;
any other folder is a folder of scans.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import torch
from lavis.common.registry import registry
from lavis.models import load_preprocess
from omegaconf import OmegaConf
from tqdm import tqdm

import lavis_medblip  # noqa: F401  (registers the model, processors and YAML resolvers)
from lavis_medblip.data.schema import CLASS_ANSWERS, CLASS_NAMES
from lavis_medblip.processors.readers import DEFAULT_READERS, VolumeReadError
from lavis_medblip.visualize import plot_volume_report

DEFAULT_MODEL = "medblip"
#: Asked for ``--explain``: the model's diagnosis question asks for a label only.
EXPLAIN_QUESTION = "Question: What will this subject be diagnosed with, and why? Answer:"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
DICOM_MAGIC_OFFSET = 128


# ---- finding scans --------------------------------------------------------------------------------


@dataclass
class Case:
    """One scan to diagnose: ``path`` is read, ``image`` is what the results show for it."""

    case_id: str
    image: str
    path: Path
    text: str = ""


def is_dicom_file(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":  # the index of a DICOM export, not a slice
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(folder: Path) -> bool:
    """A folder that directly holds at least one DICOM file (see the module docstring)."""
    return any(entry.is_file() and not entry.name.startswith(".") and is_dicom_file(entry)
               for entry in folder.iterdir())


def is_volume_file(path: Path) -> bool:
    """A file one of the volume processor's readers accepts (so the suffixes stay in sync with it)."""
    return path.is_file() and any(reader.verify_suffix(path) for reader in DEFAULT_READERS)


def find_scans(root: Path) -> list[Path]:
    """Every volume file and DICOM-series folder under ``root`` (including ``root``), sorted."""
    scans = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        folder_path = Path(folder)
        if is_dicom_series(folder_path):
            scans.append(folder_path)
        scans += [folder_path / name for name in sorted(files)
                  if not name.startswith(".") and is_volume_file(folder_path / name)]
    return sorted(scans)


def strip_volume_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mgz", ".mgh", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def cases_from_folder(root: Path, text: str) -> list[Case]:
    """Cases for every scan under ``root``; the id is the path below ``root`` without its suffix."""
    cases = []
    for path in find_scans(root):
        relative = path.relative_to(root).as_posix()
        case_id = strip_volume_suffix(relative) if relative != "." else root.name
        cases.append(Case(case_id=case_id, image=str(path), path=path, text=text))
    return cases


def cases_from_csv(csv_path: Path) -> list[Case]:
    """Rows of a CSV with columns ``image,text`` (+ optional ``id``); images relative to the CSV's folder."""
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets add a BOM
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [column for column in ("image", "text") if column not in columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {columns}")
        cases = []
        for line_number, row in enumerate(reader, start=2):
            image = (row["image"] or "").strip()
            if not image:
                raise ValueError(f"{csv_path}:{line_number}: empty 'image'")
            case_id = (row.get("id") or "").strip() or image
            cases.append(Case(case_id=case_id, image=image, path=csv_path.parent / image, text=row["text"] or ""))
    return cases


# ---- the model ------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(model_type: str, options: Sequence[str]) -> Any:
    """The model type's YAML with ``key=value`` overrides merged into its ``model`` section."""
    model_class = registry.get_model_class(DEFAULT_MODEL)
    model_types = sorted(model_class.PRETRAINED_MODEL_CONFIG_DICT)
    if model_type not in model_types:
        raise ValueError(f"unknown --model-type {model_type!r}; choose from {model_types}")
    config = OmegaConf.load(model_class.default_config_path(model_type))
    malformed = [option for option in options if "=" not in option]
    if malformed:
        raise ValueError(f"--options takes key=value pairs, got {malformed}")
    # A typo would otherwise add a key nobody reads and silently keep the default.
    unknown = [option for option in options if option.split("=", 1)[0].split(".")[0] not in config.model]
    if unknown:
        raise ValueError(f"--options {unknown}: no such key in the {model_type} model config; "
                         f"keys are {sorted(config.model)}")
    config.model = OmegaConf.merge(config.model, OmegaConf.from_dotlist(list(options)))
    # The 3D patch stem is built for exactly model.image_size; the processor must produce that size.
    config.preprocess.vis_processor.eval.image_size = config.model.image_size
    return config


def load_model(config: Any, checkpoint: str | None, device: str) -> tuple[Any, Any, Any]:
    """Model (eval mode, on ``device``), eval volume processor and eval text processor."""
    model = registry.get_model_class(DEFAULT_MODEL).from_config(config.model)
    if checkpoint:
        model.load_checkpoint(checkpoint)
    elif not (config.model.get("load_finetuned") and config.model.get("finetuned")):
        print("warning: no --checkpoint; predictions come from untrained weights", file=sys.stderr)
    model.eval()
    if torch.device(device).type == "cpu":
        model = model.float()  # as LAVIS's loader: fp16 configs are for GPUs
    vis_processors, txt_processors = load_preprocess(config.preprocess)
    return model.to(device), vis_processors["eval"], txt_processors["eval"]


@dataclass
class Prediction:
    code: str
    answer: str
    probabilities: dict[str, float]
    explanation: str | None = None


@dataclass
class Predictor:
    """Builds the samples the registered datasets would and asks the model; nothing else."""

    model: Any
    volume_processor: Any
    text_processor: Any
    classes: Sequence[str]
    device: str
    question: str | None = None  # None: the model's own diagnosis question
    explain: bool = False
    explain_question: str = EXPLAIN_QUESTION
    max_new_tokens: int = 64
    answers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.answers = [CLASS_ANSWERS[code] for code in self.classes]

    def read(self, path: Path) -> Any:
        """(1, S, S, S) volume; raises ``VolumeReadError`` naming the file."""
        return self.volume_processor(str(path))

    def samples(self, volumes: Sequence[Any], texts: Sequence[str], question: str | None) -> dict[str, Any]:
        samples = {"image": torch.stack(list(volumes)).to(self.device),
                   "text_input": [self.text_processor(text) for text in texts]}
        if question is not None:
            samples["question"] = [question] * len(volumes)
        return samples

    def predict(self, volumes: Sequence[Any], texts: Sequence[str]) -> list[Prediction]:
        with torch.no_grad():
            ranking = self.model.predict_answers(self.samples(volumes, texts, self.question), self.answers)
            explanations = [None] * len(volumes)
            if self.explain:
                explanations = self.model.generate(self.samples(volumes, texts, self.explain_question),
                                                   max_new_tokens=self.max_new_tokens)
        predictions = []
        for probs, explanation in zip(ranking.probs.float().cpu().tolist(), explanations):
            best = max(range(len(probs)), key=probs.__getitem__)
            predictions.append(Prediction(code=self.classes[best], answer=self.answers[best],
                                          probabilities=dict(zip(self.classes, probs)),
                                          explanation=None if explanation is None else explanation.strip()))
        return predictions


# ---- running ----------------------------------------------------------------------------------------


def result_columns(classes: Sequence[str], explain: bool) -> list[str]:
    return (["id", "image", "prediction", "answer"] + [f"p_{code}" for code in classes]
            + (["explanation"] if explain else []) + ["error"])


def result_row(case: Case, prediction: Prediction | None = None, error: str = "") -> dict[str, str]:
    row = {"id": case.case_id, "image": case.image, "error": error}
    if prediction is not None:
        row.update(prediction=prediction.code, answer=prediction.answer,
                   **{f"p_{code}": f"{p:.6f}" for code, p in prediction.probabilities.items()})
        if prediction.explanation is not None:
            row["explanation"] = prediction.explanation
    return row


def results_writer(predictor: Predictor, output: TextIO) -> csv.DictWriter:
    writer = csv.DictWriter(output, fieldnames=result_columns(predictor.classes, predictor.explain), restval="")
    writer.writeheader()
    return writer


def write_rows(predictor: Predictor, output: TextIO, rows: Sequence[dict[str, str]]) -> int:
    results_writer(predictor, output).writerows(rows)
    return len(rows)


def batches(cases: Sequence[Case], batch_size: int) -> Iterator[list[Case]]:
    for start in range(0, len(cases), batch_size):
        yield list(cases[start:start + batch_size])


def run_batch(predictor: Predictor, cases: Sequence[Case], output: TextIO, batch_size: int, on_error: str) -> int:
    """Write one result row per case to ``output``; returns how many scans failed to read."""
    writer = results_writer(predictor, output)
    failed = 0
    with tqdm(total=len(cases), unit="scan", desc="diagnosing", file=sys.stderr) as progress:
        for batch in batches(cases, batch_size):
            rows: list[dict[str, str] | None] = [None] * len(batch)  # input order, failures included
            readable, volumes = [], []
            for index, case in enumerate(batch):
                try:
                    volumes.append(predictor.read(case.path))
                    readable.append(index)
                except VolumeReadError as error:
                    if on_error == "raise":
                        raise
                    failed += 1
                    rows[index] = result_row(case, error=str(error))
                    progress.write(f"could not read {error}", file=sys.stderr)
            if readable:
                predictions = predictor.predict(volumes, [batch[index].text for index in readable])
                for index, prediction in zip(readable, predictions):
                    rows[index] = result_row(batch[index], prediction)
            writer.writerows(rows)
            output.flush()  # a long run that stops keeps the rows written so far
            progress.update(len(batch))
    return failed


def write_results(path: Path | None, write: Callable[[TextIO], int]) -> int:
    """Call ``write`` with the results file at ``path`` (stdout when None); returns its result."""
    if path is None:
        return write(sys.stdout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as output:
        return write(output)


def run_single(predictor: Predictor, case: Case, report: Path | None, output: TextIO) -> Prediction:
    """Print the diagnosis of one scan (raises ``VolumeReadError`` naming the file)."""
    volume = predictor.read(case.path)
    (prediction,) = predictor.predict([volume], [case.text])
    print(f"scan: {case.image}", file=output)
    print(f"diagnosis: {prediction.code} ({prediction.answer})", file=output)
    print("probabilities:", file=output)
    width = max(len(answer) for answer in predictor.answers)
    for code, answer in zip(predictor.classes, predictor.answers):
        print(f"  {code:<4} {answer:<{width}}  {prediction.probabilities[code]:.4f}", file=output)
    if prediction.explanation is not None:
        print(f"explanation: {prediction.explanation}", file=output)
    if report is not None:
        probabilities = [prediction.probabilities[code] for code in predictor.classes]
        title = f"{Path(case.image).name}: {prediction.code} ({prediction.answer}), p={max(probabilities):.2f}"
        plot_volume_report(volume[0].float().cpu().numpy(), probabilities, predictor.classes, report, title)
        print(f"report: {report}", file=output)
    return prediction


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_medblip.predict",
        description="Diagnose 3D brain MRI scans (NC / MCI / AD) with a trained MedBLIP, "
                    "from the scan and a short EHR text.",
        epilog="Folders are searched recursively for .nii/.nii.gz/.mgh/.mgz/.npy files and DICOM-series "
               "folders (folders holding .dcm/.ima files or files with the DICM marker). "
               "Example: python -m lavis_medblip.predict --model-type demo --checkpoint ckpt.pth "
               "--image scan.nii.gz --text '75-year-old female, MMSE 24, CDR 0.5'",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model-type", required=True,
                       help="registered MedBLIP model type, e.g. biomedlm_lora, biogpt_lora, flant5xl_lora, demo, tiny")
    model.add_argument("--checkpoint", help="trained checkpoint (.pth) of the model's trainable parameters")
    model.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                       help="override model config keys, e.g. lm_model=/models/BioMedLM qformer_bert=/models/bert "
                            "(repeatable)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")

    inputs = parser.add_argument_group("input (one of)")
    source = inputs.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path,
                        help="one scan (file or DICOM-series folder), or a folder of scans")
    source.add_argument("--csv", type=Path,
                        help="CSV with columns image,text (+ optional id); image paths relative to the CSV's folder")
    inputs.add_argument("--text", default="",
                        help="EHR text for --image (every scan of a folder gets the same text)")

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
                         help="results CSV (id,image,prediction,answer,p_<class>...,error); for a folder or --csv "
                              "the default is stdout, for one scan the default is none")
    outputs.add_argument("--report", type=Path, help="one scan only: write a PNG with slices and probabilities")
    outputs.add_argument("--batch-size", type=int, default=4, help="scans per forward pass (default: 4)")
    outputs.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                         help="a scan that cannot be read: 'skip' records it in the error column and goes on "
                              "(default), 'raise' stops with a message naming the file")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.classes = list(args.classes or CLASS_NAMES)
    unknown = [code for code in args.classes if code not in CLASS_NAMES]
    if unknown or len(set(args.classes)) != len(args.classes) or len(args.classes) < 2:
        parser.error(f"--classes takes two or more distinct codes from {list(CLASS_NAMES)}, got {args.classes}")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    source = args.image if args.image is not None else args.csv
    if not source.exists():
        parser.error(f"{source}: no such file or directory")
    if args.csv is not None and not args.csv.is_file():
        parser.error(f"--csv {args.csv}: not a file")


def names_one_scan(image: Path) -> bool:
    return image.is_file() or (is_dicom_series(image) and find_scans(image) == [image])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)

    single = args.image is not None and names_one_scan(args.image)
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
            cases = cases_from_csv(args.csv)
        except ValueError as error:
            parser.error(str(error))

    try:
        config = load_config(args.model_type, args.options)
    except ValueError as error:
        parser.error(str(error))
    device = args.device or default_device()
    model, volume_processor, text_processor = load_model(config, args.checkpoint, device)
    predictor = Predictor(model, volume_processor, text_processor, args.classes, device, question=args.question,
                          explain=args.explain, explain_question=args.explain_question,
                          max_new_tokens=args.max_new_tokens)

    try:
        if single:
            prediction = run_single(predictor, cases[0], args.report, sys.stdout)
            if args.output is not None:
                row = result_row(cases[0], prediction)
                write_results(args.output, lambda output: write_rows(predictor, output, [row]))
            return 0
        failed = write_results(args.output,
                               lambda output: run_batch(predictor, cases, output, args.batch_size, args.on_error))
    except VolumeReadError as error:
        print(f"error: cannot read scan {error}", file=sys.stderr)
        return 1
    where = f" to {args.output}" if args.output is not None else ""
    print(f"{len(cases) - failed} of {len(cases)} scans diagnosed{where}; {failed} could not be read"
          + (" (see the error column)" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
