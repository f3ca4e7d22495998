"""OASIS-1 (cross-sectional) and OASIS-2 (longitudinal) → annotations.

The release is recognised from the table's columns (``--release`` overrides):

* **OASIS-1** (``oasis_cross-sectional.csv``): ``ID`` (``OAS1_0001_MR1``), ``M/F``, ``Age``, ``Educ``, ``SES``,
  ``MMSE``, ``CDR``. OASIS-1 has no diagnosis and the paper uses it only for image–text pretraining,
  so every record has ``label: null`` (the schema allows it); CDR stays in the EHR text. ``Educ`` there
  is a 1–5 education *level*, not years, so it is kept as ``ehr["education_level"]`` (not described in
  the text) rather than passed off as ``education_years``. Default split: train/val only.
* **OASIS-2** (``oasis_longitudinal.csv``): ``Subject ID``, ``MRI ID`` (``OAS2_0001_MR1``), ``Group``,
  ``Visit``, ``M/F``, ``Age``, ``EDUC`` (years), ``SES``, ``MMSE``, ``CDR``. Two classes as in the paper's
  OASIS-2×200 test (demented vs not): ``Nondemented`` → NC, ``Demented`` → AD, and ``Converted`` (not
  demented at first, demented later) per visit from its CDR by default (0 → NC, ≥ 0.5 → AD; a
  converted visit without CDR is reported and skipped); ``--converted AD`` or ``drop`` instead.

Scans are matched by the session id (``OAS1_0001_MR1`` / ``OAS2_0001_MR1``) anywhere in the path, as in
the downloads (``OAS2_0001_MR1/RAW/mpr-1.nifti.img``, ``OAS1_0001_MR1/RAW/OAS1_0001_MR1_mpr-1_anon.img``).
Sessions hold several scans (``mpr-1`` … ``mpr-4`` plus processed images): the first path is kept
unless ``--all-scans-per-visit``; choose which with ``--scan-glob '**/RAW/*mpr-1*.img'``.

Usage::

    python -m dataset_builders.oasis --table oasis_longitudinal.csv --scans OASIS2/ --out annotations/oasis2 \\
        --test-per-class 200 --seed 0
    python -m dataset_builders.oasis --table oasis_cross-sectional.csv --scans OASIS1/ --out annotations/oasis1
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from dataset_builders.annotate import BuildResult, build_annotations
from dataset_builders.cli import base_parser, run_cli, split_options
from dataset_builders.matching import Scan, Visit, discover_scans, label_or_error, parse_scans
from dataset_builders.splits import SplitOptions
from dataset_builders.tables import Issues, number, read_table, row_location

OASIS1_REQUIRED = ("ID",)
OASIS2_REQUIRED = ("Subject ID", "MRI ID", "Group")
OASIS2_CLASSES = ("NC", "AD")
_SESSION = re.compile(r"(OAS[12]_\d{4})_(MR\d+)", re.IGNORECASE)


def detect_release(table: str | Path) -> int:
    columns = set(read_table(table).columns)
    if "MRI ID" in columns:
        return 2
    if "ID" in columns:
        return 1
    raise ValueError(f"{table}: neither an OASIS-1 table (missing column 'ID') nor an OASIS-2 table "
                     f"(missing column 'MRI ID'); the table has {sorted(columns)}")


def parse_oasis_scan(path: Path) -> Scan | None:
    match = _SESSION.search("/".join(path.parts[-4:]))
    if not match:
        return None
    return Scan(path=path, subject_id=match.group(1).upper(), visit=match.group(2).upper())


def _sex(value: object) -> str | None:
    return {"m": "M", "f": "F"}.get(str(value).strip().lower())


def read_oasis1_visits(table: str | Path, issues: Issues) -> list[Visit]:
    frame = read_table(table, OASIS1_REQUIRED)
    visits = []
    for index, row in frame.iterrows():
        where = row_location(frame, index)
        match = _SESSION.fullmatch(str(row["ID"]).strip())
        if not match:
            issues.add("malformed_rows", where, f"ID {row['ID']!r} is not like OAS1_0001_MR1")
            continue
        ehr = {
            "age": number(row.get("Age"), valid=(10, 110)),
            "sex": _sex(row.get("M/F")),
            "ses": number(row.get("SES"), valid=(1, 5)),
            "mmse": number(row.get("MMSE"), valid=(0, 30)),
            "cdr_global": number(row.get("CDR"), valid=(0, 3)),
            "education_level": number(row.get("Educ"), valid=(1, 5)),
        }
        visits.append(Visit(subject_id=match.group(1).upper(), visit=match.group(2).upper(), date=None, label=None,
                            ehr=ehr, where=where))
    return visits


def oasis2_label(group: str, cdr: float | None, converted: str) -> tuple[str | None, str | None]:
    """(label, None) or (None, why) for an OASIS-2 ``Group`` value at a visit with global ``cdr``."""
    if str(group).strip().lower() != "converted":
        return label_or_error(group)
    if converted == "drop":
        return None, "Converted subject excluded (--converted drop)"
    if converted == "AD":
        return "AD", None
    if cdr is None:
        return None, "Converted subject's visit has no CDR to decide demented or not"
    return ("NC" if cdr == 0 else "AD"), None


def read_oasis2_visits(table: str | Path, issues: Issues, converted: str = "cdr") -> list[Visit]:
    if converted not in ("cdr", "AD", "drop"):
        raise ValueError(f"converted must be 'cdr', 'AD' or 'drop', not {converted!r}")
    frame = read_table(table, OASIS2_REQUIRED)
    visits = []
    for index, row in frame.iterrows():
        where = row_location(frame, index)
        match = _SESSION.fullmatch(str(row["MRI ID"]).strip())
        if not match or match.group(1).upper() != str(row["Subject ID"]).strip().upper():
            issues.add("malformed_rows", where, f"MRI ID {row['MRI ID']!r} is not a session of {row['Subject ID']!r}")
            continue
        cdr = number(row.get("CDR"), valid=(0, 3))
        label, error = oasis2_label(row["Group"], cdr, converted)
        if error and "excluded" in error:
            issues.note("excluded_labels", where, error, code=row["Group"])
        elif error:
            issues.add("unknown_labels", where, error, code=row["Group"])
        ehr = {
            "age": number(row.get("Age"), valid=(10, 110)),
            "sex": _sex(row.get("M/F")),
            "education_years": number(row.get("EDUC"), valid=(0, 30)),
            "ses": number(row.get("SES"), valid=(1, 5)),
            "mmse": number(row.get("MMSE"), valid=(0, 30)),
            "cdr_global": cdr,
        }
        visits.append(Visit(subject_id=match.group(1).upper(), visit=match.group(2).upper(), date=None, label=label,
                            label_error=error, ehr=ehr, where=where))
    return visits


def build_oasis(table: str | Path, scans: str | Path, out: str | Path, *, release: int | None = None,
                split: SplitOptions | None = None, converted: str = "cdr", all_scans_per_visit: bool = False,
                scan_glob: str = "**/*", on_error: str = "skip") -> BuildResult:
    release = release or detect_release(table)
    issues = Issues(on_error)
    if release == 1:
        visits = read_oasis1_visits(table, issues)
        split = split or SplitOptions(test_fraction=0.0)
        if split.test_per_class:
            raise ValueError("OASIS-1 has no diagnosis (label null): a balanced test set is impossible")
    else:
        visits = read_oasis2_visits(table, issues, converted)
        split = replace(split or SplitOptions(test_fraction=0.2), classes=OASIS2_CLASSES)
    found = parse_scans(discover_scans(scans, scan_glob), parse_oasis_scan, issues)
    return build_annotations(cohort=f"OASIS-{release}", visits=visits, scans=found, out_dir=out, issues=issues,
                             split=split, all_scans_per_visit=all_scans_per_visit, allow_unlabelled=release == 1,
                             inputs={"table": table, "scans": scans, "release": release, "converted": converted})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("oasis", description=__doc__, test_fraction=None)
    parser.add_argument("--release", type=int, choices=(1, 2), default=None, help="default: from the columns")
    parser.add_argument("--converted", choices=("cdr", "AD", "drop"), default="cdr",
                        help="OASIS-2 'Converted' visits: label by CDR, all AD, or exclude")

    def build(args: argparse.Namespace) -> BuildResult:
        release = args.release or detect_release(args.table)
        if args.test_fraction is None:  # OASIS-1 is pretraining data: no test split unless asked
            args.test_fraction = 0.0 if release == 1 else 0.2
        return build_oasis(args.table, args.scans, args.out, release=release,
                           split=split_options(args, OASIS2_CLASSES if release == 2 else ("NC", "MCI", "AD")),
                           converted=args.converted, all_scans_per_visit=args.all_scans_per_visit,
                           scan_glob=args.scan_glob, on_error=args.on_error)

    return run_cli(build, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
