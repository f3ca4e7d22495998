"""The registered MRI volume processors on real brain volumes (CPU, small image sizes).

Volumes: the vendored ICBM-2009c T1 (1 mm, 193 x 229 x 193, RAS, uint8), nilearn's MNI152
(2 mm) and nibabel's test T1 ``anatomical.nii`` (2 mm, LAS, big-endian int16).
"""
from __future__ import annotations

import gzip
import logging
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lavis_medblip.assets import CEREBRA_LABELS, ICBM_BRAIN_MASK, ICBM_T1

import lavis_medblip.processors  # noqa: F401  (registers the processors)
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from lavis_medblip.processors.augment import RandomElasticDeformation, build_augmentation
from lavis_medblip.processors.readers import load_volume
from lavis_medblip.processors.volume_types import (
    ConstantVolumeWarning,
    Volume,
    VolumeReadError,
    VolumeTransformError,
)
from lavis_medblip.processors.transforms import Compose, EnsureVolume3D, ToCanonicalRAS, resize_trilinear_into
from lavis_medblip.processors.template import template_reference
from lavis_medblip.processors.volume import MriVolumeEvalProcessor, MriVolumeTrainProcessor

SIZE = 32


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def icbm() -> nib.Nifti1Image:
    return nib.load(ICBM_T1)


@pytest.fixture(scope="module")
def icbm_small(icbm) -> nib.Nifti1Image:
    """ICBM T1 at 3 mm (65 x 77 x 65, int16): small enough to write as DICOM or in many variants."""
    data = np.asarray(icbm.dataobj)[::3, ::3, ::3].astype(np.int16)
    affine = icbm.affine.copy()
    affine[:3, :3] *= 3
    return nib.Nifti1Image(data, affine)


@pytest.fixture
def eval_processor() -> MriVolumeEvalProcessor:
    return registry.get_processor_class("mri_volume_eval").from_config({"image_size": SIZE})


def save(image: nib.spatialimages.SpatialImage, path: Path) -> Path:
    nib.save(image, path)
    return path


