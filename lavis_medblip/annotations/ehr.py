"""EHR record → the description sentence the model reads (the paper's text T).
A missing field (None, NaN, empty) is left out of the sentence, never written as "nan".

MMSE and global CDR are written with the dementia stage the clinical literature gives their value, the MMSE
also with its distance from the maximum: "MMSE 24/30 (6 points below the maximum, mild dementia range), CDR 0.5
(very mild dementia)". Both are derived from the number alone (the number stays in the text), with published
cut-offs, never fitted on any cohort's labels:

- MMSE (out of 30), Perneczky et al. 2006, mapped onto CDR stages: 30 no dementia, 26–29 questionable,
  21–25 mild, 11–20 moderate, 0–10 severe dementia (R. Perneczky, S. Wagenpfeil, K. Komossa, T. Grimmer,
  J. Diehl, A. Kurz, "Mapping scores onto stages: mini-mental state examination and clinical dementia rating",
  Am J Geriatr Psychiatry 14(2):139–144, 2006). A value outside 0–30 is written as it is, without a stage.
- Global CDR, Hughes et al. 1982 and Morris 1993: 0 no dementia, 0.5 very mild, 1 mild, 2 moderate,
  3 severe dementia (C. P. Hughes et al., "A new clinical scale for the staging of dementia", Br J Psychiatry
  140:566–572, 1982; J. C. Morris, "The Clinical Dementia Rating (CDR): current version and scoring rules",
  Neurology 43(11):2412–2414, 1993). Another value is written as it is. CDR 0.5 takes the name of Rubin, Morris
  et al. ("Very mild senile dementia of the Alzheimer type. I. Clinical assessment", Arch Neurol 1989), not
  Hughes et al.'s "questionable dementia", which is also the MMSE's 26–29 range (README, Limitations).

Why: a small LM (SmolLM2) reads "MMSE 24" as the digits "2", "4", each value its own rare token pair, and
fine-tuned on a few hundred subjects it does not learn what the values mean; a stage name is shared by every
subject in its range, and "N points below the maximum" orders the scores inside a range in small, frequent
numbers (README, Limitations).

EHR text written by others ("MMSE: 24", "the Mini-Mental State Examination score was 24 out of 30", "global CDR
0.5") gets the same notes from :func:`add_score_stages` (the ``medblip_text`` processor's ``score_stages``), so the
stage words a model trained on these sentences reads are there too; the sentences above it leaves as they are. How
far that carries a model to text in other words (not far for the demo's LM): README, Limitations.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

#: The paper's question (eq. 2); the prompt ends with it, the answer follows.
DIAGNOSIS_QUESTION = "Question: What will this subject be diagnosed with? Answer:"
#: Asked for an explanation (``predict --explain``): the diagnosis question asks for a label only.
EXPLAIN_QUESTION = "Question: What will this subject be diagnosed with, and why? Answer:"

#: The MMSE's maximum score; valid scores are 0 to it.
MMSE_MAX = 30
#: MMSE lower bound → dementia stage (Perneczky et al. 2006), highest first.
MMSE_STAGES: tuple[tuple[float, str], ...] = (
    (30, "no dementia"), (26, "questionable dementia"), (21, "mild dementia"), (11, "moderate dementia"),
    (0, "severe dementia"))
#: Global CDR → dementia stage (Hughes et al. 1982; Morris 1993; 0.5 as Rubin, Morris et al. 1989).
CDR_STAGES: dict[float, str] = {0.0: "no dementia", 0.5: "very mild dementia", 1.0: "mild dementia",
                                2.0: "moderate dementia", 3.0: "severe dementia"}

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


def mmse_stage(value: Any) -> str | None:
    """The dementia stage of an MMSE score (:data:`MMSE_STAGES`), ``None`` outside 0–30."""
    score = float(value)
    if not 0 <= score <= MMSE_MAX:
        return None
    return next(stage for lower, stage in MMSE_STAGES if score >= lower)


def mmse_note(value: Any) -> str | None:
    """``"6 points below the maximum, mild dementia range"``, ``"the maximum, no dementia range"``; ``None`` outside
    0–30."""
    stage = mmse_stage(value)
    if stage is None:
        return None
    below = MMSE_MAX - float(value)
    distance = "the maximum" if below == 0 else f"{_number(below)} point{'' if below == 1 else 's'} below the maximum"
    return f"{distance}, {stage} range"


def describe_mmse(value: Any) -> str:
    """``"MMSE 24/30 (6 points below the maximum, mild dementia range)"``, ``"MMSE 30/30 (the maximum, no dementia
    range)"``; a score outside 0–30 as it is (``"MMSE 88"``)."""
    note = mmse_note(value)
    return f"MMSE {_number(value)}" if note is None else f"MMSE {_number(value)}/{MMSE_MAX} ({note})"


