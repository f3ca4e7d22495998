"""Diagnose brain MRI scans with a trained MedBLIP: ``python -m lavis_medblip.predict``.

One scan (prints the diagnosis and class probabilities; ``--explain`` adds a generated explanation,
``--report`` a PNG with three slices and the probabilities)::

    python -m lavis_medblip.predict --model-type biomedlm_lora --checkpoint ckpt.pth \\
        --image scan.nii.gz --text "75-year-old female, MMSE 24, CDR 0.5" --explain --report out.png

Many scans (writes a CSV ``id,image,prediction,answer,p_<class>...[,explanation],error,warning``)::

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
- symlinks are followed; a folder reached a second time (a symlink loop) is not searched again. Symlink
  loops, folders that cannot be listed and broken symlinks named like a volume get a row with an ``error``.

The results file is written whole or not at all: rows go to a temporary file next to it, renamed over it
when the run ends. A run that stops (``--on-error raise``, a crash, Ctrl-C) leaves an existing file as it was.
An ``error`` row is a scan that could not be read; a ``warning`` is a scan that was read and diagnosed but is
unlikely to be usable (constant, mostly NaN/Inf: a ``DegenerateVolumeWarning`` of the volume processor).

``--image`` names one scan when it is a file or a DICOM-series folder with no other scans in it;
any other folder is a folder of scans.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import errno
import io
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO, TypeVar

import torch
from lavis.common.registry import registry
from lavis.models import load_preprocess
from omegaconf import OmegaConf
from tqdm import tqdm

import lavis_medblip  # noqa: F401  (registers the model, processors and YAML resolvers)
from lavis_medblip.data.schema import CLASS_ANSWERS, CLASS_NAMES
from lavis_medblip.models.weights import CheckpointError
from lavis_medblip.processors.readers import DEFAULT_READERS, VolumeReadError, degenerate_volume_warnings
from lavis_medblip.storage import atomic_file
from lavis_medblip.visualize import plot_volume_report

DEFAULT_MODEL = "medblip"
#: Asked for ``--explain``: the model's diagnosis question asks for a label only.
EXPLAIN_QUESTION = "Question: What will this subject be diagnosed with, and why? Answer:"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
DICOM_MAGIC_OFFSET = 128


# ---- finding scans --------------------------------------------------------------------------------


@dataclass
class Case:
    """One scan to diagnose: ``path`` is read, ``image`` is what the results show for it.

    ``error`` is set when the scan is known to be unreadable before reading (e.g. a symlink loop).
    """

    case_id: str
    image: str
    path: Path
    text: str = ""
    error: VolumeReadError | None = None


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
    try:
        entries = list(folder.iterdir())
    except OSError:  # search_scans reports a folder it cannot list
        return False
    return any(entry.is_file() and not entry.name.startswith(".") and is_dicom_file(entry) for entry in entries)


def has_volume_suffix(path: Path) -> bool:
    """One of the volume processor's readers takes this name (so the suffixes stay in sync with it)."""
    return any(reader.verify_suffix(path) for reader in DEFAULT_READERS)


@dataclass
class ScanSearch:
    """What a folder holds: its scans, and the entries that could not be searched with the reason."""

    scans: list[Path] = field(default_factory=list)
    unsearchable: dict[Path, str] = field(default_factory=dict)


def unsearchable_entry_problem(path: Path, error: OSError) -> str | None:
    """Why ``path`` could not be looked at, or None when that needs no report (a broken link to a non-scan)."""
    if error.errno == errno.ELOOP:
        return "symlink loop; not followed"
    if error.errno == errno.ENOENT and path.is_symlink():
        return f"broken symlink to {os.readlink(path)}" if has_volume_suffix(path) else None
    return f"cannot read: {error.strerror or error}"


