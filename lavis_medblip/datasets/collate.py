"""Batching that tolerates skipped samples (``on_error: skip`` makes a dataset return ``None``)."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def collate_skipping(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack a batch, dropping ``None`` samples; ``num_skipped`` says how many were dropped.

    Tensors are stacked, integers become a long tensor, everything else stays a list. A batch
    whose samples were all skipped holds ``num_skipped`` only.
    """
    kept = [sample for sample in samples if sample is not None]
    batch: dict[str, Any] = {"num_skipped": len(samples) - len(kept)}
    for key in kept[0] if kept else ():
        values = [sample[key] for sample in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch
