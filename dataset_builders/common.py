"""What every cohort builder shares: tables, scan discovery, scan↔visit matching, splits, reports.

A cohort module (``adni.py``, ``nacc.py`` …) only knows its own table layout and file names. It turns
table rows into :class:`Visit` objects and scan paths into :class:`Scan` objects, then calls
:func:`build_annotations`, which

1. matches every scan to one visit of the same subject: the same visit code if the name has one,
   else the visit with the nearest date within ``date_tolerance_days`` (ties → the earlier row);
2. keeps one scan per visit (the first path in sorted order; the others are reported as
   ``extra_scans``) unless ``all_scans_per_visit`` is set;
3. drops visits that have no usable label (unknown codes are reported, or raised with
   ``on_error="raise"``), except for cohorts that allow ``label: None`` (image–text pretraining);
4. splits subject-wise (no subject in two splits), seeded; optionally a balanced test set of
   ``test_per_class`` visits per class, one visit per test subject, as in the paper's 3×200 / 2×200;
5. writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (the :mod:`lavis_medblip.data.schema` format,
   ``text = describe_ehr(ehr)``) and ``report.json`` into the output folder.

Image paths in the annotations are **relative to the output folder** (the schema's convention, as
in the cohort simulator): keep the annotation folder and the scans where they are relative to
each other, or rebuild. Builders never open image files; they match by path/name only.

:func:`read_authors_tsv` reads the original MedBLIP code's ``image_path<TAB>report`` lists
(``... The diagnosis is X.``) into schema records.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lavis_medblip.data.ehr import describe_ehr, is_missing
from lavis_medblip.data.labels import normalize_label
from lavis_medblip.data.schema import CLASS_NAMES, SPLITS, AnnotationRecord, write_annotations

log = logging.getLogger("dataset_builders")

#: File endings taken as scans. Analyze pairs are found by their ``.img`` (nibabel opens either half).
SCAN_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".mgz", ".mgh", ".img")


# --------------------------------------------------------------------------------------------
# Problems: counted and listed in the report, or raised
# --------------------------------------------------------------------------------------------

class Issues:
    """Collects per-row problems by kind; with ``on_error="raise"`` the first one raises."""

    def __init__(self, on_error: str = "skip") -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.on_error = on_error
        self.items: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, kind: str, where: str, message: str, **details: Any) -> None:
        if self.on_error == "raise":
            raise ValueError(f"{where}: {message}")
        self.items[kind].append({"where": where, "message": message, **details})

    def note(self, kind: str, where: str, message: str, **details: Any) -> None:
        """Record something worth reporting that is never an error (e.g. an extra scan)."""
        self.items[kind].append({"where": where, "message": message, **details})


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def read_table(path: str | Path, required: Sequence[str] = (), *, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV as strings (IDs keep their leading zeros) and check the needed columns.

    Raises ``ValueError`` naming the file and every missing column; column names are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: table not found")
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot parse table ({error})") from error
    frame.columns = [str(column).strip() for column in frame.columns]
    require_columns(frame, required, path)
    frame.attrs["path"] = str(path)
    return frame


def require_columns(frame: pd.DataFrame, required: Sequence[str], path: str | Path) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the table has {list(frame.columns)}")


def find_column(frame: pd.DataFrame, aliases: Sequence[str], path: str | Path, *, required: bool = True) -> str | None:
    """The first column whose name matches one of ``aliases`` case-insensitively."""
    lowered = {str(column).strip().lower(): column for column in frame.columns}
    for alias in aliases:
        if alias.lower() in lowered:
            return lowered[alias.lower()]
    if required:
        raise ValueError(f"{path}: missing column {aliases[0]!r} (or any of {list(aliases[1:])}); "
                         f"the table has {list(frame.columns)}")
    return None


def row_location(frame: pd.DataFrame, index: int) -> str:
    """``file:line`` of a data row (line 1 is the header)."""
    return f"{frame.attrs.get('path', '<table>')}:{index + 2}"


def number(value: Any, *, valid: tuple[float, float] | None = None, missing_codes: Iterable[float] = ()) -> float | None:
    """A float, or ``None`` for blanks, NaN, missing codes and anything outside ``valid``.

    Cohorts code "not assessed" as numbers (NACC -4, 88, 95–98; AIBL -4, -1), which must never reach
    the text as a score; ``valid`` is the safest guard because the codes differ per field.
    """
    if is_missing(value):
        return None
    try:
        result = float(str(value).strip())
    except ValueError:
        return None
    if math.isnan(result) or result in set(missing_codes):
        return None
    if valid is not None and not valid[0] <= result <= valid[1]:
        return None
    return int(result) if result.is_integer() else result


def text_value(value: Any) -> str | None:
    return None if is_missing(value) else str(value).strip()


_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%m/%d/%Y", "%m/%d/%y", "%d.%m.%Y", "%Y/%m/%d", "%Y-%m-%d %H:%M:%S")


def parse_date(value: Any) -> dt.date | None:
    """A date from the formats the cohorts use; ``None`` when blank; ``ValueError`` when unreadable."""
    if is_missing(value):
        return None
    text = str(value).strip()
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"unreadable date {text!r}")


def years_between(start: dt.date, end: dt.date) -> float:
    return (end - start).days / 365.25


# --------------------------------------------------------------------------------------------
# Scans and visits
# --------------------------------------------------------------------------------------------

@dataclass
class Visit:
    """One table row: a subject's visit with its label and EHR (``label`` may hold an error)."""

    subject_id: str
    visit: str
    date: dt.date | None
    label: str | None
    ehr: dict[str, Any]
    site: str = ""
    where: str = ""
    #: Why the label is unusable (unknown/missing code); such visits still absorb their scans.
    label_error: str | None = None


