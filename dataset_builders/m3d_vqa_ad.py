"""M3D-VQA-AD: the rows of an M3D-VQA CSV about Alzheimer's disease, dementia or brain atrophy.

The MedBLIP paper (Table 3) evaluates on "M3D-VQA-AD, a subset of AD-related diseases filtered from
M3D-VQA" but publishes neither the subset nor the filter; this is our reproducible rebuild::

    python -m dataset_builders.m3d_vqa_ad --csv M3D_VQA_test.csv --out m3d_vqa_ad.csv

It writes the kept rows unchanged (same columns, same order) and ``m3d_vqa_ad.report.json``
(rows in and kept, overall and per question type, matches per keyword, the keyword patterns and the
input's sha256), so a result can be traced to the exact input and rule.

**Rule.** A row is searched in its report (``Text``) and its ``Question``, case-insensitively, with
word-boundary regexes; the answer and the choices are *not* searched (a distractor choice such as
"Cerebral atrophy" must not select a row). M3D asks 9 questions per report with the report in
every row, so a report that matches keeps all its questions (a match in one question keeps that
question only). A row is kept when

1. an **AD term** occurs (specific to dementia on its own):

   - ``alzheimer``:        ``\\balzheimer\\w*`` (Alzheimer, Alzheimer's, Alzheimers)
   - ``dementia``:         ``\\bdement\\w*`` (dementia, demented)
   - ``cognitive``:        ``\\bcognitive\\s+(impairment|decline|dysfunction)``
   - ``memory``:           ``\\bmemory\\s+(loss|impairment|decline|deficits?)``
   - ``neurodegenerative``: ``\\bneurodegenerat\\w*``
   - ``hippocampal``:      ``\\bhippocamp\\w*`` (the structure AD shrinks first; brain-only word)

2. or an **atrophy term** occurs together with a **brain-context term** anywhere in the same row
   (M3D is whole-body CT/MRI: "renal atrophy", "left ventricular enlargement" (heart) and "volume
   loss" (lung) must not count):

   - atrophy terms: ``atrophy`` ``\\batroph\\w*``; ``volume_loss`` ``\\bvolume\\s+loss\\b``;
     ``ventricular_enlargement`` ``\\bventricul\\w*\\s+(enlarg\\w*|dilat\\w*)|\\benlarg\\w*\\s+(of\\s+the\\s+)?(\\w+\\s+)?ventric\\w*|\\bventriculomegaly\\b``;
     ``sulcal_widening`` ``\\b(widen\\w*|prominen\\w*)\\s+(of\\s+the\\s+)?(\\w+\\s+)?sulc\\w*|\\bsulc\\w*\\s+(are\\s+|is\\s+)?(widen\\w*|prominen\\w*)``;
     ``ex_vacuo`` ``\\bex\\s+vacuo\\b``
   - brain-context terms: ``brain`` ``\\bbrain\\w*``; ``cerebral`` ``\\bcerebr\\w*``; ``cerebellar``
     ``\\bcerebell\\w*``; ``encephalic`` ``\\b\\w*encephal\\w*``; ``intracranial`` ``\\bintracranial\\b``;
     ``lobe`` ``\\b(frontal|temporal|parietal|occipital)\\s+lob\\w*``; ``lateral_ventricle``
     ``\\blateral\\s+ventric\\w*``; ``white_matter`` ``\\bwhite\\s+matter\\b``; ``sulci_gyri``
     ``\\b(sulci|sulcal|gyri|gyral)\\b``; ``hippocampal`` (as above)

The patterns are :data:`AD_TERMS`, :data:`ATROPHY_TERMS` and :data:`BRAIN_CONTEXT_TERMS`; changing
them changes the benchmark, so the report records them.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from lavis_medblip.annotations.hashing import content_sha256
from lavis_medblip.annotations.m3d_vqa import QUESTION_TYPES, is_missing_value, parse_question_type, read_m3d_csv

log = logging.getLogger("dataset_builders")

AD_TERMS: dict[str, str] = {
    "alzheimer": r"\balzheimer\w*",
    "dementia": r"\bdement\w*",
    "cognitive": r"\bcognitive\s+(impairment|decline|dysfunction)",
    "memory": r"\bmemory\s+(loss|impairment|decline|deficits?)",
    "neurodegenerative": r"\bneurodegenerat\w*",
    "hippocampal": r"\bhippocamp\w*",
}
ATROPHY_TERMS: dict[str, str] = {
    "atrophy": r"\batroph\w*",
    "volume_loss": r"\bvolume\s+loss\b",
    "ventricular_enlargement": (r"\bventricul\w*\s+(enlarg\w*|dilat\w*)|\benlarg\w*\s+(of\s+the\s+)?(\w+\s+)?ventric\w*"
                                r"|\bventriculomegaly\b"),
    "sulcal_widening": (r"\b(widen\w*|prominen\w*)\s+(of\s+the\s+)?(\w+\s+)?sulc\w*"
                        r"|\bsulc\w*\s+(are\s+|is\s+)?(widen\w*|prominen\w*)"),
    "ex_vacuo": r"\bex\s+vacuo\b",
}
BRAIN_CONTEXT_TERMS: dict[str, str] = {
    "brain": r"\bbrain\w*",
    "cerebral": r"\bcerebr\w*",
    "cerebellar": r"\bcerebell\w*",
    "encephalic": r"\b\w*encephal\w*",
    "intracranial": r"\bintracranial\b",
    "lobe": r"\b(frontal|temporal|parietal|occipital)\s+lob\w*",
    "lateral_ventricle": r"\blateral\s+ventric\w*",
    "white_matter": r"\bwhite\s+matter\b",
    "sulci_gyri": r"\b(sulci|sulcal|gyri|gyral)\b",
    "hippocampal": AD_TERMS["hippocampal"],
}
SEARCHED_COLUMNS = ("Text", "Question")

_COMPILED = {group: {name: re.compile(pattern, re.IGNORECASE) for name, pattern in terms.items()}
             for group, terms in (("ad", AD_TERMS), ("atrophy", ATROPHY_TERMS), ("brain", BRAIN_CONTEXT_TERMS))}


def matched_terms(text: str) -> list[str]:
    """The AD-relevant terms that select ``text`` (empty: not selected); see the module docstring."""
    found = [name for name, pattern in _COMPILED["ad"].items() if pattern.search(text)]
    atrophy = [name for name, pattern in _COMPILED["atrophy"].items() if pattern.search(text)]
    if atrophy and any(pattern.search(text) for pattern in _COMPILED["brain"].values()):
        found += [name for name in atrophy if name not in found]
    return found


def row_search_text(row: Mapping[str, Any]) -> str:
    return " ".join("" if is_missing_value(row[column]) else str(row[column]) for column in SEARCHED_COLUMNS)


def filter_m3d_vqa_ad(frame: pd.DataFrame) -> tuple[pd.DataFrame, Counter]:
    """The AD-related rows of an M3D-VQA table (index kept) and how often each term selected a row."""
    keep, term_counts = [], Counter()
    for row in frame.to_dict("records"):
        terms = matched_terms(row_search_text(row))
        keep.append(bool(terms))
        term_counts.update(terms)
    return frame[keep], term_counts


def _per_type(frame: pd.DataFrame) -> dict[str, int]:
    counts = Counter()
    for value in frame["Question Type"]:
        try:
            number = parse_question_type(value)
            counts[f"{number} {QUESTION_TYPES[number]}"] += 1
        except ValueError:
            counts[f"unknown ({value})"] += 1
    return dict(sorted(counts.items()))


def build_m3d_vqa_ad(csv: str | Path, out: str | Path, report: str | Path | None = None) -> dict[str, Any]:
    """Filter ``csv`` into ``out`` and write the JSON report (default ``<out>.report.json``); returns it."""
    csv, out = Path(csv), Path(out)
    report_path = Path(report) if report else out.with_suffix(".report.json")
    if not csv.is_file():
        raise ValueError(f"{csv}: no such file")
    frame = read_m3d_csv(csv)
    kept, term_counts = filter_m3d_vqa_ad(frame)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept.to_csv(out, index=False)
    summary = {
        "input": str(csv), "input_sha256": content_sha256(csv), "output": str(out),
        "rows_in": int(len(frame)), "rows_kept": int(len(kept)),
        "reports_in": int(frame["Text"].nunique()), "reports_kept": int(kept["Text"].nunique()),
        "per_question_type_in": _per_type(frame), "per_question_type_kept": _per_type(kept),
        "rows_per_term": dict(sorted(term_counts.items())),
        "searched_columns": list(SEARCHED_COLUMNS),
        "keywords": {"ad_terms": AD_TERMS, "atrophy_terms": ATROPHY_TERMS, "brain_context_terms": BRAIN_CONTEXT_TERMS,
                     "rule": "keep if any ad_term, or any atrophy_term together with any brain_context_term "
                             "(case-insensitive, in Text + Question)"},
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(summary, indent=2))
    summary["report"] = str(report_path)
    log.info("kept %d of %d rows (%d of %d reports)", summary["rows_kept"], summary["rows_in"],
             summary["reports_kept"], summary["reports_in"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset_builders.m3d_vqa_ad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, required=True, help="an M3D-VQA CSV, e.g. M3D_VQA_test.csv")
    parser.add_argument("--out", type=Path, required=True, help="the filtered CSV to write, e.g. m3d_vqa_ad.csv")
    parser.add_argument("--report", type=Path, default=None, help="the JSON report (default: <out>.report.json)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = build_m3d_vqa_ad(args.csv, args.out, args.report)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['rows_kept']} of {summary['rows_in']} rows to {summary['output']}; "
          f"report {summary['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
