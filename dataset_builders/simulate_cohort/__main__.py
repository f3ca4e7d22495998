"""``python -m dataset_builders.simulate_cohort``: the command line (:func:`~.cohort.main`)."""
import sys

from dataset_builders.simulate_cohort.cohort import main

if __name__ == "__main__":  # not when a spawned worker re-imports this module
    sys.exit(main())
