"""NACC: the UDS visit table + MRI files → annotations.

Table (UDS CSV): ``NACCID``, ``NACCVNUM`` (visit number), ``VISITYR``/``VISITMO``/``VISITDAY`` and
``NACCUDSD`` are required. Optional EHR: ``NACCAGE``, ``SEX`` (1 male, 2 female), ``EDUC``,
``NACCMMSE``, ``MOCATOTS``/``MOCA`` (kept as ``ehr["moca"]``, not turned into an MMSE), ``CDRGLOB``,
``CDRSUM``, ``MEMUNITS`` (logical memory delayed), ``NACCNE4S`` (APOE e4 count); ``NACCADC`` is the site.
NACC codes "not assessed" as numbers (-4, 88, 95–98, 99, 888 …): every field has a valid range and
anything outside it is missing, never a score.

Labels (``NACCUDSD``): 1 normal → NC, 3 MCI → MCI, 4 dementia → AD (all-cause dementia, as the paper's
"AD" class), 2 impaired-not-MCI → MCI by default, the same as the shared label map's
"impaired not MCI"; ``--impaired-not-mci drop`` excludes those visits instead (reported).

Scans: paths containing the NACCID and a date (``YYYYMMDD`` or ``YYYY-MM-DD``) or a visit number
token (``_v3_``, ``visit3``); a date matches the nearest UDS visit within ``--date-tolerance-days``
(default 180: UDS visits are about a year apart and MRI sessions are not scheduled with them).

Usage::

    python -m dataset_builders.nacc --table investigator_nacc.csv --scans NACC_MRI/ --out annotations/nacc \\
        --test-per-class 200 --seed 0
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Sequence

from dataset_builders.annotate import BuildResult, build_annotations
from dataset_builders.cli import base_parser, run_cli, split_options
from dataset_builders.matching import Scan, Visit, date_in_path, discover_scans, label_or_error, parse_scans
from dataset_builders.splits import SplitOptions
from dataset_builders.tables import Issues, number, read_table, row_location, text_value

REQUIRED = ("NACCID", "NACCVNUM", "VISITYR", "VISITMO", "VISITDAY", "NACCUDSD")
_NACCID = re.compile(r"NACC\d{6}", re.IGNORECASE)
_VISIT = re.compile(r"(?:^|[_\-/.])(?:v|visit)[_\-]?(\d{1,2})(?=$|[_\-/.])", re.IGNORECASE)


def udsd_labels(impaired_not_mci: str = "MCI") -> dict[str, str | None]:
    """NACCUDSD code → class; ``None`` marks a code excluded on purpose."""
    if impaired_not_mci not in ("MCI", "drop"):
        raise ValueError(f"impaired_not_mci must be 'MCI' or 'drop', not {impaired_not_mci!r}")
    return {"1": "NC", "2": "MCI" if impaired_not_mci == "MCI" else None, "3": "MCI", "4": "AD"}


def parse_nacc_scan(path: Path) -> Scan | None:
    match = _NACCID.search(str(path))
    if not match:
        return None
    visit = _VISIT.search(path.name)
    return Scan(path=path, subject_id=match.group(0).upper(), visit=str(int(visit.group(1))) if visit else None,
                date=date_in_path(path))


def read_nacc_visits(table: str | Path, issues: Issues, impaired_not_mci: str = "MCI") -> list[Visit]:
    frame = read_table(table, REQUIRED)
    labels = udsd_labels(impaired_not_mci)
    moca_column = next((name for name in ("MOCATOTS", "MOCA") if name in frame.columns), None)
    visits = []
    for index, row in frame.iterrows():
        where = row_location(frame, index)
        subject = str(row["NACCID"]).strip().upper()
        visit_number = number(row["NACCVNUM"], valid=(1, 99))
        if not _NACCID.fullmatch(subject) or visit_number is None:
            issues.add("malformed_rows", where, f"NACCID {subject!r} / NACCVNUM {row['NACCVNUM']!r} unreadable")
            continue
        try:
            date = dt.date(*(int(number(row[name]) or 0) for name in ("VISITYR", "VISITMO", "VISITDAY")))
        except (TypeError, ValueError):
            issues.add("malformed_rows", where, f"visit date {row['VISITYR']}-{row['VISITMO']}-{row['VISITDAY']} "
                       "is not a date")
            continue
        label, error = label_or_error(row["NACCUDSD"], labels)
        if error and "excluded" in error:  # excluded on request: reported, never an error
            issues.note("excluded_labels", where, error, code=row["NACCUDSD"])
        elif error:
            issues.add("unknown_labels", where, error, code=row["NACCUDSD"])
        sex = number(row.get("SEX"), valid=(1, 2))
        ehr = {
            "age": number(row.get("NACCAGE"), valid=(18, 120)),
            "sex": {1: "M", 2: "F"}.get(sex),
            "education_years": number(row.get("EDUC"), valid=(0, 36)),
            "mmse": number(row.get("NACCMMSE"), valid=(0, 30)),
            "cdr_global": number(row.get("CDRGLOB"), valid=(0, 3)),
            "cdr_sb": number(row.get("CDRSUM"), valid=(0, 18)),
            "logical_memory_delayed": number(row.get("MEMUNITS"), valid=(0, 25)),
            "apoe4": number(row.get("NACCNE4S"), valid=(0, 2)),
        }
        if moca_column:
            ehr["moca"] = number(row[moca_column], valid=(0, 30))
        visits.append(Visit(subject_id=subject, visit=str(visit_number), date=date, label=label, label_error=error,
                            ehr=ehr, site=text_value(row.get("NACCADC")) or "", where=where))
    return visits


def build_nacc(table: str | Path, scans: str | Path, out: str | Path, *, split: SplitOptions | None = None,
               impaired_not_mci: str = "MCI", date_tolerance_days: float = 180, all_scans_per_visit: bool = False,
               scan_glob: str = "**/*", on_error: str = "skip") -> BuildResult:
    issues = Issues(on_error)
    visits = read_nacc_visits(table, issues, impaired_not_mci)
    found = parse_scans(discover_scans(scans, scan_glob), parse_nacc_scan, issues)
    return build_annotations(cohort="NACC", visits=visits, scans=found, out_dir=out, issues=issues,
                             split=split or SplitOptions(test_fraction=0.2), date_tolerance_days=date_tolerance_days,
                             all_scans_per_visit=all_scans_per_visit,
                             inputs={"table": table, "scans": scans, "impaired_not_mci": impaired_not_mci})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("nacc", description=__doc__, date_tolerance_days=180)
    parser.add_argument("--impaired-not-mci", choices=("MCI", "drop"), default="MCI",
                        help="NACCUDSD 2 (cognitively impaired, not MCI): count as MCI or exclude")

    def build(args: argparse.Namespace) -> BuildResult:
        return build_nacc(args.table, args.scans, args.out, split=split_options(args),
                          impaired_not_mci=args.impaired_not_mci, date_tolerance_days=args.date_tolerance_days,
                          all_scans_per_visit=args.all_scans_per_visit, scan_glob=args.scan_glob,
                          on_error=args.on_error)

    return run_cli(build, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
