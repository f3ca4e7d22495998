"""Subject-wise train/val/test splits (no subject in two splits), seeded and stratified by label, with
an optional balanced test set of a fixed number of visits per class (the paper's 3×200 / 2×200).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from dataset_builders.tables import Issues
from lavis_medblip.annotations.schema import CLASS_NAMES, SPLITS, AnnotationRecord


@dataclass
class SplitOptions:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    test_per_class: int | None = None
    all_test: bool = False
    classes: Sequence[str] = CLASS_NAMES


def assign_splits(records: list[AnnotationRecord], *, seed: int, val_fraction: float = 0.1,
                  test_fraction: float = 0.0, test_per_class: int | None = None, all_test: bool = False,
                  classes: Sequence[str] = CLASS_NAMES, issues: Issues | None = None) -> list[AnnotationRecord]:
    """Set ``record.split`` subject-wise; returns the records kept (ordered by split, then input).

    * ``all_test``: everything is test (zero-shot cohorts).
    * ``test_per_class=n``: exactly ``n`` test visits per class in ``classes``, each from a different
      subject (chosen with the seed); that subject's other visits are dropped (listed in the report as
      ``dropped_test_subject_visits``) so that no subject is in two splits and the test set stays
      balanced. ``ValueError`` when a class has fewer than ``n`` eligible subjects.
    * otherwise ``test_fraction`` of the subjects, stratified by each subject's latest label.
    The remaining subjects are split into ``val_fraction`` val and the rest train, stratified the same way.
    """
    rng = np.random.default_rng(seed)
    if all_test:
        for record in records:
            record.split = "test"
        return list(records)
    by_subject: dict[str, list[AnnotationRecord]] = defaultdict(list)
    for record in records:
        by_subject[record.subject_id].append(record)
    test_records: list[AnnotationRecord] = []
    test_subjects: set[str] = set()
    if test_per_class:
        test_records = balanced_test_sample(records, test_per_class, classes=classes, seed=seed)
        test_subjects = {record.subject_id for record in test_records}
        chosen = {id(record) for record in test_records}
        for subject in sorted(test_subjects):
            for record in by_subject[subject]:
                if id(record) not in chosen and issues is not None:
                    issues.note("dropped_test_subject_visits", record.image,
                                f"other visit of test subject {subject}; dropped to keep splits subject-wise")
    remaining = sorted(subject for subject in by_subject if subject not in test_subjects)
    strata = {subject: _subject_stratum(by_subject[subject]) for subject in remaining}
    split_of: dict[str, str] = {}
    if not test_per_class and test_fraction > 0:
        test_part = _stratified_pick(remaining, strata, test_fraction, rng)
        split_of.update({subject: "test" for subject in test_part})
        remaining = [subject for subject in remaining if subject not in test_part]
    # val_fraction is a fraction of the subjects not in test, so it means the same with or without a test set
    val_part = _stratified_pick(remaining, strata, val_fraction, rng)
    split_of.update({subject: ("val" if subject in val_part else "train") for subject in remaining})
    for record in test_records:
        record.split = "test"
    kept = list(test_records)
    for record in records:
        if record.subject_id in split_of:
            record.split = split_of[record.subject_id]
            kept.append(record)
    order = {name: index for index, name in enumerate(SPLITS)}
    return sorted(kept, key=lambda record: order[record.split])


def balanced_test_sample(records: Sequence[AnnotationRecord], per_class: int, *, seed: int,
                         classes: Sequence[str] = CLASS_NAMES) -> list[AnnotationRecord]:
    """``per_class`` records of each class from distinct subjects (seeded; scarcest class picks first)."""
    rng = np.random.default_rng([seed, per_class])
    candidates: dict[str, dict[str, list[AnnotationRecord]]] = {name: defaultdict(list) for name in classes}
    for record in records:
        if record.label in candidates:
            candidates[record.label][record.subject_id].append(record)
    available = {name: len(candidates[name]) for name in classes}
    short = {name: count for name, count in available.items() if count < per_class}
    if short:
        raise ValueError(f"balanced test set needs {per_class} subjects per class; too few in "
                         + ", ".join(f"{name} ({count})" for name, count in short.items()))
    taken: set[str] = set()
    chosen: list[AnnotationRecord] = []
    # A subject can have visits of several classes (converters); the scarcest class chooses first.
    for name in sorted(classes, key=lambda name: (available[name], name)):
        subjects = [subject for subject in sorted(candidates[name]) if subject not in taken]
        if len(subjects) < per_class:
            raise ValueError(f"balanced test set: only {len(subjects)} {name} subjects left after the other "
                             f"classes took theirs (need {per_class})")
        for index in rng.permutation(len(subjects))[:per_class]:
            subject = subjects[index]
            visits = candidates[name][subject]
            chosen.append(visits[int(rng.integers(len(visits)))])
            taken.add(subject)
    order = {name: index for index, name in enumerate(classes)}
    return sorted(chosen, key=lambda record: (order[record.label], record.subject_id))


def _subject_stratum(records: Sequence[AnnotationRecord]) -> str:
    return str(records[-1].label)  # rows are in table order, so the last is usually the latest visit


def _stratified_pick(subjects: Sequence[str], strata: Mapping[str, str], fraction: float,
                     rng: np.random.Generator) -> set[str]:
    """``round(fraction * len(subjects))`` subjects, spread over strata by largest remainder.

    Rounding per stratum would put nothing in val/test for small cohorts (1 subject × 0.2 → 0).
    """
    if fraction <= 0 or not subjects:
        return set()
    groups: dict[str, list[str]] = defaultdict(list)
    for subject in subjects:
        groups[strata[subject]].append(subject)
    names = sorted(groups)
    quotas = {name: fraction * len(groups[name]) for name in names}
    counts = {name: int(math.floor(quotas[name])) for name in names}
    left = int(round(fraction * len(subjects))) - sum(counts.values())
    tie_break = rng.permutation(len(names))
    by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[names[i]] - counts[names[i]]), tie_break[i]))
    for index in by_remainder[:max(left, 0)]:
        counts[names[index]] += 1
    picked: set[str] = set()
    for name in names:
        members = groups[name]
        picked.update(members[index] for index in rng.permutation(len(members))[:counts[name]])
    return picked
