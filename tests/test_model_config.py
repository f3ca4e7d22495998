"""The typed model config: sections, defaults, validation, the flat-key translation and the composed YAMLs."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from lavis.common.config import Config
from lavis.models import load_model
from omegaconf import OmegaConf

from lavis_medblip.models import MedBLIP
from lavis_medblip.models.config import (
    BASE_CONFIG_FILE,
    MODEL_TYPES,
    MedBLIPConfig,
    load_model_config,
    model_type_file,
    nest_flat_keys,
)
from lavis_medblip.models.language_model import LanguageModel
from lavis_medblip.models.qformer import build_qformer
from lavis_medblip.models.vision_3d import build_vision_encoder

REPO = Path(__file__).resolve().parents[1]
PROJECTS = REPO / "projects" / "medblip"
#: The flat model sections of the packaged model types and the project files before the sections existed.
FLAT = OmegaConf.load(Path(__file__).with_name("flat_model_configs.yaml"))


def typed(model_type: str) -> MedBLIPConfig:
    return MedBLIPConfig.from_dict(load_model_config(model_type).model)


def sections(config_class: type = MedBLIPConfig) -> list[type]:
    nested = [f.default_factory for f in dataclasses.fields(config_class)
              if dataclasses.is_dataclass(f.default_factory)]
    return [config_class] + [section for cls in nested for section in sections(cls)]


def test_every_setting_is_documented_with_a_default():
    assert [cls.__name__ for cls in sections()] == [
        "MedBLIPConfig", "VisionConfig", "QFormerConfig", "LanguageModelConfig", "LoRAConfig", "LossConfig"]
    for cls in sections():
        for setting in dataclasses.fields(cls):
            assert setting.metadata.get("help"), f"{cls.__name__}.{setting.name}"
            assert setting.default is not dataclasses.MISSING or setting.default_factory is not dataclasses.MISSING


def test_the_defaults_are_the_papers_model():
    config = MedBLIPConfig()
    assert (config.image_size, config.vision.model, config.vision.patch_size) == (224, "eva_clip_g", 32)
    assert (config.qformer.num_queries, config.qformer.bert, config.loss.lambda_lm) == (32, "bert-base-uncased", 1.0)
    assert config.prompt_order == ["image", "text", "question"]


def test_each_part_is_built_from_its_own_section():
    config = typed("tiny")
    vision_encoder = build_vision_encoder(config.vision, config.image_size)
    assert vision_encoder.patch_embed.grid_size == 32 // 8
    qformer, query_tokens, tokenizer = build_qformer(config.qformer, vision_encoder.num_features)
    assert tuple(query_tokens.shape) == (1, 8, 64) and tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    language_model = LanguageModel.from_config(config.lm)
    assert language_model.hidden_size == 64 and any("lora_" in name for name, _ in language_model.named_parameters())


# ---- configs with flat keys -------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_flat_packaged_yamls_give_the_same_config_as_the_composed_ones(model_type, caplog):
    with caplog.at_level(logging.WARNING):
        from_flat = MedBLIPConfig.from_dict(FLAT.packaged[model_type])
    assert from_flat == typed(model_type)
    assert "model.lm_model → model.lm.model" in caplog.text
    assert "model.num_query_token → model.qformer.num_queries" in caplog.text


@pytest.mark.parametrize("project", sorted(FLAT.projects))
def test_project_files_build_the_model_config_they_built_before(project, caplog):
    with caplog.at_level(logging.WARNING):  # LAVIS's own merge of the packaged config and the project's
        now = MedBLIPConfig.from_dict(Config.build_model_config(OmegaConf.load(PROJECTS / f"{project}.yaml")).model)
    assert "deprecated" not in caplog.text  # today's files are nested
    flat_section = FLAT.projects[project]
    assert now == MedBLIPConfig.from_dict(OmegaConf.merge(FLAT.packaged[flat_section.model_type], flat_section))


def test_every_medblip_project_file_is_checked_against_its_flat_form():
    medblip_projects = {path.stem for path in PROJECTS.glob("*.yaml") if OmegaConf.load(path).model.arch == "medblip"}
    assert medblip_projects == set(FLAT.projects)


def lavis_config(project: str, *options: str) -> Config:
    return Config(argparse.Namespace(cfg_path=str(PROJECTS / f"{project}.yaml"), options=list(options)))


def test_flat_command_line_options_reach_their_sections(caplog):
    with caplog.at_level(logging.WARNING):
        config = MedBLIPConfig.from_dict(lavis_config(
            "pretrain_biomedlm", "model.lm_model=/models/BioMedLM", "model.lora.r=4", "model.lambda_lm=0").model_cfg)
    assert config.lm.model == "/models/BioMedLM" and config.loss.lambda_lm == 0
    assert config.lm.lora.r == 4 and config.lm.lora.enabled  # merged into biomedlm_lora's LoRA, not replacing it
    assert "model.lora → model.lm.lora" in caplog.text and "model.lambda_lm → model.loss.lambda_lm" in caplog.text

    nested = lavis_config("pretrain_biomedlm", "model.lm.model=/models/BioMedLM", "model.lm.lora.r=4").model_cfg
    assert MedBLIPConfig.from_dict(nested).lm == config.lm


def test_a_flat_key_wins_over_the_nested_one_and_a_mapping_merges_into_it():
    nested = nest_flat_keys({"loss": {"lambda_lm": 1.0}, "lambda_lm": 0.0,
                             "lm": {"lora": {"enabled": True, "r": 8}}, "lora": {"r": 4}})
    assert nested == {"loss": {"lambda_lm": 0.0}, "lm": {"lora": {"enabled": True, "r": 4}}}


def test_a_checkpoint_saved_with_a_flat_config_still_loads(tiny_config, samples, tmp_path):
    model = MedBLIP.from_config(tiny_config).eval()
    old_checkpoint = {"model": model.checkpoint_state_dict(), "config": OmegaConf.to_container(FLAT.packaged.tiny)}
    torch.save(old_checkpoint, tmp_path / "before_sections.pth")
    restored = MedBLIP.from_config(tiny_config)
    restored.load_checkpoint(str(tmp_path / "before_sections.pth"))
    torch.testing.assert_close(restored.eval().predict_answers(samples, ["AD", "NC"]).scores,
                               model.predict_answers(samples, ["AD", "NC"]).scores)
    assert MedBLIPConfig.from_dict(old_checkpoint["config"]) == model.config


def test_a_checkpoint_records_the_nested_config(tiny_config, tmp_path):
    model = MedBLIP.from_config(tiny_config)
    model.save_checkpoint(tmp_path / "model.pth")
    saved = torch.load(tmp_path / "model.pth", weights_only=True)["config"]
    assert saved["lm"]["lora"]["r"] == 4 and "lora" not in saved
    assert MedBLIPConfig.from_dict(saved) == model.config


# ---- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"vision": {"arch": {"num_heads": 5}}},
     "model.vision.arch: embed_dim must be divisible by num_heads (got 64 and 5)"),
    ({"vision": {"patch_size": 64}}, "model.vision.patch_size must not exceed model.image_size (got 64 and 32)"),
    ({"vision": {"model": "vit_l"}}, "model.vision.model 'vit_l' has no 3D stem. Available: ['eva_clip_g']"),
    ({"vision": {"precision": "fp16"}, "freeze_vit": False},
     "model.freeze_vit: false needs model.vision.precision: fp32 (got 'fp16')"),
    ({"qformer": {"num_queries": 0}}, "model.qformer.num_queries must be positive (got 0)"),
    ({"qformer": {"config_overrides": {"num_attention_heads": 5}}},
     "model.qformer.config_overrides: hidden_size must be divisible by num_attention_heads (got 64 and 5)"),
    ({"lm": {"lora": {"dropout": 1.0}}}, "model.lm.lora.dropout must be in [0, 1) (got 1.0)"),
    ({"lm": {"dtype": "int8"}}, "model.lm.dtype must be one of ['float32', 'float16', 'bfloat16'] (got 'int8')"),
    ({"lm": {"autocast": "float16"}},
     "model.lm.autocast must be null or one of ['bfloat16', 'bfloat16_if_native'] (got 'float16')"),
    ({"loss": {"lambda_lm": -1}}, "model.loss.lambda_lm must not be negative (got -1.0)"),
    ({"prompt_order": ["image", "text"]}, "model.prompt_order must order ['image', 'text', 'question']"),
    ({"vision": {"patch": 16}},
     "model.vision.patch: Key 'patch' not in 'VisionConfig'. Did you mean one of: 'patch_size'"),
    ({"qformer": {"num_queries": "many"}}, "model.qformer.num_queries: Value 'many' of type 'str' could not be"),
])
def test_an_invalid_config_is_an_error_naming_the_key_and_the_values(change, message):
    with pytest.raises(ValueError) as error:
        MedBLIPConfig.from_dict(OmegaConf.merge(load_model_config("tiny").model, change))
    assert message in str(error.value)


# ---- composed YAMLs ---------------------------------------------------------------------------------
def leaves(config: dict, prefix: str = "") -> dict[str, object]:
    found = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


@pytest.mark.parametrize("layer", ["base", *MODEL_TYPES])
def test_a_yaml_holds_only_what_differs_from_the_layers_below(layer):
    below = OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(MedBLIPConfig))})
    if layer != "base":
        below = OmegaConf.merge(below, OmegaConf.load(BASE_CONFIG_FILE))
    written = OmegaConf.to_container(OmegaConf.load(BASE_CONFIG_FILE if layer == "base" else model_type_file(layer)))
    sentinel = object()
    repeated = [key for key, value in leaves(written).items()
                if OmegaConf.select(below, key, default=sentinel, throw_on_resolution_failure=False) == value]
    assert not repeated


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_config_path_is_the_type_file_and_reads_as_the_whole_config(model_type):
    path = MedBLIP.default_config_path(model_type)
    assert path == str(model_type_file(model_type))
    assert OmegaConf.load(path) == load_model_config(model_type) == OmegaConf.load(path)  # reads anew each time
    assert set(load_model_config(model_type)) == {"model", "preprocess"}


def test_lavis_load_model_builds_the_composed_model_type():
    model = load_model("medblip", "tiny", is_eval=True)
    assert isinstance(model, MedBLIP) and model.config == typed("tiny")
    assert model.config.model_type == "tiny" and model.config.lm.lora.r == 4


def test_an_unknown_model_type_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown medblip model type 'huge'. Available: \['biomedlm'"):
        MedBLIP.default_config_path("huge")
