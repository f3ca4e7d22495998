"""The command line every cohort builder shares: the common options (defaults differ per cohort),
their translation into :class:`SplitOptions`, and running a build with a one-line error (exit 2) or
a summary of what was written.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from dataset_builders.annotate import BuildResult
from dataset_builders.splits import SplitOptions
from lavis_medblip.annotations.schema import CLASS_NAMES


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the module docstring (the table layout) kept as written."""


def base_parser(cohort: str, *, description: str, date_tolerance_days: float = 90, all_test: bool = False,
                val_fraction: float = 0.1, test_fraction: float = 0.2, table_required: bool = True,
                scan_glob: str = "**/*", raw_download: bool = True,
                all_scans_per_visit: bool = False) -> argparse.ArgumentParser:
    """The options every cohort CLI shares (defaults differ per cohort).

    ``raw_download=False`` leaves out ``--table``/``--scans``/``--scan-glob`` for a builder that finds
    tables and scans itself (BIDS).
    """
    parser = argparse.ArgumentParser(prog=f"python -m dataset_builders.{cohort}", description=description,
                                     formatter_class=_HelpFormatter)
    if raw_download:
        parser.add_argument("--table", type=Path, required=table_required, help="the cohort's table (layout above)")
        parser.add_argument("--scans", type=Path, required=True, help="folder searched recursively for scans")
        parser.add_argument("--scan-glob", default=scan_glob,
                            help="glob under --scans selecting scan files (e.g. '**/RAW/*mpr-1*.img')")
    parser.add_argument("--out", type=Path, required=True, help="folder for {train,val,test}.jsonl + report.json")
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
    parser.add_argument("--all-scans-per-visit", action=argparse.BooleanOptionalAction, default=all_scans_per_visit,
                        help="keep every scan of a visit (otherwise the first path; the rest are reported)")
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
