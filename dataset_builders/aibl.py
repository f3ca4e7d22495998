"""AIBL: the download's CSV tables + a LONI image download → annotations (zero-shot: all test by default).

``--table`` is the folder holding the AIBL CSVs, merged by ``RID`` + ``VISCODE``:

* ``aibl_pdxconv_*.csv`` (required): ``RID``, ``VISCODE``, ``DXCURREN`` (1 NC, 2 MCI, 3 AD); ``SITEID`` if present;
* ``aibl_mri3meta_*.csv`` (required): ``RID``, ``VISCODE``, ``EXAMDATE`` — the MRI date scans are matched to;
* ``aibl_ptdemog_*.csv``: ``RID``, ``PTGENDER`` (1 male, 2 female), ``PTDOB`` (``/1931``: year only);
* ``aibl_mmse_*.csv`` (``MMSCORE``), ``aibl_cdr_*.csv`` (``CDGLOBAL``), ``aibl_neurobat_*.csv`` (``LDELTOTAL``).

Optional tables that are absent leave their fields missing (listed in the report). AIBL codes
"missing" as -4/-1: fields have valid ranges and anything outside is missing. Age at the visit is
``EXAMDATE - 1 July of the birth year`` (only the year is released), to 0.1 year.

Scans: LONI layout ``AIBL/<RID>/MPRAGE/2008-08-14_11_21_43.0/I123/AIBL_<RID>_MR_MPRAGE_..._20080814..._I123.nii``;
the RID comes from the ``AIBL_<RID>_`` name (or the folder after ``AIBL``), the date from the path,
matched to the nearest ``EXAMDATE`` of that RID within ``--date-tolerance-days`` (default 90;
AIBL visits are 18 months apart).

Usage::

    python -m dataset_builders.aibl --table AIBL_tables/ --scans AIBL/ --out annotations/aibl
    python -m dataset_builders.aibl --table AIBL_tables/ --scans AIBL/ --out annotations/aibl --test-per-class 100
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from dataset_builders.annotate import BuildResult, build_annotations
from dataset_builders.cli import base_parser, run_cli, split_options
from dataset_builders.matching import (Scan, Visit, date_in_path, discover_scans, label_or_error,
                                       normalize_viscode, parse_scans, viscode_in_path)
from dataset_builders.splits import SplitOptions
from dataset_builders.tables import Issues, number, parse_date, read_table, row_location, text_value, years_between

DXCURREN = {"1": "NC", "2": "MCI", "3": "AD"}
#: table name → (required, columns it contributes); keyed by RID + VISCODE except ptdemog (RID).
TABLES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "pdxconv": (True, ("DXCURREN",)),
    "mri3meta": (True, ("EXAMDATE",)),
    "ptdemog": (False, ("PTGENDER", "PTDOB")),
    "mmse": (False, ("MMSCORE",)),
    "cdr": (False, ("CDGLOBAL",)),
    "neurobat": (False, ("LDELTOTAL",)),
}
_NAME_RID = re.compile(r"AIBL_(\d+)_", re.IGNORECASE)


def find_tables(folder: str | Path) -> dict[str, Path | None]:
    """``aibl_<name>_*.csv`` per table name; ``ValueError`` for a missing required or an ambiguous table."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: AIBL table folder not found (--table is the folder with the aibl_*.csv files)")
    found: dict[str, Path | None] = {}
    for name, (required, _) in TABLES.items():
        matches = sorted(folder.glob(f"aibl_{name}_*.csv")) + sorted(folder.glob(f"aibl_{name}.csv"))
        if len(matches) > 1:
            raise ValueError(f"{folder}: several aibl_{name} tables {[path.name for path in matches]}; keep one")
        if not matches and required:
            raise ValueError(f"{folder}: missing table aibl_{name}_*.csv")
        found[name] = matches[0] if matches else None
    return found


