"""``python -m lavis_medblip.app``: :func:`lavis_medblip.app.cli.main`."""
import sys

from lavis_medblip.app.cli import main

sys.exit(main())
