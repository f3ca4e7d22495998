"""The demo: its image-evidence control (images shuffled), the EHR-fields baseline, the lanes its models train in,
and a smoke run of the whole pipeline on a tiny cohort that prints every row of the table on both held-out sets."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lavis_medblip.annotations.schema import AnnotationRecord
from lavis_medblip.baselines import NUMERIC_FIELDS, EHRLogisticRegression, ehr_features
from lavis_medblip.cli import demo
from lavis_medblip.tasks.metrics import classification_metrics


def write_held_out(cohort, count: int = 8) -> list[dict]:
    cohort.mkdir(parents=True)
    records = [{"subject_id": f"s{i}", "image": f"images/s{i}.nii.gz", "text": f"MMSE {20 + i}.", "label": "NC",
                "split": "test", "ehr": {"mmse": 20 + i}} for i in range(count)]
    (cohort / "test.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def test_shuffled_images_keep_text_and_labels(tmp_path):
    run = demo.Demo(tmp_path)
    records = write_held_out(run.cohort)

    path = demo.write_shuffled(run.cohort / "test.jsonl", seed=0)
    shuffled = [json.loads(line) for line in path.read_text().splitlines()]

    assert path.parent == run.cohort  # image paths stay relative to the cohort root
    assert [(r["subject_id"], r["text"], r["label"]) for r in shuffled] == [
        (r["subject_id"], r["text"], r["label"]) for r in records]
    assert sorted(r["image"] for r in shuffled) == sorted(r["image"] for r in records)
    assert sum(a["image"] != b["image"] for a, b in zip(shuffled, records)) >= 6
    assert demo.write_shuffled(run.cohort / "test.jsonl", seed=0).read_text() == path.read_text()  # by seed


def test_ehr_regression_reads_the_fields_and_their_missingness():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    records = [AnnotationRecord(image="x.nii.gz", subject_id=f"s{i}", label=("NC", "MCI", "AD")[label], split="train",
                                ehr={"age": float(rng.normal(74, 6)), "sex": "F",
                                     "mmse": None if i % 4 == 0 else int(29 - 3 * label + rng.integers(0, 2))})
               for i, label in enumerate(labels)]

    features = ehr_features(records[:4])
    model = EHRLogisticRegression().fit(records[:200])
    metrics = model.evaluate(records[200:])

    mmse = 2 * NUMERIC_FIELDS.index("mmse")  # each field: its value, then whether it is missing
    assert np.isnan(features[0, mmse]) and features[0, mmse + 1] == 1.0  # MMSE missing: NaN (imputed) + indicator
    assert metrics["balanced_accuracy"] > 0.6  # MMSE separates the classes where it is recorded
    assert 0 <= metrics["ece"] < 0.2 and model.predict_proba(records[:3]).sum(axis=1) == pytest.approx(1.0)


def evaluation(labels, predictions) -> dict:
    """One cell's evaluation as the evaluation task writes it: metrics and per-subject predictions."""
    return {"metrics": classification_metrics(labels, predictions, ["NC", "MCI", "AD"]),
            "predictions": [{"instance_id": f"s{i}/bl", "label": label, "prediction": prediction}
                            for i, (label, prediction) in enumerate(zip(labels, predictions))]}


def test_each_comparison_under_the_table_is_a_paired_difference_with_its_interval():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60).tolist()
    model = {name: np.where(rng.random(60) < right, labels, rng.integers(0, 3, 60)).tolist()
             for name, right in (("image_text", 0.8), ("text_only", 0.3), ("image_only", 0.5), ("shuffled", 0.1),
                                 ("ehr_regression", 0.4))}
    results = {name: {split: evaluation(labels, model[name]) for split in demo.HELD_OUT}
               for name in ("text_only", "image_only", "ehr_regression")}
    results["image_text"] = {split: evaluation(labels, model["image_text"]) for split in demo.HELD_OUT}
    results["image_text"].update({f"{split}_images_shuffled": evaluation(labels, model["shuffled"])
                                  for split in demo.HELD_OUT})

    intervals = demo.differences(results)["test_anatomy"]

    rows = demo.table_rows(results)
    accuracy = {row: rows[row]["test_anatomy"]["balanced_accuracy"] for row in rows}
    better = intervals["image + text - better of text, image only"]
    assert better.estimate == pytest.approx(accuracy["image_text"] - accuracy["image_only"])  # the better baseline
    text_only = intervals["text only (LM) - EHR regression"]
    assert text_only.estimate == pytest.approx(accuracy["text_only"] - accuracy["ehr_regression"])
    assert text_only.low <= text_only.estimate <= text_only.high
    assert intervals["image + text - images shuffled"].low > 0  # right on 80% against 10%: clear at n = 60
    results["image_only"]["test"]["predictions"].pop()  # a scan it skipped: compared on the subjects both scored
    assert np.isfinite(demo.differences(results)["test"]["image + text - better of text, image only"].estimate)


