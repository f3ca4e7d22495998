"""M3D-VQA: the ``m3d_vqa`` builder, the M3D-VQA-AD filter, the open-ended metrics and ``medblip_vqa`` end to end."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import ndimage

from lavis.common.registry import registry

from dataset_builders import m3d_vqa_ad
from lavis_medblip.assets import ICBM_T1
from lavis_medblip.annotations.m3d_vqa import M3D_COLUMNS
from lavis_medblip.datasets.m3d_vqa import M3DVQADataset
from lavis_medblip.annotations.hashing import content_sha256
from lavis_medblip.tasks.metrics import bleu_1, rouge_1
from lavis_medblip.tasks.vqa import MedBLIPVQATask
from test_train_evaluate_launchers import launch, only_job_dir, run_config

BRAIN_AD = ("MRI brain: diffuse cerebral atrophy with enlarged lateral ventricles and widened sulci, "
            "consistent with Alzheimer's disease.")
KIDNEY = "CT abdomen: atrophic left kidney. No focal liver lesion."
HEAD_NORMAL = "MRI head: no acute intracranial abnormality."
CHEST = "Chest CT: left ventricular enlargement. Volume loss in the right lower lobe."

# (image, text, type, question, A, B, C, D, answer, letter); CSV line = index + 2
ROWS = [
    ("M3D_Cap_npy/case0/axial.npy", BRAIN_AD, "1", "Which plane is this image in?", "Axial", "Sagittal", "Coronal", "NA",
     "Axial", "A"),
    ("M3D_Cap_npy/case0/axial.npy", BRAIN_AD, "4", "What abnormality is seen?", "Hemorrhage", "Cerebral atrophy", "Mass",
     "Normal", "Cerebral atrophy", "B"),
    ("M3D_Cap_npy/case1/portal.npy", KIDNEY, "3", "Which organ shows atrophy?", "Liver", "Kidney", "Spleen", "Pancreas",
     "Kidney", "B"),
    ("M3D_Cap_npy/case1/portal.npy", KIDNEY, "2", "In which phase was the image taken?", "Non-contrast", "Arterial",
     "Portal venous", "Delayed", "Portal venous", "C"),
    ("M3D_Cap_npy/case2/t1.npy", HEAD_NORMAL, "5", "Is the hippocampus involved in cognitive impairment here?", "Yes",
     "No", "NA", "NA", "No", "B"),
    ("M3D_Cap_npy/missing/gone.npy", CHEST, "4", "What abnormality is seen?", "Cardiomegaly", "Pneumothorax", "Nodule",
     "Effusion", "Cardiomegaly", "A"),
]
AD_ROWS = [0, 1, 4]  # brain atrophy/AD report (2 questions) and a hippocampus/cognitive question; not kidney or heart/lung


def write_csv(path, rows) -> None:
    pd.DataFrame(rows, columns=list(M3D_COLUMNS)).to_csv(path, index=False)


@pytest.fixture(scope="module")
def m3d(tmp_path_factory):
    """M3D's layout: ``<root>/M3D_VQA_test.csv`` and ``<root>/data/M3D_Cap_npy/…`` 1×32×64×64 float32 in [0, 1]."""
    root = tmp_path_factory.mktemp("m3d")
    template = np.asarray(nib.load(ICBM_T1).dataobj, dtype=np.float32)
    small = ndimage.zoom(template, [t / s for t, s in zip((32, 64, 64), template.shape)], order=1)
    small = (small - small.min()) / (small.max() - small.min())
    for index, relative in enumerate(sorted({row[0] for row in ROWS if "missing" not in row[0]})):
        (root / "data" / relative).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / "data" / relative, np.clip(small * (1 - 0.1 * index), 0, 1)[None].astype(np.float32))
    write_csv(root / "M3D_VQA_test.csv", ROWS)
    return root


def processors(size: int = 32):
    vis = registry.get_processor_class("mri_volume_eval").from_config(OmegaConf.create({"image_size": size}))
    text = registry.get_processor_class("medblip_text").from_config(None)
    return vis, text


def make_dataset(m3d, **kwargs) -> M3DVQADataset:
    vis, text = processors()
    return M3DVQADataset(vis, text, [m3d / "M3D_VQA_test.csv"], image_root=m3d / "data", **kwargs)