def every_other_axial_slice(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same anatomy with twice the slice spacing (anisotropic voxels)."""
    data = np.ascontiguousarray(np.asarray(image.dataobj)[:, :, ::2])
    return nib.Nifti1Image(data, image.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))


def nibabel_anatomical() -> Path:
    import nibabel.testing

    return Path(nibabel.testing.data_path) / "anatomical.nii"


# --------------------------------------------------------------------------- registry and config


def test_processors_are_registered_lavis_processors():
    for name in ("mri_volume_train", "mri_volume_eval"):
        processor_class = registry.get_processor_class(name)
        assert issubclass(processor_class, BaseProcessor)
    assert registry.get_processor_class("mri_volume_eval") is MriVolumeEvalProcessor


def test_processors_pickle_for_spawned_dataloader_workers(tmp_path):
    import pickle

    for processor in (
        MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path),
        MriVolumeTrainProcessor(image_size=SIZE),
    ):
        clone = pickle.loads(pickle.dumps(processor))
        assert clone(ICBM_T1).shape == (1, SIZE, SIZE, SIZE)


def test_read_errors_pickle_back_from_dataloader_workers_unchanged():
    import pickle

    from lavis_medblip.processors.volume_types import VolumeReadError, VolumeTransformError

    for error in (VolumeReadError("scan.nii.gz", "truncated gzip stream"),
                  VolumeTransformError("scan.nii.gz", "ToCanonicalRAS", ValueError("singular affine"))):
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)
        assert (clone.source, clone.problem) == ("scan.nii.gz", error.problem)


def test_from_config_defaults_and_keys():
    from omegaconf import OmegaConf

    default = MriVolumeEvalProcessor.from_config(None)
    assert default.image_size == 224
    assert default.clip_percentiles == (0.5, 99.5)
    assert default.voxel_spacing is None and default.cache is None and default.dtype == torch.float32

    cfg = OmegaConf.create(
        {"image_size": 48, "clip_percentiles": [1, 99], "voxel_spacing": [1.5, 1.5, 1.5], "dtype": "bfloat16"}
    )
    processor = MriVolumeEvalProcessor.from_config(cfg)
    assert (processor.image_size, processor.clip_percentiles) == (48, (1.0, 99.0))
    assert processor.voxel_spacing == (1.5, 1.5, 1.5) and processor.dtype == torch.bfloat16

    with pytest.raises(ValueError, match="dtype"):
        MriVolumeEvalProcessor.from_config({"dtype": "int8"})
    with pytest.raises(ValueError, match="unknown augment"):
        MriVolumeTrainProcessor.from_config({"augment": {"rotation": 10}})


# --------------------------------------------------------------------------- output contract


def test_eval_output_shape_range_dtype_and_determinism(eval_processor):
    volume = eval_processor(ICBM_T1)
    assert volume.shape == (1, SIZE, SIZE, SIZE)
    assert volume.dtype == torch.float32
    assert float(volume.min()) == 0.0 and float(volume.max()) == pytest.approx(1.0)
    assert torch.equal(volume, eval_processor(str(ICBM_T1)))  # str or Path, same result


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_dtype_is_selectable(dtype):
    processor = MriVolumeEvalProcessor(image_size=SIZE, dtype=dtype)
    volume = processor(ICBM_T1)
    assert volume.dtype == getattr(torch, dtype)
    reference = MriVolumeEvalProcessor(image_size=SIZE)(ICBM_T1)
    assert torch.allclose(volume.float(), reference, atol=1e-2)


def test_numpy_array_and_tensor_inputs(icbm, eval_processor):
    data = np.asarray(icbm.dataobj)  # ICBM is RAS with an axis-aligned affine: arrays are taken as RAS
    from_file = eval_processor(ICBM_T1)
    assert torch.equal(eval_processor(data), from_file)
    assert torch.equal(eval_processor(torch.from_numpy(data)), from_file)
    assert torch.equal(eval_processor(data[None]), from_file)  # channel-first 1 x D x H x W


def test_caller_array_is_not_modified(icbm, eval_processor):
    data = np.asarray(icbm.dataobj).astype(np.float32)
    before = data.copy()
    eval_processor(data)
    np.testing.assert_array_equal(data, before)


# --------------------------------------------------------------------------- orientation and geometry


def test_lps_volume_gives_the_same_output_as_ras(icbm, tmp_path, eval_processor):
    data = np.asarray(icbm.dataobj)
    # Same anatomy stored left-to-right and anterior-to-posterior flipped (LPS voxel order).
    flip_xy = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip_xy[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    lps = nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1, :]), icbm.affine @ flip_xy)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    lps_path = save(lps, tmp_path / "lps.nii.gz")
    assert torch.equal(eval_processor(lps_path), eval_processor(ICBM_T1))


def test_permuted_axes_give_the_same_output(icbm, tmp_path, eval_processor):
    data = np.asarray(icbm.dataobj)
    # Voxel axes stored as (A, S, R): a sagittal-first acquisition order.
    # New voxel (a, s, r) is old voxel (r, a, s): old index = permutation @ new index.
    permutation = np.zeros((4, 4))
    permutation[0, 2] = permutation[1, 0] = permutation[2, 1] = permutation[3, 3] = 1
    asr = nib.Nifti1Image(np.ascontiguousarray(data.transpose(1, 2, 0)), icbm.affine @ permutation)
    assert nib.aff2axcodes(asr.affine) == ("A", "S", "R")
    assert torch.equal(eval_processor(save(asr, tmp_path / "asr.nii")), eval_processor(ICBM_T1))


def test_las_big_endian_nibabel_example_matches_its_canonical_copy(tmp_path, eval_processor):
    original = nib.load(nibabel_anatomical())
    assert nib.aff2axcodes(original.affine) == ("L", "A", "S")
    canonical = nib.as_closest_canonical(original)
    expected = eval_processor(save(canonical, tmp_path / "canonical.nii"))
    assert torch.equal(eval_processor(nibabel_anatomical()), expected)

    volume = ToCanonicalRAS()(load_volume(nibabel_anatomical()))
    np.testing.assert_allclose(volume.affine, canonical.affine)


@pytest.mark.parametrize("new_shape", [(54, 64, 54), (180, 224, 137), (193, 229, 193), (20, 229, 300)])
def test_fast_resize_equals_torch_trilinear(icbm, new_shape):
    data = torch.from_numpy(np.asarray(icbm.dataobj).astype(np.float32) / 255)
    expected = torch.nn.functional.interpolate(data[None, None], size=new_shape, mode="trilinear")[0, 0]
    resized = torch.empty(new_shape)
    resize_trilinear_into(data, new_shape, resized)
    torch.testing.assert_close(resized, expected, atol=1e-5, rtol=0)


def test_non_cubic_volume_is_padded_not_stretched(icbm, tmp_path):
    # A 193 x 229 x 60 slab: longest side (229) -> 64, the others keep the ratio, then zero padding.
    slab = nib.Nifti1Image(np.asarray(icbm.dataobj)[:, :, 70:130], icbm.affine)
    volume = MriVolumeEvalProcessor(image_size=64)(save(slab, tmp_path / "slab.nii.gz"))[0]
    expected_extent = [round(193 * 64 / 229), 64, round(60 * 64 / 229)]  # [54, 64, 17]
    z_start = (64 - expected_extent[2]) // 2
    assert torch.all(volume[:, :, :z_start] == 0) and torch.all(volume[:, :, z_start + expected_extent[2] :] == 0)
    assert torch.all(volume[:5] == 0) and torch.all(volume[5 + 54 :] == 0)
    # The content fills exactly its slab: every content slice has signal.
    assert torch.all(volume[5 : 5 + 54, :, z_start : z_start + 17].amax(dim=(0, 1)) > 0)


def test_brain_mask_keeps_its_proportions(tmp_path):
    # The binary brain mask's bounding box has the same proportions before and after processing.
    mask = np.asarray(nib.load(ICBM_BRAIN_MASK).dataobj) > 0
    out = MriVolumeEvalProcessor(image_size=64)(ICBM_BRAIN_MASK)[0] > 0.5
    before = np.array([np.ptp(np.nonzero(mask)[axis]) + 1 for axis in range(3)], dtype=float)
    after = np.array([np.ptp(np.nonzero(out.numpy())[axis]) + 1 for axis in range(3)], dtype=float)
    np.testing.assert_allclose(after / after.max(), before / before.max(), atol=0.05)


def test_voxel_spacing_resamples_anisotropic_volumes_to_physical_proportions(icbm, tmp_path):
    data = np.asarray(icbm.dataobj)
    # Thick 2 mm slices: half as many voxels along z, same physical brain.
    thick_affine = icbm.affine.copy()
    thick_affine[:3, 2] *= 2
    thick = save(nib.Nifti1Image(np.ascontiguousarray(data[:, :, ::2]), thick_affine), tmp_path / "thick.nii.gz")

    def z_extent(processor) -> int:
        volume = processor(thick)[0]
        return int((volume.amax(dim=(0, 1)) > 0).sum())

    physical = MriVolumeEvalProcessor(image_size=64, voxel_spacing=[1.0, 1.0, 1.0])
    voxel_grid = MriVolumeEvalProcessor(image_size=64)
    assert z_extent(physical) == round(193 * 64 / 229)  # like the 1 mm original
    assert z_extent(voxel_grid) == round(97 * 64 / 229)  # voxel grid kept as is


# --------------------------------------------------------------------------- intensities


def test_constant_volume_gives_zeros_and_a_warning(eval_processor):
    with pytest.warns(ConstantVolumeWarning, match="constant volume"):
        volume = eval_processor(np.full((40, 50, 30), 7.0, dtype=np.float32))
    assert torch.count_nonzero(volume) == 0 and not torch.isnan(volume).any()


def test_sparse_labels_are_not_mistaken_for_constant(eval_processor):
    # Few voxels are hippocampus (CerebrA label 48): both percentiles of a 0/1 map are 0.
    hippocampus = (np.asarray(nib.load(CEREBRA_LABELS).dataobj) == 48).astype(np.uint8)
    assert hippocampus.mean() < 0.005
    volume = eval_processor(hippocampus)
    assert float(volume.max()) > 0.5


def test_nan_and_inf_voxels_are_replaced_and_counted(icbm, eval_processor, caplog):
    data = np.asarray(icbm.dataobj).astype(np.float32)
    data[:20, :20, :20] = np.nan
    data[100, 100, 100] = np.inf
    data[101, 100, 100] = -np.inf
    with caplog.at_level(logging.WARNING, logger="lavis_medblip.processors.volume"):
        volume = eval_processor(data)
    assert torch.isfinite(volume).all() and 0 <= float(volume.min()) and float(volume.max()) <= 1
    assert "8002 NaN/Inf voxels" in caplog.text


def test_npy_in_m3d_format_is_taken_as_already_normalised(icbm, tmp_path, eval_processor):
    # M3D stores 1 x D x H x W float32 in [0, 1]; values are kept, not stretched to [0, 1].
    data = np.asarray(icbm.dataobj).astype(np.float32) / 255.0 * 0.5
    path = tmp_path / "m3d.npy"
    np.save(path, data[None])
    volume = eval_processor(path)
    assert volume.shape == (1, SIZE, SIZE, SIZE)
    assert float(volume.max()) == pytest.approx(float(data.max()), abs=0.02)


# --------------------------------------------------------------------------- formats


def test_mgz_round_trip_matches_nifti(icbm, tmp_path, eval_processor):
    mgz = save(nib.MGHImage(np.asarray(icbm.dataobj), icbm.affine), tmp_path / "t1.mgz")
    assert torch.equal(eval_processor(mgz), eval_processor(ICBM_T1))


def test_nilearn_mni152_template(tmp_path, eval_processor):
    from nilearn.datasets import load_mni152_template

    path = save(load_mni152_template(resolution=2), tmp_path / "mni152_2mm.nii.gz")
    volume = eval_processor(path)
    assert volume.shape == (1, SIZE, SIZE, SIZE) and float(volume.max()) == pytest.approx(1.0)


def new_mr_dataset(sop_class_uid: str, study_uid: str, series_uid: str):
    """An empty MR DICOM dataset with its file meta and identifiers, ready for pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, "MR"
    return ds


def write_dicom_series(image: nib.Nifti1Image, directory: Path) -> None:
    """Write an axis-aligned RAS NIfTI as an axial DICOM series in LPS, files in random order."""
    from pydicom.uid import MRImageStorage, generate_uid

    data = np.asarray(image.dataobj).astype(np.int16)
    spacing = float(image.header.get_zooms()[0])
    origin = image.affine[:3, 3]
    nx, ny, nz = data.shape
    # First pixel = the most right (+x LPS = left) and most anterior voxel of each slice.
    x0 = -(origin[0] + (nx - 1) * spacing)
    y0 = -(origin[1] + (ny - 1) * spacing)
    series_uid, study_uid = generate_uid(), generate_uid()
    directory.mkdir()
    order = list(range(nz))
    random.Random(0).shuffle(order)  # file names and instance numbers do not follow position
    for file_index, k in enumerate(order):
        ds = new_mr_dataset(MRImageStorage, study_uid, series_uid)
        ds.InstanceNumber = file_index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0, y0, float(origin[2] + k * spacing)]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = spacing
        pixels = np.ascontiguousarray(data[::-1, ::-1, k].T)  # rows run posterior, columns run left
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.astype("<i2").tobytes()
        ds.save_as(directory / f"IM{file_index:04d}.dcm", enforce_file_format=True)
    (directory / "README.txt").write_text("not a DICOM file; the reader skips it")


