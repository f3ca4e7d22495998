"""Our eval volume processor gives what a MONAI or TorchIO user would build for the same steps
(RAS, percentile clip to [0, 1], resize with the aspect kept, centred zero pad), on real scans:
the chains ``benchmarks/data_pipeline.py`` times against ours."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from data_pipeline import PEER_LOADERS, benchmark_files  # noqa: E402

from lavis_medblip.processors.volume import MriVolumeEvalProcessor  # noqa: E402

SIZE = 48


@pytest.mark.parametrize("peer", sorted(PEER_LOADERS))
def test_the_peer_chain_gives_our_output_on_real_scans(peer):
    ours, theirs = MriVolumeEvalProcessor(image_size=SIZE), PEER_LOADERS[peer](SIZE)
    for scan in benchmark_files():  # the ICBM 2009c T1, nilearn's MNI152 and nibabel's anatomical.nii
        expected, got = ours(str(scan)), theirs(scan)
        assert got.shape == expected.shape == (1, SIZE, SIZE, SIZE), scan.name
        assert torch.allclose(got.float(), expected, atol=1e-4), (scan.name, float((got - expected).abs().max()))
