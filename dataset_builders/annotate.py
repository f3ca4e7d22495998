"""Writing a cohort's annotations: :func:`build_annotations` matches scans to visits, drops unusable
labels, splits and writes ``{train,val,test}.jsonl`` plus ``report.json``. Named for what it produces
(the old ``common.py`` said nothing); the shared command line is :mod:`dataset_builders.cli`.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from dataset_builders.matching import Scan, Visit, dedupe_visits, match_scans
from dataset_builders.splits import SplitOptions, assign_splits
from dataset_builders.tables import Issues
from lavis_medblip.annotations.ehr import describe_ehr, is_missing
from lavis_medblip.annotations.schema import SPLITS, AnnotationRecord, write_annotations

log = logging.getLogger("dataset_builders")


def image_reference(path: Path, out_dir: Path) -> str:
    """The scan path relative to the annotation folder (the schema's convention, as in the simulator).

    Keep the annotation folder and the scans where they are relative to each other, or rebuild.
    """
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


def build_annotations(*, cohort: str, visits: Sequence[Visit], scans: Sequence[Scan], out_dir: str | Path,
                      issues: Issues, split: SplitOptions, date_tolerance_days: float = 90,
                      all_scans_per_visit: bool = False, allow_unlabelled: bool = False,
                      inputs: Mapping[str, Any] | None = None) -> BuildResult:
    """Match, drop unusable labels, split, write the three JSONL files and ``report.json``.

    1. Every scan is matched to one visit of the same subject: the same visit code if the name has one,
       else the visit with the nearest date within ``date_tolerance_days`` (ties → the earlier row).
    2. One scan is kept per visit (the first path in sorted order; the others are reported as
       ``extra_scans``) unless ``all_scans_per_visit`` is set.
    3. Visits without a usable label are dropped (unknown codes are reported, or raised with
       ``on_error="raise"``), unless ``allow_unlabelled`` keeps ``label: None`` (image–text pretraining).
    4. The records are split subject-wise with :func:`~dataset_builders.splits.assign_splits`.
    5. ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (the :mod:`lavis_medblip.annotations.schema` format,
       ``text = describe_ehr(ehr)``) and ``report.json`` are written into ``out_dir``.
    """
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