@dataclass
class Scan:
    path: Path
    subject_id: str
    visit: str | None = None
    date: dt.date | None = None
    #: What a cohort reads from the name beyond the keys (MIRIAD: group and sex).
    extra: dict[str, Any] = field(default_factory=dict)


def discover_scans(root: str | Path, pattern: str = "**/*") -> list[Path]:
    """Every scan file under ``root`` matching the glob ``pattern``, sorted (deterministic)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: scan folder not found")
    found = [path for path in root.glob(pattern)
             if path.is_file() and path.name.lower().endswith(SCAN_SUFFIXES)]
    return sorted(found)


def parse_scans(paths: Iterable[Path], parse: Callable[[Path], Scan | None], issues: Issues) -> list[Scan]:
    """Apply a cohort's name parser; names it cannot read are reported as orphan scans."""
    scans = []
    for path in paths:
        scan = parse(path)
        if scan is None:
            issues.note("orphan_scans", str(path), "file name has no recognisable subject id")
        else:
            scans.append(scan)
    return scans


_LONI_FOLDER_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})_\d{2}_\d{2}_\d{2}")
_LONI_NAME_DATE = re.compile(r"_(\d{8})\d{0,9}_(?:\d+_)?(?:S\d+_)?I\d+")
_ANY_DATE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")


def date_in_path(path: str | Path) -> dt.date | None:
    """The acquisition date in a LONI (ADNI/AIBL) download path or any ``YYYY-MM-DD``/``YYYYMMDD``.

    Only the name and the last four folders are searched (a LONI date folder is three levels up).
    """
    text = "/".join(Path(path).parts[-5:])
    for pattern in (_LONI_FOLDER_DATE, _LONI_NAME_DATE, _ANY_DATE):
        for match in pattern.finditer(text):
            digits = "".join(match.groups())
            try:
                return dt.datetime.strptime(digits, "%Y%m%d").date()
            except ValueError:
                continue
    return None


_VISCODE = re.compile(r"(?:^|[_\-/.])(bl|sc|scmri|m\d{1,3})(?=$|[_\-/.])", re.IGNORECASE)


