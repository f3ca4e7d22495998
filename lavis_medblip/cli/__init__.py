"""The command lines: ``python -m lavis_medblip.<name>`` (or ``lavis.train`` / ``lavis.evaluate``) runs ``cli/<name>.py``."""
