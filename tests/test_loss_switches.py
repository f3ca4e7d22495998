"""The paper's ablations as model settings: each loss term's weight (Table 6) and the text-only LM (Table 2)."""
from __future__ import annotations

import pytest
import torch

from lavis_medblip.models import MedBLIP

CLASSES = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]


def test_lambda_itc_qa_zero_drops_the_question_answer_term(tiny_config, samples):
    tiny_config.loss.lambda_itc_qa = 0.0
    model = MedBLIP.from_config(tiny_config)
    encoded = []
    encode_text = model.encode_text
    model.encode_text = lambda texts: encoded.append(list(texts)) or encode_text(texts)

    output = model(samples)

    assert output.loss_itc_qa is None  # neither computed nor logged
    assert encoded == [samples["text_input"]]  # only the EHR texts went through the text branch
    torch.testing.assert_close(output.loss, output.loss_itc_text + output.loss_lm)


def test_lambda_itc_text_weights_its_term(tiny_config, samples):
    torch.manual_seed(0)
    tiny_config.loss.lambda_itc_text = 0.25
    output = MedBLIP.from_config(tiny_config)(samples)
    torch.testing.assert_close(output.loss, 0.25 * output.loss_itc_text + output.loss_itc_qa + output.loss_lm)


def test_every_weight_zero_is_a_config_error(tiny_config):
    tiny_config.loss.update(lambda_lm=0.0, lambda_itc_text=0.0, lambda_itc_qa=0.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        MedBLIP.from_config(tiny_config)


@pytest.fixture
def text_only_model(tiny_config):
    tiny_config.prompt_order = ["text", "question"]
    model = MedBLIP.from_config(tiny_config)

    def no_vision(*args, **kwargs):
        raise AssertionError("the text-only LM must not run the vision path")

    model.visual_prefix = no_vision
    return model


def test_text_only_lm_trains_on_the_text_alone(text_only_model, samples):
    output = text_only_model(samples)

    assert output.loss_itc_text is None and output.loss_itc_qa is None
    torch.testing.assert_close(output.loss, output.loss_lm)
    output.loss.backward()
    with_grad = {name for name, p in text_only_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)


def test_text_only_lm_scores_do_not_depend_on_the_image(text_only_model, samples):
    text_only_model.eval()
    ranking = text_only_model.predict_answers(samples, CLASSES)
    other_images = dict(samples, image=torch.zeros_like(samples["image"]))
    torch.testing.assert_close(text_only_model.predict_answers(other_images, CLASSES).scores, ranking.scores)
    assert len(text_only_model.generate(samples, max_new_tokens=2)) == 2


def test_text_only_lm_needs_the_lm_loss(tiny_config):
    tiny_config.prompt_order = ["question", "text"]
    tiny_config.loss.lambda_lm = 0.0
    with pytest.raises(ValueError, match="needs model.loss.lambda_lm > 0"):
        MedBLIP.from_config(tiny_config)


def test_prompt_order_must_name_the_text_and_the_question(tiny_config):
    tiny_config.prompt_order = ["image", "question"]
    with pytest.raises(ValueError, match="model.prompt_order must order"):
        MedBLIP.from_config(tiny_config)