def normalize_viscode(code: str) -> str:
    """LONI visit codes (ADNI, AIBL): ``m6``/``M06`` → ``m06`` (the tables pad months to two digits)."""
    code = code.strip().lower()
    match = re.fullmatch(r"m0*(\d+)", code)
    return f"m{int(match.group(1)):02d}" if match else code


def viscode_in_path(path: Path) -> str | None:
    """A LONI visit code token (``_m06_``, ``-bl.``) in the name or the last few folders."""
    # not the whole path: wherever the download was unpacked must not count
    match = _VISCODE.search(path.name) or _VISCODE.search("/".join(path.parent.parts[-4:]))
    return normalize_viscode(match.group(1)) if match else None


def match_scans(visits: Sequence[Visit], scans: Sequence[Scan], *, date_tolerance_days: float,
                all_scans_per_visit: bool, issues: Issues) -> list[tuple[Visit, Scan]]:
    """Pair scans with visits (subject, then visit code, then nearest date); report the leftovers."""
    by_subject: dict[str, list[Visit]] = defaultdict(list)
    for visit in visits:
        by_subject[visit.subject_id].append(visit)
    scans_of: dict[int, list[Scan]] = defaultdict(list)
    for scan in scans:
        candidates = by_subject.get(scan.subject_id)
        if not candidates:
            issues.note("orphan_scans", str(scan.path), f"no table row for subject {scan.subject_id!r}")
            continue
        chosen, reason = _choose_visit(scan, candidates, date_tolerance_days)
        if chosen is None:
            issues.note("orphan_scans", str(scan.path), reason)
        else:
            scans_of[id(chosen)].append(scan)
    pairs = []
    for visit in visits:
        matched = sorted(scans_of.get(id(visit), []), key=lambda scan: str(scan.path))
        if not matched:
            issues.note("unmatched_rows", visit.where, f"no scan for subject {visit.subject_id!r} visit "
                        f"{visit.visit!r}" + (f" ({visit.date.isoformat()})" if visit.date else ""))
            continue
        kept = matched if all_scans_per_visit else matched[:1]
        for extra in matched[len(kept):]:
            issues.note("extra_scans", str(extra.path), f"another scan of {visit.subject_id} {visit.visit}; "
                        f"kept {kept[0].path.name}")
        pairs.extend((visit, scan) for scan in kept)
    return pairs


def _choose_visit(scan: Scan, candidates: Sequence[Visit], tolerance: float) -> tuple[Visit | None, str]:
    if scan.visit:
        same = [visit for visit in candidates if visit.visit == scan.visit]
        if len(same) == 1:
            return same[0], ""
        if same:  # duplicate visit codes: let the date decide among them
            candidates = same
    if scan.date is None:
        return None, (f"visit {scan.visit!r} of {scan.subject_id!r} is not in the table" if scan.visit
                      else "file name has neither a visit code nor a date")
    dated = [(abs((visit.date - scan.date).days), order, visit)
             for order, visit in enumerate(candidates) if visit.date is not None]
    if not dated:
        return None, f"no dated table row for subject {scan.subject_id!r}"
    days, _, nearest = min(dated, key=lambda item: item[:2])
    if days > tolerance:
        return None, (f"nearest visit of {scan.subject_id!r} ({nearest.visit}) is {days} days from the scan "
                      f"date {scan.date.isoformat()} (tolerance {tolerance:g})")
    return nearest, ""


def dedupe_visits(visits: Sequence[Visit], issues: Issues) -> list[Visit]:
    """Keep the first row per (subject, visit code); later duplicates are reported."""
    seen: dict[tuple[str, str], Visit] = {}
    kept = []
    for visit in visits:
        key = (visit.subject_id, visit.visit)
        if visit.visit and key in seen:
            issues.note("duplicate_rows", visit.where, f"duplicate of {seen[key].where} "
                        f"(subject {visit.subject_id!r}, visit {visit.visit!r}); kept the first")
            continue
        seen[key] = visit
        kept.append(visit)
    return kept


