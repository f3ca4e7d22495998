"""2D captioning (MedBLIP of Banerjee & Limbu on ROCO): fine-tuning modes, ROCO/JSONL builders,
training and evaluation through the launchers, metrics against hand-computed values, attention maps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lavis_medblip.assets import ICBM_T1
from lavis_medblip.caption import task as captioning
from lavis_medblip.caption.datasets import MedicalCaptionBuilder, ROCOBuilder
from lavis_medblip.caption.model import MedBLIPCaption
from lavis_medblip.caption.task import caption_metrics, tokenize_caption
from lavis_medblip.cli.caption_attention import CAPTION_PX, figure_layout
from lavis_medblip.cli.caption_attention import main as caption_attention_main
from lavis_medblip.processors.volume_types import VolumeReadError
from test_train_evaluate_launchers import launch, only_job_dir, run_config

TINY_IMAGES = {"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64},  # no random crop: a stable loss
                                 "eval": {"name": "blip_image_eval", "image_size": 64}}}


# ---- real images available offline: slices of the ICBM-2009c T1 template ------------------------------
def write_brain_slices(folder: Path) -> list[tuple[str, str]]:
    """Six PNG slices (two per plane) with captions naming plane and weighting."""
    volume = np.asarray(nib.load(str(ICBM_T1)).dataobj, dtype=np.float32)
    volume = (255 * (volume - volume.min()) / (volume.max() - volume.min())).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    slices = {"axial": lambda i: volume[:, :, i], "coronal": lambda i: volume[:, i, :], "sagittal": lambda i: volume[i, :, :]}
    pairs = []
    for plane, take in slices.items():
        for index in (80, 100):
            name = f"{plane}_{index}.png"
            Image.fromarray(np.ascontiguousarray(take(index).T[::-1])).save(folder / name)
            pairs.append((name, f"{plane} t1 weighted mri of the brain"))
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_model(mode: str) -> MedBLIPCaption:
    config = OmegaConf.load(MedBLIPCaption.default_config_path("tiny")).model
    config.finetune_mode = mode
    return MedBLIPCaption.from_config(config)


# ---- fine-tuning modes ---------------------------------------------------------------------------------
def test_finetune_modes_freeze_exactly_the_named_module():
    counts = {}
    for mode in ("full", "decoder_only", "encoder_only"):
        model = tiny_model(mode)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        names = {name for name, _ in model.named_parameters()}
        vision = {name for name in names if name.startswith("visual_encoder.")}
        decoder = {name for name in names if name.startswith("text_decoder.")}
        assert vision | decoder == names
        expected = {"full": names, "decoder_only": decoder, "encoder_only": vision}[mode]
        assert trainable == expected, mode
        counts[mode] = model.num_trainable_parameters()

        model.train()  # frozen parts keep dropout off
        frozen = {"full": [], "decoder_only": [model.visual_encoder], "encoder_only": [model.text_decoder]}[mode]
        assert all(not module.training for part in frozen for module in part.modules())
        if mode == "encoder_only":  # the paper freezes the whole decoder, cross-attention included
            assert not any("crossattention" in name for name in trainable)
    total = sum(p.numel() for p in tiny_model("full").parameters())
    assert counts["full"] == total == counts["decoder_only"] + counts["encoder_only"]
    assert counts["encoder_only"] < counts["decoder_only"]  # the 30k-word embedding sits in the decoder


def test_frozen_vision_encoder_gets_no_gradient_but_decoder_does_and_vice_versa():
    samples = {"image": torch.rand(2, 3, 64, 64), "text_input": ["a picture of axial mri", "a picture of coronal mri"]}
    for mode, frozen, trained in (("decoder_only", "visual_encoder", "text_decoder"),
                                  ("encoder_only", "text_decoder", "visual_encoder")):
        model = tiny_model(mode).train()
        model(samples)["loss"].backward()
        assert all(p.grad is None for p in getattr(model, frozen).parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, trained).parameters())


def test_unknown_finetune_mode_is_refused():
    with pytest.raises(ValueError, match="finetune_mode"):
        tiny_model("lora")


# ---- metrics -------------------------------------------------------------------------------------------
def test_tokenization_lowercases_and_drops_punctuation():
    assert tokenize_caption("Axial T1-weighted MRI, of the BRAIN.") == "axial t1 weighted mri of the brain"


def test_metrics_match_hand_computed_values():
    # candidate "the brain mri scan" vs reference "axial mri of the brain":
    # unigram precision 3/4, brevity penalty exp(1 - 5/4) → BLEU-1 = 0.75·e^-0.25;
    # LCS "the brain" = 2: P = 2/4, R = 2/5, ROUGE-L (β = 1.2) = (1 + β²)PR / (R + β²P)
    metrics = caption_metrics({"a": "Axial MRI of the brain."}, {"a": "the brain MRI scan"}, meteor=False)
    assert metrics["bleu_1"] == pytest.approx(0.75 * math.exp(-0.25), abs=1e-6)
    assert metrics["bleu_2"] == pytest.approx(math.sqrt(0.75 * (1 / 3)) * math.exp(-0.25), abs=1e-6)  # "the brain" 1/3
    beta2, precision, recall = 1.2 ** 2, 0.5, 0.4
    assert metrics["rouge_l"] == pytest.approx((1 + beta2) * precision * recall / (recall + beta2 * precision))
    assert metrics["cider"] == 0.0  # one image: every n-gram is in every document, so its IDF is 0


def test_identical_captions_score_the_maximum():
    captions = {"a": "axial mri of the brain", "b": "chest x-ray showing pneumonia", "c": "ct of the abdomen"}
    metrics = caption_metrics(captions, dict(captions), meteor=False)
    for n in (1, 2, 3, 4):
        assert metrics[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rouge_l"] == pytest.approx(1.0)
    assert metrics["cider"] == pytest.approx(10.0)  # cosine 1 for every n, times CIDEr's factor 10


def test_meteor_says_why_without_java(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    metrics = caption_metrics({"a": "axial mri"}, {"a": "axial mri"})
    assert metrics["meteor"] == "not computed: java not found"


# ---- builders ------------------------------------------------------------------------------------------
def write_fake_roco(root: Path) -> Path:
    """ROCO's layout: <root>/<split>/<subset>/{images/, captions.txt, keywords.txt}; one image missing."""
    gray = Image.fromarray(np.full((20, 24), 128, dtype=np.uint8))
    radiology = root / "train" / "radiology"
    (radiology / "images").mkdir(parents=True)
    for roco_id in ("ROCO_00001", "ROCO_00002"):
        gray.save(radiology / "images" / f"{roco_id}.jpg")
    (radiology / "captions.txt").write_text("ROCO_00001\t CT of the chest.\nROCO_00002\t Axial MRI of the brain.\n"
                                            "ROCO_00003\t Missing image.\n")
    (radiology / "keywords.txt").write_text("ROCO_00001\tct\tchest\n")
    other = root / "train" / "non-radiology"
    (other / "images").mkdir(parents=True)
    gray.save(other / "images" / "ROCO_00010.png")
    (other / "captions.txt").write_text("ROCO_00010\tA photograph of a skin lesion.\n")
    return root


