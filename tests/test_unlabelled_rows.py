"""Pretraining rows without a diagnosis (OASIS-1): ``model.loss.unlabelled_rows``. Under the default
``itc_text_only`` they train ITC(image, EHR text) only; the LM and ITC(image, Q&A) terms get no gradient
from them. ``empty_answer`` keeps the behaviour before the key (every term, an empty answer)."""
from __future__ import annotations

import pytest
import torch

from lavis_medblip.models import MedBLIP
from lavis_medblip.models.config import MedBLIPConfig

TERMS = ("loss_itc_text", "loss_itc_qa", "loss_lm")


@pytest.fixture
def model(tiny_config):
    return MedBLIP.from_config(tiny_config).eval()  # no dropout: the same rows give the same losses


@pytest.fixture
def three(samples):
    """Two labelled subjects and a third without a diagnosis (ITC(image, Q&A) needs two pairs to contrast)."""
    image = torch.cat([samples["image"], torch.rand(1, *samples["image"].shape[1:], generator=torch.Generator().manual_seed(1))])
    return {"image": image, "text_input": samples["text_input"] + ["A 68-year-old female. MMSE 29."],
            "text_output": samples["text_output"] + [""]}


def image_gradients(model, samples):
    """Per term: the gradient of that term w.r.t. each sample's image (B, ...)."""
    image = samples["image"].clone().requires_grad_(True)
    output = model(dict(samples, image=image))
    grads = {}
    for term in TERMS:
        (grad,) = torch.autograd.grad(output[term], image, retain_graph=True)
        grads[term] = grad
    return output, grads


def test_the_default_is_itc_text_only():
    assert MedBLIPConfig().loss.unlabelled_rows == "itc_text_only"


def test_an_unlabelled_row_trains_only_itc_with_its_ehr_text(model, three):
    _, grads = image_gradients(model, three)

    assert grads["loss_lm"][2].abs().sum() == 0  # exactly: no gradient from the unlabelled row
    assert grads["loss_itc_qa"][2].abs().sum() == 0
    assert grads["loss_itc_text"][2].abs().sum() > 0
    for term in TERMS:  # the labelled rows train every term
        assert grads[term][:2].abs().sum() > 0


def test_the_masked_terms_equal_those_of_the_labelled_rows_alone(model, samples, three):
    alone, mixed = model(samples), model(three)
    torch.testing.assert_close(mixed.loss_lm, alone.loss_lm)
    torch.testing.assert_close(mixed.loss_itc_qa, alone.loss_itc_qa)  # the unlabelled row is no negative either


def test_a_batch_of_unlabelled_rows_reports_only_itc_text_and_still_backpropagates(model, samples):
    output = model(dict(samples, text_output=["", ""]))

    assert output.loss_lm is None and output.loss_itc_qa is None  # nothing measured, nothing logged
    assert torch.isfinite(output.loss_itc_text)
    torch.testing.assert_close(output.loss, output.loss_itc_text)  # the masked terms add an exact 0
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_empty_answer_keeps_every_row_in_every_term(tiny_config, three):
    tiny_config.loss.unlabelled_rows = "empty_answer"
    _, grads = image_gradients(MedBLIP.from_config(tiny_config).eval(), three)
    assert all(grads[term][2].abs().sum() > 0 for term in TERMS)


def test_labelled_batches_are_unchanged(tiny_config, samples):
    """With every row answered, both settings compute the same losses (the unmasked path)."""
    outputs = {}
    for policy in ("itc_text_only", "empty_answer"):
        tiny_config.loss.unlabelled_rows = policy
        outputs[policy] = MedBLIP.from_config(tiny_config).eval()(samples)
    for term in ("loss",) + TERMS:
        torch.testing.assert_close(outputs["itc_text_only"][term], outputs["empty_answer"][term])


def test_an_unknown_setting_is_a_config_error(tiny_config):
    tiny_config.loss.unlabelled_rows = "drop"
    with pytest.raises(ValueError, match="unlabelled_rows must be one of"):
        MedBLIP.from_config(tiny_config)


def test_training_logs_average_each_term_over_the_steps_that_report_it(tmp_path, monkeypatch, tiny_config, samples):
    from lavis.common.registry import registry

    from lavis_medblip.tasks.pretrain import MedBLIPPretrainTask

    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    model = MedBLIP.from_config(tiny_config).eval()
    batches = [dict(samples, text_output=["", ""]), dict(samples)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    class Scheduler:
        def step(self, cur_epoch, cur_step):
            pass

    stats = MedBLIPPretrainTask().train_epoch(0, model, batches, optimizer, Scheduler())
    with torch.no_grad():
        expected = model(dict(samples))
    assert stats["num_steps"] == 2
    assert stats["loss_lm"] == pytest.approx(float(expected.loss_lm), abs=1e-3)  # the labelled step's, not half
    assert all(torch.isfinite(torch.tensor(stats[term])) for term in ("loss",) + TERMS)