def label_or_error(code: Any, mapping: Mapping[str, str | None] | None = None) -> tuple[str | None, str | None]:
    """(label, None) or (None, why): cohort ``mapping`` first (numeric codes), then the shared map."""
    if is_missing(code):
        return None, "missing diagnosis"
    key = str(code).strip()
    if mapping is not None:
        if key.endswith(".0"):
            key = key[:-2]
        if key in mapping:
            label = mapping[key]
            return (label, None) if label is not None else (None, f"diagnosis code {key!r} is excluded")
    try:
        return normalize_label(key), None
    except ValueError:
        return None, f"unknown diagnosis label {key!r}"


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def assign_splits(records: list[AnnotationRecord], *, seed: int, val_fraction: float = 0.1,
                  test_fraction: float = 0.0, test_per_class: int | None = None, all_test: bool = False,
                  classes: Sequence[str] = CLASS_NAMES, issues: Issues | None = None) -> list[AnnotationRecord]:
    """Set ``record.split`` subject-wise; returns the records kept (ordered by split, then input).

    * ``all_test``: everything is test (zero-shot cohorts).
    * ``test_per_class=n``: exactly ``n`` test visits per class in ``classes``, each from a different
      subject (chosen with the seed); that subject's other visits are dropped (listed in the report as
      ``dropped_test_subject_visits``) so that no subject is in two splits and the test set stays
      balanced. ``ValueError`` when a class has fewer than ``n`` eligible subjects.
    * otherwise ``test_fraction`` of the subjects, stratified by each subject's latest label.
    The remaining subjects are split into ``val_fraction`` val and the rest train, stratified the same way.
    """
    rng = np.random.default_rng(seed)
    if all_test:
        for record in records:
            record.split = "test"
        return list(records)
    by_subject: dict[str, list[AnnotationRecord]] = defaultdict(list)
    for record in records:
        by_subject[record.subject_id].append(record)
    test_records: list[AnnotationRecord] = []
    test_subjects: set[str] = set()
    if test_per_class:
        test_records = balanced_test_sample(records, test_per_class, classes=classes, seed=seed)
        test_subjects = {record.subject_id for record in test_records}
        chosen = {id(record) for record in test_records}
        for subject in sorted(test_subjects):
            for record in by_subject[subject]:
                if id(record) not in chosen and issues is not None:
                    issues.note("dropped_test_subject_visits", record.image,
                                f"other visit of test subject {subject}; dropped to keep splits subject-wise")
    remaining = sorted(subject for subject in by_subject if subject not in test_subjects)
    strata = {subject: _subject_stratum(by_subject[subject]) for subject in remaining}
    split_of: dict[str, str] = {}
    if not test_per_class and test_fraction > 0:
        test_part = _stratified_pick(remaining, strata, test_fraction, rng)
        split_of.update({subject: "test" for subject in test_part})
        remaining = [subject for subject in remaining if subject not in test_part]
    # val_fraction is a fraction of the subjects not in test, so it means the same with or without a test set
    val_part = _stratified_pick(remaining, strata, val_fraction, rng)
    split_of.update({subject: ("val" if subject in val_part else "train") for subject in remaining})
    for record in test_records:
        record.split = "test"
    kept = list(test_records)
    for record in records:
        if record.subject_id in split_of:
            record.split = split_of[record.subject_id]
            kept.append(record)
    order = {name: index for index, name in enumerate(SPLITS)}
    return sorted(kept, key=lambda record: order[record.split])


