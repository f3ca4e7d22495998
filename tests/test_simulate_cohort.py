"""The simulated atrophy cohort: deterministic, schema-valid, multi-site, anatomically varied, and
atrophic where it should be.

A handful of subjects on a coarse 4 mm grid; the whole module runs in about a minute (most of it is
building the structure basis fields once per process).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dataset_builders.simulate_cohort import (
    BASIS_NAMES, HELD_OUT_ANATOMY, HELD_OUT_SITE, HIPPOCAMPUS, RATE_LIMITS, SITES, TRAINING_ANATOMY,
    TRAINING_SITES, VENTRICLE_IDS, SubjectSpec, ehr_log_likelihood, jacobian_determinant, main, simulate_cohort,
    simulate_subject, simulate_ehr_records, structure_basis, structure_displacement,
)
from lavis_medblip.annotations.ehr import describe_ehr
from lavis_medblip.annotations.schema import CLASS_NAMES, read_annotations

SMALL = dict(subjects_per_class=4, voxel_mm=4.0, save_labels=True, progress=False)
#: 4 per class, plus 1 per class of the held-out anatomy (test_anatomy is as large as test).
SMALL_COHORT_SIZE = 15


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A 15-subject cohort written through the Python API."""
    return simulate_cohort(tmp_path_factory.mktemp("cohort_a"), seed=7, **SMALL)


@pytest.fixture(scope="module")
def cohort_again(tmp_path_factory):
    """The same cohort written again, through the command line."""
    out = tmp_path_factory.mktemp("cohort_b")
    main(["--out", str(out), "--subjects-per-class", "4", "--seed", "7", "--voxel-mm", "4", "--save-labels",
          "--quiet"])
    return out


def _records(result):
    return {split: list(read_annotations(path)) for split, path in result.annotation_files.items()}


