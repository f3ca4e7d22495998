"""Diagnose scans from Python: find them (:func:`cases_from_folder`, :func:`cases_from_csv`), load a
model type with its checkpoint or a bundle folder (:func:`model_source`, :func:`load_model`), and ask it
(:class:`Predictor`).
"""
from __future__ import annotations

import codecs
import csv
import errno
import io
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from lavis.common.registry import registry
from lavis.models import load_preprocess
from omegaconf import OmegaConf

import lavis_medblip  # noqa: F401  (registers the model, processors and YAML resolvers)
from lavis_medblip.annotations.ehr import EXPLAIN_QUESTION
from lavis_medblip.annotations.schema import CLASS_ANSWERS
from lavis_medblip.models.bundle import merge_options, read_bundle_config
from lavis_medblip.processors.dicom import is_dicom_series
from lavis_medblip.processors.readers import has_volume_suffix, scan_name
from lavis_medblip.processors.volume_types import VolumeReadError, degenerate_volume_warnings

DEFAULT_MODEL = "medblip"

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
    entries that could not be searched. Symlinks are followed, but each folder is searched once;
    names starting with "." are skipped.

    A scan is a file a volume reader takes by its suffix or a DICOM-series folder
    (:mod:`lavis_medblip.processors.readers`).
    """
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


def names_one_scan(image: Path) -> bool:
    """Whether ``image`` is one scan: a file, or a DICOM-series folder with no other scans in it (else a folder of
    scans)."""
    return image.is_file() or (is_dicom_series(image) and find_scans(image) == [image])


def cases_from_folder(root: Path, text: str) -> list[Case]:
    """Cases for every scan under ``root`` and, with their error, every entry that could not be searched.

    The id is the path below ``root`` without its suffix; cases are in path order.
    """
    found = search_scans(root)
    errors = {path: VolumeReadError(path, problem) for path, problem in found.unsearchable.items()}
    cases = []
    for path in sorted([*found.scans, *errors]):
        relative = path.relative_to(root).as_posix()
        case_id = scan_name(relative) if relative != "." else root.name
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
    """What is wrong with a CSV row of ``fields`` under the header ``columns``, or None when nothing is."""
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


def resolve_device(device: str | None = None) -> str:
    """``device``, or cuda when there is one, else cpu; a device this machine lacks is a ``ValueError``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r}: {error}") from None
    if kind.type == "cuda" and (not torch.cuda.is_available() or (kind.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here")
    return device


def load_config(model_type: str, options: Sequence[str]) -> Any:
    """The model type's YAML with ``key=value`` overrides merged into its ``model`` section.

    The overrides are checked as the model reads them (an unknown or misspelt key is an error, not
    a silently kept default); the processors follow ``model.image_size`` (``preprocess`` refers to it).
    """
    model_class = registry.get_model_class(DEFAULT_MODEL)
    model_types = sorted(model_class.PRETRAINED_MODEL_CONFIG_DICT)
    if model_type not in model_types:
        raise ValueError(f"unknown --model-type {model_type!r}; choose from {model_types}")
    return merge_options(OmegaConf.load(model_class.default_config_path(model_type)), options)


def model_source(model_type: str | None, checkpoint: str | None, bundle: str | os.PathLike | None,
                 options: Sequence[str]) -> tuple[Any, str | None]:
    """The config and the weights :func:`load_model` takes: a bundle folder's (its ``config.yaml``, and the
    folder), or a model type's YAML (:func:`load_config`) and ``checkpoint``; ``options`` apply to either.

    A bad bundle is a :class:`~lavis_medblip.models.weights.CheckpointError` naming the file.
    """
    if bundle is not None:
        return read_bundle_config(bundle, options), str(bundle)
    return load_config(model_type, options), checkpoint


def load_model(config: Any, checkpoint: str | None, device: str) -> tuple[Any, Any, Any]:
    """Model (eval mode, on ``device``), eval volume processor and eval text processor; ``checkpoint``: a ``.pth``
    or a bundle folder."""
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


def read_case(volume_processor: Any, case: Case) -> ScanRead:
    """``case``'s volume through ``volume_processor``, its degenerate-volume warnings, or why it failed."""
    if case.error is not None:
        return ScanRead(error=case.error)
    try:
        with degenerate_volume_warnings() as degenerate:
            volume = volume_processor(str(case.path))
    except VolumeReadError as error:
        return ScanRead(error=error)
    return ScanRead(volume=volume, warning="; ".join(degenerate))


@dataclass
class CaseReads(Dataset):
    """Cases as a map-style dataset of :class:`ScanRead` (what DataLoader workers run: no model in it)."""

    volume_processor: Any
    cases: Sequence[Case]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> ScanRead:
        return read_case(self.volume_processor, self.cases[index])


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
        return read_case(self.volume_processor, case)

    def read_batches(self, cases: Sequence[Case], batch_size: int,
                     workers: int = 0) -> Iterator[tuple[list[Case], list[ScanRead]]]:
        """Each batch of ``cases``, in order, with its :meth:`read`; ``workers`` > 0 processes read and preprocess
        the next batches while the model scores this one (a DataLoader over the volume processor alone)."""
        loader = DataLoader(CaseReads(self.volume_processor, cases), batch_size=batch_size, num_workers=workers,
                            collate_fn=list, prefetch_factor=2 if workers else None)
        for start, scans in zip(range(0, len(cases), batch_size), loader):
            yield list(cases[start:start + batch_size]), scans

    def samples(self, volumes: Sequence[Any], texts: Sequence[str], question: str | None) -> dict[str, Any]:
        """A batch as the registered datasets collate it; ``question`` None asks the model's own question."""
        samples = {"image": torch.stack(list(volumes)).to(self.device),
                   "text_input": [self.text_processor(text) for text in texts]}
        if question is not None:
            samples["question"] = [question] * len(volumes)
        return samples

    def predict(self, volumes: Sequence[Any], texts: Sequence[str]) -> list[Prediction]:
        """One :class:`Prediction` per volume (from :meth:`read`) and its EHR text.

        Its probabilities are exactly ``model.predict_answers(samples, class answers).probs`` (calibrated when
        the checkpoint holds a calibration); with ``explain`` the model also generates an answer to
        ``explain_question``.
        """
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
