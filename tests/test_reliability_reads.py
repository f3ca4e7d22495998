"""Reliability of reading volumes (issue 14): bounded reads, tiny and mostly non-finite volumes, and a
preprocessed-volume cache (and feature cache) shared by concurrent processes."""
from __future__ import annotations

import functools
import gzip
import multiprocessing
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from lavis_medblip.assets import ICBM_T1
from lavis_medblip.processors.readers import load_volume
from lavis_medblip.processors.volume_types import (
    ConstantVolumeWarning,
    DegenerateVolumeWarning,
    VolumeLimits,
    VolumeReadError,
)
from lavis_medblip.processors.volume import MriVolumeEvalProcessor

SIZE = 32
DEFAULT_LIMITS = VolumeLimits()


def header_only_nifti(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Path:
    """A valid NIfTI-1 header claiming ``shape`` with no data after it (352 bytes; gzipped for .gz)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4  # 348-byte header + the 4-byte "no extensions" flag
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def header_only_npy(path: Path, shape: tuple[int, ...]) -> Path:
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return path


@functools.lru_cache(maxsize=1)
def icbm_t1() -> np.ndarray:
    return np.asarray(nib.load(ICBM_T1).dataobj)


def small_brain(seed: int = 0, step: int = 4) -> np.ndarray:
    """The ICBM T1 every ``step`` voxels, with a little noise: a real-looking scan in milliseconds."""
    data = icbm_t1()[::step, ::step, ::step].astype(np.float32)
    return data + np.random.default_rng(seed).normal(0, 2, data.shape).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), path)
    return path


def read_failure(item, processor=None) -> tuple[str, float, int]:
    """(error message, seconds, peak traced bytes) of a processor call that must raise VolumeReadError."""
    processor = processor or MriVolumeEvalProcessor(image_size=SIZE)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(VolumeReadError) as caught:
            processor(item)
        return str(caught.value), time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def degenerate_messages(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, DegenerateVolumeWarning)]


# ---- bounded reads ------------------------------------------------------------------------------


def test_header_claiming_1500_cubed_is_rejected_before_allocating(tmp_path):
    scan = header_only_nifti(tmp_path / "huge.nii", (1500, 1500, 1500))
    assert scan.stat().st_size == 352

    message, seconds, peak_bytes = read_failure(scan)

    assert str(scan) in message and "1500 x 1500 x 1500 float32" in message
    assert f"max_voxels={DEFAULT_LIMITS.max_voxels:,}" in message
    assert seconds < 1.0 and peak_bytes < 10 * 2**20  # was 14.1 GB and 29 s


def test_header_claiming_32767_cubed_names_the_limit_not_a_bare_memory_error(tmp_path):
    scan = header_only_nifti(tmp_path / "absurd.nii.gz", (32767, 32767, 32767), np.int16)
    message, seconds, _ = read_failure(scan)
    assert str(scan) in message and "32767 x 32767 x 32767 int16" in message and "max_voxels" in message
    assert seconds < 1.0


def test_header_only_file_within_the_limits_is_rejected_as_truncated(tmp_path):
    scan = header_only_nifti(tmp_path / "header_only.nii", (64, 64, 64))
    message, _, peak_bytes = read_failure(scan)
    assert "64 x 64 x 64 float32" in message and "only 352 bytes" in message and "header-only" in message
    assert peak_bytes < 512 * 2**10  # the 1 MB it claims is never allocated


def test_gzip_claiming_more_than_deflate_can_expand_to_is_rejected(tmp_path):
    # 512^3 uint8 is within the limits, but ~100 gzip bytes expand to at most ~100 kB.
    scan = header_only_nifti(tmp_path / "header_only.nii.gz", (512, 512, 512), np.uint8)
    message, _, peak_bytes = read_failure(scan)
    assert "512 x 512 x 512 uint8" in message and "deflate expands at most 1032:1" in message
    assert peak_bytes < 10 * 2**20


def test_npy_header_is_checked_before_loading(tmp_path):
    huge = header_only_npy(tmp_path / "huge.npy", (1500, 1500, 1500))
    message, seconds, peak_bytes = read_failure(huge)
    assert str(huge) in message and "1500 x 1500 x 1500 float32" in message and "max_voxels" in message
    assert seconds < 1.0 and peak_bytes < 10 * 2**20

    truncated = header_only_npy(tmp_path / "truncated.npy", (64, 64, 64))
    assert "header-only" in read_failure(truncated)[0]


def test_dicom_claiming_too_many_voxels_is_rejected_before_decoding(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(tmp_path / "multiframe.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Rows = dataset.Columns = 1024
    dataset.NumberOfFrames = 1000  # 1024 x 1024 x 1000 claimed; 32 bytes of pixels present
    dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 1, 16, 16, 15
    dataset.PixelRepresentation, dataset.PhotometricInterpretation = 0, "MONOCHROME2"
    dataset.PixelData = b"\0" * 32
    dataset.save_as(tmp_path / "multiframe.dcm", enforce_file_format=True)

    message, _, _ = read_failure(tmp_path / "multiframe.dcm")
    assert "1024 x 1024 x 1000 uint16" in message and "max_voxels" in message


def test_default_limits_admit_real_high_resolution_scans():
    DEFAULT_LIMITS.check_claim("scan", (512, 512, 512), np.int16)
    DEFAULT_LIMITS.check_claim("scan", (256, 256, 256), np.float64)  # a 1 mm head stored as float64
    with pytest.raises(VolumeReadError, match="max_bytes"):
        DEFAULT_LIMITS.check_claim("scan", (1024, 1024, 256), np.complex128)


def test_limits_are_processor_settings():
    strict = MriVolumeEvalProcessor.from_config({"image_size": SIZE, "max_voxels": 1_000_000})
    message, _, _ = read_failure(ICBM_T1, strict)  # 193 x 229 x 193 = 8.5 M voxels
    assert "193 x 229 x 193 uint8" in message and "max_voxels=1,000,000" in message
    tiny_budget = MriVolumeEvalProcessor(image_size=SIZE, limits=VolumeLimits(max_bytes=1000))
    assert "max_bytes=1,000" in read_failure(ICBM_T1, tiny_budget)[0]
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        MriVolumeEvalProcessor.from_config({"max_voxels": 0})
    assert MriVolumeEvalProcessor.from_config({}).limits == DEFAULT_LIMITS


def test_two_by_two_by_two_volume_is_rejected_as_too_small(tmp_path):
    tiny = save_nifti(tmp_path / "tiny.nii.gz", small_brain()[20:22, 20:22, 20:22])
    message, _, _ = read_failure(tiny)
    assert str(tiny) in message and "(2, 2, 2)" in message and "min_axis_size=16" in message
    assert "min_axis_size" in read_failure(np.ones((40, 40, 8), np.float32))[0]  # in-memory arrays too

    lenient = MriVolumeEvalProcessor.from_config({"image_size": SIZE, "min_axis_size": 2})
    assert lenient(tiny).shape == (1, SIZE, SIZE, SIZE)
    assert MriVolumeEvalProcessor(image_size=SIZE)(np.random.default_rng(0).random((16, 16, 16))).shape[1] == SIZE


# ---- mostly non-finite volumes ------------------------------------------------------------------


def mostly_nan_scan(tmp_path: Path, name: str = "mostly_nan.nii.gz") -> tuple[Path, float]:
    data = small_brain()
    data[: data.shape[0] * 3 // 5] = np.nan
    return save_nifti(tmp_path / name, data), float(np.isnan(data).mean())


def test_mostly_nan_volume_warns_degenerate_naming_the_file_and_fraction(tmp_path):
    scan, fraction = mostly_nan_scan(tmp_path)
    processor = MriVolumeEvalProcessor(image_size=SIZE)

    (message,) = degenerate_messages(lambda: processor(scan))
    assert message.startswith(f"{scan}: ") and f"{fraction:.1%} of the voxels" in message

    some_nan = small_brain()
    some_nan[:5] = np.nan  # ~10%: replaced and logged, not degenerate
    assert degenerate_messages(lambda: processor(some_nan)) == []
    sensitive = MriVolumeEvalProcessor.from_config({"image_size": SIZE, "non_finite_warning_fraction": 0.05})
    assert len(degenerate_messages(lambda: sensitive(some_nan))) == 1


def test_cache_hit_emits_the_same_degenerate_warnings_as_the_miss(tmp_path):
    scan, _ = mostly_nan_scan(tmp_path)
    constant = save_nifti(tmp_path / "constant.nii.gz", np.full((20, 20, 20), 7.0, np.float32))
    processor = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path / "cache")

    for path in (scan, constant):
        on_miss = degenerate_messages(lambda: processor(path))
        on_hit = degenerate_messages(lambda: processor(path))
        assert len(on_miss) == 1 and on_hit == on_miss
    assert (processor.cache.hits, processor.cache.misses) == (2, 2)
    with pytest.warns(ConstantVolumeWarning, match="constant volume"):
        processor(constant)

    # An entry is shared by files of the same content; the warning names the file asked for.
    copy = Path(shutil.copy(scan, tmp_path / "copy_of_scan.nii.gz"))
    (message,) = degenerate_messages(lambda: processor(copy))
    assert message.startswith(f"{copy}: ") and processor.cache.hits == 4


@pytest.mark.parametrize("damage", ["warnings file missing (an older or partial copy)", "warnings file garbled",
                                    "empty array file"])
def test_incomplete_or_damaged_cache_entries_are_rebuilt(tmp_path, damage):
    scan, _ = mostly_nan_scan(tmp_path)
    processor = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path / "cache")
    with pytest.warns(DegenerateVolumeWarning):
        first = processor(scan)
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    notes = entry.with_suffix(".json")
    {"warnings file missing (an older or partial copy)": notes.unlink,
     "warnings file garbled": lambda: notes.write_text("{not json"),
     "empty array file": lambda: entry.write_bytes(b"")}[damage]()

    assert len(degenerate_messages(lambda: processor(scan))) == 1  # rebuilt, and warned again
    with pytest.warns(DegenerateVolumeWarning):
        again = processor(scan)
    assert (processor.cache.hits, processor.cache.misses) == (1, 2) and torch.equal(again, first)


def test_a_failed_cache_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch):
    import lavis_medblip.processors.volume_cache as volume_cache

    def disk_full(file, array, allow_pickle):
        file.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_cache.np, "save", disk_full)
    processor = MriVolumeEvalProcessor(image_size=SIZE, cache_dir=tmp_path / "cache")
    scan = save_nifti(tmp_path / "scan.nii.gz", small_brain())
    assert processor(scan).shape == (1, SIZE, SIZE, SIZE)  # served uncached
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.tmp"))

    def interrupted(file, array, allow_pickle):
        raise KeyboardInterrupt
    monkeypatch.setattr(volume_cache.np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        processor(scan)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ---- two processes filling one cache, a third reading -------------------------------------------

VOLUMES = 24
CONCURRENT_SIZE = 48  # entries of 220 kB: writes long enough to overlap


def feature_cache_inputs() -> tuple[torch.nn.Module, torch.Tensor]:
    """A frozen stand-in encoder and a batch of distinct volumes."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 8).requires_grad_(False)
    return encoder, torch.rand(VOLUMES, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))


