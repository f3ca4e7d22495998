"""Reading cohort tables and their values: CSV/TSV as strings, columns by alias, scores with their
missing codes removed, dates in the cohorts' formats, and :class:`Issues`, which counts per-row
problems for the report (or raises the first one with ``on_error="raise"``).
"""
from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from lavis_medblip.annotations.ehr import is_missing


class Issues:
    """Collects per-row problems by kind; with ``on_error="raise"`` the first one raises."""

    def __init__(self, on_error: str = "skip") -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.on_error = on_error
        self.items: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, kind: str, where: str, message: str, **details: Any) -> None:
        if self.on_error == "raise":
            raise ValueError(f"{where}: {message}")
        self.items[kind].append({"where": where, "message": message, **details})

    def note(self, kind: str, where: str, message: str, **details: Any) -> None:
        """Record something worth reporting that is never an error (e.g. an extra scan)."""
        self.items[kind].append({"where": where, "message": message, **details})


def read_table(path: str | Path, required: Sequence[str] = (), *, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV as strings (IDs keep their leading zeros) and check the needed columns.

    Raises ``ValueError`` naming the file and every missing column; column names are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: table not found")
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot parse table ({error})") from error
    frame.columns = [str(column).strip() for column in frame.columns]
    require_columns(frame, required, path)
    frame.attrs["path"] = str(path)
    return frame


def require_columns(frame: pd.DataFrame, required: Sequence[str], path: str | Path) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the table has {list(frame.columns)}")


def find_column(frame: pd.DataFrame, aliases: Sequence[str], path: str | Path, *, required: bool = True) -> str | None:
    """The first column whose name matches one of ``aliases`` case-insensitively."""
    lowered = {str(column).strip().lower(): column for column in frame.columns}
    for alias in aliases:
        if alias.lower() in lowered:
            return lowered[alias.lower()]
    if required:
        raise ValueError(f"{path}: missing column {aliases[0]!r} (or any of {list(aliases[1:])}); "
                         f"the table has {list(frame.columns)}")
    return None


def row_location(frame: pd.DataFrame, index: int) -> str:
    """``file:line`` of a data row (line 1 is the header)."""
    return f"{frame.attrs.get('path', '<table>')}:{index + 2}"


def number(value: Any, *, valid: tuple[float, float] | None = None, missing_codes: Iterable[float] = ()) -> float | None:
    """A float, or ``None`` for blanks, NaN, missing codes and anything outside ``valid``.

    Cohorts code "not assessed" as numbers (NACC -4, 88, 95–98; AIBL -4, -1), which must never reach
    the text as a score; ``valid`` is the safest guard because the codes differ per field.
    """
    if is_missing(value):
        return None
    try:
        result = float(str(value).strip())
    except ValueError:
        return None
    if math.isnan(result) or result in set(missing_codes):
        return None
    if valid is not None and not valid[0] <= result <= valid[1]:
        return None
    return int(result) if result.is_integer() else result


def text_value(value: Any) -> str | None:
    return None if is_missing(value) else str(value).strip()


_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%m/%d/%Y", "%m/%d/%y", "%d.%m.%Y", "%Y/%m/%d", "%Y-%m-%d %H:%M:%S")


def parse_date(value: Any) -> dt.date | None:
    """A date from the formats the cohorts use; ``None`` when blank; ``ValueError`` when unreadable."""
    if is_missing(value):
        return None
    text = str(value).strip()
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"unreadable date {text!r}")


def years_between(start: dt.date, end: dt.date) -> float:
    return (end - start).days / 365.25