def test_dicom_series_matches_the_same_volume_as_nifti(icbm_small, tmp_path, eval_processor):
    write_dicom_series(icbm_small, tmp_path / "series")
    volume = ToCanonicalRAS()(load_volume(tmp_path / "series"))
    np.testing.assert_array_equal(volume.data, np.asarray(icbm_small.dataobj))
    np.testing.assert_allclose(volume.affine, icbm_small.affine, atol=1e-6)

    nifti = save(icbm_small, tmp_path / "small.nii.gz")
    assert torch.equal(eval_processor(tmp_path / "series"), eval_processor(nifti))


def write_enhanced_dicom(
    image: nib.Nifti1Image, path: Path, axcodes: tuple[str, str, str], rescale: tuple[float, float] = (1.0, 0.0)
) -> None:
    """Write an axis-aligned NIfTI as one Enhanced MR multi-frame file, frames in random order.

    Voxel axes are stored along ``axcodes`` (columns, rows, frames), as a scanner acquiring that
    way would. Frame positions go in PerFrameFunctionalGroupsSequence; spacing, orientation and
    ``rescale`` = (slope, intercept) once in SharedFunctionalGroupsSequence. Stored values are the
    image's, so the real values are ``image * slope + intercept``.
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import EnhancedMRImageStorage, generate_uid

    transform = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(axcodes))
    stored = image.as_reoriented(transform)
    grid = np.asarray(stored.dataobj).astype(np.int16)  # (columns, rows, frames)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ stored.affine
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    order = list(range(grid.shape[2]))
    random.Random(1).shuffle(order)  # frame order does not follow position

    ds = new_mr_dataset(EnhancedMRImageStorage, generate_uid(), generate_uid())

    measures, orientation, transformation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
    measures.SliceThickness = float(spacing[2])
    orientation.ImageOrientationPatient = [*(affine_lps[:3, 0] / spacing[0]), *(affine_lps[:3, 1] / spacing[1])]
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = *rescale, "US"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelValueTransformationSequence = [transformation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in (affine_lps @ [0, 0, k, 1])[:3]]
        group.PlanePositionSequence = [position]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame

    pixels = np.stack([grid[:, :, k].T for k in order])  # frames x rows x columns
    ds.NumberOfFrames, ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    "axcodes", [("L", "P", "S"), ("P", "I", "L"), ("R", "S", "P")], ids=["axial", "sagittal", "coronal"]
)
def test_enhanced_multiframe_dicom_matches_the_same_volume_as_nifti(icbm_small, tmp_path, eval_processor, axcodes):
    # 3 x 3 x 6 mm: a swapped PixelSpacing or slice step would show in the affine.
    image = every_other_axial_slice(icbm_small)
    write_enhanced_dicom(image, tmp_path / "enhanced.dcm", axcodes, rescale=(2.0, -100.0))
    expected = np.asarray(image.dataobj) * 2.0 - 100.0
    for path in (tmp_path / "enhanced.dcm", tmp_path):  # the file, or a directory holding only it
        volume = ToCanonicalRAS()(load_volume(path))
        np.testing.assert_array_equal(volume.data, expected)
        np.testing.assert_allclose(volume.affine, image.affine, atol=1e-6)

    # Percentile scaling removes the linear rescale: the same output as the NIfTI, up to rounding.
    nifti = save(image, tmp_path / "small.nii.gz")
    torch.testing.assert_close(eval_processor(tmp_path / "enhanced.dcm"), eval_processor(nifti), atol=1e-5, rtol=0)


def test_a_per_frame_orientation_overrides_the_shared_one(icbm_small, tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    path = tmp_path / "enhanced.dcm"
    write_enhanced_dicom(icbm_small, path, ("L", "P", "S"))
    ds = pydicom.dcmread(path)
    tilted = Dataset()
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]  # one frame of a three-plane localizer, say
    ds.PerFrameFunctionalGroupsSequence[3].PlaneOrientationSequence = [tilted]
    ds.save_as(path)
    with pytest.raises(VolumeReadError, match="different orientations") as caught:
        load_volume(path)
    assert str(path) in str(caught.value)


def test_a_directory_with_two_series_is_an_error_listing_them(icbm_small, tmp_path):
    import pydicom

    write_dicom_series(icbm_small, tmp_path / "study")
    write_dicom_series(every_other_axial_slice(icbm_small), tmp_path / "other")
    for file in (tmp_path / "other").glob("*.dcm"):
        file.rename(tmp_path / "study" / f"other_{file.name}")
    uids = {str(pydicom.dcmread(file).SeriesInstanceUID) for file in (tmp_path / "study").glob("*.dcm")}
    assert len(uids) == 2

    with pytest.raises(VolumeReadError) as caught:
        load_volume(tmp_path / "study")
    message = str(caught.value)
    assert str(tmp_path / "study") in message and "2 DICOM series" in message
    assert all(uid in message for uid in uids)
    assert "65 images" in message and "33 images" in message


# --------------------------------------------------------------------------- bad input


def bad_inputs(tmp_path: Path, icbm: nib.Nifti1Image) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the error must contain)."""
    cases = {}
    raw = Path(ICBM_T1).read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated gz"] = (tmp_path / "truncated.nii.gz", "could not read")
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    cases["corrupt gz"] = (tmp_path / "garbage.nii.gz", "could not read")
    (tmp_path / "notes.nii").write_text("patient notes, not an image\n" * 30)
    cases["text with .nii suffix"] = (tmp_path / "notes.nii", "could not read")
    (tmp_path / "notes.txt").write_text("hello")
    cases["unknown suffix"] = (tmp_path / "notes.txt", "no reader")
    data = np.asarray(icbm.dataobj)
    cases["2D"] = (save(nib.Nifti1Image(data[:, :, 90], icbm.affine), tmp_path / "slice.nii"), "2D")
    cases["single slice"] = (save(nib.Nifti1Image(data[:, :, 90:91], icbm.affine), tmp_path / "one.nii"), "single slice")
    four_d = np.stack([data[::4, ::4, ::4]] * 3, axis=-1)
    cases["4D"] = (save(nib.Nifti1Image(four_d, icbm.affine), tmp_path / "4d.nii.gz"), "4D")
    np.save(tmp_path / "empty.npy", np.zeros((0, 10, 10), np.float32))
    cases["zero-size"] = (tmp_path / "empty.npy", "empty volume")
    complex_data = data[::4, ::4, ::4].astype(np.complex64)
    cases["complex"] = (save(nib.Nifti1Image(complex_data, icbm.affine), tmp_path / "complex.nii"), "complex")
    np.save(tmp_path / "strings.npy", np.full((16, 16, 16), "a"))
    cases["strings"] = (tmp_path / "strings.npy", "unsupported data type")
    np.save(tmp_path / "all_nan.npy", np.full((16, 16, 16), np.nan, np.float32))
    cases["all NaN"] = (tmp_path / "all_nan.npy", "NaN")
    cases["missing"] = (tmp_path / "does_not_exist.nii.gz", "no such file")
    cases["empty DICOM dir"] = (tmp_path / "empty_dir", "no DICOM")
    (tmp_path / "notes.dcm").write_text("a .dcm suffix, but text")
    cases["not DICOM"] = (tmp_path / "notes.dcm", "not a DICOM file")
    (tmp_path / "empty_dir").mkdir()
    return cases