def fill_caches(volume_cache_dir: Path, feature_cache_dir: Path, scans: list[Path], barrier=None) -> tuple[int, int]:
    """What each process does: warm the volume cache as ``warm_cache`` does, then fill the feature cache.

    Returns how many entries of each cache this process built.
    """
    from lavis_medblip.models.feature_cache import VisionFeatureCache
    from lavis_medblip.cli.warm_cache import warm_cache

    processor = MriVolumeEvalProcessor(image_size=CONCURRENT_SIZE, cache_dir=volume_cache_dir)
    datasets = {"cohort": {"train": SimpleNamespace(vis_processor=processor, records=[(None, scan) for scan in scans])}}
    if barrier is not None:  # each build waits for the other process's: both miss and write every entry at once
        get_or_build = processor.cache.get_or_build
        processor.cache.get_or_build = lambda source, build: get_or_build(source, together(build, barrier))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateVolumeWarning)
        result = warm_cache(datasets, workers=0)
    assert result["failed"] == [], result["failed"]

    encoder, volumes = feature_cache_inputs()
    cache = VisionFeatureCache(feature_cache_dir, encoder)
    encode = lambda batch: encoder(batch.reshape(len(batch), -1, 8))  # noqa: E731
    for volume in volumes:
        cache.tokens(volume[None], encode if barrier is None else together(encode, barrier))
    return processor.cache.misses, cache.misses


