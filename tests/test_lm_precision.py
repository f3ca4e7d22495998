"""``model.lm.autocast`` runs the LM's forward passes in bf16 (the weights stay in ``model.lm.dtype``), always or
where the hardware multiplies bf16 natively; ``model.lm.attn_implementation`` picks transformers' attention kernel.
The demo sets both (``bfloat16_if_native``, ``eager``): its LM steps are most of its time on a CPU."""
from __future__ import annotations

import pytest
import torch

from lavis_medblip.models import MedBLIP, precision
from lavis_medblip.models.config import LanguageModelConfig

CLASSES = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522}


def build(tiny_config, **lm_settings) -> MedBLIP:
    """The tiny MedBLIP with a Llama-family LM, the same weights on every call."""
    tiny_config.lm.config_overrides = LLAMA
    for key, value in lm_settings.items():
        tiny_config.lm[key] = value
    torch.manual_seed(0)
    return MedBLIP.from_config(tiny_config)


def lm_output_dtypes(model: MedBLIP) -> set[torch.dtype]:
    """The dtypes the LM's first query projection returns, call after call."""
    dtypes = set()
    projection = model.language_model.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    projection.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    return dtypes


def test_bfloat16_autocast_scores_as_fp32_does_within_bf16_rounding(tiny_config, samples):
    fp32, bf16 = build(tiny_config).eval(), build(tiny_config, autocast="bfloat16").eval()
    dtypes = lm_output_dtypes(bf16)

    ranking = bf16.predict_answers(samples, CLASSES)

    assert dtypes == {torch.bfloat16}
    assert all(parameter.dtype == torch.float32 for parameter in bf16.parameters())  # only the arithmetic is bf16
    reference = fp32.predict_answers(samples, CLASSES)
    torch.testing.assert_close(ranking.scores, reference.scores, rtol=0.0, atol=0.05)
    assert not torch.equal(ranking.scores, reference.scores)


def test_a_bfloat16_training_step_gives_fp32_gradients_to_lora_and_the_visual_prefix(tiny_config, samples):
    model = build(tiny_config, autocast="bfloat16").train()

    model(samples).loss.backward()

    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    projection = model.llm_proj.weight  # the visual prefix's gradient comes back through the LM
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert projection.grad is not None and bool(torch.isfinite(projection.grad).all()) and projection.grad.abs().sum() > 0


@pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "emulated_bf16"])
def test_bfloat16_if_native_autocasts_only_where_the_hardware_has_bf16(tiny_config, samples, monkeypatch, native):
    monkeypatch.setattr(precision, "computes_bfloat16_natively", lambda device: native)
    model = build(tiny_config, autocast="bfloat16_if_native").eval()
    dtypes = lm_output_dtypes(model)

    model.predict_answers(samples, CLASSES)

    assert dtypes == ({torch.bfloat16} if native else {torch.float32})


def test_eager_attention_scores_as_the_default_kernel_does(tiny_config, samples):
    default, eager = build(tiny_config).eval(), build(tiny_config, attn_implementation="eager").eval()

    ranking = eager.predict_answers(samples, CLASSES)

    assert eager.language_model.model.config._attn_implementation == "eager"
    assert eager.language_model.packs_answers  # eager attention honours the ranking's 4D mask
    torch.testing.assert_close(ranking.scores, default.predict_answers(samples, CLASSES).scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native, expected", [
    (True, "LM arithmetic: bf16 autocast (model.lm.autocast: bfloat16_if_native; this cpu has native bf16)"),
    (False, "LM arithmetic: float32 (model.lm.autocast: bfloat16_if_native; this cpu has no native bf16)"),
], ids=["native_bf16", "emulated_bf16"])
def test_the_demo_names_the_lm_arithmetic_it_ran(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "computes_bfloat16_natively", lambda device: native)

    assert precision.describe(LanguageModelConfig(autocast="bfloat16_if_native")) == expected
