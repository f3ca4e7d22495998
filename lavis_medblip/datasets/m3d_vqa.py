"""M3D-VQA (Bai et al. 2024) as a registered LAVIS dataset, ``m3d_vqa``: closed- or open-ended
questions about a 3D volume, read from M3D's CSVs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lavis.common.registry import registry

from lavis_medblip.annotations.m3d_vqa import (
    CHOICE_LETTERS,
    closed_question,
    format_choice,
    is_missing_value,
    parse_question_type,
    read_m3d_csv,
)
from lavis_medblip.datasets.builders import CONFIG_DIR, AnnotationBuilder
from lavis_medblip.datasets.collate import SkippingDataset, process_or_skip

logger = logging.getLogger(__name__)

MODES = ("closed", "open")
DEFAULT_PROMPT_TEMPLATE = "Question: {question} Answer:"


@dataclass(frozen=True)
class M3DVQARecord:
    """One CSV row; ``choices`` maps each present letter to its text (``NA`` choices dropped)."""

    image: str
    text: str
    question_type: int
    question: str
    choices: dict[str, str]
    answer: str
    answer_choice: str
    file: str
    line: int  # line in the CSV (line 1 is the header)

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def instance_id(self) -> str:
        """``M3D_VQA_test:17``: unique across the splits' files, stable across runs."""
        return f"{Path(self.file).stem}:{self.line}"


def parse_row(row: Mapping[str, Any], file: str, line: int, mode: str = "closed") -> M3DVQARecord:
    """One CSV row → record; ``ValueError`` (without location; the caller adds it) when malformed."""
    image = "" if is_missing_value(row["Image Path"]) else str(row["Image Path"]).strip()
    question = "" if is_missing_value(row["Question"]) else str(row["Question"]).strip()
    if not image:
        raise ValueError("empty Image Path")
    if not question:
        raise ValueError("empty Question")
    choices = {letter: str(row[f"Choice {letter}"]).strip() for letter in CHOICE_LETTERS
               if not is_missing_value(row[f"Choice {letter}"])}
    answer = "" if is_missing_value(row["Answer"]) else str(row["Answer"]).strip()
    answer_choice = str(row["Answer Choice"]).strip().upper()
    if mode == "closed":
        if len(choices) < 2:
            raise ValueError(f"closed-ended question needs at least two choices, has {len(choices)}")
        if answer_choice not in choices:
            raise ValueError(f"Answer Choice {row['Answer Choice']!r} is not among the choices {list(choices)}")
        answer = answer or choices[answer_choice]
    elif not answer:
        raise ValueError("empty Answer")
    text = "" if is_missing_value(row["Text"]) else str(row["Text"])
    return M3DVQARecord(image=image, text=text, question_type=parse_question_type(row["Question Type"]),
                        question=question, choices=choices, answer=answer, answer_choice=answer_choice, file=file,
                        line=line)


def read_m3d_records(path: str | os.PathLike, mode: str = "closed", on_error: str = "raise",
                     skipped: list[str] | None = None) -> list[M3DVQARecord]:
    """All well-formed rows of one CSV; malformed ones raise (naming ``file:line``) or go to ``skipped``."""
    frame = read_m3d_csv(path)
    records = []
    for index, row in enumerate(frame.to_dict("records")):
        source = f"{path}:{index + 2}"
        try:
            records.append(parse_row(row, str(path), index + 2, mode))
        except ValueError as error:
            if on_error == "raise":
                raise ValueError(f"{source}: {error}") from error
            logger.warning("skipped row %s: %s", source, error)
            if skipped is not None:
                skipped.append(f"{source}: {error}")
    return records