def test_every_bad_input_raises_volume_read_error_naming_the_file(icbm, tmp_path, eval_processor):
    for name, (path, words) in bad_inputs(tmp_path, icbm).items():
        with pytest.raises(VolumeReadError) as caught:
            eval_processor(path)
        message = str(caught.value)
        assert str(path) in message, name
        assert words.lower() in message.lower(), f"{name}: {message}"


def test_unknown_suffix_error_lists_the_readers_tried(tmp_path, eval_processor):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(VolumeReadError, match="NibabelReader.*NumpyReader.*DicomSeriesReader"):
        eval_processor(tmp_path / "scan.png")


def test_volume_read_error_is_a_value_error_so_datasets_can_catch_either():
    assert issubclass(VolumeReadError, ValueError)


def test_singleton_fourth_dimension_is_squeezed_and_bool_masks_work(icbm, tmp_path, eval_processor):
    data = np.asarray(icbm.dataobj)
    four_d = save(nib.Nifti1Image(data[..., None], icbm.affine), tmp_path / "x_y_z_1.nii.gz")
    assert torch.equal(eval_processor(four_d), eval_processor(ICBM_T1))
    mask = np.asarray(nib.load(ICBM_BRAIN_MASK).dataobj) > 0
    np.save(tmp_path / "mask.npy", mask)
    assert float(eval_processor(tmp_path / "mask.npy").max()) == pytest.approx(1.0)


