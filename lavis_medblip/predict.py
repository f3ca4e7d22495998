"""Diagnose scans: ``python -m lavis_medblip.predict``, the command of :mod:`lavis_medblip.cli.predict` under its usual name."""
import sys

from lavis_medblip.cli.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