# ---- builder / dataset -------------------------------------------------------------------------------

def test_closed_samples_have_m3d_prompt_target_and_no_report_text(m3d):
    dataset = make_dataset(m3d, mode="closed", on_error="skip")
    first, second = dataset[0], dataset[1]
    assert first["image"].shape == (1, 32, 32, 32) and 0.0 <= float(first["image"].min()) <= float(first["image"].max()) <= 1.0
    # NA choice D dropped from the prompt and the choices
    assert first["question"] == "Question: Which plane is this image in? Choices: A. Axial B. Sagittal C. Coronal Answer:"
    assert first["choices"] == ["Axial", "Sagittal", "Coronal"] and first["choice_letters"] == ["A", "B", "C"]
    assert first["text_output"] == "A. Axial" and first["answer_choice"] == "A"
    assert second["text_output"] == "B. Cerebral atrophy" and second["question_type"] == 4
    assert first["text_input"] == ""  # the report would leak the answer
    assert first["instance_id"] == "M3D_VQA_test:2"
    assert dataset[4]["choices"] == ["Yes", "No"]


def test_open_samples_ask_the_question_alone_and_report_text_is_opt_in(m3d):
    dataset = make_dataset(m3d, mode="open", use_report_text=True)
    sample = dataset[1]
    assert sample["question"] == "Question: What abnormality is seen? Answer:"
    assert sample["text_output"] == "Cerebral atrophy"
    assert sample["text_input"] == BRAIN_AD


def test_missing_image_is_skipped_and_counted_or_raises_naming_row_and_file(m3d):
    skipping = make_dataset(m3d, on_error="skip")
    batch = skipping.collater([skipping[index] for index in range(len(skipping))])
    assert batch["num_skipped"] == 1 and len(batch["instance_id"]) == 5
    assert batch["image"].shape == (5, 1, 32, 32, 32) and batch["question_type"].tolist() == [1, 4, 3, 2, 5]

    raising = make_dataset(m3d, on_error="raise")
    with pytest.raises(ValueError, match=r"gone\.npy: sample 5 \(row \S*M3D_VQA_test\.csv:7\): no such file"):
        raising[5]


def test_malformed_rows_raise_with_file_and_line_or_are_skipped(m3d, tmp_path):
    bad = list(ROWS[:2]) + [ROWS[0][:9] + ("D",), ROWS[1][:2] + ("7",) + ROWS[1][3:]]  # D is NA; type 7 unknown
    write_csv(tmp_path / "bad.csv", bad)
    vis, text = processors()
    with pytest.raises(ValueError, match=r"bad\.csv:4: Answer Choice 'D' is not among the choices \['A', 'B', 'C'\]"):
        M3DVQADataset(vis, text, [tmp_path / "bad.csv"], image_root=m3d / "data")
    dataset = M3DVQADataset(vis, text, [tmp_path / "bad.csv"], image_root=m3d / "data", on_error="skip")
    assert len(dataset) == 2 and len(dataset.skipped_annotations) == 2
    assert "bad.csv:5" in dataset.skipped_annotations[1] and "question type" in dataset.skipped_annotations[1]


def test_registered_builder_reads_splits_relative_to_the_data_root(m3d):
    config = OmegaConf.load(registry.get_builder_class("m3d_vqa").default_config_path()).datasets.m3d_vqa
    config.build_info.annotations.test.storage = str(m3d / "M3D_VQA_test.csv")
    config.build_info.images.storage = str(m3d / "data")
    config.vis_processor = {"eval": {"image_size": 32}}  # a builder on its own: the processors' defaults + this
    config.on_error = "skip"
    datasets = registry.get_builder_class("m3d_vqa")(config).build_datasets()
    assert list(datasets) == ["test"] and len(datasets["test"]) == 6 and datasets["test"].mode == "closed"


# ---- M3D-VQA-AD filter -------------------------------------------------------------------------------

