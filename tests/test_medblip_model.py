"""The ``medblip`` model: registry, losses, gradients, LoRA, generation, ranking, checkpoints."""
from __future__ import annotations

import logging

import pytest
import torch
from accelerate import init_empty_weights
from lavis.common.registry import registry
from lavis.models import load_model_and_preprocess, model_zoo
from lavis.models.eva_vit import VisionTransformer
from omegaconf import OmegaConf

from lavis_medblip.models import MedBLIP
from lavis_medblip.models.vision_3d import build_vit_3d

PAPER_MODEL_TYPES = ["biomedlm", "biomedlm_lora", "biogpt", "biogpt_lora", "flant5xl", "flant5xl_lora"]
CLASSES = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]


def test_registry_has_medblip_with_the_papers_model_types():
    assert registry.get_model_class("medblip") is MedBLIP
    assert set(PAPER_MODEL_TYPES + ["tiny"]) <= set(MedBLIP.PRETRAINED_MODEL_CONFIG_DICT)
    assert "medblip" in str(model_zoo)
    for model_type in PAPER_MODEL_TYPES:
        assert MedBLIP.default_config_path(model_type).endswith(f"lavis_medblip/models/configs/medblip_{model_type}.yaml")


def test_load_model_and_preprocess_gives_model_and_volume_processors():
    model, vis_processors, txt_processors = load_model_and_preprocess("medblip", "tiny", is_eval=True, device="cpu")
    assert isinstance(model, MedBLIP)
    assert set(vis_processors) == {"train", "eval"} and set(txt_processors) == {"train", "eval"}
    volume = vis_processors["eval"](torch.rand(20, 30, 25).numpy())
    assert volume.shape == (1, 32, 32, 32)
    answers = model.generate({"image": volume[None], "text_input": [txt_processors["eval"]("A 75-year-old female.")]},
                             max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_paper_scale_stem_gives_344_tokens_of_1408():
    with init_empty_weights():  # parameters on the meta device: no 4 GB of ViT-g weights
        vit = build_vit_3d("eva_clip_g", image_size=224, patch_size=32)
    tokens = vit.forward_features(torch.empty(1, 1, 224, 224, 224, device="meta"))
    assert tuple(tokens.shape) == (1, 344, 1408)
    assert vit.patch_embed.proj.weight.shape == (1408, 1, 32, 32, 32)


def test_forward_gives_finite_losses_and_gradients_only_on_trainable_parameters(tiny_config, samples):
    model = MedBLIP.from_config(tiny_config)
    output = model(samples)
    for name in ("loss", "loss_itc_text", "loss_itc_qa", "loss_lm"):
        assert torch.isfinite(output[name]), name
    torch.testing.assert_close(output.loss, output.loss_itc_text + output.loss_itc_qa + output.loss_lm)
    output.loss.backward()

    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert not with_grad & frozen
    assert not any(name.startswith("visual_encoder.blocks.") for name in with_grad)
    assert {"visual_encoder.patch_embed.proj.weight", "visual_encoder.pos_embed", "query_tokens",
            "llm_proj.weight"} <= with_grad
    lm_with_grad = {name for name in with_grad if name.startswith("language_model.")}
    assert lm_with_grad and all("lora_" in name for name in lm_with_grad)


def test_lambda_lm_weights_the_language_loss(tiny_config, samples):
    torch.manual_seed(0)
    tiny_config.lambda_lm = 0.5
    output = MedBLIP.from_config(tiny_config)(samples)
    torch.testing.assert_close(output.loss, output.loss_itc_text + output.loss_itc_qa + 0.5 * output.loss_lm)


def test_lambda_lm_zero_is_an_lm_free_stage_that_trains_the_qformer(tiny_config, samples):
    tiny_config.lambda_lm = 0.0
    model = MedBLIP.from_config(tiny_config)
    model.language_model.model.forward = None  # any LM call would fail: the stage must not run the LM
    output = model(samples)
    assert output.loss_lm is None  # not computed, not logged
    torch.testing.assert_close(output.loss, output.loss_itc_text + output.loss_itc_qa)
    output.loss.backward()
    assert model.query_tokens.grad.abs().sum() > 0 and model.vision_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" in name)


def test_freeze_qformer_bert_trains_only_what_the_qformer_adds_to_bert(tiny_config, samples, tmp_path):
    tiny_config.freeze_qformer_bert = True
    model = MedBLIP.from_config(tiny_config)
    trainable_bert = [name for name, p in model.Qformer.bert.named_parameters() if p.requires_grad]
    assert trainable_bert and all("crossattention" in name or "_query" in name for name in trainable_bert)
    assert not model.Qformer.bert.embeddings.word_embeddings.weight.requires_grad

    model(samples).loss.backward()
    assert model.Qformer.bert.encoder.layer[0].crossattention.self.query.weight.grad.abs().sum() > 0
    assert model.Qformer.bert.encoder.layer[0].attention.self.query.weight.grad is None

    # a checkpoint of this model loads into the same configuration (its frozen BERT is the init's)
    model.save_checkpoint(tmp_path / "frozen_bert.pth")
    MedBLIP.from_config(tiny_config).load_checkpoint(str(tmp_path / "frozen_bert.pth"))


def test_llama_family_lms_score_answers_from_answer_position_logits_only(tiny_config, samples):
    tiny_config.lm.config_overrides = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 30522}
    torch.manual_seed(0)
    model = MedBLIP.from_config(tiny_config).eval()
    assert model.language_model.keeps_chosen_logits  # GPT-2 has no logits_to_keep: it computes them all
    chosen = model.predict_answers(samples, CLASSES).scores
    torch.manual_seed(0)
    every_logit = MedBLIP.from_config(tiny_config).eval()
    every_logit.language_model.keeps_chosen_logits = False
    torch.testing.assert_close(chosen, every_logit.predict_answers(samples, CLASSES).scores)


