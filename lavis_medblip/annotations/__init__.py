"""Annotations, what the cohort preparation scripts share with the plugin: the schema, EHR text,
labels, the M3D-VQA CSV format, and content hashes (provenance in reports, keys of the caches).

Nothing here imports LAVIS, torch or transformers (tests/test_light_imports.py checks), so
``python -m dataset_builders.<cohort>`` starts in well under a second; importing
``lavis_medblip`` defers its LAVIS registration until LAVIS itself is imported
(:mod:`lavis_medblip.registration`).
"""