def test_ad_filter_keeps_the_hand_picked_rows_and_reports_them(m3d, tmp_path):
    out = tmp_path / "m3d_vqa_ad.csv"
    assert m3d_vqa_ad.main(["--csv", str(m3d / "M3D_VQA_test.csv"), "--out", str(out)]) == 0
    kept = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected = pd.DataFrame([ROWS[i] for i in AD_ROWS], columns=list(M3D_COLUMNS))
    pd.testing.assert_frame_equal(kept, expected)  # rows unchanged, NA kept as written

    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["rows_in"] == 6 and report["rows_kept"] == 3
    assert report["per_question_type_kept"] == {"1 Plane": 1, "4 Abnormality": 1, "5 Location": 1}
    assert report["input_sha256"] == content_sha256(m3d / "M3D_VQA_test.csv")
    assert report["keywords"]["ad_terms"] == m3d_vqa_ad.AD_TERMS
    assert report["rows_per_term"]["alzheimer"] == 2 and report["rows_per_term"]["hippocampal"] == 1


@pytest.mark.parametrize("text, selected", [
    ("Findings of early dementia.", True),
    ("Mild cognitive impairment, follow-up.", True),
    ("Bilateral hippocampal volume reduction.", True),
    ("Generalized brain atrophy.", True),
    ("Prominent cortical sulci and ventriculomegaly; the cerebral parenchyma is otherwise normal.", True),
    ("Atrophic pancreas. Left ventricular enlargement.", False),  # body atrophy, cardiac ventricle
    ("Volume loss of the right lower lobe.", False),
    ("Cerebral hemorrhage without atrophy of other organs", True),  # atrophy + brain context (documented rule)
])
def test_ad_filter_rule(text, selected):
    assert bool(m3d_vqa_ad.matched_terms(text)) is selected


def test_ad_filter_docstring_lists_every_pattern():
    for terms in (m3d_vqa_ad.AD_TERMS, m3d_vqa_ad.ATROPHY_TERMS, m3d_vqa_ad.BRAIN_CONTEXT_TERMS):
        for name, pattern in terms.items():
            assert name in m3d_vqa_ad.__doc__ and pattern in m3d_vqa_ad.__doc__, name


# ---- metrics -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference, bleu, rouge", [
    ("the left hippocampus is small", "small left hippocampus", 3 / 5, 2 * (3 / 5) * 1 / (3 / 5 + 1)),
    ("Hippocampus.", "left hippocampus atrophy", math.exp(1 - 3 / 1), 2 * 1 * (1 / 3) / (1 + 1 / 3)),  # brevity penalty
    ("the the the", "the cat", 1 / 3, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)),  # clipped counts
    ("", "axial", 0.0, 0.0),
    ("Axial", "axial", 1.0, 1.0),
])
def test_bleu_1_and_rouge_1_match_hand_computed_values(prediction, reference, bleu, rouge):
    assert bleu_1(prediction, reference) == pytest.approx(bleu)
    assert rouge_1(prediction, reference) == pytest.approx(rouge)


def test_vqa_metrics_accuracy_overall_and_per_type():
    task = MedBLIPVQATask(method="letter")
    rows = [{"question_type": t, "correct": c} for t, c in [(1, True), (1, False), (4, True), (5, True)]]
    metrics = task.vqa_metrics(rows)
    assert metrics["accuracy"] == 0.75 and metrics["agg_metrics"] == 0.75 and metrics["method"] == "letter"
    assert metrics["per_type"] == {"1 Plane": {"accuracy": 0.5, "num_samples": 2},
                                   "4 Abnormality": {"accuracy": 1.0, "num_samples": 1},
                                   "5 Location": {"accuracy": 1.0, "num_samples": 1}}


# ---- end to end --------------------------------------------------------------------------------------

