"""Annotations, what the cohort preparation scripts share with the plugin: the schema, EHR text,
labels, the M3D-VQA CSV format and content hashes (provenance in reports, keys of the caches).
Nothing here imports LAVIS, torch or transformers (tests/test_light_imports.py checks; why: README).
"""