def test_held_out_sets_pool_into_one_evaluation_with_each_subject_once():
    rng = np.random.default_rng(0)
    records = [AnnotationRecord(image="x.nii.gz", subject_id=f"s{i}", label=("NC", "MCI", "AD")[i % 3], split="test",
                                ehr={"mmse": int(29 - 3 * (i % 3) + rng.integers(-2, 3))}) for i in range(90)]
    model = EHRLogisticRegression().fit(records[:60])
    the_demos, fresh = model.evaluation(records[60:75]), model.evaluation(records[75:])
    fresh["predictions"] = [dict(row, instance_id=f"s{i}") for i, row in enumerate(fresh["predictions"])]

    pooled = demo.pooled_evaluation({"demo": the_demos, "seed7": fresh})

    assert pooled["metrics"] == model.evaluate(records[60:])  # as if evaluated on all of them at once
    ids = [row["instance_id"] for row in pooled["predictions"]]
    assert len(set(ids)) == 30 and ids[0] == "demo/s60" and ids[15] == "seed7/s0"  # two cohorts' "s0" apart
    assert demo.pooled_evaluation({"demo": the_demos})["metrics"] == the_demos["metrics"]


def test_a_lane_prefixes_its_lines_and_its_threads_sleep_when_idle(tmp_path, capsys):
    lane = demo.Demo(tmp_path).lane("text_only+image_only")
    lane.run([sys.executable, "-c", "import os; print('wait policy', os.environ['OMP_WAIT_POLICY'])"])

    assert capsys.readouterr().out.splitlines()[-1] == "[text_only+image_only] wait policy PASSIVE"
    with pytest.raises(subprocess.CalledProcessError):  # a failed launch stops its lane
        lane.run([sys.executable, "-c", "raise SystemExit(3)"])


def test_the_lanes_hold_every_model_once():
    assert sorted(variant for lane in demo.LANES for variant in lane) == sorted(demo.MODELS)


def test_the_scans_are_preprocessed_once_before_the_first_image_model_and_text_only_needs_none(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(demo.Demo, "launch", lambda self, module, yaml_name, options: launched.append(module))
    monkeypatch.setattr(demo.Demo, "train", lambda self, name, options: launched.append(f"train {name}") or tmp_path)
    monkeypatch.setattr(demo.Demo, "evaluate", lambda self, name, checkpoint, options, test_sets: {})
    run = demo.Demo(tmp_path)
    baselines, image_text = run.lane("text_only+image_only"), run.lane("image_text")

    baselines.train_and_evaluate("text_only", [], {})
    assert launched == ["train text_only"]  # no scans read: it trains while the other lane preprocesses them
    image_text.train_and_evaluate("image_text", [], {})
    baselines.train_and_evaluate("image_only", [], {})
    assert launched == ["train text_only", "lavis_medblip.warm_cache", "train image_text_stage1", "train image_text",
                        "train image_only_stage1", "train image_only"]  # the lanes share one cache, warmed once


def test_a_failed_warm_up_stops_the_other_lane_too(tmp_path):
    cache = demo.VolumeCache()
    with pytest.raises(subprocess.CalledProcessError):
        cache.warm_once(lambda: subprocess.run([sys.executable, "-c", "raise SystemExit(2)"], check=True))
    with pytest.raises(subprocess.CalledProcessError):  # not warmed again: the same error
        cache.warm_once(lambda: pytest.fail("warmed twice"))


def write_stage1_steps(run_dir, first_epoch_losses, last_epoch_losses):
    steps = [{"epoch": epoch, "step": step, "loss_itc_qa": loss}
             for epoch, losses in ((0, first_epoch_losses), (7, last_epoch_losses)) for step, loss in enumerate(losses)]
    (run_dir / "train_steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    return run_dir


def test_a_stage_1_that_never_left_chance_is_named_after_the_table(tmp_path):
    stuck = write_stage1_steps(tmp_path, [2.081, 2.080], [2.079, 2.079])  # ln 8 = 2.079: a batch of 8 at chance
    warning = demo.stage1_warning(stuck)
    assert str(stuck) in warning and "did not learn" in warning and "--train-seed" in warning

    learned = write_stage1_steps(tmp_path, [2.086, 2.083], [1.70, 1.64])  # the table's run: 2.085 -> 1.671
    assert demo.stage1_warning(learned) is None


@pytest.mark.slow
def test_demo_smoke_prints_every_row_on_both_held_out_sets(tmp_path, capsys):
    demo.main(["--root", str(tmp_path), "--subjects-per-class", "8", "--max-epoch", "1"])

    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    rows, differences = results["rows"], results["differences"]
    assert set(rows) == set(demo.ROWS)
    for row in rows.values():
        assert set(row) == set(demo.HELD_OUT)
        assert all({"balanced_accuracy", "macro_f1", "macro_auroc", "ece"} <= set(metrics) for metrics in row.values())
    assert all(name in printed for name in demo.ROWS.values())
    assert all(set(per_split) == set(demo.COMPARISONS) for per_split in differences.values())
    assert all(name in printed for name in demo.COMPARISONS)
    assert "LM arithmetic: " in printed  # bf16 or fp32: the rows depend on it
    assert "The current process just got forked" not in printed  # tokenizers' warning, once per epoch before
    assert printed.count("No validation splits found") <= 5  # once per training (RunnerBase's: 75 lines here)
    assert (tmp_path / "report.png").stat().st_size > 0