def test_a_failing_transform_is_named_with_the_file_and_the_cause_chained():
    def broken(volume: Volume) -> Volume:
        raise ZeroDivisionError("boom")

    pipeline = Compose([EnsureVolume3D(), broken])
    volume = Volume(data=np.zeros((16, 16, 16)), affine=np.eye(4), source="/data/sub-01_T1w.nii.gz")
    with pytest.raises(VolumeTransformError, match=r"sub-01_T1w\.nii\.gz.*function.*boom") as caught:
        pipeline(volume)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert isinstance(caught.value, VolumeReadError)


# --------------------------------------------------------------------------- cache


def test_cache_hit_does_not_read_the_file_again(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    processor = MriVolumeEvalProcessor.from_config({"image_size": SIZE, "cache_dir": str(cache_dir)})
    first = processor(ICBM_T1)
    entries = list(cache_dir.rglob("*.npy"))
    assert len(entries) == 1 and (processor.cache.hits, processor.cache.misses) == (0, 1)
    assert np.load(entries[0]).dtype == np.float16

    def must_not_read(item):
        raise AssertionError("a cache hit must not read the volume")

    monkeypatch.setattr(processor, "read", must_not_read)
    second = processor(ICBM_T1)
    assert torch.equal(first, second) and (processor.cache.hits, processor.cache.misses) == (1, 1)
    # Cached output = uncached output up to float16 storage.
    assert torch.allclose(first, MriVolumeEvalProcessor(image_size=SIZE)(ICBM_T1), atol=1e-3)
    assert not list(cache_dir.rglob("*.tmp"))  # atomic writes leave no temp files


def test_cache_rebuilds_when_settings_or_content_change(icbm_small, tmp_path):
    cache_dir = tmp_path / "cache"
    path = save(icbm_small, tmp_path / "t1.nii.gz")
    MriVolumeEvalProcessor(image_size=SIZE, cache_dir=cache_dir)(path)
    other_clip = MriVolumeEvalProcessor(image_size=SIZE, clip_percentiles=[2, 98], cache_dir=cache_dir)
    other_clip(path)
    assert other_clip.cache.misses == 1 and len(list(cache_dir.rglob("*.npy"))) == 2

    # Output dtype and augmentation are applied after the cache: they share the entry.
    half = MriVolumeEvalProcessor(image_size=SIZE, dtype="float16", cache_dir=cache_dir)
    train = MriVolumeTrainProcessor(image_size=SIZE, cache_dir=cache_dir)
    half(path), train(path)
    assert (half.cache.hits, train.cache.hits) == (1, 1)

    # New content at the same path gets a new entry (flip front-back: the template is left-right symmetric).
    flipped = nib.Nifti1Image(np.asarray(icbm_small.dataobj)[:, ::-1].copy(), icbm_small.affine)
    save(flipped, path)
    rewritten = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=cache_dir)
    rewritten(path)
    assert rewritten.cache.misses == 1 and len(list(cache_dir.rglob("*.npy"))) == 3


