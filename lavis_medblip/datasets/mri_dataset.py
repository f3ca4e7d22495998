"""A map-style dataset over annotation files in the project's schema (3D scan + EHR text + label).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lavis_medblip.annotations.ehr import DIAGNOSIS_QUESTION
from lavis_medblip.annotations.schema import CLASS_ANSWERS, CLASS_NAMES, AnnotationRecord, read_annotations
from lavis_medblip.datasets.collate import SkippingDataset, process_or_skip

logger = logging.getLogger(__name__)


class MRIAnnotationDataset(SkippingDataset):
    """Yields ``{image, text_input, question, text_output, label, instance_id, subject_id}``.

    ``text_output`` is the class answer the LM learns to say (``CLASS_ANSWERS``); ``label`` is the
    index into ``class_names`` (-1 for records without a diagnosis, e.g. OASIS-1 pretraining pairs).

    Bad input never crashes mid-epoch unseen: with ``on_error: raise`` the error names the file (and
    annotation line) and the problem; with ``on_error: skip`` the sample is logged, dropped by the
    collater, and counted in ``num_skipped`` so the task can report it in the run's log.
    """

    def __init__(
        self,
        vis_processor: Callable[[Any], torch.Tensor],
        text_processor: Callable[[str], str],
        ann_paths: Sequence[str | os.PathLike],
        image_root: str | os.PathLike | None = None,
        class_names: Sequence[str] = CLASS_NAMES,
        question: str = DIAGNOSIS_QUESTION,
        on_error: str = "raise",
        require_label: bool = False,
    ):
        super().__init__(vis_processor, text_processor, on_error)
        unknown = [name for name in class_names if name not in CLASS_ANSWERS]
        if unknown:
            raise ValueError(f"class_names {unknown} are not among {list(CLASS_ANSWERS)}")
        self.class_names = list(class_names)
        self.class_answers = [CLASS_ANSWERS[name] for name in self.class_names]
        self.question = question
        self.records: list[tuple[AnnotationRecord, Path]] = []
        for ann_path in ann_paths:
            folder = Path(image_root) if image_root else Path(ann_path).parent
            for record in read_annotations(ann_path, on_error=on_error, skipped=self.skipped_annotations):
                problem = self._check_label(record, require_label)
                if problem:
                    if on_error == "raise":
                        raise ValueError(f"{ann_path}: subject {record.subject_id} ({record.image}): {problem}")
                    logger.warning("skipped annotation %s (%s): %s", ann_path, record.image, problem)
                    self.skipped_annotations.append(f"{ann_path}: {record.image}: {problem}")
                    continue
                self.records.append((record, folder / record.image))
        if self.skipped_annotations:
            logger.warning("%d annotation(s) skipped while reading %s", len(self.skipped_annotations), list(ann_paths))

    def _check_label(self, record: AnnotationRecord, require_label: bool) -> str | None:
        if record.label is None:
            return "no diagnosis label" if require_label else None
        if record.label not in self.class_names:
            return f"label {record.label!r} is not one of this dataset's classes {self.class_names}"
        return None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record, image_path = self.records[index]
        image, warning = process_or_skip(self.vis_processor, image_path, self.on_error, f"sample {index} of this dataset")
        if image is None:
            return None
        label = self.class_names.index(record.label) if record.label is not None else -1
        return {
            "image": image,
            "text_input": self.text_processor(record.text),
            "question": self.question,
            "text_output": self.class_answers[label] if label >= 0 else "",
            "label": label,
            "instance_id": record.instance_id,
            "subject_id": record.subject_id,
            "site": record.site,
            "warning": warning,
        }

