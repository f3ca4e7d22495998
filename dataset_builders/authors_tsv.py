"""Reading the original MedBLIP code's ``image_path<TAB>report`` lists (``... The diagnosis is X.``)
into annotation records, the diagnosis moved from the text into the label.
"""
from __future__ import annotations

import re
from pathlib import Path

from lavis_medblip.annotations.labels import normalize_label
from lavis_medblip.annotations.schema import AnnotationRecord

_DIAGNOSIS_SENTENCE = re.compile(r"\s*The diagnosis is\s+(?P<label>[^.]+?)\s*\.?\s*$", re.IGNORECASE)


def read_authors_tsv(path: str | Path, *, split: str = "train", cohort: str = "",
                     subject_pattern: str | None = None) -> list[AnnotationRecord]:
    """Read the authors' ``local_data/<name>.csv`` lists: ``image_path<TAB>report`` per line.

    The report ends with ``The diagnosis is X.``; ``X`` becomes the normalised label and the sentence
    is removed from ``text`` (otherwise the answer is in the prompt). A report without that sentence
    gives ``label=None``. ``subject_id`` is the first match of ``subject_pattern`` in the image path,
    else the file name without its extension (the lists carry no subject column, so splits made from
    them cannot be checked for subject overlap). Image paths are kept as written. ``ValueError`` names
    the file and line for a line without a tab or an unknown diagnosis.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            if "\t" not in line:
                raise ValueError(f"{where}: expected 'image_path<TAB>report'")
            image, report = line.split("\t", 1)
            label = None
            match = _DIAGNOSIS_SENTENCE.search(report)
            if match:
                try:
                    label = normalize_label(match.group("label"))
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                report = report[:match.start()].strip()
            subject = None
            if subject_pattern:
                found = re.search(subject_pattern, image)
                subject = found.group(0) if found else None
            if not subject:
                subject = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", Path(image).name)
            records.append(AnnotationRecord(image=image.strip(), subject_id=subject, label=label, split=split,
                                            text=report.strip(), cohort=cohort))
    return records