def test_uint8_cache_and_damaged_entries_are_rebuilt(tmp_path):
    processor = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path, cache_dtype="uint8")
    first = processor(ICBM_T1)
    (entry,) = tmp_path.rglob("*.npy")
    assert np.load(entry).dtype == np.uint8
    entry.write_bytes(b"\x93NUMPY truncated")
    again = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path, cache_dtype="uint8")
    assert torch.equal(again(ICBM_T1), first) and again.cache.misses == 1


def test_float32_cache_is_exact_and_its_output_is_a_copy_on_write_map(tmp_path):
    processor = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path, cache_dtype="float32")
    first = processor(ICBM_T1)
    (entry,) = tmp_path.rglob("*.npy")
    stored_bytes = entry.read_bytes()
    cached = processor(ICBM_T1)
    assert processor.cache.hits == 1
    # No rounding: the cached output is the uncached one, bit for bit.
    assert torch.equal(cached, MriVolumeEvalProcessor(image_size=SIZE)(ICBM_T1)) and torch.equal(cached, first)
    # The output maps the entry, yet writing to it leaves the file (and later reads) untouched.
    cached.mul_(0.5)
    assert entry.read_bytes() == stored_bytes
    assert torch.equal(processor(ICBM_T1), first)


def test_cache_for_dicom_directories(icbm_small, tmp_path):
    write_dicom_series(icbm_small, tmp_path / "series")
    processor = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path / "cache")
    first = processor(tmp_path / "series")
    assert torch.equal(processor(tmp_path / "series"), first) and processor.cache.hits == 1


# --------------------------------------------------------------------------- augmentation


def test_train_augmentation_changes_output_and_eval_is_deterministic():
    eval_processor = MriVolumeEvalProcessor(image_size=SIZE)
    train_processor = registry.get_processor_class("mri_volume_train").from_config(
        {"image_size": SIZE, "augment": {"probability": 1.0}}
    )
    reference = eval_processor(ICBM_T1)
    assert torch.equal(eval_processor(ICBM_T1), reference)

    torch.manual_seed(0)
    first = train_processor(ICBM_T1)
    second = train_processor(ICBM_T1)
    assert first.shape == reference.shape and first.dtype == torch.float32
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    assert not torch.equal(first, reference) and not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(train_processor(ICBM_T1), first)  # reproducible from torch's seed


def test_train_processor_without_augmentation_equals_eval():
    train_processor = MriVolumeTrainProcessor.from_config({"image_size": SIZE, "augment": None})
    assert torch.equal(train_processor(ICBM_T1), MriVolumeEvalProcessor(image_size=SIZE)(ICBM_T1))


