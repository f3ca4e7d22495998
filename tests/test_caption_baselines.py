"""Seed 003's zero-shot captioning baselines (Banerjee & Limbu 2025), each built from a tiny random config
(nothing downloaded) and run through one evaluation step of ``medblip_captioning``: LAVIS's own ``blip2_opt``
(its weight and tokenizer loading patched to tiny random parts), ``instructblip_t5_caption`` and
``vit_gpt2_caption`` (transformers' models registered as LAVIS models)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from lavis.common.registry import registry
from lavis.models.blip2_models import blip2_opt
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm
from lavis.models.eva_vit import VisionTransformer

from lavis_medblip.assets import BERT_UNCASED_VOCAB_DIR
from lavis_medblip.caption.task import MedBLIPCaptioningTask
from lavis_medblip.models.config import QFormerConfig
from lavis_medblip.models.qformer import build_qformer

PROJECTS = Path(__file__).resolve().parent.parent / "projects" / "medblip"
CAPTIONS = ["axial t1 weighted mri of the brain", "coronal ct of the chest"]


@pytest.fixture
def samples():
    return {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), "caption": CAPTIONS,
            "text_input": CAPTIONS, "instance_id": ["a", "b"]}


def evaluate_one_step(model, samples, tmp_path, monkeypatch) -> dict:
    """``valid_step`` then ``after_evaluation`` of the captioning task, as the runner calls them."""
    for name in ("output_dir", "result_dir"):
        monkeypatch.setitem(registry.mapping["paths"], name, str(tmp_path))
    task = MedBLIPCaptioningTask(num_beams=1, max_len=8, min_len=2, compute_meteor=False)
    rows = task.valid_step(model.eval(), samples)
    assert [row["instance_id"] for row in rows] == ["a", "b"] and all(isinstance(row["caption"], str) for row in rows)
    metrics = task.after_evaluation(rows, "test", "best")
    assert metrics["num_samples"] == 2 and {"bleu_4", "rouge_l", "cider", "agg_metrics"} <= set(metrics)
    assert json.loads((tmp_path / "test_epochbest_metrics.json").read_text())["num_samples"] == 2
    return metrics


# ---- LAVIS's own BLIP-2 OPT, with tiny random parts in place of its downloads --------------------------
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (as OPT's: "\\n" is a token) trained here, so nothing is downloaded."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS * 4 + ["a photo of\n"], vocab_size=300, min_frequency=1,
                            special_tokens=["<pad>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def tiny_blip2_parts(monkeypatch):
    from transformers import BertTokenizer

    def init_tokenizer(cls, truncation_side="right"):
        tokenizer = BertTokenizer.from_pretrained(str(BERT_UNCASED_VOCAB_DIR), truncation_side=truncation_side)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        encoder = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                    mlp_ratio=2.0, qkv_bias=True, use_mean_pooling=False)
        return encoder, LayerNorm(encoder.num_features)

    def init_qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
        config = QFormerConfig(bert=str(BERT_UNCASED_VOCAB_DIR), load_bert_weights=False, num_queries=num_query_token,
                               cross_attention_freq=1, config_overrides={"hidden_size": 32, "num_hidden_layers": 2,
                                                                         "num_attention_heads": 2, "intermediate_size": 64})
        qformer, query_tokens, _ = build_qformer(config, vision_width)
        return qformer, query_tokens

    tokenizer = byte_level_tokenizer()
    opt_config = blip2_opt.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    monkeypatch.setattr(Blip2Base, "init_tokenizer", classmethod(init_tokenizer))
    monkeypatch.setattr(Blip2Base, "init_vision_encoder", classmethod(init_vision_encoder))
    monkeypatch.setattr(Blip2Base, "init_Qformer", classmethod(init_qformer))
    monkeypatch.setattr(blip2_opt.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)
    monkeypatch.setattr(blip2_opt.OPTForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: cls(opt_config)))


def test_blip2_opt_captions_through_the_task(tiny_blip2_parts, samples, tmp_path, monkeypatch):
    project = OmegaConf.load(PROJECTS / "eval_caption_roco_blip2_opt.yaml")
    model_cls = registry.get_model_class(project.model.arch)
    assert model_cls is blip2_opt.Blip2OPT  # LAVIS's own class
    config = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(project.model.model_type)).model,
                             project.model, {"image_size": 64, "num_query_token": 4})
    loaded = []  # the weights LAVIS would load: recorded, not downloaded
    monkeypatch.setattr(model_cls, "load_checkpoint_from_config", lambda self, cfg: loaded.append(cfg.get("finetuned")))
    model = model_cls.from_config(config)
    assert loaded == [config.finetuned] and loaded[0].endswith("blip2_caption_opt2.7b.pth")  # LAVIS's COCO captioner
    evaluate_one_step(model, samples, tmp_path, monkeypatch)


# ---- InstructBLIP and ViT-GPT2 through transformers -----------------------------------------------------
@pytest.mark.parametrize("arch", ["instructblip_t5_caption", "vit_gpt2_caption"])
def test_tiny_baseline_captions_through_the_task(arch, samples, tmp_path, monkeypatch):
    model_cls = registry.get_model_class(arch)
    model = model_cls.from_config(OmegaConf.load(model_cls.default_config_path("tiny")).model)
    evaluate_one_step(model, samples, tmp_path, monkeypatch)
    with pytest.raises(NotImplementedError, match="zero-shot baseline"):
        model(samples)


@pytest.mark.parametrize("arch", ["instructblip_t5_caption", "vit_gpt2_caption"])
def test_pretrained_folders_load_and_caption_as_the_model_they_were_saved_from(arch, samples, tmp_path):
    """The ``pretrained`` path (a hub name or a folder) on a folder written by ``save_pretrained``."""
    model_cls = registry.get_model_class(arch)
    tiny = OmegaConf.load(model_cls.default_config_path("tiny")).model
    model = model_cls.from_config(tiny)
    model.model.save_pretrained(tmp_path / "weights")
    model.tokenizer.save_pretrained(tmp_path / "weights")
    reloaded = model_cls.from_config(OmegaConf.merge(tiny, {"hf_config": None, "pretrained": str(tmp_path / "weights"),
                                                            "tokenizer": None}))
    kwargs = dict(num_beams=1, max_length=6, min_length=2)
    assert reloaded.generate(samples, **kwargs) == model.generate(samples, **kwargs)


@pytest.mark.parametrize("name, arch", [("eval_caption_roco_blip2_opt.yaml", "blip2_opt"),
                                        ("eval_caption_roco_instructblip.yaml", "instructblip_t5_caption"),
                                        ("eval_caption_roco_vit_gpt2.yaml", "vit_gpt2_caption")])
def test_baseline_project_files_evaluate_zero_shot_with_the_captioning_task(name, arch):
    project = OmegaConf.load(PROJECTS / name)
    assert project.model.arch == arch and registry.get_model_class(arch) is not None
    assert project.run.task == "medblip_captioning" and project.run.evaluate is True
    assert project.model.model_type in registry.get_model_class(arch).PRETRAINED_MODEL_CONFIG_DICT
    processor = project.datasets.roco.vis_processor.eval
    model_defaults = OmegaConf.load(registry.get_model_class(arch).default_config_path(project.model.model_type))
    assert processor.image_size == model_defaults.preprocess.vis_processor.eval.image_size
