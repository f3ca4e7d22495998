"""Shared-prefix answer ranking: each prompt runs once for all its candidates: in one pass with them (LMs that take
a 4D attention mask), before them on its key/value cache (other decoder-only LMs), or as T5's encoder output.
The scores equal those of every ``[prompt, answer]`` sequence run on its own."""
from __future__ import annotations

import pytest
import torch

from lavis_medblip.models import MedBLIP
from lavis_medblip.models.config import MedBLIPConfig
from lavis_medblip.models.language_model import LanguageModel

CLASSES = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]
#: Random LMs of each family the adapter handles (tiny: GPT-2 is the packaged config's own).
ARCHITECTURES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "vocab_size": 30522},
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522},
    "biogpt": {"model_type": "biogpt", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "vocab_size": 30522},
    "t5": {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4,
           "vocab_size": 30522, "decoder_start_token_id": 0},
}


def scores_one_sequence_each(model: MedBLIP, samples: dict, candidates: list[str]) -> torch.Tensor:
    """The reference (and the ranking before shared prefixes, which benchmarks/zeroshot.py times): every
    (sample, candidate) pair laid out and run as its own right-padded sequence."""
    repeat = len(candidates)
    prefix = model.visual_prefix(samples["image"])[1].repeat_interleave(repeat, dim=0)
    texts = [text for text in samples["text_input"] for _ in range(repeat)]
    questions = [question for question in model._questions(samples, len(samples["text_input"])) for _ in range(repeat)]
    batch = model.language_model.build_batch(prefix, model._prompt_ids(texts, questions), model.prompt_order,
                                             model._answer_ids(candidates * len(samples["text_input"])))
    total, count = model.language_model.answer_log_likelihood(batch)
    return (total / count).view(-1, repeat)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_shared_prefix_scores_equal_one_sequence_per_candidate(architecture, tiny_config, samples):
    torch.manual_seed(0)
    tiny_config.lm.config_overrides = ARCHITECTURES[architecture]
    if architecture == "biogpt":  # peft has no default LoRA targets for it; medblip_biogpt.yaml names them
        tiny_config.lm.lora.target_modules = ["q_proj", "v_proj"]
    model = MedBLIP.from_config(tiny_config).eval()
    # prompts of different lengths, so the left padding of the shared prompt is exercised
    samples["text_input"] = [samples["text_input"][0], "A subject."]

    ranking = model.predict_answers(samples, CLASSES)

    with torch.no_grad():
        expected = scores_one_sequence_each(model, samples, CLASSES)
    torch.testing.assert_close(ranking.scores, expected, rtol=1e-4, atol=1e-5)


def record_lm_input_shapes(model: MedBLIP) -> list[torch.Size]:
    """The (batch, length) of every call into the LM."""
    shapes = []
    model.language_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(
            (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[:2]),
        with_kwargs=True)
    return shapes


def ignore_4d_attention_masks(model: MedBLIP) -> None:
    """Make the LM behave like one whose attention ignores a custom 4D mask (it falls back to plain causal)."""
    lm = model.language_model.model
    forward = lm.forward

    def forward_without_4d_masks(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            kwargs["attention_mask"] = torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.long)
        return forward(*args, **kwargs)
    lm.forward = forward_without_4d_masks


def test_llama_family_lms_run_prompt_and_answers_in_one_pass(tiny_config, samples):
    tiny_config.lm.config_overrides = ARCHITECTURES["llama"]
    model = MedBLIP.from_config(tiny_config).eval()
    prompt_length = model.language_model.build_batch(
        model.visual_prefix(samples["image"])[1], model._prompt_ids(samples["text_input"], model._questions({}, 2)),
        model.prompt_order, left_pad=True).inputs_embeds.shape[1]
    longest_answer = max(len(ids) for ids in model._answer_ids(CLASSES))
    shapes = record_lm_input_shapes(model)

    model.predict_answers(samples, CLASSES)

    assert model.language_model.packs_answers
    assert shapes[-1] == (2, prompt_length + len(CLASSES) * longest_answer)  # the last call is the ranking's only one


def test_an_lm_that_ignores_4d_masks_scores_answers_on_the_prompts_cache(tiny_config, samples, caplog):
    tiny_config.lm.config_overrides = ARCHITECTURES["llama"]
    model = MedBLIP.from_config(tiny_config).eval()
    ignore_4d_attention_masks(model)
    shapes = record_lm_input_shapes(model)

    ranking = model.predict_answers(samples, CLASSES)

    assert not model.language_model.packs_answers and "ignores a 4D attention mask" in caplog.text
    prompt_shape, answers_shape = shapes[-2:]
    assert prompt_shape[0] == 2  # the two prompts, once each
    assert answers_shape[0] == 2 * len(CLASSES) and answers_shape[1] <= 8  # only the answer tokens, per candidate
    with torch.no_grad():
        expected = scores_one_sequence_each(model, samples, CLASSES)
    torch.testing.assert_close(ranking.scores, expected, rtol=1e-4, atol=1e-5)


def test_lm_num_layers_keeps_the_first_blocks_of_a_pretrained_lm(smollm2_dir):
    config = MedBLIPConfig.from_dict({"lm": {"model": smollm2_dir}}).lm
    config.num_layers = 3

    lm = LanguageModel.from_config(config)

    assert lm.model.config.num_hidden_layers == 3 and len(lm.model.model.layers) == 3
