"""``python -m lavis_medblip.warm_cache``: preprocess a project's volumes into the cache before training."""
from __future__ import annotations

from pathlib import Path

import yaml

from cohort_fixtures import write_small_cohort
from lavis_medblip.cli.warm_cache import main as warm_cache_main
from lavis_medblip.processors.volume import MriVolumeEvalProcessor


def test_warm_cache_preprocesses_every_split_once_and_names_unreadable_scans(tmp_path, capsys, caplog):
    annotations = write_small_cohort(tmp_path, {"train": 4, "test": 2})
    (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"\x1f\x8b broken")
    with (annotations / "train.jsonl").open("a") as handle:
        handle.write('{"image": "../scans/broken.nii.gz", "subject_id": "broken", "label": "AD", "split": "train", '
                     '"text": "A 70-year-old male."}\n')
    cache_dir = tmp_path / "volumes"
    processor = {"image_size": 32, "cache_dir": str(cache_dir)}
    config = {
        "model": {"arch": "medblip", "model_type": "tiny"},
        "datasets": {"brain_mri": {
            "on_error": "skip",
            "vis_processor": {"train": {"name": "mri_volume_train", **processor},
                              "eval": {"name": "mri_volume_eval", **processor}},
            "build_info": {"annotations": {split: {"storage": str(annotations / f"{split}.jsonl")}
                                           for split in ("train", "test")}}}},
        "run": {"task": "medblip_pretrain", "output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "project.yaml").write_text(yaml.safe_dump(config))

    warm_cache_main(["--cfg-path", str(tmp_path / "project.yaml"), "--workers", "2"])

    assert "preprocessed 7 volumes, 1 failed" in capsys.readouterr().out
    assert "broken.nii.gz" in caplog.text
    assert len(list(cache_dir.rglob("*.npy"))) == 6  # train and eval processors share the entries

    # training's processors now read the cache instead of preprocessing
    eval_processor = MriVolumeEvalProcessor.from_config(processor)
    eval_processor(str(Path(annotations / "../scans/sub-004.nii.gz")))
    assert (eval_processor.cache.hits, eval_processor.cache.misses) == (1, 0)
