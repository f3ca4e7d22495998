"""Shared-prefix answer ranking: each prompt runs once and its candidates reuse its key/value cache
(T5: its encoder output). The scores equal those of every ``[prompt, answer]`` sequence run on its own."""
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
    "t5": {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4,
           "vocab_size": 30522, "decoder_start_token_id": 0},
}


def scores_one_sequence_each(model: MedBLIP, samples: dict, candidates: list[str]) -> torch.Tensor:
    """The reference: every (sample, candidate) pair laid out and run as its own right-padded sequence."""
    repeat = len(candidates)
    prefix = model.visual_prefix(samples["image"])[1].repeat_interleave(repeat, dim=0)
    texts = [text for text in samples["text_input"] for _ in range(repeat)]
    questions = model._questions({}, len(texts))
    batch = model.language_model.build_batch(prefix, model._prompt_ids(texts, questions), model.prompt_order,
                                             model._answer_ids(candidates * len(samples["text_input"])))
    total, count = model.language_model.answer_log_likelihood(batch)
    return (total / count).view(-1, repeat)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_shared_prefix_scores_equal_one_sequence_per_candidate(architecture, tiny_config, samples):
    torch.manual_seed(0)
    tiny_config.lm.config_overrides = ARCHITECTURES[architecture]
    model = MedBLIP.from_config(tiny_config).eval()
    # prompts of different lengths, so the left padding of the shared prompt is exercised
    samples["text_input"] = [samples["text_input"][0], "A subject."]

    ranking = model.predict_answers(samples, CLASSES)

    with torch.no_grad():
        expected = scores_one_sequence_each(model, samples, CLASSES)
    torch.testing.assert_close(ranking.scores, expected, rtol=1e-4, atol=1e-5)


def test_the_prompt_runs_once_per_sample_not_once_per_candidate(tiny_config, samples):
    model = MedBLIP.from_config(tiny_config).eval()
    batch_sizes = []
    model.language_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(
            (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape),
        with_kwargs=True)

    model.predict_answers(samples, CLASSES)

    prompt_shape, answers_shape = batch_sizes
    assert prompt_shape[0] == 2  # the two prompts, once each
    assert answers_shape[0] == 2 * len(CLASSES) and answers_shape[1] <= 8  # only the answer tokens, per candidate


def test_lm_num_layers_keeps_the_first_blocks_of_a_pretrained_lm(smollm2_dir):
    config = MedBLIPConfig.from_dict({"lm": {"model": smollm2_dir}}).lm
    config.num_layers = 3

    lm = LanguageModel.from_config(config)

    assert lm.model.config.num_hidden_layers == 3 and len(lm.model.model.layers) == 3
