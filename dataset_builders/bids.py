"""A BIDS dataset (raw, or written by Clinica's converters) → annotations, with pybids.

Scans: every ``anat/*_T1w.nii[.gz]`` of every subject and session (pybids' index of the raw dataset,
derivatives left out). EHR and diagnosis come from ``participants.tsv``, ``phenotype/*.tsv`` (keyed by
``participant_id`` and, where present, ``session_id``) and each subject's ``sub-*_sessions.tsv``; a
session's values win over the participant's. Clinica's column names (``diagnosis``, ``MMS``,
``cdr_global``, ``age``, ``sex``, ``education``, ...) are understood by default
(:mod:`dataset_builders.bids_columns`); ``--diagnosis-column`` names another, ``--map`` maps its codes
(``NC=CN,MCI=EMCI,MCI=LMCI,drop=SMC``; codes not named go through the shared label map).

A subject with a ``sessions.tsv`` has one visit per row (rows without a T1w are reported as
``unmatched_rows``); a subject listed only in ``participants.tsv`` has one visit per session folder.
T1w images of subjects no table lists are ``orphan_scans``. Every T1w of a session is kept (runs,
acquisitions); ``--no-all-scans-per-visit`` keeps the first. Subject ids are ``participant_id``s
(``sub-ADNI002S0295``), visits ``session_id``s (``ses-M000``; ``n/a`` without sessions).

Usage::

    clinica convert adni-to-bids ADNI/ clinical/ ADNI_BIDS/          # Clinica first, if your cohort has a converter
    python -m dataset_builders.bids --bids-dir ADNI_BIDS/ --out adni_bids/annotations --test-per-class 200
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dataset_builders.annotate import BuildResult, build_annotations
from dataset_builders.bids_columns import (DIAGNOSIS_COLUMNS, NO_SESSION, SITE_COLUMNS, ehr_fields, lookup,
                                           parse_label_map)
from dataset_builders.cli import base_parser, run_cli, split_options
from dataset_builders.matching import Scan, Visit, label_or_error
from dataset_builders.splits import SplitOptions
from dataset_builders.tables import Issues, read_table, row_location

T1W_EXTENSIONS = (".nii", ".nii.gz")


@dataclass
class BIDSTables:
    """The rows of a dataset's tables, keyed by participant (and session), each with its ``file:line``."""

    participants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    sessions: dict[str, list[tuple[str, str, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    phenotype: dict[tuple[str, str | None], dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))
    files: list[Path] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)

    def merged(self, subject: str, session: str | None, session_row: Mapping[str, Any]) -> dict[str, Any]:
        """participants → phenotype (subject) → phenotype (session) → sessions: later values win."""
        row: dict[str, Any] = {}
        for layer in (self.participants.get(subject, ("", {}))[1], self.phenotype.get((subject, None), {}),
                      self.phenotype.get((subject, session), {}), session_row):
            row.update({key: value for key, value in layer.items() if lookup({key: value}, (key,)) is not None})
        return row


def _table_rows(path: Path, key: str) -> list[tuple[str, dict[str, Any]]]:
    frame = read_table(path, [key], sep="\t")
    return [(row_location(frame, index), dict(row)) for index, row in frame.iterrows()]


def read_tables(root: Path, layout: Any, issues: Issues) -> BIDSTables:
    """``participants.tsv``, ``phenotype/*.tsv`` and every ``sub-*_sessions.tsv`` of the dataset."""
    tables = BIDSTables()
    participants = root / "participants.tsv"
    if participants.is_file():
        tables.files.append(participants)
        for where, row in _table_rows(participants, "participant_id"):
            subject = str(row["participant_id"]).strip()
            if not subject.startswith("sub-"):
                issues.add("malformed_rows", where, f"participant_id {subject!r} does not start with 'sub-'")
                continue
            tables.participants[subject] = (where, row)
            tables.columns.update(row)
    for path in sorted((root / "phenotype").glob("*.tsv")):
        tables.files.append(path)
        for _, row in _table_rows(path, "participant_id"):
            session = lookup(row, ("session_id",))
            tables.phenotype[(str(row["participant_id"]).strip(), session)].update(row)
            tables.columns.update(row)
    for entry in layout.get(suffix="sessions", extension=".tsv"):
        path = Path(entry.path)
        tables.files.append(path)
        subject = f"sub-{entry.get_entities()['subject']}"
        for where, row in _table_rows(path, "session_id"):
            tables.sessions[subject].append((str(row["session_id"]).strip(), where, row))
            tables.columns.update(row)
    if not tables.files:
        raise ValueError(f"{root}: no participants.tsv, phenotype/*.tsv or sub-*_sessions.tsv: nothing to label "
                         f"the scans with")
    return tables


def find_t1w(layout: Any) -> list[Scan]:
    """Every T1w image of the raw dataset, with its participant and session ids."""
    scans = []
    for entry in layout.get(suffix="T1w", extension=list(T1W_EXTENSIONS), datatype="anat"):
        entities = entry.get_entities()
        session = entities.get("session")
        scans.append(Scan(path=Path(entry.path), subject_id=f"sub-{entities['subject']}",
                          visit=f"ses-{session}" if session else NO_SESSION))
    return sorted(scans, key=lambda scan: str(scan.path))


def read_bids_visits(tables: BIDSTables, layout: Any, issues: Issues, *, diagnosis_column: str | None = None,
                     label_map: Mapping[str, str | None] | None = None,
                     unlabelled: bool = False) -> list[Visit]:
    """One :class:`Visit` per ``sessions.tsv`` row, or per session folder of a participant without one."""
    diagnosis_names = (diagnosis_column,) if diagnosis_column else DIAGNOSIS_COLUMNS
    if not unlabelled and not {name.lower() for name in diagnosis_names} & {c.lower() for c in tables.columns}:
        raise ValueError(f"no diagnosis column ({' or '.join(diagnosis_names)}) in "
                         f"{', '.join(map(str, tables.files))}; their columns are {sorted(tables.columns)}. "
                         f"Name one with --diagnosis-column, or use --unlabelled for image-text pairs")
    visits = []
    for subject in sorted(set(tables.participants) | set(tables.sessions)):
        rows = tables.sessions.get(subject) or [
            (f"ses-{session}", tables.participants[subject][0], {})
            for session in layout.get_sessions(subject=subject[len("sub-"):])] or [
            (NO_SESSION, tables.participants[subject][0], {})]
        for session, where, session_row in rows:
            row = tables.merged(subject, session, session_row)
            code = lookup(row, diagnosis_names)
            label, error = (None, None) if unlabelled else label_or_error(code, label_map)
            if error and "excluded" in error:
                issues.note("excluded_labels", where, error, code=code)
            elif error:
                issues.add("unknown_labels", where, error, code=code)
            visits.append(Visit(subject_id=subject, visit=session, date=None, label=label, label_error=error,
                                ehr=ehr_fields(row), site=lookup(row, SITE_COLUMNS) or "", where=where))
    return visits


def build_bids(bids_dir: str | Path, out: str | Path, *, split: SplitOptions | None = None,
               diagnosis_column: str | None = None, label_map: str | Mapping[str, str | None] | None = None,
               unlabelled: bool = False, all_scans_per_visit: bool = True, cohort: str | None = None,
               on_error: str = "skip") -> BuildResult:
    """Index ``bids_dir`` with pybids, read its tables, match T1w images to visits and write annotations."""
    from bids import BIDSLayout  # pybids indexes with SQLAlchemy: imported only when a build runs

    root = Path(bids_dir)
    if not (root / "dataset_description.json").is_file():
        raise ValueError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    layout = BIDSLayout(str(root), validate=False, derivatives=False)
    issues = Issues(on_error)
    tables = read_tables(root, layout, issues)
    mapping = parse_label_map(label_map) if isinstance(label_map, str) or label_map is None else dict(label_map)
    visits = read_bids_visits(tables, layout, issues, diagnosis_column=diagnosis_column, label_map=mapping,
                              unlabelled=unlabelled)
    return build_annotations(cohort=cohort or root.resolve().name, visits=visits, scans=find_t1w(layout),
                             out_dir=out, issues=issues, split=split or SplitOptions(test_fraction=0.2),
                             all_scans_per_visit=all_scans_per_visit, allow_unlabelled=unlabelled,
                             inputs={"bids_dir": root, "diagnosis_column": diagnosis_column or "default",
                                     "map": label_map or ""})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("bids", description=__doc__, raw_download=False, all_scans_per_visit=True)
    parser.add_argument("--bids-dir", type=Path, required=True, help="the BIDS dataset (dataset_description.json)")
    parser.add_argument("--diagnosis-column", default=None,
                        help=f"column holding the diagnosis (default: the first of {list(DIAGNOSIS_COLUMNS)})")
    parser.add_argument("--map", dest="label_map", default=None,
                        help="diagnosis codes onto classes, e.g. NC=CN,MCI=EMCI,MCI=LMCI,AD=AD,drop=SMC")
    parser.add_argument("--unlabelled", action="store_true", help="image-text pairs without a diagnosis (label null)")
    parser.add_argument("--cohort", default=None, help="the records' cohort name (default: the folder's name)")

    def build(args: argparse.Namespace) -> BuildResult:
        return build_bids(args.bids_dir, args.out, split=split_options(args), diagnosis_column=args.diagnosis_column,
                          label_map=args.label_map, unlabelled=args.unlabelled, cohort=args.cohort,
                          all_scans_per_visit=args.all_scans_per_visit, on_error=args.on_error)

    return run_cli(build, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