def together(build, barrier):
    """``build`` that first waits until the other process is building the same entry."""
    def build_together(*args):
        barrier.wait(timeout=120)
        return build(*args)
    return build_together


def _fill_caches_in_child(volume_cache_dir: Path, feature_cache_dir: Path, scans: list[Path], barrier, builds) -> None:
    torch.set_num_threads(1)
    builds.put(fill_caches(volume_cache_dir, feature_cache_dir, scans, barrier))


def check_visible_entries(cache_dir: Path, seen: set[Path]) -> None:
    """Every entry under its final name loads completely (with its warnings file, for volume entries)."""
    for entry in cache_dir.rglob("*.npy"):
        array = np.load(entry, allow_pickle=False)  # raises on a partial file
        assert array.dtype == np.float16 and np.isfinite(array).all(), entry
        if array.ndim == 4:  # a volume entry (feature entries are 2D)
            assert array.shape == (1, CONCURRENT_SIZE, CONCURRENT_SIZE, CONCURRENT_SIZE)
            json_text = entry.with_suffix(".json").read_text()  # written before the .npy
            assert json_text.startswith('{"degenerate_warnings": ['), entry
        seen.add(entry)


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def concurrently_filled(tmp_path_factory) -> SimpleNamespace:
    """Two spawned processes fill the same caches at once while this one reads every entry it sees."""
    root = tmp_path_factory.mktemp("concurrent")
    (root / "scans").mkdir()
    scans = [save_nifti(root / "scans" / f"sub-{index:02d}.nii.gz", small_brain(index, step=3))
             for index in range(VOLUMES - 1)]
    scans.append(mostly_nan_scan(root / "scans", "sub-nan.nii.gz")[0])
    shared = SimpleNamespace(volumes=root / "volumes", features=root / "features", seen=set(), failures=[])

    context = multiprocessing.get_context("spawn")
    barrier, builds = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_fill_caches_in_child,
                               args=(shared.volumes, shared.features, scans, barrier, builds)) for _ in range(2)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        for cache_dir in (shared.volumes, shared.features):
            try:
                check_visible_entries(cache_dir, shared.seen)
            except Exception as error:  # noqa: BLE001  (recorded, asserted by the tests)
                shared.failures.append(f"{type(error).__name__}: {error}")
        time.sleep(0.005)
    for worker in workers:
        worker.join(60)
    shared.exit_codes = [worker.exitcode for worker in workers]
    shared.builds = [builds.get(timeout=10) for worker in workers if worker.exitcode == 0]

    # The reference: one process filling fresh caches alone.
    shared.single_volumes, shared.single_features = root / "single_volumes", root / "single_features"
    fill_caches(shared.single_volumes, shared.single_features, scans)
    return shared


def test_two_processes_warming_one_volume_cache_leave_only_complete_entries(concurrently_filled):
    filled = concurrently_filled
    assert filled.exit_codes == [0, 0] and filled.failures == []
    concurrent, single = tree(filled.volumes), tree(filled.single_volumes)
    assert len(single) == 2 * VOLUMES  # a .npy and a .json per scan
    assert [volume_builds for volume_builds, _ in filled.builds] == [VOLUMES, VOLUMES]  # both wrote every entry
    assert concurrent == single  # same names (no temporary files left) and the same bytes
    assert any('"NonFiniteVolumeWarning"' in text.decode() for name, text in single.items() if name.endswith(".json"))
    assert any(entry.parent.parent == filled.volumes for entry in filled.seen)  # the reader did read while writing


def test_two_processes_filling_one_feature_cache_leave_only_complete_entries(concurrently_filled):
    filled = concurrently_filled
    assert filled.exit_codes == [0, 0] and filled.failures == []
    concurrent, single = tree(filled.features), tree(filled.single_features)
    assert [feature_builds for _, feature_builds in filled.builds] == [VOLUMES, VOLUMES]
    assert len(single) == VOLUMES and concurrent == single
