"""Evaluate MedBLIP: ``python -m lavis_medblip.evaluate``, the command of :mod:`lavis_medblip.cli.evaluate` under its usual name."""
from lavis_medblip.cli.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
