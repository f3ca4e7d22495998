"""MIRIAD: scans named ``miriad_<subject>_<AD|HC>_<M|F>_<visit>_MR_<scan>.nii`` → annotations (binary, zero-shot).

The label and sex come from the file name (``HC`` → NC, ``AD`` → AD); every scan is usable without a
table. An optional demographics CSV (``--table``) adds age at the visit and MMSE; its columns are found
case-insensitively: subject (``subject``/``subject_id``/``id``; ``188`` or ``miriad_188``), ``visit``,
``age``, ``mmse``. Demographics rows without a scan are reported as ``unmatched_rows``; visits without a
demographics row are kept (label from the name) and reported as ``scans_without_row``.
MIRIAD repeats scans within a visit (``MR_1``, ``MR_2``): the first is kept unless ``--all-scans-per-visit``.
All test by default (the paper evaluates MIRIAD zero-shot).

Usage::

    python -m dataset_builders.miriad --scans MIRIAD/ --out annotations/miriad
    python -m dataset_builders.miriad --scans MIRIAD/ --table miriad_demographics.csv --out annotations/miriad
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from dataset_builders.annotate import BuildResult, build_annotations
from dataset_builders.cli import base_parser, run_cli, split_options
from dataset_builders.matching import Scan, Visit, discover_scans, label_or_error, parse_scans
from dataset_builders.splits import SplitOptions
from dataset_builders.tables import Issues, find_column, number, read_table, row_location

MIRIAD_CLASSES = ("NC", "AD")
_NAME = re.compile(r"miriad_(\d+)_([A-Za-z]+)_([MF])_(\d+)_MR_(\d+)", re.IGNORECASE)


def parse_miriad_scan(path: Path) -> Scan | None:
    match = _NAME.search(path.name)
    if not match:
        return None
    subject, group, sex, visit, _ = match.groups()
    return Scan(path=path, subject_id=str(int(subject)), visit=str(int(visit)),
                extra={"group": group.upper(), "sex": sex.upper()})


def read_demographics(table: str | Path, issues: Issues) -> dict[tuple[str, str], tuple[dict[str, Any], str]]:
    """(subject, visit) → (age/MMSE, ``file:line``)."""
    frame = read_table(table)
    subject_column = find_column(frame, ("subject", "subject_id", "id", "participant"), table)
    visit_column = find_column(frame, ("visit", "visit_number", "session"), table)
    age_column = find_column(frame, ("age", "age_at_visit"), table, required=False)
    mmse_column = find_column(frame, ("mmse",), table, required=False)
    rows: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
    for index, row in frame.iterrows():
        where = row_location(frame, index)
        subject = re.search(r"\d+", str(row[subject_column]))
        visit = number(row[visit_column], valid=(0, 99))
        if subject is None or visit is None:
            issues.add("malformed_rows", where, f"subject {row[subject_column]!r} / visit {row[visit_column]!r} "
                       "unreadable")
            continue
        key = (str(int(subject.group(0))), str(int(visit)))
        if key in rows:
            issues.note("duplicate_rows", where, f"duplicate of {rows[key][1]}; kept the first")
            continue
        rows[key] = ({"age": number(row[age_column], valid=(18, 110)) if age_column else None,
                      "mmse": number(row[mmse_column], valid=(0, 30)) if mmse_column else None}, where)
    return rows


def build_miriad(scans: str | Path, out: str | Path, *, table: str | Path | None = None,
                 split: SplitOptions | None = None, all_scans_per_visit: bool = False, scan_glob: str = "**/*",
                 on_error: str = "skip") -> BuildResult:
    issues = Issues(on_error)
    found = parse_scans(discover_scans(scans, scan_glob), parse_miriad_scan, issues)
    demographics = read_demographics(table, issues) if table else {}
    visits: dict[tuple[str, str], Visit] = {}
    for scan in found:  # one visit per (subject, visit) named by the files themselves
        key = (scan.subject_id, scan.visit or "")
        if key in visits:
            continue
        label, error = label_or_error(scan.extra["group"])
        if error:
            issues.add("unknown_labels", str(scan.path), error, code=scan.extra["group"])
        ehr, where = demographics.get(key, ({"age": None, "mmse": None}, str(scan.path)))
        if table and key not in demographics:
            issues.note("scans_without_row", str(scan.path), f"no demographics row for subject {key[0]} visit "
                        f"{key[1]}; kept with the label from the file name")
        visits[key] = Visit(subject_id=key[0], visit=key[1], date=None, label=label, label_error=error,
                            ehr={"age": ehr["age"], "sex": scan.extra["sex"], "mmse": ehr["mmse"]}, where=where)
    for key, (_, where) in demographics.items():
        if key not in visits:
            issues.note("unmatched_rows", where, f"no scan for subject {key[0]} visit {key[1]}")
    return build_annotations(cohort="MIRIAD", visits=list(visits.values()), scans=found, out_dir=out, issues=issues,
                             split=split or SplitOptions(all_test=True, classes=MIRIAD_CLASSES),
                             all_scans_per_visit=all_scans_per_visit, inputs={"table": table, "scans": scans})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("miriad", description=__doc__, all_test=True, test_fraction=0.0,
                         table_required=False)

    def build(args: argparse.Namespace) -> BuildResult:
        return build_miriad(args.scans, args.out, table=args.table, split=split_options(args, MIRIAD_CLASSES),
                            all_scans_per_visit=args.all_scans_per_visit, scan_glob=args.scan_glob,
                            on_error=args.on_error)

    return run_cli(build, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
