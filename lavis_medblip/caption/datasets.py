"""2D image–caption datasets for ``medblip_caption``: ``roco`` (ROCO's own layout) and
``medical_caption`` (any JSONL of ``{"image": path, "caption": text, "id": …}``).

Samples are ``{image, text_input, caption, instance_id}``: ``text_input`` is the processed caption
the decoder learns (the train text processor prepends the model's prompt), ``caption`` the raw one
that evaluation scores against. Images are read with PIL as RGB, then the vision processor
(LAVIS's ``blip_image_train`` / ``blip_image_eval``).

Errors follow the project's ``on_error``: a missing or unreadable image raises naming the file and
sample (``raise``), or is logged, dropped by the collater and counted in ``num_skipped`` (``skip``);
a malformed annotation line raises naming ``file:line``, or is skipped and listed in
``skipped_annotations``.

**ROCO layout** (Pelka et al. 2018, after ``scripts/fetch.py``)::

    <root>/{train,validation,test}/{radiology,non-radiology}/
        images/            ROCO_00001.jpg … (or the PMC file names listed in dlinks.txt)
        captions.txt       ROCO_00001<TAB>caption
        keywords.txt       ROCO_00001<TAB>keywords   (optional)
        dlinks.txt         ROCO_00001<TAB>download command<TAB>file name   (optional)

``build_info.storage`` is ``<root>``, ``subset`` picks ``radiology`` (default) or
``non-radiology``, and ``build_info.splits`` maps LAVIS split names to ROCO's folders.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from lavis.common.registry import registry

from lavis_medblip.datasets.builders import CONFIG_DIR, AnnotationBuilder, resolve_storage
from lavis_medblip.datasets.collate import SkippingDataset, process_or_skip

logger = logging.getLogger(__name__)
ROCO_SUBSETS = ("radiology", "non-radiology")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class CaptionRecord:
    instance_id: str
    image: Path
    caption: str
    keywords: str = ""


def read_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class CaptionDataset(SkippingDataset):
    """Image–caption pairs from :class:`CaptionRecord` s."""

    def __init__(self, vis_processor: Callable[[Any], torch.Tensor], text_processor: Callable[[str], str],
                 records: Sequence[CaptionRecord], on_error: str = "raise",
                 skipped_annotations: Sequence[str] = ()):
        super().__init__(vis_processor, text_processor, on_error)
        self.records = list(records)
        self.skipped_annotations = list(skipped_annotations)

    def _read_image(self, path: str) -> torch.Tensor:
        return self.vis_processor(read_rgb(path))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image, warning = process_or_skip(self._read_image, record.image, self.on_error,
                                         f"sample {index} ({record.instance_id})")
        if image is None:
            return None
        return {"image": image, "text_input": self.text_processor(record.caption), "caption": record.caption,
                "instance_id": record.instance_id, "warning": warning}



# ---- generic JSONL -----------------------------------------------------------------------------------
def read_caption_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None, on_error: str = "raise",
                       skipped: list[str] | None = None) -> list[CaptionRecord]:
    """Records of one JSONL file; ``image`` is relative to ``image_root`` (default: the file's folder).

    ``id`` defaults to ``<file stem>:<line>``.
    """
    folder = Path(image_root) if image_root else Path(path).parent
    records = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not entry.get("image") or not isinstance(entry.get("caption"), str):
                    raise ValueError('expected {"image": path, "caption": text, "id": …}')
            except ValueError as error:
                if on_error == "raise":
                    raise ValueError(f"{path}:{line_number}: {error}") from error
                logger.warning("skipped %s:%d: %s", path, line_number, error)
                if skipped is not None:
                    skipped.append(f"{path}:{line_number}: {error}")
                continue
            instance_id = str(entry.get("id", f"{Path(path).stem}:{line_number}"))
            records.append(CaptionRecord(instance_id, folder / entry["image"], entry["caption"]))
    return records


class MedicalCaptionDataset(CaptionDataset):
    def __init__(self, vis_processor: Callable[[Any], torch.Tensor], text_processor: Callable[[str], str],
                 ann_paths: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None,
                 on_error: str = "raise"):
        skipped: list[str] = []
        records = [record for path in ann_paths for record in read_caption_jsonl(path, image_root, on_error, skipped)]
        super().__init__(vis_processor, text_processor, records, on_error, skipped)


@registry.register_builder("medical_caption")
class MedicalCaptionBuilder(AnnotationBuilder):
    """JSONL files per split (``build_info.annotations.<split>.storage``), images under ``build_info.images.storage``."""

    train_dataset_cls = MedicalCaptionDataset
    eval_dataset_cls = MedicalCaptionDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "medical_caption.yaml")}


# ---- ROCO ----------------------------------------------------------------------------------------------
def read_tab_file(path: Path, on_error: str, skipped: list[str]) -> dict[str, list[str]]:
    """``ROCO_ID<TAB>field<TAB>…`` lines → ``{ROCO_ID: [field, …]}`` (fields stripped)."""
    rows: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            roco_id, *fields = [part.strip() for part in line.rstrip("\n").split("\t")]
            if not roco_id or not fields:
                problem = f"{path}:{line_number}: expected 'ROCO_ID<TAB>text', got {line.strip()[:80]!r}"
                if on_error == "raise":
                    raise ValueError(problem)
                logger.warning("skipped %s", problem)
                skipped.append(problem)
                continue
            rows[roco_id] = fields
    return rows


def read_roco_split(split_dir: str | os.PathLike, subset: str = "radiology", on_error: str = "raise",
                    skipped: list[str] | None = None) -> list[CaptionRecord]:
    """The captioned images of one ROCO split folder's subset.

    An image is found by the file name ``dlinks.txt`` gives, else as ``images/<ROCO_ID>.<ext>``;
    an image that is in neither place keeps the expected path, so that reading it fails (or skips)
    naming the file.
    """
    if subset not in ROCO_SUBSETS:
        raise ValueError(f"ROCO subset must be one of {ROCO_SUBSETS}, got {subset!r}")
    skipped = skipped if skipped is not None else []
    folder = Path(split_dir) / subset
    captions_file = folder / "captions.txt"
    if not captions_file.is_file():
        raise FileNotFoundError(f"no ROCO captions file at {captions_file} (expected <root>/<split>/{subset}/captions.txt)")
    captions = read_tab_file(captions_file, on_error, skipped)
    keywords = read_tab_file(folder / "keywords.txt", "skip", []) if (folder / "keywords.txt").is_file() else {}
    dlinks = read_tab_file(folder / "dlinks.txt", "skip", []) if (folder / "dlinks.txt").is_file() else {}
    images_dir = folder / "images"
    on_disk = {Path(name).stem: name for name in os.listdir(images_dir)} if images_dir.is_dir() else {}
    records = []
    for roco_id, fields in captions.items():
        link = dlinks.get(roco_id, [])
        file_name = link[-1] if len(link) >= 2 else on_disk.get(roco_id, f"{roco_id}.jpg")
        records.append(CaptionRecord(instance_id=roco_id, image=images_dir / file_name, caption=" ".join(fields),
                                     keywords=" ".join(keywords.get(roco_id, []))))
    return records


class ROCODataset(CaptionDataset):
    def __init__(self, vis_processor: Callable[[Any], torch.Tensor], text_processor: Callable[[str], str],
                 split_dir: str | os.PathLike, subset: str = "radiology", on_error: str = "raise"):
        skipped: list[str] = []
        records = read_roco_split(split_dir, subset, on_error, skipped)
        super().__init__(vis_processor, text_processor, records, on_error, skipped)
        self.split_dir, self.subset = Path(split_dir), subset

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = super().__getitem__(index)
        if sample is not None:
            sample["keywords"] = self.records[index].keywords
        return sample


@registry.register_builder("roco")
class ROCOBuilder(AnnotationBuilder):
    """ROCO from its own folders: ``build_info.storage`` (root), ``build_info.splits`` (LAVIS split →
    ROCO folder; a split set to null is not built) and ``subset``."""

    train_dataset_cls = ROCODataset
    eval_dataset_cls = ROCODataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "roco.yaml")}

    def build(self) -> dict[str, Any]:
        build_info = self.config.build_info
        root = Path(resolve_storage(build_info.storage))
        subset = self.config.get("subset", "radiology")
        datasets = {}
        for split, folder in build_info.splits.items():
            if not folder:
                continue
            is_train = split == "train"
            dataset_cls = self.train_dataset_cls if is_train else self.eval_dataset_cls
            datasets[split] = dataset_cls(
                vis_processor=self.vis_processors["train" if is_train else "eval"],
                text_processor=self.text_processors["train" if is_train else "eval"],
                split_dir=root / folder, subset=subset, on_error=self.config.get("on_error", "raise"))
            logger.info("roco/%s: %d %s samples from %s", split, len(datasets[split]), subset, root / folder)
        return datasets
