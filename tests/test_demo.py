"""The demo's image-evidence control: the held-out annotations with the images shuffled across subjects."""
from __future__ import annotations

import json

from lavis_medblip.cli import demo


def test_shuffled_test_set_keeps_text_and_labels_and_permutes_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo.COHORT_DIR.mkdir(parents=True)
    records = [{"subject_id": f"s{i}", "image": f"images/s{i}.nii.gz", "text": f"MMSE {20 + i}.", "label": "NC",
                "split": "test"} for i in range(8)]
    (demo.COHORT_DIR / "test.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    path = demo.write_shuffled_test(seed=0)
    shuffled = [json.loads(line) for line in path.read_text().splitlines()]

    assert path.parent == demo.COHORT_DIR  # image paths stay relative to the cohort root
    assert [(r["subject_id"], r["text"], r["label"]) for r in shuffled] == [
        (r["subject_id"], r["text"], r["label"]) for r in records]
    assert sorted(r["image"] for r in shuffled) == sorted(r["image"] for r in records)
    assert sum(a["image"] != b["image"] for a, b in zip(shuffled, records)) >= 6
    assert demo.write_shuffled_test(seed=0).read_text() == path.read_text()  # deterministic by seed