def build_roco(root: Path, **overrides) -> dict:
    config = OmegaConf.load(ROCOBuilder.DATASET_CONFIG_DICT["default"]).datasets.roco
    config = OmegaConf.merge(config, {**TINY_IMAGES, "build_info": {"storage": str(root), "splits": {
        "train": "train", "val": None, "test": None}}}, overrides)
    return ROCOBuilder(config).build_datasets()


def test_roco_builder_reads_the_radiology_subset_and_raises_naming_a_missing_image(tmp_path):
    dataset = build_roco(write_fake_roco(tmp_path))["train"]
    assert [record.instance_id for record in dataset.records] == ["ROCO_00001", "ROCO_00002", "ROCO_00003"]
    sample = dataset[0]
    assert sample["image"].shape == (3, 64, 64) and sample["caption"] == "CT of the chest."
    assert sample["text_input"] == "a picture of ct of the chest" and sample["keywords"] == "ct chest"
    with pytest.raises(VolumeReadError, match="ROCO_00003.jpg"):
        dataset[2]


def test_roco_builder_selects_the_non_radiology_subset_and_counts_skipped_images(tmp_path):
    root = write_fake_roco(tmp_path)
    other = build_roco(root, subset="non-radiology")["train"]
    assert [record.instance_id for record in other.records] == ["ROCO_00010"]
    assert other[0]["image"].shape == (3, 64, 64)

    dataset = build_roco(root, on_error="skip")["train"]
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    assert batch["num_skipped"] == 1 and batch["instance_id"] == ["ROCO_00001", "ROCO_00002"]