def balanced_test_sample(records: Sequence[AnnotationRecord], per_class: int, *, seed: int,
                         classes: Sequence[str] = CLASS_NAMES) -> list[AnnotationRecord]:
    """``per_class`` records of each class from distinct subjects (seeded; scarcest class picks first)."""
    rng = np.random.default_rng([seed, per_class])
    candidates: dict[str, dict[str, list[AnnotationRecord]]] = {name: defaultdict(list) for name in classes}
    for record in records:
        if record.label in candidates:
            candidates[record.label][record.subject_id].append(record)
    available = {name: len(candidates[name]) for name in classes}
    short = {name: count for name, count in available.items() if count < per_class}
    if short:
        raise ValueError(f"balanced test set needs {per_class} subjects per class; too few in "
                         + ", ".join(f"{name} ({count})" for name, count in short.items()))
    taken: set[str] = set()
    chosen: list[AnnotationRecord] = []
    # A subject can have visits of several classes (converters); the scarcest class chooses first.
    for name in sorted(classes, key=lambda name: (available[name], name)):
        subjects = [subject for subject in sorted(candidates[name]) if subject not in taken]
        if len(subjects) < per_class:
            raise ValueError(f"balanced test set: only {len(subjects)} {name} subjects left after the other "
                             f"classes took theirs (need {per_class})")
        for index in rng.permutation(len(subjects))[:per_class]:
            subject = subjects[index]
            visits = candidates[name][subject]
            chosen.append(visits[int(rng.integers(len(visits)))])
            taken.add(subject)
    order = {name: index for index, name in enumerate(classes)}
    return sorted(chosen, key=lambda record: (order[record.label], record.subject_id))


def _subject_stratum(records: Sequence[AnnotationRecord]) -> str:
    return str(records[-1].label)  # rows are in table order, so the last is usually the latest visit


def _stratified_pick(subjects: Sequence[str], strata: Mapping[str, str], fraction: float,
                     rng: np.random.Generator) -> set[str]:
    """``round(fraction * len(subjects))`` subjects, spread over strata by largest remainder.

    Rounding per stratum would put nothing in val/test for small cohorts (1 subject × 0.2 → 0).
    """
    if fraction <= 0 or not subjects:
        return set()
    groups: dict[str, list[str]] = defaultdict(list)
    for subject in subjects:
        groups[strata[subject]].append(subject)
    names = sorted(groups)
    quotas = {name: fraction * len(groups[name]) for name in names}
    counts = {name: int(math.floor(quotas[name])) for name in names}
    left = int(round(fraction * len(subjects))) - sum(counts.values())
    tie_break = rng.permutation(len(names))
    by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[names[i]] - counts[names[i]]), tie_break[i]))
    for index in by_remainder[:max(left, 0)]:
        counts[names[index]] += 1
    picked: set[str] = set()
    for name in names:
        members = groups[name]
        picked.update(members[index] for index in rng.permutation(len(members))[:counts[name]])
    return picked


# --------------------------------------------------------------------------------------------
# Records, output and report
# --------------------------------------------------------------------------------------------

def image_reference(path: Path, out_dir: Path) -> str:
    """The scan path relative to the annotation folder (see the module docstring)."""
    return os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())


def make_record(visit: Visit, scan: Scan, out_dir: Path, cohort: str) -> AnnotationRecord:
    ehr = {key: (None if is_missing(value) else value) for key, value in visit.ehr.items()}
    return AnnotationRecord(image=image_reference(scan.path, out_dir), subject_id=visit.subject_id,
                            label=visit.label, split="train", text=describe_ehr(ehr), visit=visit.visit,
                            cohort=cohort, site=visit.site, ehr=ehr)


@dataclass
class BuildResult:
    out_dir: Path
    files: dict[str, Path]
    counts: dict[str, int]
    report: dict[str, Any]
    records: list[AnnotationRecord]


@dataclass
class SplitOptions:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    test_per_class: int | None = None
    all_test: bool = False
    classes: Sequence[str] = CLASS_NAMES


def build_annotations(*, cohort: str, visits: Sequence[Visit], scans: Sequence[Scan], out_dir: str | Path,
                      issues: Issues, split: SplitOptions, date_tolerance_days: float = 90,
                      all_scans_per_visit: bool = False, allow_unlabelled: bool = False,
                      inputs: Mapping[str, Any] | None = None) -> BuildResult:
    """Match, drop unusable labels, split, write the three JSONL files and ``report.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    visits = dedupe_visits(visits, issues)
    pairs = match_scans(visits, scans, date_tolerance_days=date_tolerance_days,
                        all_scans_per_visit=all_scans_per_visit, issues=issues)
    records = []
    for visit, scan in pairs:
        if visit.label is None and (visit.label_error or not allow_unlabelled):
            issues.note("scans_of_skipped_rows", str(scan.path),
                        f"row {visit.where} skipped: {visit.label_error or 'no label'}")
            continue
        if visit.label is not None and visit.label not in split.classes:
            issues.note("scans_of_skipped_rows", str(scan.path),
                        f"label {visit.label} is not one of this cohort's classes {list(split.classes)}")
            continue
        records.append(make_record(visit, scan, out_dir, cohort))
    records = assign_splits(records, seed=split.seed, val_fraction=split.val_fraction,
                            test_fraction=split.test_fraction, test_per_class=split.test_per_class,
                            all_test=split.all_test, classes=split.classes, issues=issues)
    files = {}
    counts = {}
    for name in SPLITS:
        files[name] = out_dir / f"{name}.jsonl"
        counts[name] = write_annotations(files[name], [record for record in records if record.split == name])
    report = _report(cohort, records, issues, len(visits), len(scans), inputs or {}, split, date_tolerance_days)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    files["report"] = out_dir / "report.json"
    _log_summary(report)
    return BuildResult(out_dir=out_dir, files=files, counts=counts, report=report, records=records)


def _report(cohort: str, records: Sequence[AnnotationRecord], issues: Issues, n_rows: int, n_scans: int,
            inputs: Mapping[str, Any], split: SplitOptions, tolerance: float) -> dict[str, Any]:
    per_split = {name: Counter(str(record.label) for record in records if record.split == name) for name in SPLITS}
    subjects = {name: len({record.subject_id for record in records if record.split == name}) for name in SPLITS}
    return {
        "cohort": cohort,
        "inputs": {key: str(value) for key, value in inputs.items()},
        "options": {**{key: value for key, value in asdict(split).items() if key != "classes"},
                    "classes": list(split.classes), "date_tolerance_days": tolerance},
        "image_paths": "relative to this folder",
        "counts": {
            "rows_read": n_rows,  # table rows parsed into visits (malformed rows are counted below)
            "scans_recognised": n_scans,  # scan files whose name gave a subject id
            "records": len(records),
            **{f"records_{name}": sum(per_split[name].values()) for name in SPLITS},
            **{f"subjects_{name}": subjects[name] for name in SPLITS},
            **{kind: len(items) for kind, items in sorted(issues.items.items())},
        },
        "labels_per_split": {name: dict(sorted(per_split[name].items())) for name in SPLITS},
        **{kind: items for kind, items in sorted(issues.items.items())},
    }


def _log_summary(report: Mapping[str, Any]) -> None:
    counts = report["counts"]
    log.info("%s: %s", report["cohort"], ", ".join(f"{key}={value}" for key, value in counts.items()))
    for kind in ("unmatched_rows", "orphan_scans", "malformed_rows", "unknown_labels"):
        for item in report.get(kind, [])[:20]:
            log.warning("%s: %s: %s", kind, item["where"], item["message"])
        if len(report.get(kind, [])) > 20:
            log.warning("%s: … %d more in report.json", kind, len(report[kind]) - 20)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the module docstring (the table layout) kept as written."""


