"""Export a checkpoint as a model bundle: ``python -m lavis_medblip.export``, the command of
:mod:`lavis_medblip.cli.export` under its usual name."""
import sys

from lavis_medblip.cli.export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
