"""Evaluate: ``python -m lavis_medblip.evaluate --cfg-path projects/medblip/eval_zeroshot_aibl.yaml``."""
from __future__ import annotations

from typing import Sequence

from lavis_medblip.cli.launch import build_runner


def main(argv: Sequence[str] | None = None) -> dict:
    runner, _ = build_runner(argv, "python -m lavis_medblip.evaluate", "Evaluate MedBLIP with LAVIS's runner")
    return runner.evaluate(skip_reload=True)


if __name__ == "__main__":
    main()