def test_evaluate_launcher_writes_per_type_accuracy_and_predictions(m3d, tmp_path):
    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": {"m3d_vqa": {"on_error": "skip", "mode": "closed", "build_info": {
                  "annotations": {"test": {"storage": str(m3d / "M3D_VQA_test.csv")}},
                  "images": {"storage": str(m3d / "data")}},
                  "vis_processor": {"eval": {"name": "mri_volume_eval", "image_size": 32}}}},
              "run": run_config(tmp_path / "output", "medblip_vqa", evaluate=True, test_splits=["test"],
                                vqa_method="rank", max_new_tokens=4)}
    launch("lavis_medblip.evaluate", config, tmp_path / "eval.yaml")

    result_dir = only_job_dir(tmp_path / "output") / "result"
    metrics = json.loads((result_dir / "test_epochbest_metrics.json").read_text())
    assert metrics["num_samples"] == 5 and metrics["num_skipped"] == 1 and metrics["method"] == "rank"
    assert set(metrics["per_type"]) == {"1 Plane", "2 Phase", "3 Organ", "4 Abnormality", "5 Location"}
    assert metrics["agg_metrics"] == metrics["accuracy"] == pytest.approx(
        sum(t["accuracy"] * t["num_samples"] for t in metrics["per_type"].values()) / 5)
    predictions = {row["instance_id"]: row for row in json.loads((result_dir / "test_epochbest_predictions.json").read_text())}
    assert set(predictions) == {f"M3D_VQA_test:{line}" for line in (2, 3, 4, 5, 6)}
    plane = predictions["M3D_VQA_test:2"]
    assert {"question_type", "question", "answer", "prediction", "correct"} <= set(plane)
    assert plane["question"] == "Which plane is this image in?" and plane["answer"] == "A. Axial"
    assert plane["prediction"] in {"A. Axial", "B. Sagittal", "C. Coronal"} and len(plane["scores"]) == 3
    assert plane["correct"] == (plane["predicted_choice"] == "A")


class ScriptedModel:
    """Stands in for MedBLIP: fixed generations; ranking prefers the last candidate of each sample."""

    def __init__(self, generations):
        self.generations = generations
        self.candidate_calls = []

    def generate(self, samples, max_new_tokens, num_beams):
        return [self.generations[instance_id] for instance_id in samples["instance_id"]]

    def predict_answers(self, samples, candidates):
        import torch

        from lavis_medblip.models.medblip import CandidateRanking

        assert len({len(options) for options in candidates}) == 1  # the model's contract
        self.candidate_calls.append(candidates)
        scores = torch.arange(len(candidates[0]), dtype=torch.float).repeat(len(candidates), 1)
        return CandidateRanking(scores=scores, probs=scores.softmax(1), predictions=[c[-1] for c in candidates])


def test_letter_rank_and_open_scoring_per_sample(m3d):
    dataset = make_dataset(m3d, on_error="skip")
    batch = dataset.collater([dataset[index] for index in (0, 1, 4)])  # 3, 4 and 2 choices
    generations = {"M3D_VQA_test:2": "A. Axial", "M3D_VQA_test:3": "The answer is C. Mass", "M3D_VQA_test:6": "B."}

    letter = MedBLIPVQATask(method="letter").valid_step(ScriptedModel(generations), batch)
    assert [row["correct"] for row in letter] == [True, False, True]  # M3D: "B." (answer "B") occurs in "B."
    assert [row["predicted_choice"] for row in letter] == ["A", "C", "B"]

    model = ScriptedModel(generations)
    ranked = MedBLIPVQATask(method="rank").valid_step(model, batch)
    assert [row["prediction"] for row in ranked] == ["C. Coronal", "D. Normal", "B. No"]
    assert [row["correct"] for row in ranked] == [False, False, True]
    assert sorted(len(call[0]) for call in model.candidate_calls) == [2, 3, 4]  # grouped by number of choices

    task = MedBLIPVQATask()
    task.mode = "open"
    open_batch = make_dataset(m3d, mode="open").collater([make_dataset(m3d, mode="open")[1]])
    (row,) = task.valid_step(ScriptedModel({"M3D_VQA_test:3": "cerebral atrophy is seen"}), open_batch)
    assert row["bleu_1"] == pytest.approx(0.5) and row["rouge_1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert row["correct"] is False
    metrics = task.vqa_metrics([row])
    assert metrics["agg_metrics"] == metrics["rouge_1"] and metrics["per_type"]["4 Abnormality"]["num_samples"] == 1


def test_project_file_is_zero_shot_closed_vqa_on_m3d_vqa_ad():
    import argparse
    from pathlib import Path

    from lavis.common.config import Config

    path = Path(__file__).resolve().parent.parent / "projects" / "medblip" / "eval_m3d_vqa_ad.yaml"
    config = Config(argparse.Namespace(cfg_path=str(path), options=None))
    assert config.run_cfg.task == "medblip_vqa" and config.run_cfg.vqa_method in ("rank", "letter")
    assert config.model_cfg.model_type == "biomedlm_lora" and config.model_cfg.load_finetuned
    dataset = config.datasets_cfg.m3d_vqa
    assert dataset.mode == "closed" and not dataset.use_report_text
    assert "77.96%" in path.read_text() and "72.88%" in path.read_text()
