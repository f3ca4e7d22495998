"""Fill the preprocessed-volume cache: ``python -m lavis_medblip.warm_cache``, the command of :mod:`lavis_medblip.cli.warm_cache` under its usual name."""
from lavis_medblip.cli.warm_cache import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
