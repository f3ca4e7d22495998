"""Throughput and peak memory of the MRI volume pipeline vs. a naive loader and the peers' loaders, on real volumes.

* ``naive``    nibabel ``get_fdata()`` (float64) -> trilinear ``F.interpolate`` to S^3
               (ignores the aspect ratio, so no padding is needed);
* ``monai``    MONAI's chain for the same output: ``LoadImage`` -> ``Orientation("RAS")`` ->
               ``ScaleIntensityRangePercentiles(0.5, 99.5, clip)`` -> ``Resize(longest, trilinear)`` -> ``SpatialPad``;
* ``torchio``  TorchIO's: ``ScalarImage`` -> ``ToCanonical`` -> ``RescaleIntensity(percentiles 0.5, 99.5)`` ->
               ``Resize`` (aspect kept, linear) -> ``Pad`` (centred);
* ``uncached`` ``mri_volume_eval`` without a cache;
* ``cached``   ``mri_volume_eval`` with a warm cache (filled during the untimed warm-up);
               float16 entries, float32 output (both defaults);
* ``cached8``  the same with ``cache_dtype: uint8`` (half the disk and page cache), float32 output;
* ``cached32`` ``cache_dtype: float32`` (exact, twice the disk), float32 output: the output maps
               the cache entry, no decode pass (its pages are read when consumed);
* ``cached16`` float16 entries and ``dtype: float16`` output: likewise no decode pass.

How it measures (subprocesses, consumed outputs, files, rounds): README, Design notes.

    python benchmarks/data_pipeline.py [--repeats 5] [--rounds 2] [--image-size 224] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

METHODS = ("naive", "monai", "torchio", "uncached", "cached", "cached8", "cached32", "cached16")
REFERENCE = "uncached"  # every other method's outputs are compared with ours (the peers' should match closely)


def benchmark_files() -> list[Path]:
    import nibabel.testing
    import nilearn.datasets

    from lavis_medblip.assets import ICBM_T1

    mni_1mm = Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not mni_1mm.exists():  # other nilearn layouts: save the in-memory template once
        import nibabel as nib

        mni_1mm = Path(tempfile.gettempdir()) / "medblip_bench_mni152_1mm.nii.gz"
        if not mni_1mm.exists():
            nib.save(nilearn.datasets.load_mni152_template(resolution=1), mni_1mm)
    return [Path(ICBM_T1), mni_1mm, Path(nibabel.testing.data_path) / "anatomical.nii"]


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def monai_loader(image_size: int) -> Callable[[Path], "torch.Tensor"]:
    from monai import transforms

    chain = transforms.Compose([
        transforms.LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader"),
        transforms.Orientation(axcodes="RAS"),
        transforms.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        transforms.Resize(spatial_size=image_size, size_mode="longest", mode="trilinear"),
        transforms.SpatialPad(spatial_size=(image_size,) * 3, method="symmetric"),
        transforms.ToTensor(track_meta=False, dtype=np.float32),
    ])
    return lambda path: chain(str(path))


def torchio_loader(image_size: int) -> Callable[[Path], "torch.Tensor"]:
    import torchio

    canonical_and_scaled = torchio.Compose([
        torchio.ToCanonical(), torchio.RescaleIntensity(out_min_max=(0, 1), percentiles=(0.5, 99.5)),
    ])

    def load(path: Path) -> "torch.Tensor":
        image = canonical_and_scaled(torchio.ScalarImage(path))
        shape = np.asarray(image.spatial_shape, dtype=np.float64)
        target = [int(round(n * image_size / shape.max())) for n in shape]  # aspect kept, as ours
        image = torchio.Resize(target, image_interpolation="linear")(image)
        before = [(image_size - n) // 2 for n in target]  # CropOrPad would put the odd voxel first; ours puts it last
        padding = [side for n, ini in zip(target, before) for side in (ini, image_size - n - ini)]
        image = torchio.Pad(padding)(image)
        return image.data.float().clamp_(0.0, 1.0)  # linear resampling stays in [0, 1] up to rounding

    return load


PEER_LOADERS = {"monai": monai_loader, "torchio": torchio_loader}


def output_path(cache_dir: str, method: str, index: int) -> Path:
    return Path(cache_dir) / f"output_{method}_{index}.npy"


def max_abs_difference(cache_dir: str, method: str, files: int) -> float:
    """Largest voxel difference from our output over the benchmark files."""
    return max(float(np.abs(np.load(output_path(cache_dir, method, index))
                            - np.load(output_path(cache_dir, REFERENCE, index))).max()) for index in range(files))


def run_worker(method: str, repeats: int, image_size: int, threads: int, cache_dir: str) -> dict:
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    import lavis_medblip.processors  # noqa: F401  (registers the processors)
    from lavis.common.registry import registry

    torch.set_num_threads(threads)
    files = benchmark_files()

    if method == "naive":

        def load(path: Path) -> torch.Tensor:
            data = torch.from_numpy(nib.load(path).get_fdata())  # float64
            return F.interpolate(data[None, None], size=(image_size,) * 3, mode="trilinear", align_corners=False)[0]

    elif method in PEER_LOADERS:
        load = PEER_LOADERS[method](image_size)
    else:
        cfg = {
            "image_size": image_size,
            "cache_dir": None if method == "uncached" else cache_dir,
            "dtype": "float16" if method == "cached16" else "float32",
            "cache_dtype": {"cached8": "uint8", "cached32": "float32"}.get(method, "float16"),
        }
        load = registry.get_processor_class("mri_volume_eval").from_config(cfg)

    baseline_rss = peak_rss_mb()
    for index, path in enumerate(files):  # warm-up: page cache, lazy imports, and (for "cached*") the cache itself
        volume = load(path)
        np.save(output_path(cache_dir, method, index), volume.float().numpy())  # for the comparison with ours
    # The consumer: every voxel of every output is read (and written once), for every method
    # alike, and the output is dropped before the next load, as a DataLoader drops a collated sample.
    output = f"{tuple(volume.shape)} {volume.dtype}"
    batch_slot = torch.empty_like(volume)
    del volume
    start = time.perf_counter()
    n_volumes = 0
    for _ in range(repeats):
        for path in files:
            batch_slot.copy_(load(path))
            n_volumes += 1
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "volumes": n_volumes,
        "seconds": seconds,
        "volumes_per_s": n_volumes / seconds,
        "ms_per_volume": 1000 * seconds / n_volumes,
        "output": output,
        "baseline_rss_mb": baseline_rss,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per method (DataLoader workers use 1)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.repeats, args.image_size, args.threads, args.cache_dir)))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    rounds: dict[str, list[dict]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory(prefix="medblip_bench_cache_") as cache_dir:
        for _ in range(args.rounds):
            for method in METHODS:
                command = [sys.executable, __file__, "--worker", method, "--repeats", str(args.repeats),
                           "--image-size", str(args.image_size), "--threads", str(args.threads),
                           "--cache-dir", cache_dir]
                completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if completed.returncode != 0:
                    sys.exit(f"{method} worker failed:\n{completed.stderr}")
                rounds[method].append(json.loads(completed.stdout.strip().splitlines()[-1]))
        results = {}
        for method, runs in rounds.items():
            best = max(runs, key=lambda r: r["volumes_per_s"])
            results[method] = {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                               "baseline_rss_mb": min(r["baseline_rss_mb"] for r in runs),
                               "max_abs_diff": max_abs_difference(cache_dir, method, len(benchmark_files()))}

    files = ", ".join(path.name for path in benchmark_files())
    print(f"files: {files}; {args.repeats} repeats each, best of {args.rounds} rounds; "
          f"S={args.image_size}; torch threads={args.threads}")
    print(f"{'method':<10}{'vol/s':>8}{'ms/vol':>9}{'vs naive':>10}{'vs peers':>10}{'peak RSS MB':>13}"
          f"{'(above import)':>16}{'max |diff|':>12}  output")
    naive_rate = results["naive"]["volumes_per_s"]
    best_peer = max(PEER_LOADERS, key=lambda method: results[method]["volumes_per_s"])
    for method in METHODS:
        r = results[method]
        print(
            f"{method:<10}{r['volumes_per_s']:>8.2f}{r['ms_per_volume']:>9.1f}{r['volumes_per_s'] / naive_rate:>9.1f}x"
            f"{r['volumes_per_s'] / results[best_peer]['volumes_per_s']:>9.1f}x"
            f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] - r['baseline_rss_mb']:>16.0f}{r['max_abs_diff']:>12.1e}"
            f"  {r['output']}"
        )
    print(f"vs peers: against the faster peer ({best_peer}); max |diff|: largest voxel difference from ours "
          f"({REFERENCE}) over the files (the naive loader ignores the aspect ratio, so it differs by design)")


if __name__ == "__main__":
    main()
