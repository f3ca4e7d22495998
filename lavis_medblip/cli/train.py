"""Train: ``python -m lavis_medblip.train --cfg-path projects/medblip/pretrain_biomedlm.yaml [--options k=v …]``.

Multi-GPU (or multi-process CPU): ``torchrun --nproc_per_node=N -m lavis_medblip.train --cfg-path …``.
"""
from __future__ import annotations

from typing import Sequence

from lavis_medblip.cli.launch import build_runner


def main(argv: Sequence[str] | None = None) -> None:
    runner, _ = build_runner(argv, "python -m lavis_medblip.train", "Train MedBLIP with LAVIS's runner")
    runner.train()


if __name__ == "__main__":
    main()
