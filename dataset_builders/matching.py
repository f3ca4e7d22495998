"""Scans and visits: finding scan files, reading subject, visit code and date from their paths, and
pairing each scan with one visit of its subject (the same visit code, else the nearest date within a
tolerance). Builders never open image files; they match by path and name only.
"""
from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dataset_builders.tables import Issues
from lavis_medblip.annotations.ehr import is_missing
from lavis_medblip.annotations.labels import normalize_label

#: File endings taken as scans. Analyze pairs are found by their ``.img`` (nibabel opens either half).
SCAN_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".mgz", ".mgh", ".img")


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
