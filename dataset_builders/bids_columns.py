"""The column names a BIDS dataset's tables use for the EHR fields and the diagnosis, with Clinica's
(``clinica convert adni-to-bids``, ``aibl-to-bids``, ``oasis-to-bids``, ...) first: one place for the
defaults of :mod:`dataset_builders.bids`, and the reading of one merged table row into EHR values.
"""
from __future__ import annotations

from typing import Any, Mapping

from dataset_builders.tables import number, text_value
from lavis_medblip.annotations.schema import CLASS_NAMES

#: EHR field → (column names, case-insensitive, first found wins; valid range). Clinica writes ``MMS``
#: for MMSE, ``cdr_global``/``cdr_sb`` and ``education`` (years); the others are common BIDS spellings.
EHR_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[float, float] | None]] = {
    "age": (("age", "age_at_visit", "age_years"), (10, 110)),
    "sex": (("sex", "gender"), None),
    "education_years": (("education", "education_years", "educ", "years_of_education"), (0, 30)),
    "mmse": (("MMS", "MMSE", "mmse_total", "mmse_score"), (0, 30)),
    "cdr_global": (("cdr_global", "cdr", "cdr_global_score"), (0, 3)),
    "cdr_sb": (("cdr_sb", "cdrsb", "cdr_sum_of_boxes"), (0, 18)),
    "apoe4": (("apoe4", "apoe4_count", "apoe_e4_count"), (0, 2)),
    "adas13": (("adas13", "adas_cog13", "adas_13"), (0, 85)),
    "faq": (("faq", "faq_total"), (0, 30)),
}
#: The diagnosis: per session in Clinica's ``sessions.tsv`` (``diagnosis``), else per participant.
DIAGNOSIS_COLUMNS: tuple[str, ...] = ("diagnosis", "dx", "diagnosis_sc", "diagnosis_bl", "dx_bl", "group")
SITE_COLUMNS: tuple[str, ...] = ("site", "site_id", "center", "centre")
#: BIDS writes "n/a" where a value is missing; a subject without ``ses-`` folders has this visit code.
NO_SESSION = "n/a"

_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


def lookup(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    """The first non-missing value among ``names`` (case-insensitive column names), else ``None``."""
    lowered = {str(column).lower(): value for column, value in row.items()}
    for name in names:
        value = text_value(lowered.get(name.lower()))
        if value is not None and value != "n/a":
            return value
    return None


def ehr_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """EHR values from one merged table row; numbers outside their valid range become ``None``."""
    ehr: dict[str, Any] = {}
    for field, (names, valid) in EHR_COLUMNS.items():
        value = lookup(row, names)
        if field == "sex":
            ehr[field] = _SEX.get(str(value).lower()) if value is not None else None
        else:
            ehr[field] = number(value, valid=valid)
    return ehr


def parse_label_map(text: str | None) -> dict[str, str | None]:
    """``"NC=CN,MCI=EMCI,MCI=LMCI,drop=SMC"`` → ``{"CN": "NC", "EMCI": "MCI", "LMCI": "MCI", "SMC": None}``.

    Codes not named fall through to the shared label map (``CN``, ``Dementia``, ... already work).
    """
    mapping: dict[str, str | None] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        label, sep, code = item.partition("=")
        label, code = label.strip(), code.strip()
        if not sep or not code or (label not in CLASS_NAMES and label != "drop"):
            raise ValueError(f"--map item {item!r} is not CLASS=CODE with CLASS one of {list(CLASS_NAMES)} or drop")
        mapping[code] = None if label == "drop" else label
    return mapping
