"""Train MedBLIP: ``python -m lavis_medblip.train``, the command of :mod:`lavis_medblip.cli.train` under its usual name."""
from lavis_medblip.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