def test_lora_adds_rank_times_in_plus_out_per_target(tiny_config):
    model = MedBLIP.from_config(tiny_config)  # tiny GPT-2: LoRA r=4 on the fused c_attn (64 → 192), 2 layers
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert lora == 2 * 4 * (64 + 192)
    tiny_config.lm.lora.enabled = False
    frozen_lm = MedBLIP.from_config(tiny_config)
    assert not any(p.requires_grad for p in frozen_lm.language_model.parameters())


def test_prompt_is_visual_prefix_then_ehr_text_then_question(tiny_config, samples):
    model = MedBLIP.from_config(tiny_config)
    lm = model.language_model
    prefix = torch.randn(2, 8, lm.hidden_size)
    prompt_ids = model._prompt_ids(samples["text_input"], [model.question] * 2)
    batch = lm.build_batch(prefix, prompt_ids, ["image", "text", "question"], model._answer_ids(["AD", "NC"]))
    torch.testing.assert_close(batch.inputs_embeds[:, :8], prefix)
    text_0 = prompt_ids["text"][0]
    embedded_text = lm.model.get_input_embeddings()(torch.tensor(text_0))
    torch.testing.assert_close(batch.inputs_embeds[0, 8 : 8 + len(text_0)], embedded_text)
    answer_positions = (batch.labels[0] != -100).nonzero().flatten()
    assert lm.tokenizer.decode(batch.labels[0, answer_positions]) == "ad [SEP]"  # answer + eos, nothing else

    question_first = lm.build_batch(prefix, prompt_ids, ["question", "image", "text"])
    question_length = len(prompt_ids["question"][0])
    torch.testing.assert_close(question_first.inputs_embeds[0, question_length : question_length + 8], prefix[0])


def test_batched_generation_matches_one_by_one(tiny_config, samples):
    model = MedBLIP.from_config(tiny_config).eval()
    batched = model.generate(samples, max_new_tokens=6)
    one_by_one = [model.generate({"image": samples["image"][i : i + 1], "text_input": samples["text_input"][i : i + 1]},
                                 max_new_tokens=6)[0] for i in range(2)]
    assert batched == one_by_one
    assert len(model.generate(samples, num_beams=3, max_new_tokens=4)) == 2