def test_medical_caption_builder_reads_jsonl(tmp_path):
    pairs = write_brain_slices(tmp_path / "images")
    annotations = write_jsonl(tmp_path / "test.jsonl", [{"image": f"images/{name}", "caption": caption, "id": i}
                                                        for i, (name, caption) in enumerate(pairs[:2])])
    config = OmegaConf.merge(OmegaConf.load(MedicalCaptionBuilder.DATASET_CONFIG_DICT["default"]).datasets.medical_caption,
                             {**TINY_IMAGES, "build_info": {"annotations": {"test": {"storage": str(annotations)}}}})
    dataset = MedicalCaptionBuilder(config).build_datasets()["test"]
    assert len(dataset) == 2 and dataset[1]["instance_id"] == "1" and dataset[1]["image"].shape == (3, 64, 64)
    assert dataset[1]["text_input"] == "axial t1 weighted mri of the brain"  # eval: no prompt


# ---- end to end through the launchers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def caption_run(tmp_path_factory) -> Path:
    """Four epochs (12 steps) of full fine-tuning of ``tiny`` on six brain slices, then the test split."""
    work = tmp_path_factory.mktemp("caption")
    pairs = write_brain_slices(work / "images")
    rows = [{"image": f"images/{name}", "caption": caption, "id": Path(name).stem} for name, caption in pairs]
    write_jsonl(work / "train.jsonl", rows)
    write_jsonl(work / "test.jsonl", rows[::2])
    config = {"model": {"arch": "medblip_caption", "model_type": "tiny", "finetune_mode": "full"},
              "datasets": {"medical_caption": {**TINY_IMAGES, "build_info": {"annotations": {
                  split: {"storage": str(work / f"{split}.jsonl")} for split in ("train", "test")}}}},
              "run": run_config(work / "output", "medblip_captioning", max_epoch=4, train_splits=["train"],
                                test_splits=["test"], init_lr=5e-3, num_beams=1, max_len=12, min_len=2,
                                compute_meteor=False)}
    launch("lavis_medblip.train", config, work / "caption.yaml")
    return only_job_dir(work / "output")


def test_training_lowers_the_caption_loss_and_writes_captions_and_metrics(caption_run):
    steps = [json.loads(line) for line in (caption_run / "train_steps.jsonl").read_text().splitlines()]
    losses = [step["loss"] for step in steps]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 2.0, losses  # ~10.4 (ln 30524) at the start

    result_dir = caption_run / "result"
    (metrics_file,) = result_dir.glob("test_epoch*_metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_samples"] == 3 and metrics["meteor"].startswith("not computed")
    assert {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "agg_metrics"} <= set(metrics)
    captions = json.loads(Path(metrics["captions_file"]).read_text())
    assert {row["instance_id"] for row in captions} == {"axial_80", "coronal_80", "sagittal_80"}
    assert all(set(row) == {"instance_id", "reference", "caption"} for row in captions)


def test_attention_cli_writes_a_png_of_the_expected_size(caption_run, tmp_path):
    image = tmp_path / "slice.png"
    write_brain_slices(tmp_path / "slices")
    (tmp_path / "slices" / "axial_80.png").rename(image)
    (out,) = caption_attention_main(["--model-type", "tiny", "--checkpoint", str(caption_run / "checkpoint_latest.pth"),
                                     "--image", str(image), "--out", str(tmp_path / "attn.png"), "--max-len", "10"])
    words = json.loads(out.with_suffix(".json").read_text())["words"]
    assert words  # the trained model says something
    columns, rows = figure_layout(len(words))
    with Image.open(out) as png:
        assert png.size == (columns * 160, rows * 160 + CAPTION_PX)