def base_parser(cohort: str, *, description: str, date_tolerance_days: float = 90, all_test: bool = False,
                val_fraction: float = 0.1, test_fraction: float = 0.2, table_required: bool = True,
                scan_glob: str = "**/*") -> argparse.ArgumentParser:
    """The options every cohort CLI shares (defaults differ per cohort)."""
    parser = argparse.ArgumentParser(prog=f"python -m dataset_builders.{cohort}", description=description,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--table", type=Path, required=table_required, help="the cohort's table (layout above)")
    parser.add_argument("--scans", type=Path, required=True, help="folder searched recursively for scans")
    parser.add_argument("--out", type=Path, required=True, help="folder for {train,val,test}.jsonl + report.json")
    parser.add_argument("--scan-glob", default=scan_glob,
                        help="glob under --scans selecting scan files (e.g. '**/RAW/*mpr-1*.img')")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="balanced test set: this many visits per class from distinct subjects (paper: 200)")
    parser.add_argument("--test-fraction", type=float, default=test_fraction,
                        help="fraction of subjects in test (ignored with --test-per-class / --all-test)")
    parser.add_argument("--val-fraction", type=float, default=val_fraction,
                        help="fraction of the non-test subjects in val")
    parser.add_argument("--all-test", action=argparse.BooleanOptionalAction, default=all_test,
                        help="put everything in test (zero-shot evaluation cohorts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--date-tolerance-days", type=float, default=date_tolerance_days,
                        help="a scan matches the nearest visit of its subject within this many days")
    parser.add_argument("--all-scans-per-visit", action="store_true",
                        help="keep every scan of a visit (default: the first path; the rest are reported)")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="malformed rows / unknown labels: count, list in report.json and skip, or stop")
    return parser


def split_options(args: argparse.Namespace, classes: Sequence[str] = CLASS_NAMES) -> SplitOptions:
    # An explicit balanced test set wins over the cohort's all-test default.
    all_test = bool(args.all_test) and not args.test_per_class
    return SplitOptions(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        test_per_class=args.test_per_class, all_test=all_test, classes=tuple(classes))


def run_cli(build: Callable[[argparse.Namespace], BuildResult], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
    """Parse, build, print where things went; a ``ValueError`` becomes a one-line error, exit 2."""
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        result = build(args)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    counts = result.report["counts"]
    print(f"wrote {counts['records']} records (train {result.counts['train']}, val {result.counts['val']}, "
          f"test {result.counts['test']}) to {result.out_dir}; unmatched rows "
          f"{counts.get('unmatched_rows', 0)}, orphan scans {counts.get('orphan_scans', 0)}; "
          f"details in {result.files['report']}")
    return 0


# --------------------------------------------------------------------------------------------
# The original MedBLIP code's lists
# --------------------------------------------------------------------------------------------

_DIAGNOSIS_SENTENCE = re.compile(r"\s*The diagnosis is\s+(?P<label>[^.]+?)\s*\.?\s*$", re.IGNORECASE)


def read_authors_tsv(path: str | Path, *, split: str = "train", cohort: str = "",
                     subject_pattern: str | None = None) -> list[AnnotationRecord]:
    """Read the authors' ``local_data/<name>.csv`` lists: ``image_path<TAB>report`` per line.

    The report ends with ``The diagnosis is X.``; ``X`` becomes the normalised label and the sentence
    is removed from ``text`` (otherwise the answer is in the prompt). A report without that sentence
    gives ``label=None``. ``subject_id`` is the first match of ``subject_pattern`` in the image path,
    else the file name without its extension (the lists carry no subject column, so splits made from
    them cannot be checked for subject overlap). Image paths are kept as written. ``ValueError`` names
    the file and line for a line without a tab or an unknown diagnosis.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            if "\t" not in line:
                raise ValueError(f"{where}: expected 'image_path<TAB>report'")
            image, report = line.split("\t", 1)
            label = None
            match = _DIAGNOSIS_SENTENCE.search(report)
            if match:
                try:
                    label = normalize_label(match.group("label"))
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                report = report[:match.start()].strip()
            subject = None
            if subject_pattern:
                found = re.search(subject_pattern, image)
                subject = found.group(0) if found else None
            if not subject:
                subject = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", Path(image).name)
            records.append(AnnotationRecord(image=image.strip(), subject_id=subject, label=label, split=split,
                                            text=report.strip(), cohort=cohort))
    return records
