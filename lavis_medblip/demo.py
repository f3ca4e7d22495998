"""The CPU demo: ``python -m lavis_medblip.demo``, the command of :mod:`lavis_medblip.cli.demo` under its usual name."""
from lavis_medblip.cli.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