class M3DVQADataset(SkippingDataset):
    """Yields ``{image, text_input, question, text_output, question_type, choices, choice_letters,
    answer_choice, answer, raw_question, instance_id}``; ``question`` is the full prompt for the model.

    Args:
        ann_paths: M3D-VQA CSVs (``M3D_VQA_{train,val,test,test5k}.csv``) with the columns
            :data:`lavis_medblip.annotations.m3d_vqa.M3D_COLUMNS`. ``Image Path`` is relative to the
            data root (``image_root``, ``build_info.images.storage``) and points at a 1×D×H×W float32
            ``.npy`` in [0, 1], which the ``mri_volume_*`` processors read as they are. Missing
            choices are ``NA`` (or blank) and are dropped; the letters of the remaining choices are kept.
        mode: ``closed``: the M3D closed-ended prompt ``"{Question} Choices: A. {A} B. {B} …"``, target
            ``"{Answer Choice}. {Answer}"``; the sample also carries ``choices``, ``choice_letters``
            and ``answer_choice`` for scoring. ``open``: the question alone, target the answer text.
        prompt_template: the model's question template the prompt is put into (default MedBLIP's
            ``"Question: {question} Answer:"``, paper eq. 2).
        use_report_text: ``text_input`` (MedBLIP's EHR-text slot) is empty by default: M3D's ``Text``
            column is the radiology report the questions were generated from, so putting it in the
            prompt would hand the model the answer. ``True`` fills it with the report, for training
            report-grounded VQA only; never evaluate with it.
        on_error: as for :class:`~lavis_medblip.datasets.mri_dataset.MRIAnnotationDataset`: a malformed
            row (unknown question type, answer letter not among the choices, …) raises ``ValueError``
            naming ``file:line`` with ``raise`` and is logged, skipped and listed in
            ``skipped_annotations`` with ``skip``; an unreadable or missing volume raises naming the
            row and file, or returns ``None`` which the collater drops and counts in ``num_skipped``.
    """

    def __init__(
        self,
        vis_processor: Callable[[Any], torch.Tensor],
        text_processor: Callable[[str], str],
        ann_paths: Sequence[str | os.PathLike],
        image_root: str | os.PathLike | None = None,
        mode: str = "closed",
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        use_report_text: bool = False,
        on_error: str = "raise",
    ):
        super().__init__(vis_processor, text_processor, on_error)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if "{question}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        self.mode, self.prompt_template, self.use_report_text = mode, prompt_template, use_report_text
        self.records: list[tuple[M3DVQARecord, Path]] = []
        for ann_path in ann_paths:
            # M3D's Image Path is relative to the data root; without one, to the CSV's folder
            folder = Path(image_root) if image_root else Path(ann_path).parent
            for record in read_m3d_records(ann_path, mode, on_error, self.skipped_annotations):
                self.records.append((record, folder / record.image))
        if self.skipped_annotations:
            logger.warning("%d row(s) skipped while reading %s", len(self.skipped_annotations), list(ann_paths))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record, image_path = self.records[index]
        image, warning = process_or_skip(self.vis_processor, image_path, self.on_error,
                                         f"sample {index} (row {record.source})")
        if image is None:
            return None
        if self.mode == "closed":
            question = closed_question(record.question, record.choices)
            target = format_choice(record.answer_choice, record.answer)
        else:
            question, target = record.question, record.answer
        return {
            "image": image,
            "text_input": self.text_processor(record.text) if self.use_report_text else "",
            "question": self.text_processor(self.prompt_template.format(question=question)),
            "text_output": self.text_processor(target),
            "question_type": record.question_type,
            "choices": list(record.choices.values()),
            "choice_letters": list(record.choices),
            "answer_choice": record.answer_choice,
            "answer": record.answer,
            "raw_question": record.question,
            "instance_id": record.instance_id,
            "warning": warning,
        }



@registry.register_builder("m3d_vqa")
class M3DVQABuilder(AnnotationBuilder):
    """M3D-VQA CSVs per split (``build_info.annotations.<split>.storage``, one path or a list)."""

    train_dataset_cls = M3DVQADataset
    eval_dataset_cls = M3DVQADataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "m3d_vqa.yaml")}

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        return {"mode": self.config.get("mode", "closed"),
                "prompt_template": self.config.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
                "use_report_text": bool(self.config.get("use_report_text", False))}