def search_scans(root: Path) -> ScanSearch:
    """Every volume file and DICOM-series folder under ``root`` (including ``root``), sorted, and the
    entries that could not be searched. Symlinks are followed, but each folder is searched once."""
    found = ScanSearch()
    searched: dict[tuple[int, int], Path] = {}  # (device, inode) of a folder -> the path it was searched as

    def search(folder: Path) -> None:
        try:
            status = folder.stat()
            first_path = searched.setdefault((status.st_dev, status.st_ino), folder)
            if first_path != folder:
                found.unsearchable[folder] = (f"links to {first_path}, which is already searched "
                                              "(a symlink loop or a second link); not searched again")
                return
            names = sorted(os.listdir(folder))
        except OSError as error:
            found.unsearchable[folder] = f"cannot list folder: {error.strerror or error}"
            return
        if is_dicom_series(folder):
            found.scans.append(folder)
        for name in names:
            if name.startswith("."):
                continue
            path = folder / name
            try:
                mode = path.stat().st_mode
            except OSError as error:
                problem = unsearchable_entry_problem(path, error)
                if problem is not None:
                    found.unsearchable[path] = problem
                continue
            if stat.S_ISDIR(mode):
                search(path)
            elif stat.S_ISREG(mode) and has_volume_suffix(path):
                found.scans.append(path)

    search(root)
    found.scans.sort()
    return found


def find_scans(root: Path) -> list[Path]:
    """Every volume file and DICOM-series folder under ``root`` (including ``root``), sorted."""
    return search_scans(root).scans


def strip_volume_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mgz", ".mgh", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def cases_from_folder(root: Path, text: str) -> list[Case]:
    """Cases for every scan under ``root`` and, with their error, every entry that could not be searched.

    The id is the path below ``root`` without its suffix; cases are in path order.
    """
    found = search_scans(root)
    errors = {path: VolumeReadError(path, problem) for path, problem in found.unsearchable.items()}
    cases = []
    for path in sorted([*found.scans, *errors]):
        relative = path.relative_to(root).as_posix()
        case_id = strip_volume_suffix(relative) if relative != "." else root.name
        cases.append(Case(case_id=case_id, image=str(path), path=path, text=text, error=errors.get(path)))
    return cases


def read_utf8(path: Path) -> str:
    """The text of ``path``; a byte that is not UTF-8 is an error naming the file, line and column."""
    raw = path.read_bytes()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # spreadsheets add a BOM
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        position = start + error.start
        line = raw.count(b"\n", 0, position) + 1
        column = position - (raw.rfind(b"\n", 0, position) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[position]:02x} at column {column}); "
                         "save the file as UTF-8 (in Excel: 'CSV UTF-8')") from None


@dataclass
class CsvCases:
    cases: list[Case]
    skipped: list[str]  # "file:line: problem" of each row left out


def bad_row_problem(fields: Sequence[str], columns: Sequence[str]) -> str | None:
    if len(fields) != len(columns):
        return (f"{len(fields)} field(s) but the header has {len(columns)} ({','.join(columns)}); "
                "a missing or extra comma, or an unquoted comma in the text?")
    if not fields[columns.index("image")].strip():
        return "empty 'image'"
    return None


def cases_from_csv(csv_path: Path, skip_bad_rows: bool = False) -> CsvCases:
    """Rows of a CSV with columns ``image,text`` (+ optional ``id``); images relative to the CSV's folder.

    A bad row (a missing or extra field, an empty ``image``) is an error naming the file and line, or
    with ``skip_bad_rows`` is left out and listed in ``skipped``.
    """
    reader = csv.reader(io.StringIO(read_utf8(csv_path), newline=""))
    cases, skipped = [], []
    try:
        columns = next((row for row in reader if row), [])  # blank lines are no rows, as in csv.DictReader
        missing = [column for column in ("image", "text") if column not in columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {columns}")
        row_start = reader.line_num + 1
        for fields in reader:
            line, row_start = row_start, reader.line_num + 1  # a quoted field may span lines
            if not fields:
                continue
            problem = bad_row_problem(fields, columns)
            if problem is not None:
                message = f"{csv_path}:{line}: {problem}"
                if not skip_bad_rows:
                    raise ValueError(message)
                skipped.append(message)
                continue
            row = dict(zip(columns, fields))
            image = row["image"].strip()
            case_id = row.get("id", "").strip() or image
            cases.append(Case(case_id=case_id, image=image, path=csv_path.parent / image, text=row["text"]))
    except csv.Error as error:
        raise ValueError(f"{csv_path}:{reader.line_num}: {error}") from None
    return CsvCases(cases, skipped)


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
class ScanRead:
    """A case read: its volume and the "; "-joined ``DegenerateVolumeWarning`` messages, or why it failed."""

    volume: Any = None
    warning: str = ""
    error: VolumeReadError | None = None


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

    def read(self, case: Case) -> ScanRead:
        """The (1, S, S, S) volume of ``case``, or the ``VolumeReadError`` naming the file."""
        if case.error is not None:
            return ScanRead(error=case.error)
        try:
            with degenerate_volume_warnings() as degenerate:
                volume = self.volume_processor(str(case.path))
        except VolumeReadError as error:
            return ScanRead(error=error)
        return ScanRead(volume=volume, warning="; ".join(degenerate))

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
            + (["explanation"] if explain else []) + ["error", "warning"])