def describe_cdr(value: Any) -> str:
    """``"CDR 0.5 (very mild dementia)"``; a value that is no CDR stage as it is."""
    stage = CDR_STAGES.get(float(value))
    return f"CDR {_number(value)}" + (f" ({stage})" if stage else "")


#: Scores in the order they are written, each field's writer.
_SCORES = (("mmse", describe_mmse), ("cdr_global", describe_cdr),
           *((key, lambda value, name=name: f"{name} {_number(value)}") for key, name in (
               ("cdr_sb", "CDR-SB"), ("logical_memory_delayed", "logical memory delayed recall"),
               ("adas13", "ADAS-13"), ("faq", "FAQ"), ("apoe4", "APOE4 allele count"))))


def describe_ehr(ehr: Mapping[str, Any]) -> str:
    """One or two sentences from the EHR fields in :data:`lavis_medblip.annotations.schema.EHR_FIELDS`, e.g.
    "A 75-year-old female with 12 years of education. MMSE 24/30 (6 points below the maximum, mild dementia
    range), CDR 0.5 (very mild dementia)."."""
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
    scores = [write(present[key]) for key, write in _SCORES if key in present]
    text = sentence + "."
    if scores:
        text += " " + ", ".join(scores) + "."
    return text


# ---- scores in others' EHR text -------------------------------------------------------------------------------
# A score's name, then only separators and linking words, then its value: "MMSE: 24", "MMSE score of 24/30", "the
# Mini-Mental State Examination score was 24 out of 30", "global CDR 0.5", "CDR-global: 1". Anything else between
# name and number (another field, a comma) leaves the value alone, and so does a parenthesis after it (this
# module's sentences, or the writer's own note). "CDR-SB" / "CDR sum of boxes" is another score.
_LINK = r"(?:[\s:=-]|\b(?:score|total|result|global|was|is|of|at\s+(?:baseline|screening))\b)*"
_VALUE = r"(?<![-+])(?P<value>\d+(?:\.\d+)?)"  # not a negative value
_MMSE_IN_TEXT = re.compile(
    r"\b(?:Mini[- ]?Mental State Exam(?:ination)?\b(?:\s*\(MMSE\))?|MMSE\b)" + _LINK + _VALUE
    + r"(?:\s*/\s*30|\s+(?:out\s+)?of\s+30)?(?!\s*(?:\(|/|(?:out\s+)?of\s+\d)|\d|\.\d)", re.IGNORECASE)
_CDR_IN_TEXT = re.compile(
    r"\b(?:CDR\b|Clinical Dementia Rating\b(?:\s*\(CDR\))?)(?![\s-]*(?:SB|sum))" + _LINK + _VALUE
    + r"(?!\s*\(|\d|\.\d)", re.IGNORECASE)


def add_score_stages(text: str) -> str:
    """Each MMSE and global CDR value in ``text`` followed by the note :func:`describe_ehr` writes for it, e.g.
    ``"Age: 74; MMSE: 24; CDR: 0.5."`` → ``"Age: 74; MMSE: 24 (6 points below the maximum, mild dementia range);
    CDR: 0.5 (very mild dementia)."``. Values without a stage, and :func:`describe_ehr`'s sentences, stay as they
    are."""

    def with_mmse_note(match: re.Match) -> str:
        note = mmse_note(match["value"])
        return match[0] if note is None else f"{match[0]} ({note})"

    def with_cdr_stage(match: re.Match) -> str:
        stage = CDR_STAGES.get(float(match["value"]))
        return match[0] if stage is None else f"{match[0]} ({stage})"

    return _CDR_IN_TEXT.sub(with_cdr_stage, _MMSE_IN_TEXT.sub(with_mmse_note, text))
