"""Table 4's linear probe (``medblip_linear_probe``): a linear head with cross-entropy on MedBLIP's frozen
query outputs, or on the ViT's tokens with the ViT trainable; evaluated by ``medblip_classification``."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cohort_fixtures import write_small_cohort
from lavis.common.registry import registry
from lavis_medblip.models import MedBLIP, MedBLIPLinearProbe
from lavis_medblip.models.linear_probe import NoLanguageModel
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

CLASSES = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]


def probe(tiny_config, **settings):
    config = OmegaConf.merge(tiny_config, {"arch": "medblip_linear_probe", "probe": settings.pop("probe", {})},
                             settings)
    return MedBLIPLinearProbe.from_config(config)


@pytest.fixture
def labelled(samples):
    return dict(samples, label=torch.tensor([2, 0]))


def test_it_is_registered_with_the_medblip_model_types():
    assert registry.get_model_class("medblip_linear_probe") is MedBLIPLinearProbe
    assert "tiny" in MedBLIPLinearProbe.PRETRAINED_MODEL_CONFIG_DICT


def test_only_the_head_trains_on_the_query_outputs_and_its_loss_decreases(tiny_config, labelled):
    model = probe(tiny_config).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert model.head.in_features == model.backbone.Qformer.config.hidden_size
    assert isinstance(model.backbone.language_model, NoLanguageModel)  # no LM is loaded for a probe

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(labelled).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 and losses == sorted(losses, reverse=True)
    assert all(p.grad is None for p in model.backbone.parameters())  # the features are frozen
    assert set(model.checkpoint_state_dict()) == {"head.weight", "head.bias"}


def test_rows_without_a_diagnosis_are_ignored(tiny_config, labelled):
    model = probe(tiny_config).eval()
    one = model({key: value[:1] for key, value in labelled.items()}).loss
    torch.testing.assert_close(model(dict(labelled, label=torch.tensor([2, -1]))).loss, one)
    all_unlabelled = model(dict(labelled, label=torch.tensor([-1, -1]))).loss
    assert all_unlabelled.item() == 0.0 and all_unlabelled.requires_grad


def test_ranks_the_class_answers_by_the_heads_probabilities(tiny_config, labelled):
    model = probe(tiny_config).eval()
    ranking = model.predict_answers(labelled, CLASSES)
    logits = model.head(model.features(labelled["image"]))
    torch.testing.assert_close(ranking.scores, logits.log_softmax(dim=1))
    assert ranking.predictions == [CLASSES[i] for i in logits.argmax(dim=1).tolist()]
    reordered = model.predict_answers(labelled, CLASSES[::-1])  # candidates in any order map to their classes
    torch.testing.assert_close(reordered.scores, ranking.scores.flip(1))
    with pytest.raises(NotImplementedError, match="classification_mode: rank"):
        model.generate(labelled)


def test_vit_features_with_a_trainable_vit_train_the_vision_path(tiny_config, labelled):
    """The "ViT-G" row of Table 4: the ViT (from its initial weights) trains with the head."""
    model = probe(tiny_config, freeze_vit=False, probe={"features": "vit"}).train()
    assert model.head.in_features == model.backbone.visual_encoder.num_features
    model(labelled).loss.backward()
    assert model.backbone.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.backbone.named_parameters()
               if not name.startswith(("visual_encoder.", "ln_vision.")))
    frozen = probe(tiny_config, probe={"features": "vit"})  # freeze_vit: true, the head alone
    assert {name for name, p in frozen.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_reads_the_features_of_a_pretrained_medblip_checkpoint(tiny_config, tmp_path):
    pretrained = MedBLIP.from_config(tiny_config)
    with torch.no_grad():
        pretrained.query_tokens.add_(1.0)
    pretrained.save_checkpoint(tmp_path / "medblip.pth")
    model = probe(tiny_config, load_finetuned=True, finetuned=str(tmp_path / "medblip.pth"))
    torch.testing.assert_close(model.backbone.query_tokens, pretrained.query_tokens)


@pytest.mark.parametrize("freeze_vit", [True, False])
def test_freeze_vit_false_trains_medblips_vit_blocks(tiny_config, samples, freeze_vit):
    """The trainable-ViT switch on MedBLIP itself: the blocks get gradients when false, none when true."""
    tiny_config.freeze_vit = freeze_vit
    model = MedBLIP.from_config(tiny_config).train()
    model(samples).loss.backward()
    block_grads = [p.grad for p in model.visual_encoder.blocks.parameters()]
    if freeze_vit:
        assert all(grad is None for grad in block_grads) and not model.visual_encoder.blocks.training
    else:
        assert all(grad is not None for grad in block_grads) and sum(g.abs().sum() for g in block_grads) > 0
        assert any(key.startswith("visual_encoder.blocks.") for key in model.checkpoint_state_dict())
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None  # the 3D stem trains either way


def test_an_unknown_feature_is_a_config_error(tiny_config):
    with pytest.raises(ValueError, match="probe.features must be one of"):
        probe(tiny_config, probe={"features": "pixels"})


def test_trains_and_evaluates_through_the_classification_task(tmp_path):
    annotations = write_small_cohort(tmp_path / "cohort", {"train": 6, "val": 3, "test": 3})
    config = {"model": {"arch": "medblip_linear_probe", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "val", "test"]),
              "run": run_config(tmp_path / "output", "medblip_classification", max_epoch=2, init_lr=0.05,
                                train_splits=["train"], valid_splits=["val"], test_splits=["test"])}
    launch("lavis_medblip.train", config, tmp_path / "probe.yaml")

    job = only_job_dir(tmp_path / "output")
    logs = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert [entry["train_epoch"] for entry in logs] == [0, 1]
    assert set(torch.load(job / "checkpoint_best.pth", weights_only=True)["model"]) == {"head.weight", "head.bias"}
    metrics = json.loads((job / "result" / "test_epochbest_metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["mode"] == "rank"
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and set(metrics["auroc"]) == {"NC", "MCI", "AD"}


@pytest.mark.parametrize("name, features, freeze_vit", [("probe_medqformer_adni.yaml", "queries", True),
                                                         ("probe_vit_g_adni.yaml", "vit", False)])
def test_table_4_project_files(name, features, freeze_vit):
    from lavis_medblip.models.config import MedBLIPConfig, load_model_config
    from lavis_medblip.models.linear_probe import ProbeConfig
    from test_paper_configs import PROJECTS

    project = OmegaConf.load(PROJECTS / name)
    model = OmegaConf.to_container(OmegaConf.merge(load_model_config(project.model.model_type).model, project.model))
    probe_settings = ProbeConfig(**model.pop("probe"))
    config = MedBLIPConfig.from_dict(model)
    assert probe_settings.features == features and config.freeze_vit is freeze_vit
    assert project.model.arch == "medblip_linear_probe" and project.run.task == "medblip_classification"
    assert list(project.datasets) == ["adni"] and project.run.classification_mode == "rank"
