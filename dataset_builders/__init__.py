"""Cohort preparation: scripts that write the project's annotation schema (and the cohort simulator)."""
