"""ADNI: ADNIMERGE.csv + a LONI image download → annotations.

Table (ADNIMERGE layout): ``PTID`` (``002_S_0295``), ``VISCODE`` (``bl``, ``m06`` …), ``EXAMDATE`` and the
label column ``DX`` (``CN``/``MCI``/``Dementia``; older releases also ``NL``, ``MCI to Dementia`` …, read
as the diagnosis after "to") are required; ``DX_bl`` is used with ``--label-column DX_bl``. Optional EHR
columns: ``AGE`` (at baseline; visit age = ``AGE + Years_bl`` when ``Years_bl`` exists), ``PTGENDER``,
``PTEDUCAT``, ``MMSE``, ``CDRSB``, ``LDELTOTAL``, ``APOE4``, ``ADAS13``, ``FAQ``. Site = the PTID's
3-digit prefix.

Scans: any path containing the PTID and a date (LONI folders ``2006-04-18_08_20_30.0`` or the
``..._20060418..._I13722.nii`` name) or a visit code token (``_m06_``, ``-bl.``); a date matches the
nearest EXAMDATE of that subject within ``--date-tolerance-days`` (default 90: ADNI visits are ≥ 6
months apart, and MRI dates drift a few weeks from the clinical EXAMDATE).

Usage::

    python -m dataset_builders.adni --table ADNIMERGE.csv --scans ADNI/ --out annotations/adni \\
        --test-per-class 200 --val-fraction 0.1 --seed 0
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from dataset_builders.annotate import BuildResult, build_annotations
from dataset_builders.cli import base_parser, run_cli, split_options
from dataset_builders.matching import (Scan, Visit, date_in_path, discover_scans, label_or_error,
                                       normalize_viscode, parse_scans, viscode_in_path)
from dataset_builders.splits import SplitOptions
from dataset_builders.tables import (Issues, number, parse_date, read_table, require_columns, row_location,
                                     text_value)

REQUIRED = ("PTID", "VISCODE", "EXAMDATE")
_PTID = re.compile(r"(?<!\d)(\d{3})_S_(\d{4})(?!\d)")
def adni_diagnosis(code: str) -> str:
    """Old ADNIMERGE conversion strings (``MCI to Dementia``) mean the diagnosis after the change."""
    code = code.strip()
    if " to " in code.lower():
        code = re.split(r"\s+to\s+", code, flags=re.IGNORECASE)[-1]
    return "CN" if code.upper() == "NL" else code


def parse_adni_scan(path: Path) -> Scan | None:
    match = _PTID.search(str(path))
    if not match:
        return None
    return Scan(path=path, subject_id=f"{match.group(1)}_S_{match.group(2)}", visit=viscode_in_path(path),
                date=date_in_path(path))


def read_adni_visits(table: str | Path, issues: Issues, label_column: str = "DX") -> list[Visit]:
    frame = read_table(table, REQUIRED)
    require_columns(frame, [label_column], table)
    has = set(frame.columns)
    visits = []
    for index, row in frame.iterrows():
        where = row_location(frame, index)
        subject = str(row["PTID"]).strip()
        if not _PTID.fullmatch(subject):
            issues.add("malformed_rows", where, f"PTID {subject!r} is not like 002_S_0295")
            continue
        try:
            date = parse_date(row["EXAMDATE"])
        except ValueError as error:
            issues.add("malformed_rows", where, str(error))
            continue
        code = text_value(row[label_column])
        label, error = label_or_error(adni_diagnosis(code) if code else None)
        if error:
            issues.add("unknown_labels", where, error, code=code)
        age = number(row["AGE"], valid=(40, 110)) if "AGE" in has else None
        years_bl = number(row["Years_bl"], valid=(0, 30)) if "Years_bl" in has else None
        if age is not None and years_bl is not None:
            age = round(age + years_bl, 1)
        ehr = {
            "age": age,
            "sex": {"male": "M", "female": "F"}.get(str(row.get("PTGENDER", "")).strip().lower()),
            "education_years": number(row.get("PTEDUCAT"), valid=(0, 30)),
            "mmse": number(row.get("MMSE"), valid=(0, 30)),
            "cdr_sb": number(row.get("CDRSB"), valid=(0, 18)),
            "logical_memory_delayed": number(row.get("LDELTOTAL"), valid=(0, 25)),
            "apoe4": number(row.get("APOE4"), valid=(0, 2)),
            "adas13": number(row.get("ADAS13"), valid=(0, 85)),
            "faq": number(row.get("FAQ"), valid=(0, 30)),
        }
        visits.append(Visit(subject_id=subject, visit=normalize_viscode(str(row["VISCODE"])), date=date,
                            label=label, label_error=error, ehr=ehr, site=subject[:3], where=where))
    return visits


def build_adni(table: str | Path, scans: str | Path, out: str | Path, *, split: SplitOptions | None = None,
               label_column: str = "DX", date_tolerance_days: float = 90, all_scans_per_visit: bool = False,
               scan_glob: str = "**/*", on_error: str = "skip") -> BuildResult:
    issues = Issues(on_error)
    visits = read_adni_visits(table, issues, label_column)
    found = parse_scans(discover_scans(scans, scan_glob), parse_adni_scan, issues)
    return build_annotations(cohort="ADNI", visits=visits, scans=found, out_dir=out, issues=issues,
                             split=split or SplitOptions(test_fraction=0.2), date_tolerance_days=date_tolerance_days,
                             all_scans_per_visit=all_scans_per_visit,
                             inputs={"table": table, "scans": scans, "label_column": label_column})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("adni", description=__doc__, date_tolerance_days=90)
    parser.add_argument("--label-column", default="DX", choices=("DX", "DX_bl"),
                        help="per-visit diagnosis (DX) or baseline diagnosis (DX_bl)")

    def build(args: argparse.Namespace) -> BuildResult:
        return build_adni(args.table, args.scans, args.out, split=split_options(args), label_column=args.label_column,
                          date_tolerance_days=args.date_tolerance_days, all_scans_per_visit=args.all_scans_per_visit,
                          scan_glob=args.scan_glob, on_error=args.on_error)

    return run_cli(build, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
