"""Relevance maps (issue 18): ``MedBLIP.explain`` on the ``tiny`` model, the way back onto a scan's own grid
(with and without registration to the template), the CerebrA region summary, and ``predict --relevance``."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations
from omegaconf import OmegaConf

from lavis_medblip.assets import CEREBRA_LABELS, ICBM_T1
from lavis_medblip.cli.predict import main
from lavis_medblip.inference import Predictor
from lavis_medblip.models import MedBLIP
from lavis_medblip.processors.volume import MriVolumeEvalProcessor
from lavis_medblip.relevance import (
    ScanRelevance, cerebra_region_names, explain_scan, read_scan, region_shares, relevance_path, to_scan_grid,
    top_regions,
)

EHR = "A 75-year-old female with 12 years of education. MMSE 24, CDR 0.5."
LEFT_HIPPOCAMPUS = 99  # CerebrA


@pytest.fixture(scope="module")
def tiny_model() -> MedBLIP:
    return MedBLIP.from_config(OmegaConf.load(MedBLIP.default_config_path("tiny")).model).eval()


@pytest.mark.parametrize("method", ["gradient", "attention"])
def test_maps_are_shaped_like_the_input_non_negative_and_deterministic(tiny_model, samples, method):
    samples = {key: value for key, value in samples.items() if key != "text_output"}
    first = tiny_model.explain(samples, method=method)
    again = tiny_model.explain(samples, method=method)
    assert first.shape == (2, 32, 32, 32) and first.dtype == torch.float32
    assert (first >= 0).all() and (first.flatten(1).sum(dim=1) > 0).all()
    assert torch.equal(first, again)
    # one sample's map does not depend on the rest of its batch
    alone = tiny_model.explain({"image": samples["image"][:1], "text_input": samples["text_input"][:1]}, method=method)
    torch.testing.assert_close(alone[0], first[0], rtol=1e-4, atol=1e-9)


def test_gradient_explains_the_answer_asked_for_and_by_default_the_predicted_one(tiny_model, samples):
    samples = {"image": samples["image"], "text_input": samples["text_input"]}
    predicted = tiny_model.predict_answers(samples, ["not demented", "mild cognitive impairment",
                                                     "Alzheimer's disease"]).predictions
    torch.testing.assert_close(tiny_model.explain(samples), tiny_model.explain(samples, answer=predicted))
    other = "Alzheimer's disease" if predicted[0] != "Alzheimer's disease" else "not demented"
    assert not torch.equal(tiny_model.explain(samples, answer=other)[0], tiny_model.explain(samples)[0])
    assert tiny_model.training is False


def test_gradients_bypass_the_vision_feature_cache(tiny_config, samples, tmp_path):
    tiny_config.freeze_vision_stem = True
    uncached = MedBLIP.from_config(tiny_config).eval()
    tiny_config.vision_feature_cache = str(tmp_path)
    cached = MedBLIP.from_config(tiny_config).eval()
    samples = {"image": samples["image"], "text_input": samples["text_input"]}
    cached.predict_answers(samples, ["not demented", "Alzheimer's disease"])  # fills the cache
    for method in ("gradient", "attention"):
        torch.testing.assert_close(cached.explain(samples, method=method), uncached.explain(samples, method=method))
    assert cached.feature_cache is not None


def test_attention_reads_only_the_layers_that_cross_attend(tiny_config, samples):
    tiny_config.qformer.cross_attention_freq = 2  # the paper's Q-Former: every other layer
    maps = MedBLIP.from_config(tiny_config).eval().explain({"image": samples["image"][:1],
                                                            "text_input": samples["text_input"][:1]}, method="attention")
    assert maps.shape == (1, 32, 32, 32) and (maps > 0).all()


def test_a_text_only_model_and_an_unknown_method_are_clear_errors(tiny_config, samples):
    tiny_config.prompt_order = ["text", "question"]
    with pytest.raises(ValueError, match="no image"):
        MedBLIP.from_config(tiny_config).explain(samples)
    with pytest.raises(ValueError, match="unknown relevance method 'saliency'"):
        MedBLIP.from_config(OmegaConf.load(MedBLIP.default_config_path("tiny")).model).explain(samples, method="saliency")


# ---- the way back to the scan ------------------------------------------------------------------------------


def reoriented(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another axis order (world coordinates unchanged)."""
    transform = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt(codes))
    return (orientations.apply_orientation(data, transform),
            affine @ orientations.inv_ornt_aff(transform, data.shape))


