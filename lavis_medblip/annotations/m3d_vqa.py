"""The M3D-VQA CSV format (Bai et al. 2024): columns, question types, missing values, reading a table.
Shared by the registered ``m3d_vqa`` dataset (:mod:`lavis_medblip.datasets.m3d_vqa`) and the
M3D-VQA-AD filter (``python -m dataset_builders.m3d_vqa_ad``); pandas only, no torch or LAVIS.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import pandas as pd

M3D_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")
CHOICE_LETTERS = ("A", "B", "C", "D")
QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
_MISSING_VALUES = {"", "na", "n/a", "nan"}


def is_missing_value(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip().lower() in _MISSING_VALUES


def parse_question_type(value: Any) -> int:
    """M3D's question type as 1–5; accepts the number ("3", "3.0") or the name ("Organ")."""
    text = str(value).strip()
    names = {name.lower(): number for number, name in QUESTION_TYPES.items()}
    if text.lower() in names:
        return names[text.lower()]
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number in QUESTION_TYPES:
        return int(number)
    raise ValueError(f"question type {text!r} is not one of {QUESTION_TYPES}")


def read_m3d_csv(path: str | os.PathLike) -> pd.DataFrame:
    """An M3D-VQA CSV as strings (``NA`` kept as text); ``ValueError`` names the file and missing columns."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the M3D-VQA CSV ({error})") from error
    frame.columns = [str(column).strip() for column in frame.columns]
    missing = [column for column in M3D_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the table has {list(frame.columns)}")
    return frame


def format_choice(letter: str, choice: str) -> str:
    """``"B. Sagittal"``: how a choice appears in the closed prompt, the target and the ranked candidates."""
    return f"{letter}. {choice}"


def closed_question(question: str, choices: Mapping[str, str]) -> str:
    """M3D's closed-ended prompt: ``"{question} Choices: A. {A} B. {B} …"``."""
    return f"{question} Choices: " + " ".join(format_choice(letter, choice) for letter, choice in choices.items())