def result_row(case: Case, prediction: Prediction | None = None, error: str = "", warning: str = "") -> dict[str, str]:
    row = {"id": case.case_id, "image": case.image, "error": error, "warning": warning}
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


def run_batch(predictor: Predictor, cases: Sequence[Case], output: TextIO, batch_size: int, on_error: str) -> Tally:
    """Write one result row per case to ``output``.

    With ``on_error="raise"`` the batch holding the first unreadable scan is still read and scored
    whole, its diagnosed rows written, and then :class:`PredictionStopped` names every failure in it.
    """
    writer = results_writer(predictor, output)
    tally = Tally()
    with tqdm(total=len(cases), unit="scan", desc="diagnosing", file=sys.stderr) as progress:
        for batch in batches(cases, batch_size):
            scans = [predictor.read(case) for case in batch]
            readable = [index for index, scan in enumerate(scans) if scan.error is None]
            predictions: dict[int, Prediction] = {}
            if readable:
                scored = predictor.predict([scans[index].volume for index in readable],
                                           [batch[index].text for index in readable])
                predictions = dict(zip(readable, scored))
            rows = [result_row(case, predictions[index], warning=scan.warning) if index in predictions
                    else result_row(case, error=str(scan.error))
                    for index, (case, scan) in enumerate(zip(batch, scans))]
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
    if path is None:
        return write(sys.stdout)
    with atomic_file(path, "w", newline="", encoding="utf-8") as output:
        return write(output)


def run_single(predictor: Predictor, case: Case, report: Path | None, output: TextIO) -> dict[str, str]:
    """Print the diagnosis of one scan and return its results row (raises ``VolumeReadError`` naming the file)."""
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
    if report is not None:
        probabilities = [prediction.probabilities[code] for code in predictor.classes]
        title = f"{Path(case.image).name}: {prediction.code} ({prediction.answer}), p={max(probabilities):.2f}"
        plot_volume_report(scan.volume[0].float().cpu().numpy(), probabilities, predictor.classes, report, title)
        print(f"report: {report}", file=output)
    return result_row(case, prediction, warning=scan.warning)


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
                         help="results CSV (id,image,prediction,answer,p_<class>...,error,warning), replaced only "
                              "when the run succeeds; for a folder or --csv the default is stdout, for one scan "
                              "the default is none")
    outputs.add_argument("--report", type=Path, help="one scan only: write a PNG with slices and probabilities")
    outputs.add_argument("--batch-size", type=int, default=4, help="scans per forward pass (default: 4)")
    outputs.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                         help="a scan that cannot be read, or a --csv row with a missing or extra field: 'skip' "
                              "records the scan in the error column and the row as a line on stderr, and goes on "
                              "(default); 'raise' stops with a message naming the file (and line), leaving "
                              "--output as it was")
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
        config = load_config(args.model_type, args.options)
    except ValueError as error:
        parser.error(str(error))
    device = args.device or default_device()
    try:
        model, volume_processor, text_processor = load_model(config, args.checkpoint, device)
    except CheckpointError as error:
        print(f"error: cannot load the checkpoint {error}", file=sys.stderr)
        return 1
    predictor = Predictor(model, volume_processor, text_processor, args.classes, device, question=args.question,
                          explain=args.explain, explain_question=args.explain_question,
                          max_new_tokens=args.max_new_tokens)

    try:
        if single:
            row = run_single(predictor, cases[0], args.report, sys.stdout)
            if args.output is not None:
                write_results(args.output, lambda output: write_rows(predictor, output, [row]))
            return 0
        tally = write_results(args.output,
                              lambda output: run_batch(predictor, cases, output, args.batch_size, args.on_error))
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
