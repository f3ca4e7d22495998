"""Annotation schema, EHR text and label normalisation shared by builders and cohort scripts."""
