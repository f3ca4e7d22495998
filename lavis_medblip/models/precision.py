"""The LM's arithmetic precision (``model.lm.autocast``, values in ``config.LM_AUTOCAST``): its forward passes under
bf16 autocast always, or only where the hardware multiplies bf16 natively; the weights stay in ``model.lm.dtype``."""
from __future__ import annotations

import contextlib

import torch

from lavis_medblip.models.config import LanguageModelConfig


def computes_bfloat16_natively(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a GPU that supports bf16, or a CPU with AVX512-BF16
    or AMX (``torch.cpu``'s probes). Elsewhere bf16 arithmetic is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def autocasts(mode: str | None, device: torch.device) -> bool:
    """Whether ``model.lm.autocast: mode`` runs the LM in bf16 on ``device``."""
    return mode == "bfloat16" or (mode == "bfloat16_if_native" and computes_bfloat16_natively(device))


def lm_autocast(mode: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the LM's forward passes on ``device`` run in for ``model.lm.autocast: mode``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocasts(mode, device) else contextlib.nullcontext()


def describe(lm: LanguageModelConfig, device: torch.device = torch.device("cpu")) -> str:
    """What an LM of the ``model.lm`` section ``lm`` computes in on ``device``, in a line (the demo prints it)."""
    arithmetic = "bf16 autocast" if autocasts(lm.autocast, device) else lm.dtype
    native = "has" if computes_bfloat16_natively(device) else "has no"
    return (f"LM arithmetic: {arithmetic} (model.lm.autocast: {lm.autocast or 'null'}; "
            f"this {device.type} {native} native bf16)")