def rotation_z(degrees: float, shift_mm: tuple[float, float, float]) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rigid = np.eye(4)
    rigid[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rigid[:3, 3] = shift_mm
    return rigid


@pytest.fixture(scope="module")
def oblique_scan(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The ICBM T1 at 2 mm stored as LIA, rotated 6 degrees and shifted in world space; and its own CerebrA labels."""
    t1, labels = nib.load(ICBM_T1), nib.load(CEREBRA_LABELS)
    affine = t1.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    data, stored = reoriented(np.asarray(t1.dataobj)[::2, ::2, ::2], affine, "LIA")
    own_labels, _ = reoriented(np.asarray(labels.dataobj)[::2, ::2, ::2], affine, "LIA")
    path = tmp_path_factory.mktemp("oblique") / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, rotation_z(6.0, (8.0, -5.0, 4.0)) @ stored), path)
    return path, own_labels


def world_centroid(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.stack(np.nonzero(weights > 0), axis=1).astype(float)
    mean = (index * weights[weights > 0][:, None]).sum(axis=0) / weights[weights > 0].sum()
    return affine[:3, :3] @ mean + affine[:3, 3]


def atlas_region_on_cube(cube_affine: np.ndarray, size: int, label: int) -> torch.Tensor:
    """How much of each cube voxel the CerebrA region covers: a known blob in model space."""
    labels = nib.load(CEREBRA_LABELS)
    ijk = np.stack(np.nonzero(np.asarray(labels.dataobj) == label), axis=1)
    to_cube = np.linalg.inv(cube_affine) @ labels.affine
    index = np.rint(ijk @ to_cube[:3, :3].T + to_cube[:3, 3]).astype(int)
    blob = np.zeros((size,) * 3)
    np.add.at(blob, tuple(index.T), 1.0)
    return torch.from_numpy(blob)


@pytest.mark.parametrize("registered", [False, True], ids=["resize_and_pad", "register_to_template"])
def test_a_blob_in_model_space_lands_where_it_belongs_on_the_scan(oblique_scan, registered):
    path, own_labels = oblique_scan
    if registered:  # the cube is template space; the registration is undone on the way back
        processor = MriVolumeEvalProcessor(image_size=32, field_of_view_mm=192, intensity_normalization="head_quantiles",
                                           register_to_template=True)
    else:  # the cube is the scan's world, resized and padded (here the scan's world is rotated MNI)
        processor = MriVolumeEvalProcessor(image_size=32)
    cube, geometry, _ = read_scan(processor, path)
    torch.testing.assert_close(cube, processor(str(path)))  # what the model sees
    scan = nib.load(path)
    assert geometry.shape == scan.shape and np.allclose(geometry.affine, scan.affine)

    if registered:  # the template's left hippocampus, carried to the scan, is the scan's own
        blob = atlas_region_on_cube(geometry.cube_affine, 32, LEFT_HIPPOCAMPUS)
        expected = world_centroid((own_labels == LEFT_HIPPOCAMPUS).astype(float), scan.affine)
    else:  # a blob at a known cube voxel lands at that voxel's world position
        blob = torch.zeros(32, 32, 32)
        blob[10:13, 20:23, 14:17] = 1.0
        expected = geometry.cube_affine[:3, :3] @ np.array([11.0, 21.0, 15.0]) + geometry.cube_affine[:3, 3]
    on_scan = to_scan_grid(blob, geometry)
    assert on_scan.shape == scan.shape and on_scan.min() >= 0
    error_mm = np.linalg.norm(world_centroid(on_scan, scan.affine) - expected)
    assert error_mm < (6.0 if registered else 2.0), error_mm  # 6 mm cube voxels; an affine fit


def test_region_shares_name_real_cerebra_regions_and_sum_to_at_most_one():
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = [-96.0, -130.0, -78.0]
    hippocampus = atlas_region_on_cube(affine, 32, LEFT_HIPPOCAMPUS)
    shares = region_shares(hippocampus, affine)
    assert top_regions(shares)[0][0] == "Left Hippocampus"
    uniform = region_shares(torch.ones(32, 32, 32), affine)
    names = set(cerebra_region_names().values())
    assert len(names) == 102 and set(uniform) <= names and len(uniform) > 90
    assert 0.1 < sum(uniform.values()) <= 1.0 and sum(shares.values()) <= 1.0 + 1e-9
    ranked = top_regions(uniform)
    assert len(ranked) == 10 and [share for _, share in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert region_shares(torch.zeros(32, 32, 32), affine) == {}


def test_relevance_paths_keep_the_id_inside_the_folder(tmp_path):
    assert relevance_path(tmp_path, "sub-01.nii.gz") == tmp_path / "sub-01_relevance.nii.gz"
    assert relevance_path(tmp_path, "site/sub-02") == tmp_path / "site" / "sub-02_relevance.nii.gz"
    assert relevance_path(tmp_path, "../../etc/x") == tmp_path / "etc" / "x_relevance.nii.gz"


def test_explain_scan_answers_on_the_scans_grid(tiny_model, oblique_scan):
    path, _ = oblique_scan
    from lavis.models import load_preprocess

    config = OmegaConf.load(MedBLIP.default_config_path("tiny"))
    processors, texts = load_preprocess(config.preprocess)
    predictor = Predictor(tiny_model, processors["eval"], texts["eval"], ["NC", "MCI", "AD"], "cpu")
    result = explain_scan(predictor, path, EHR, method="attention")
    assert isinstance(result, ScanRelevance) and result.method == "attention" and result.seconds > 0
    assert result.answer == result.prediction.answer and set(result.timings) == {"read", "predict", "relevance", "mapping"}
    assert result.image.shape == nib.load(path).shape and np.allclose(result.image.affine, nib.load(path).affine)
    assert result.model_space.shape == (32, 32, 32) and len(result.top_regions) == 10
    named = explain_scan(predictor, path, EHR, answer="Alzheimer's disease")
    assert named.answer == "Alzheimer's disease" and named.method == "gradient"


# ---- predict --relevance -----------------------------------------------------------------------------------


def test_predict_writes_a_relevance_nifti_per_case_and_the_top_regions_column(checkpoint, oblique_scan, tmp_path):
    scans = tmp_path / "scans"
    (scans / "site").mkdir(parents=True)
    (scans / "site" / "oblique.nii.gz").write_bytes(oblique_scan[0].read_bytes())
    (scans / "corrupt.nii.gz").write_bytes(b"not a NIfTI")
    results, maps = tmp_path / "results.csv", tmp_path / "maps"
    assert main(["--model-type", "tiny", "--checkpoint", str(checkpoint), "--image", str(scans), "--text", EHR,
                 "--output", str(results), "--relevance", str(maps), "--relevance-method", "attention"]) == 0
    with results.open(newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    assert rows["corrupt"]["error"] and rows["corrupt"]["top_regions"] == ""
    assert rows["site/oblique"]["top_regions"].count(";") == 9
    written = nib.load(maps / "site" / "oblique_relevance.nii.gz")
    scan = nib.load(oblique_scan[0])
    assert written.shape == scan.shape and np.allclose(written.affine, scan.affine)
    assert sorted(path.name for path in maps.rglob("*.nii.gz")) == ["oblique_relevance.nii.gz"]


def test_predict_report_draws_the_map_on_the_slices(checkpoint, oblique_scan, tmp_path, capsys):
    report = tmp_path / "report.png"
    assert main(["--model-type", "tiny", "--checkpoint", str(checkpoint), "--image", str(oblique_scan[0]),
                 "--text", EHR, "--relevance", str(tmp_path), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'oblique_relevance.nii.gz'}" in printed and "top regions: " in printed
    assert matplotlib.image.imread(report).shape[2] in (3, 4)
