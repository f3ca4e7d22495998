"""The one annotation schema every cohort is converted to (one JSON object per line): cohort
preparation scripts in ``dataset_builders/`` and the cohort simulator write it, the registered LAVIS
builders read it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

#: The paper's three diagnostic classes, in the order used for class indices.
CLASS_NAMES: tuple[str, ...] = ("NC", "MCI", "AD")
#: The answer each class is spoken as by the language model (paper, Fig. 3).
CLASS_ANSWERS: dict[str, str] = {"NC": "not demented", "MCI": "mild cognitive impairment", "AD": "Alzheimer's disease"}
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: EHR fields a cohort may fill; any other key is kept but not described in text.
EHR_FIELDS: tuple[str, ...] = (
    "age", "sex", "education_years", "ses", "mmse", "cdr_global", "cdr_sb",
    "logical_memory_delayed", "apoe4", "adas13", "faq",
)


@dataclass
class AnnotationRecord:
    """One line of an annotation file, e.g.::

        {"image": "sub-0001/ses-bl/t1.nii.gz", "subject_id": "002_S_0295", "visit": "bl",
         "cohort": "ADNI", "site": "002", "ehr": {"age": 84.8, "sex": "M", "education_years": 18,
         "mmse": 28, "cdr_global": 0.0}, "text": "An 84.8-year-old male with 18 years of education ...",
         "label": "NC", "split": "train"}

    ``image`` is absolute, or relative to the annotation file's folder (or to the builder's
    ``storage`` root when one is configured).
    """

    image: str
    subject_id: str
    label: str | None
    split: str
    text: str = ""
    visit: str = ""
    cohort: str = ""
    site: str = ""
    ehr: dict[str, Any] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        """``subject/visit`` (the subject alone when no visit is named): how results name this record."""
        return f"{self.subject_id}/{self.visit}" if self.visit else self.subject_id

    def validate(self, where: str = "") -> None:
        """Raise ``ValueError`` naming ``where`` (file:line) and the bad field."""
        prefix = f"{where}: " if where else ""
        if not self.image:
            raise ValueError(f"{prefix}empty 'image'")
        if not self.subject_id:
            raise ValueError(f"{prefix}empty 'subject_id'")
        if self.label is not None and self.label not in CLASS_NAMES:
            raise ValueError(f"{prefix}label {self.label!r} is not one of {list(CLASS_NAMES)}")
        if self.split not in SPLITS:
            raise ValueError(f"{prefix}split {self.split!r} is not one of {list(SPLITS)}")


logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("image", "subject_id", "label", "split")


def read_annotations(
    path: str | Path, on_error: str = "raise", skipped: list[str] | None = None
) -> Iterator[AnnotationRecord]:
    """Yield validated records from a JSONL file.

    A malformed line raises ``ValueError`` naming file and line; with ``on_error="skip"`` it is
    logged and appended to ``skipped`` instead.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_line(line, f"{path}:{line_number}")
            except ValueError as error:
                if on_error == "raise":
                    raise
                logger.warning("skipped annotation: %s", error)
                if skipped is not None:
                    skipped.append(str(error))


def _parse_line(line: str, where: str) -> AnnotationRecord:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    known = {key: row[key] for key in AnnotationRecord.__dataclass_fields__ if key in row}
    record = AnnotationRecord(**known)
    record.validate(where)
    return record


def write_annotations(path: str | Path, records: Iterable[AnnotationRecord]) -> int:
    """Write records as JSONL (validated first); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            record.validate(str(path))
            handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
            count += 1
    return count
