"""Bad samples under ``on_error``: an error naming the file and sample, or a logged skip that the
collater drops and counts.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from lavis_medblip.processors.volume_types import VolumeReadError, degenerate_volume_warnings

logger = logging.getLogger(__name__)


def process_or_skip(processor: Callable[[str], torch.Tensor], path: Any, on_error: str,
                    where: str) -> tuple[torch.Tensor | None, str]:
    """``(processor(path), warning)``; on failure raise :class:`VolumeReadError` naming ``path`` and
    ``where`` (e.g. "sample 3 (row 17)"), or log and return ``(None, "")`` when ``on_error`` is ``"skip"``.

    A scan that reads but raised a :class:`~lavis_medblip.processors.volume_types.DegenerateVolumeWarning`
    (constant, mostly NaN, ...) is kept: ``warning`` joins the messages of any such warning (else "")
    and the batch's ``num_degenerate`` counts them; other warnings pass through as usual.
    """
    try:
        with degenerate_volume_warnings() as degenerate:
            image = processor(str(path))
    except (OSError, ValueError, RuntimeError) as error:
        problem = error.problem if isinstance(error, VolumeReadError) else f"{type(error).__name__}: {error}"
        if on_error == "raise":
            raise VolumeReadError(path, f"{where}: {problem}") from error
        logger.warning("skipped %s (%s): %s", where, path, problem)
        return None, ""
    for message in degenerate:
        logger.warning("%s (%s): %s", where, path, message)
    return image, "; ".join(degenerate)


def collate_skipping(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack a batch, dropping ``None`` samples; ``num_skipped`` says how many were dropped and
    ``num_degenerate`` how many kept ones carry a ``warning``.

    Tensors are stacked, integers become a long tensor, everything else stays a list. A batch
    whose samples were all skipped holds the two counts only.
    """
    kept = [sample for sample in samples if sample is not None]
    batch: dict[str, Any] = {"num_skipped": len(samples) - len(kept),
                             "num_degenerate": sum(1 for sample in kept if sample.get("warning"))}
    for key in kept[0] if kept else ():
        values = [sample[key] for sample in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


class SkippingDataset(Dataset):
    """What our datasets share: processors, ``on_error``, ``records``, skipped-annotation log, collater.

    A subclass reads its scan with :func:`process_or_skip` and returns ``None`` for a skipped sample;
    :func:`collate_skipping` drops those and counts them in ``num_skipped`` for the run's log.
    """

    def __init__(self, vis_processor: Callable[[Any], torch.Tensor], text_processor: Callable[[str], str],
                 on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.vis_processor, self.text_processor, self.on_error = vis_processor, text_processor, on_error
        self.records: list[Any] = []
        self.skipped_annotations: list[str] = []

    def __len__(self) -> int:
        return len(self.records)

    def collater(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        return collate_skipping(samples)