def test_elastic_deformation_moves_voxels_by_the_requested_rms_and_is_off_by_default():
    # Three channels holding each voxel's coordinates: one warp of them reads its displacement at every voxel.
    size = 32
    coordinates = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    torch.manual_seed(0)
    warped = RandomElasticDeformation(voxels=1.5, control_points=4, probability=1.0)(coordinates)
    inner = (slice(None), *(slice(4, -4),) * 3)  # away from the zero-filled border
    displacement = (warped - coordinates)[inner]
    assert 1.2 < float(displacement.pow(2).sum(0).mean().sqrt()) < 1.8  # 1.5 voxels RMS
    assert float(displacement.abs().max()) < 8  # smooth: no voxel travels far

    state = torch.get_rng_state()
    off = build_augmentation({"probability": 1.0})[1]  # DEFAULT_AUGMENT: elastic_voxels 0
    assert isinstance(off, RandomElasticDeformation) and off(coordinates) is coordinates
    assert torch.equal(torch.get_rng_state(), state)  # no draw: other augmentations' draws stay as they were


# --------------------------------------------------------------------------- multi-site harmonisation
# field_of_view_mm, bias_field_sigma_mm and intensity_normalization="head_quantiles" make the same
# anatomy look the same whatever the scanner's field of view, voxel size, bias field or contrast.


def harmonising_processor(**overrides) -> MriVolumeEvalProcessor:
    options = {"image_size": SIZE, "field_of_view_mm": 192.0, "bias_field_sigma_mm": 30.0,
               "intensity_normalization": "head_quantiles"}
    return MriVolumeEvalProcessor(**{**options, **overrides})


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_field_of_view_keeps_millimetres_per_voxel_whatever_the_scanner_field_of_view(icbm, tmp_path):
    # Another scanner: 2 mm voxels and a field of view 60 mm wider on every side (zero-filled).
    data = np.pad(np.asarray(icbm.dataobj)[::2, ::2, ::2], 30)
    affine = icbm.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] -= affine[:3, :3] @ [30, 30, 30]
    wide = save(nib.Nifti1Image(data, affine), tmp_path / "wide.nii.gz")

    fixed_mm = harmonising_processor(bias_field_sigma_mm=None, intensity_normalization="percentiles")
    assert correlation(fixed_mm(ICBM_T1), fixed_mm(wide)) > 0.95
    # The paper's pad-to-cube-and-scale maps the two fields of view to different scales.
    pad_and_scale = MriVolumeEvalProcessor(image_size=SIZE)
    assert correlation(pad_and_scale(ICBM_T1), pad_and_scale(wide)) < 0.8


def test_field_of_view_output_is_centred_on_the_head_and_orientation_free(icbm, tmp_path):
    processor = harmonising_processor()
    ras = processor(ICBM_T1)
    lps = save(nib.as_closest_canonical(icbm).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]])), tmp_path / "lps.nii.gz")
    assert torch.allclose(processor(lps), ras, atol=1e-4)
    # The head's centre of mass lands in the middle of the cube.
    centre = [float(i.float().mean()) for i in torch.nonzero(ras[0] > 0, as_tuple=True)]
    np.testing.assert_allclose(centre, [(SIZE - 1) / 2] * 3, atol=1.0)

    with pytest.raises(ValueError, match="not both"):
        MriVolumeEvalProcessor(voxel_spacing=1.0, field_of_view_mm=192.0)
    with pytest.raises(ValueError, match="intensity_normalization"):
        MriVolumeEvalProcessor(intensity_normalization="zscore")


def test_bias_field_correction_removes_a_smooth_coil_inhomogeneity(icbm, tmp_path):
    data = np.asarray(icbm.dataobj).astype(np.float32)
    x = np.linspace(-1.0, 1.0, data.shape[0])[:, None, None]
    z = np.linspace(-1.0, 1.0, data.shape[2])[None, None, :]
    biased = save(nib.Nifti1Image(data * np.exp(0.35 * x + 0.25 * z ** 2), icbm.affine), tmp_path / "biased.nii.gz")

    corrected = harmonising_processor(intensity_normalization="percentiles")
    uncorrected = harmonising_processor(bias_field_sigma_mm=None, intensity_normalization="percentiles")
    clean = corrected(ICBM_T1)
    head = clean > 0.05

    def relative(volume: torch.Tensor) -> torch.Tensor:  # the field also moves the global percentiles
        return volume / volume[head].mean()

    error_before = (relative(uncorrected(biased)) - relative(uncorrected(ICBM_T1)))[head].abs().mean()
    error_after = (relative(corrected(biased)) - relative(clean))[head].abs().mean()
    assert error_after < 0.6 * error_before  # measured: 0.128 -> 0.065 (a +-40 % field)


def test_head_quantiles_remove_scanner_contrast_and_scale(icbm, tmp_path):
    data = np.asarray(icbm.dataobj).astype(np.float32)
    other_scanner = save(nib.Nifti1Image(3000.0 * (data / data.max()) ** 1.4, icbm.affine), tmp_path / "gamma.nii.gz")

    quantiles = harmonising_processor(bias_field_sigma_mm=None)
    percentiles = harmonising_processor(bias_field_sigma_mm=None, intensity_normalization="percentiles")
    reference, changed = quantiles(ICBM_T1), quantiles(other_scanner)
    # Not exactly equal: the contrast change happens before resampling, which averages voxels.
    # Measured: 0.016 with quantiles, 0.061 with percentile scaling.
    assert (changed - reference).abs().mean() < 0.3 * (percentiles(other_scanner) - percentiles(ICBM_T1)).abs().mean()
    # Head voxels hold their quantile: uniform on (0, 1], background stays 0.
    head = reference[reference > 0]
    assert float(head.max()) == 1.0 and abs(float(head.mean()) - 0.5) < 0.01