def _truth(result):
    return [json.loads(line) for line in result.subjects_file.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_cohort(cohort, cohort_again):
    first, second = _files(cohort.out_dir), _files(cohort_again)
    assert first.keys() == second.keys()
    assert len([name for name in first if name.startswith("images/")]) == SMALL_COHORT_SIZE
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_a_different_cohort(cohort, tmp_path):
    other = simulate_cohort(tmp_path, seed=8, **SMALL)
    assert other.annotation_files["train"].read_bytes() != cohort.annotation_files["train"].read_bytes()
    ours = nib.load(cohort.out_dir / "images/siteA/siteA-0000.nii.gz").get_fdata()
    theirs = nib.load(other.out_dir / "images/siteA/siteA-0000.nii.gz").get_fdata()
    assert ours.shape == theirs.shape and not np.array_equal(ours, theirs)


def test_rerun_with_same_arguments_is_a_cache_hit(cohort):
    image = cohort.out_dir / "images/siteB/siteB-0000.nii.gz"
    before = image.stat().st_mtime_ns
    again = simulate_cohort(cohort.out_dir, seed=7, **SMALL)
    assert again.cache_hit and image.stat().st_mtime_ns == before
    manifest = json.loads(cohort.cohort_file.read_text())
    assert manifest["parameters"]["seed"] == 7 and manifest["held_out_site"] == HELD_OUT_SITE.name


def test_annotations_follow_the_schema(cohort):
    records = _records(cohort)
    everyone = [record for split in records.values() for record in split]
    assert len(everyone) == SMALL_COHORT_SIZE
    for record in everyone:
        assert (cohort.out_dir / record.image).exists()  # relative to the annotation file's folder
        assert record.text == describe_ehr(record.ehr)
        assert "None" not in record.text and "nan" not in record.text
        assert record.cohort and record.visit == "bl"
    assert any(value is None for record in everyone for value in record.ehr.values())  # EHR is incomplete
    assert [sum(r.label == name for r in everyone) for name in CLASS_NAMES] == [5, 5, 5]
    for held_out_set in ("test", "test_anatomy"):
        assert [sum(r.label == name for r in records[held_out_set]) for name in CLASS_NAMES] == [1, 1, 1]
        assert {r.split for r in records[held_out_set]} == {"test"}  # the schema's split; the file names the set


def test_fresh_held_out_sets_come_without_a_training_set(cohort, tmp_path):
    held_out = simulate_cohort(tmp_path, seed=7, splits=("test", "test_anatomy"), **SMALL)

    assert set(held_out.annotation_files) == {"test", "test_anatomy"} and held_out.n_subjects == 6
    assert not (tmp_path / "train.jsonl").exists()
    for split, path in held_out.annotation_files.items():  # each subject exactly as the whole cohort draws it
        assert path.read_bytes() == cohort.annotation_files[split].read_bytes()
        for record in read_annotations(path):
            assert (tmp_path / record.image).read_bytes() == (cohort.out_dir / record.image).read_bytes()
    assert simulate_cohort(tmp_path, seed=7, splits=("test_anatomy", "test"), **SMALL).cache_hit
    with pytest.raises(ValueError, match="splits must be some of"):
        simulate_cohort(tmp_path, seed=7, splits=("holdout",), **SMALL)


def test_the_cohorts_ehr_records_come_without_scans_for_the_models_that_read_none(cohort):
    everyone = [record for split in _records(cohort).values() for record in split]

    records = simulate_ehr_records(4, seed=7)  # the cohort's plan and EHR draws (SMALL's defaults), no scans

    assert sorted(records, key=lambda r: r.subject_id) == sorted(everyone, key=lambda r: r.subject_id)
    assert simulate_ehr_records(4, seed=8) != records


def test_the_ehr_likelihood_is_a_distribution_over_what_the_simulator_records():
    for label in CLASS_NAMES:
        for field, values in (("education_years", range(6, 21)), ("mmse", range(10, 31)),
                              ("cdr_global", (0.0, 0.5, 1.0, 2.0)), ("sex", "MF")):
            total = sum(np.exp(ehr_log_likelihood({field: value}, label, kappa=0.5)) for value in values)
            assert total == pytest.approx(1.0), (label, field)
        ages = np.round(np.arange(55.0, 95.05, 0.1), 1)
        assert sum(np.exp(ehr_log_likelihood({"age": age}, label, kappa=0.5)) for age in ages) == pytest.approx(1.0)
        assert ehr_log_likelihood({"age": None, "mmse": None}, label, kappa=0.5) == 0.0  # missing: no evidence


def test_the_bayes_optimal_reader_of_the_ehr_beats_chance_and_a_regression():
    from lavis_medblip.baselines import EHRLogisticRegression

    train, test = simulate_ehr_records(100, seed=1, ehr_informativeness=0.5), \
        simulate_ehr_records(100, seed=2, ehr_informativeness=0.5)
    truth = np.array([CLASS_NAMES.index(record.label) for record in test])
    bayes = np.array([np.argmax([ehr_log_likelihood(record.ehr, label, kappa=0.5) for label in CLASS_NAMES])
                      for record in test])
    regression = EHRLogisticRegression().fit(train).predict_proba(test).argmax(axis=1)

    def balanced_accuracy(predicted):
        return np.mean([np.mean(predicted[truth == k] == k) for k in range(len(CLASS_NAMES))])

    assert balanced_accuracy(bayes) > 0.45  # chance 0.33
    assert balanced_accuracy(bayes) >= balanced_accuracy(regression)


def test_held_out_site_is_the_test_split_and_subjects_are_in_one_split(cohort):
    records = _records(cohort)
    assert {r.site for r in records["test"]} == {HELD_OUT_SITE.name}
    assert {r.site for r in records["train"] + records["val"]} <= {site.name for site in TRAINING_SITES}
    ids = [r.subject_id for split in records.values() for r in split]
    assert len(ids) == len(set(ids))


def test_held_out_anatomy_is_scanned_at_the_training_sites(cohort):
    """test_anatomy: new brains (a family training never saw), familiar scanners."""
    records = _records(cohort)
    assert {r.site for r in records["test_anatomy"]} <= {site.name for site in TRAINING_SITES}
    family_of = {subject["subject_id"]: subject["anatomy"]["family"] for subject in _truth(cohort)}
    assert {family_of[r.subject_id] for r in records["test_anatomy"]} == {HELD_OUT_ANATOMY.name}
    assert {family_of[r.subject_id] for split in ("train", "val", "test") for r in records[split]} \
        == {TRAINING_ANATOMY.name}
    # ids look alike in every split: "<site>-<number>", numbered in a shuffled order per site
    assert all(r.subject_id.startswith(f"{r.site}-") for split in records.values() for r in split)
    manifest = json.loads(cohort.cohort_file.read_text())
    assert manifest["anatomy_families"]["held_out"]["warp_length_mm"] == HELD_OUT_ANATOMY.warp_length_mm
    assert manifest["counts"]["test_anatomy"] == manifest["counts"]["test"]


def test_healthy_anatomy_varies_as_much_as_in_real_elderly_brains():
    """With no atrophy at all, normal subjects' ventricles still differ several-fold (CV ~0.4 in ADNI NC)."""
    subjects = [simulate_subject(SubjectSpec(f"s{k}", "NC", "siteA", "train", (0, 0, k)), voxel_mm=4.0,
                                 atrophy_scale=0.0).truth for k in range(24)]
    volumes = {key: np.array([s["volumes"][key] for s in subjects])
               for key in ("brain_mm3", "ventricles_mm3", "hippocampus_mm3")}

    def cv(values: np.ndarray) -> float:
        return float(values.std(ddof=1) / values.mean())

    assert 0.07 < cv(volumes["brain_mm3"]) < 0.2  # intracranial size: ~10%
    assert cv(volumes["ventricles_mm3"]) > 0.25
    assert volumes["ventricles_mm3"].max() > 2.5 * volumes["ventricles_mm3"].min()
    assert 0.05 < cv(volumes["hippocampus_mm3"] / volumes["brain_mm3"]) < 0.2
    assert all(s["min_jacobian_anatomy"] > 0 for s in subjects)


def test_held_out_anatomy_family_differs_in_head_shape_and_torque(cohort):
    anatomies = {subject["split"]: subject["anatomy"] for subject in _truth(cohort)}  # one per split suffices
    assert len(set(anatomies["test_anatomy"]["head_scale"])) == 3  # scaled differently along each axis
    assert len(set(anatomies["train"]["head_scale"])) == 1
    held_out_torques = [s["anatomy"]["torque_mm"] for s in _truth(cohort) if s["split"] == "test_anatomy"]
    assert np.mean(held_out_torques) < 0  # mirrored: training's torque is positive on average


def test_structure_warps_never_fold_at_the_rate_caps():
    strongest = {name: RATE_LIMITS[name.split("_")[0]][1] for name in BASIS_NAMES}
    weakest = {name: RATE_LIMITS[name.split("_")[0]][0] for name in BASIS_NAMES}
    for rates in (strongest, weakest):
        determinant = jacobian_determinant(structure_displacement(rates), structure_basis().spacing)
        assert float(determinant.min()) > 0.1


def test_every_subjects_warps_have_positive_jacobians(cohort):
    for subject in _truth(cohort):
        assert subject["min_jacobian_atrophy"] > 0 and subject["min_jacobian_anatomy"] > 0


def test_sites_store_different_orientations_that_canonicalise_to_ras(cohort):
    records = [r for split in _records(cohort).values() for r in split]
    stored = {}
    for site in SITES:
        record = next(r for r in records if r.site == site.name)
        image = nib.load(cohort.out_dir / record.image)
        labels = nib.load(cohort.out_dir / record.image.replace("images/", "labels/", 1))
        stored[site.name] = ("".join(nib.aff2axcodes(image.affine)), image.header.get_zooms())
        assert np.allclose(image.affine, labels.affine)

        canonical = nib.as_closest_canonical(labels)
        assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
        data = np.asanyarray(canonical.dataobj)

        def centroid(label_id: int) -> np.ndarray:  # world mm
            return nib.affines.apply_affine(canonical.affine, np.argwhere(data == label_id).mean(axis=0))

        right_hippocampus, left_hippocampus = centroid(HIPPOCAMPUS["right"]), centroid(HIPPOCAMPUS["left"])
        assert right_hippocampus[0] > 10 and left_hippocampus[0] < -10  # R is +x
        assert centroid(38)[1] > right_hippocampus[1] + 20  # superior frontal is anterior
        assert centroid(9)[2] > right_hippocampus[2] + 30  # superior parietal is superior
    assert [codes for codes, _ in stored.values()] == [site.orientation for site in SITES]
    assert len({codes for codes, _ in stored.values()}) == len(SITES)
    assert all(stored[HELD_OUT_SITE.name][1] != stored[site.name][1] for site in TRAINING_SITES)