def merged_table(folder: str | Path, issues: Issues) -> pd.DataFrame:
    """pdxconv rows with the other tables' columns joined on RID (+ VISCODE); ``where`` names the source row."""
    tables = find_tables(folder)
    base = read_table(tables["pdxconv"], ("RID", "VISCODE", "DXCURREN"))
    base["where"] = [row_location(base, index) for index in range(len(base))]
    base["RID"] = base["RID"].str.strip()
    base["VISCODE"] = base["VISCODE"].map(normalize_viscode)
    for name, (_, columns) in TABLES.items():
        if name == "pdxconv":
            continue
        if tables[name] is None:
            issues.note("missing_tables", str(folder), f"no aibl_{name}_*.csv: {list(columns)} left missing")
            base = base.assign(**{column: "" for column in columns})
            continue
        keys = ["RID"] if name == "ptdemog" else ["RID", "VISCODE"]
        side = read_table(tables[name], keys + list(columns))
        side["RID"] = side["RID"].str.strip()
        if "VISCODE" in keys:
            side["VISCODE"] = side["VISCODE"].map(normalize_viscode)
        duplicated = side.duplicated(keys, keep="first")
        for index in side.index[duplicated]:
            issues.note("duplicate_rows", row_location(side, index), f"another {name} row for the same "
                        f"{'/'.join(keys)}; kept the first")
        side = side.loc[~duplicated, keys + list(columns)]
        base = base.drop(columns=[column for column in columns if column in base.columns])  # pdxconv has its own EXAMDATE
        base = base.merge(side, on=keys, how="left")
    return base.fillna("")


def parse_aibl_scan(path: Path) -> Scan | None:
    match = _NAME_RID.search(path.name)
    rid = match.group(1) if match else None
    if rid is None:  # LONI folder layout AIBL/<RID>/...
        parts = path.parts
        for index, part in enumerate(parts[:-1]):
            if part.upper() == "AIBL" and parts[index + 1].isdigit():
                rid = parts[index + 1]
    if rid is None:
        return None
    return Scan(path=path, subject_id=str(int(rid)), visit=viscode_in_path(path), date=date_in_path(path))


def read_aibl_visits(folder: str | Path, issues: Issues) -> list[Visit]:
    frame = merged_table(folder, issues)
    visits = []
    for _, row in frame.iterrows():
        where = row["where"]
        rid = number(row["RID"])
        if rid is None or not float(rid).is_integer():
            issues.add("malformed_rows", where, f"RID {row['RID']!r} is not a number")
            continue
        try:
            date = parse_date(row["EXAMDATE"])
        except ValueError as error:
            issues.add("malformed_rows", where, f"mri3meta EXAMDATE: {error}")
            continue
        label, error = label_or_error(row["DXCURREN"], DXCURREN)
        if error:
            issues.add("unknown_labels", where, error, code=row["DXCURREN"])
        birth_year = re.search(r"\d{4}", str(row["PTDOB"]))
        age = None
        if birth_year and date:
            age = round(years_between(dt.date(int(birth_year.group(0)), 7, 1), date), 1)
        ehr = {
            "age": age if age is not None and 40 <= age <= 110 else None,
            "sex": {1: "M", 2: "F"}.get(number(row["PTGENDER"], valid=(1, 2))),
            "mmse": number(row["MMSCORE"], valid=(0, 30)),
            "cdr_global": number(row["CDGLOBAL"], valid=(0, 3)),
            "logical_memory_delayed": number(row["LDELTOTAL"], valid=(0, 25)),
        }
        visits.append(Visit(subject_id=str(int(rid)), visit=row["VISCODE"], date=date, label=label,
                            label_error=error, ehr=ehr, site=text_value(row.get("SITEID")) or "", where=where))
    return visits


def build_aibl(table: str | Path, scans: str | Path, out: str | Path, *, split: SplitOptions | None = None,
               date_tolerance_days: float = 90, all_scans_per_visit: bool = False, scan_glob: str = "**/*",
               on_error: str = "skip") -> BuildResult:
    issues = Issues(on_error)
    visits = read_aibl_visits(table, issues)
    found = parse_scans(discover_scans(scans, scan_glob), parse_aibl_scan, issues)
    return build_annotations(cohort="AIBL", visits=visits, scans=found, out_dir=out, issues=issues,
                             split=split or SplitOptions(all_test=True), date_tolerance_days=date_tolerance_days,
                             all_scans_per_visit=all_scans_per_visit, inputs={"tables": table, "scans": scans})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("aibl", description=__doc__, all_test=True, test_fraction=0.0)

    def build(args: argparse.Namespace) -> BuildResult:
        return build_aibl(args.table, args.scans, args.out, split=split_options(args),
                          date_tolerance_days=args.date_tolerance_days, all_scans_per_visit=args.all_scans_per_visit,
                          scan_glob=args.scan_glob, on_error=args.on_error)

    return run_cli(build, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