# --------------------------------------------------------------------------- template registration
# register_to_template aligns every head to the vendored ICBM 2009c template and keeps the brain;
# template_deviation_scale then hands the model what differs from that average brain.


def registering_processor(**overrides) -> MriVolumeEvalProcessor:
    return harmonising_processor(register_to_template=True, **overrides)


def test_registration_undoes_the_shift_that_a_cropped_neck_causes(icbm, tmp_path):
    # A scanner whose field of view stops 40 mm higher: the head's centre of mass moves up, and
    # with it the whole cube, though the brain is the same.
    data = np.asarray(icbm.dataobj).copy()
    data[:, :, :40] = 0
    cropped = save(nib.Nifti1Image(data, icbm.affine), tmp_path / "cropped.nii.gz")

    plain, registered = harmonising_processor(), registering_processor()
    brain = registered(ICBM_T1) > 0
    misaligned = (plain(cropped) - plain(ICBM_T1))[brain].abs().mean()
    aligned = (registered(cropped) - registered(ICBM_T1))[brain].abs().mean()
    # Measured: 0.234 -> 0.121 (a 14 mm shift found; at 6 mm voxels interpolation alone leaves ~0.12).
    assert aligned < 0.6 * misaligned
    # Only the brain is kept, as quantiles within the template's brain mask.
    output = registered(cropped)
    assert float(output.max()) == 1.0 and abs(float(output[output > 0].mean()) - 0.5) < 0.01
    assert brain.float().mean() < 0.4  # the brain, not the head (measured: 0.33 of the cube)


def test_a_registered_volume_does_not_depend_on_the_number_of_threads(icbm, tmp_path):
    # predict's DataLoader workers preprocess with one thread and build their own template, an in-process read
    # uses every thread: the same scan must give the model the same input (float32 sums in the head's centre
    # and the fit once moved the demo's inputs by up to 0.09)
    data = np.asarray(icbm.dataobj).copy()
    data[:, :, :40] = 0
    cropped = save(nib.Nifti1Image(data, icbm.affine), tmp_path / "cropped.nii.gz")
    processor = registering_processor(image_size=48, template_deviation_scale=0.05)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            template_reference.cache_clear()  # as in a fresh worker process
            outputs.append(processor(cropped))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*outputs)


def test_template_deviation_is_zero_for_the_template_and_signed_elsewhere(icbm, tmp_path):
    processor = registering_processor(template_deviation_scale=0.05)
    assert processor(ICBM_T1).abs().mean() < 0.2  # the template is its own reference (up to the fit)

    data = np.asarray(icbm.dataobj).astype(np.float32)
    darker_centre = data.copy()
    darker_centre[80:113, 95:135, 80:110] *= 0.3  # more CSF-dark tissue in the middle of the brain
    deviation = processor(save(nib.Nifti1Image(darker_centre, icbm.affine), tmp_path / "dark.nii.gz"))
    middle = deviation[0, SIZE // 2 - 2:SIZE // 2 + 2, SIZE // 2 - 2:SIZE // 2 + 2, SIZE // 2 - 2:SIZE // 2 + 2]
    assert float(middle.mean()) < -2.0  # darker than the template there, by many 0.05 quantile steps
    assert float(deviation.mean()) == pytest.approx(0.0, abs=0.01)  # quantiles against quantiles

    train = MriVolumeTrainProcessor(image_size=SIZE, field_of_view_mm=192.0, bias_field_sigma_mm=30.0,
                                    intensity_normalization="head_quantiles", register_to_template=True,
                                    template_deviation_scale=0.05, augment=False)
    assert torch.equal(train(ICBM_T1), processor(ICBM_T1))  # the deviation is applied by both


def test_registration_options_are_checked():
    with pytest.raises(ValueError, match="register_to_template needs field_of_view_mm"):
        MriVolumeEvalProcessor(image_size=SIZE, register_to_template=True)
    with pytest.raises(ValueError, match="template_deviation_scale"):
        harmonising_processor(template_deviation_scale=0.05)
    with pytest.raises(ValueError, match="template_deviation_scale"):
        registering_processor(template_deviation_scale=0.0)
    with pytest.raises(TypeError, match="register_to_template must be true or false"):
        harmonising_processor(register_to_template="false")  # a quoted YAML value: truthy, so refused
    cfg = {"image_size": SIZE, "field_of_view_mm": 192, "intensity_normalization": "head_quantiles",
           "register_to_template": True, "template_deviation_scale": 0.05}
    processor = MriVolumeEvalProcessor.from_config(cfg)
    assert processor.register_to_template and processor.template_deviation_scale == 0.05
    assert processor.cache_settings()["register_to_template"] is True
