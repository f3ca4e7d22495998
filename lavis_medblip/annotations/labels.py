"""One label map: every cohort's diagnosis codes onto the paper's classes NC / MCI / AD."""
from __future__ import annotations

import re

from lavis_medblip.annotations.schema import CLASS_NAMES

_ALIASES: dict[str, str] = {}
for _code in ("nc", "cn", "normal", "control", "healthy control", "hc", "nondemented", "non-demented",
              "not demented", "cognitively normal", "smc", "normal cognition"):
    _ALIASES[_code] = "NC"
for _code in ("mci", "emci", "lmci", "smci", "pmci", "mild cognitive impairment", "early mci", "late mci",
              "stable mci", "progressive mci", "impaired not mci"):
    _ALIASES[_code] = "MCI"
for _code in ("ad", "dementia", "demented", "dem", "alzheimer's disease", "alzheimers disease",
              "alzheimer disease", "probable ad", "converted"):
    _ALIASES[_code] = "AD"


def normalize_label(code: object) -> str:
    """Map a cohort's diagnosis code to ``NC``, ``MCI`` or ``AD``.

    Raises ``ValueError`` naming the code for anything unknown (so callers can count and skip).
    """
    if code is None:
        raise ValueError("missing diagnosis label")
    key = re.sub(r"\s+", " ", str(code).strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown diagnosis label {code!r}; known: {sorted(set(_ALIASES))}")


__all__ = ["CLASS_NAMES", "normalize_label"]
