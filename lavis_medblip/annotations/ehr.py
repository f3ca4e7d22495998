"""EHR record → the description sentence the model reads (the paper's text T).
A missing field (None, NaN, empty) is left out of the sentence, never written as "nan".
"""
from __future__ import annotations

import math
from typing import Any, Mapping

#: The paper's question (eq. 2); the prompt ends with it, the answer follows.
DIAGNOSIS_QUESTION = "Question: What will this subject be diagnosed with? Answer:"

_SEX_WORDS = {"f": "female", "female": "female", "2": "female", "m": "male", "male": "male", "1": "male"}


def sex_of(value: Any) -> str | None:
    """``"male"``, ``"female"`` or ``None`` for a recorded sex (M/F, male/female, 1/2, any case)."""
    return _SEX_WORDS.get(str(value if value is not None else "").strip().lower())


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in {"", "nan", "na", "n/a", "none", "-4", "-1"}


def _number(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:.1f}"


def describe_ehr(ehr: Mapping[str, Any]) -> str:
    """One or two sentences from the EHR fields in :data:`lavis_medblip.annotations.schema.EHR_FIELDS`."""
    present = {key: value for key, value in ehr.items() if not is_missing(value)}
    subject = []
    if "age" in present:
        subject.append(f"{_number(present['age'])}-year-old")
    sex = sex_of(present.get("sex"))
    subject.append(sex or "subject")
    starts_with_vowel_sound = subject[0][0] in "8aeiou" or subject[0].startswith(("11-", "18-", "11.", "18."))
    sentence = ("An " if starts_with_vowel_sound else "A ") + " ".join(subject)
    details = []
    if "education_years" in present:
        details.append(f"{_number(present['education_years'])} years of education")
    if "ses" in present:
        details.append(f"socio-economic status {_number(present['ses'])}")
    if details:
        sentence += " with " + " and ".join(details)
    scores = []
    for key, name in (("mmse", "MMSE"), ("cdr_global", "CDR"), ("cdr_sb", "CDR-SB"),
                      ("logical_memory_delayed", "logical memory delayed recall"), ("adas13", "ADAS-13"),
                      ("faq", "FAQ"), ("apoe4", "APOE4 allele count")):
        if key in present:
            scores.append(f"{name} {_number(present[key])}")
    text = sentence + "."
    if scores:
        text += " " + ", ".join(scores) + "."
    return text