def test_predict_answers_ranks_by_mean_answer_log_likelihood(tiny_config, samples):
    model = MedBLIP.from_config(tiny_config).eval()
    ranking = model.predict_answers(samples, CLASSES)
    assert ranking.scores.shape == (2, 3)
    torch.testing.assert_close(ranking.probs.sum(dim=1), torch.ones(2))
    assert ranking.predictions == [CLASSES[i] for i in ranking.scores.argmax(dim=1)]

    # the score of one candidate is minus the LM loss of training on that answer
    first = {"image": samples["image"][:1], "text_input": samples["text_input"][:1], "text_output": [CLASSES[2]]}
    torch.testing.assert_close(ranking.scores[0, 2], -model(first).loss_lm)

    per_sample = model.predict_answers(samples, [["A", "B"], ["C", "D"]])
    assert per_sample.predictions[0] in {"A", "B"} and per_sample.predictions[1] in {"C", "D"}


def test_checkpoint_holds_trainable_parameters_and_reproduces_outputs(tiny_config, samples, tmp_path):
    torch.manual_seed(0)
    trained = MedBLIP.from_config(tiny_config)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    trained(samples).loss.backward()
    optimizer.step()
    trained.eval()
    path = tmp_path / "medblip_tiny.pth"
    trained.save_checkpoint(path)

    saved = torch.load(path, weights_only=True)
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert set(saved["model"]) == trainable
    assert saved["config"]["model_type"] == "tiny"

    # the config's init_seed: the same random frozen backbones, fresh trainable weights
    restored = MedBLIP.from_config(tiny_config).eval()
    before = restored.predict_answers(samples, CLASSES).scores
    assert not torch.allclose(before, trained.predict_answers(samples, CLASSES).scores)
    restored.load_checkpoint(str(path))
    torch.testing.assert_close(restored.predict_answers(samples, CLASSES).scores,
                               trained.predict_answers(samples, CLASSES).scores)
    assert restored.generate(samples, max_new_tokens=5) == trained.generate(samples, max_new_tokens=5)


def test_a_stage_that_freezes_the_stem_passes_the_earlier_stages_stem_on(tiny_config, samples, tmp_path):
    stage1 = MedBLIP.from_config(tiny_config)
    with torch.no_grad():
        stage1.visual_encoder.patch_embed.proj.weight.add_(1.0)  # "trained" in stage 1
    stage1.save_checkpoint(tmp_path / "stage1.pth")

    tiny_config.freeze_vision_stem = True  # stage 2: the stem is frozen (its features could be cached)
    stage2 = MedBLIP.from_config(tiny_config)
    stage2.load_checkpoint(str(tmp_path / "stage1.pth"))
    stage2.save_checkpoint(tmp_path / "stage2.pth")

    tiny_config.freeze_vision_stem = False  # evaluation builds the model as stage 1 did
    evaluated = MedBLIP.from_config(tiny_config)
    evaluated.load_checkpoint(str(tmp_path / "stage2.pth"))
    torch.testing.assert_close(evaluated.visual_encoder.patch_embed.proj.weight,
                               stage1.visual_encoder.patch_embed.proj.weight)


def test_checkpoint_with_foreign_or_missing_keys_is_an_error(tiny_config, tmp_path):
    model = MedBLIP.from_config(tiny_config)
    state = model.checkpoint_state_dict()
    torch.save({"model": {**state, "not_a_parameter": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="unexpected keys \\['not_a_parameter'\\]"):
        model.load_checkpoint(str(tmp_path / "extra.pth"))
    state.pop("query_tokens")
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="missing trainable keys \\['query_tokens'\\]"):
        model.load_checkpoint(str(tmp_path / "missing.pth"))


def _lavis_vit_checkpoint(tmp_path, **extra):
    """A 2D EVA ViT state dict in LAVIS's key layout, at the tiny config's width and depth."""
    vit_2d = VisionTransformer(img_size=224, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                               qkv_bias=True, use_mean_pooling=False)
    state = {**vit_2d.state_dict(), **extra}
    path = tmp_path / "eva_vit_tiny.pth"
    torch.save(state, path)
    return path, state


def test_vit_weights_load_from_a_local_file_except_the_2d_stem(tiny_config, tmp_path, caplog):
    path, state = _lavis_vit_checkpoint(tmp_path)
    tiny_config.vit_weights = str(path)
    with caplog.at_level(logging.INFO):
        model = MedBLIP.from_config(tiny_config)
    vit = model.visual_encoder
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(vit.cls_token, state["cls_token"])
    assert vit.pos_embed.shape == (1, 4**3 + 1, 64)  # 3D, not the checkpoint's (1, 257, 64)
    stem_logs = [r.message for r in caplog.records if "not loaded on purpose" in r.message]
    assert len(stem_logs) == 1 and "patch_embed.proj.weight" in stem_logs[0] and "'pos_embed'" in stem_logs[0]


def test_vit_checkpoint_with_unknown_keys_is_an_error(tiny_config, tmp_path):
    path, _ = _lavis_vit_checkpoint(tmp_path, **{"blocks.2.norm1.weight": torch.ones(64)})
    tiny_config.vit_weights = str(path)
    with pytest.raises(RuntimeError, match="unexpected keys \\['blocks.2.norm1.weight'\\]"):
        MedBLIP.from_config(tiny_config)


def test_blip2_qformer_checkpoint_loads_and_skips_unused_heads(tiny_config, tmp_path):
    source = MedBLIP.from_config(tiny_config)
    blip2_layout = {k: v for k, v in source.state_dict().items()
                    if k.startswith(("Qformer.", "query_tokens", "vision_proj", "text_proj", "temp", "ln_vision"))}
    blip2_layout["Qformer.cls.predictions.bias"] = torch.zeros(30523)  # BLIP-2's ITG head: unused here
    blip2_layout["itm_head.weight"] = torch.zeros(2, 64)
    torch.save({"model": blip2_layout}, tmp_path / "blip2_pretrained.pth")

    tiny_config.qformer_pretrained = str(tmp_path / "blip2_pretrained.pth")
    model = MedBLIP.from_config(tiny_config)
    torch.testing.assert_close(model.query_tokens, source.query_tokens)
    torch.testing.assert_close(model.Qformer.bert.encoder.layer[1].crossattention.self.key.weight,
                               source.Qformer.bert.encoder.layer[1].crossattention.self.key.weight)

    blip2_layout["query_tokens"] = torch.zeros(1, 32, 64)  # 32 queries into an 8-query model
    torch.save({"model": blip2_layout}, tmp_path / "wrong.pth")
    tiny_config.qformer_pretrained = str(tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match="shape mismatches \\['query_tokens'\\]"):
        MedBLIP.from_config(tiny_config)


@pytest.mark.parametrize("key, value", [
    ("vision.weights", "/nonexistent/eva_vit_g.pth"),
    ("qformer.bert", "/nonexistent/bert"),
    ("lm.tokenizer", "/nonexistent/lm"),
])
def test_a_missing_weight_names_the_yaml_key_to_set(tiny_config, key, value):
    OmegaConf.update(tiny_config, key, value)
    if key == "qformer.bert":
        tiny_config.qformer.load_bert_weights = True
    with pytest.raises((OSError, ValueError), match=f"model.{key}"):
        MedBLIP.from_config(tiny_config)


def test_itc_takes_the_best_query_per_text(tiny_config):
    model = MedBLIP.from_config(tiny_config)
    image_feats = torch.nn.functional.normalize(torch.randn(3, 8, 32), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    best = torch.stack([(image_feats[i] @ text_feat.T).max(dim=0).values for i in range(3)]) / model.temp
    expected = (torch.nn.functional.cross_entropy(best, torch.arange(3), label_smoothing=0.1)
                + torch.nn.functional.cross_entropy(best.T, torch.arange(3), label_smoothing=0.1)) / 2
    torch.testing.assert_close(model.itc_loss(image_feats, text_feat), expected)
