"""Model bundles (issue 20, part 2): ``save_pretrained`` / ``from_pretrained``, the export CLI, ``predict --model``,
``load_model_and_preprocess`` on a folder, bad bundles, and a Hugging Face snapshot folder (local only)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lavis.models import load_model_and_preprocess
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from cohort_fixtures import write_small_cohort
from lavis_medblip.annotations.schema import CLASS_ANSWERS
from lavis_medblip.assets import ICBM_T1
from lavis_medblip.cli.export import main as export_main
from lavis_medblip.cli.predict import main as predict_main
from lavis_medblip.models import MedBLIP
from lavis_medblip.models.bundle import CALIBRATION_FILE, CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from lavis_medblip.models.calibration import Calibration
from lavis_medblip.models.config import MedBLIPConfig
from lavis_medblip.models.weights import CheckpointError
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

ANSWERS = list(CLASS_ANSWERS.values())
EHR = "A 75-year-old female with 12 years of education. MMSE 24, CDR 0.5."
METRICS = {"test": {"agg_metrics": 0.625, "auroc": 0.71, "reliability": [[0.1, 0.2]]}}


def tiny() -> MedBLIP:
    return MedBLIP.from_config(OmegaConf.load(MedBLIP.default_config_path("tiny")).model).eval()


@pytest.fixture(scope="module")
def trained() -> MedBLIP:
    """A ``tiny`` model whose trained parameters differ from their init (a reload cannot pass by rebuilding them),
    with a calibration."""
    model = tiny()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.calibration = Calibration(temperature=1.7, class_bias=[0.3, -0.1, -0.2], answers=ANSWERS, num_samples=12)
    return model


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    return trained.save_pretrained(tmp_path_factory.mktemp("bundle") / "tiny-trained", metrics=METRICS,
                                   training_data="a simulated cohort of 6 subjects")


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth"
    trained.save_checkpoint(path)
    return path


def assert_same_model(loaded: MedBLIP, expected: MedBLIP, samples) -> None:
    own, theirs = loaded.state_dict(), expected.state_dict()
    assert own.keys() == theirs.keys()
    assert [key for key in own if not torch.equal(own[key], theirs[key])] == []
    assert loaded.calibration == expected.calibration
    got, want = loaded.predict_answers(samples, ANSWERS), expected.predict_answers(samples, ANSWERS)
    assert torch.equal(got.probs, want.probs) and torch.equal(got.scores, want.scores)
    assert not torch.equal(want.probs, want.scores.softmax(dim=1))  # the calibration is applied


def test_save_then_load_gives_identical_parameters_and_calibrated_probabilities(trained, bundle, samples):
    assert_same_model(MedBLIP.from_pretrained(bundle).eval(), trained, samples)
    assert_same_model(MedBLIP.from_pretrained_dir(str(bundle)).eval(), trained, samples)


def test_the_bundle_is_flat_and_holds_no_pickle(bundle, trained, monkeypatch, samples):
    assert sorted(path.name for path in bundle.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, CALIBRATION_FILE,
                                                                      CARD_FILE])
    assert set(load_file(bundle / WEIGHTS_FILE)) == set(trained.checkpoint_state_dict())  # trained parameters only
    for path in bundle.iterdir():
        assert not path.read_bytes().startswith((b"PK\x03\x04", b"\x80")), path  # no torch.save zip, no pickle
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a bundle loaded with torch.load"))
    assert_same_model(MedBLIP.from_pretrained(bundle).eval(), trained, samples)


def test_config_yaml_alone_rebuilds_the_model_and_moves_between_machines(bundle, trained):
    text = (bundle / CONFIG_FILE).read_text()
    assert str(Path(__file__).resolve().parents[1]) not in text  # no path of this checkout
    assert "${medblip_asset:bert-base-uncased}" in text
    saved = OmegaConf.load(bundle / CONFIG_FILE)
    assert set(saved.model) == set(MedBLIPConfig().to_dict())  # every key, no model type YAML needed
    assert MedBLIPConfig.from_dict(saved.model) == trained.config
    assert saved.preprocess.vis_processor.eval == {"name": "mri_volume_eval", "image_size": 32}


def test_from_pretrained_still_takes_a_registered_model_type(tmp_path, monkeypatch):
    assert torch.equal(MedBLIP.from_pretrained("tiny").query_tokens, tiny().query_tokens)
    model, vis_processors, _ = load_model_and_preprocess("medblip", model_type="tiny", is_eval=True)
    assert isinstance(model, MedBLIP) and vis_processors["eval"].image_size == 32
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like a model type: the model type wins
    assert MedBLIP.from_pretrained("tiny").config.model_type == "tiny"
    with pytest.raises(ValueError, match="neither a model type of .*tiny.* nor a model bundle folder"):
        MedBLIP.from_pretrained("no-such-type")


def test_load_model_and_preprocess_takes_a_bundle_folder(bundle, trained, samples):
    model, vis_processors, txt_processors = load_model_and_preprocess("medblip", model_type=str(bundle), is_eval=True)
    assert_same_model(model, trained, samples)
    assert vis_processors["eval"].image_size == 32
    assert txt_processors["eval"](" MMSE  24 ") == "MMSE 24 (6 points below the maximum, mild dementia range)"


def test_a_bundle_folder_is_a_finetuned_checkpoint_too(bundle, trained, samples):
    """``model.finetuned: <folder>`` in a project YAML (e.g. to fine-tune a shared model further)."""
    config = OmegaConf.load(bundle / CONFIG_FILE).model
    config.update(load_finetuned=True, finetuned=str(bundle))
    assert_same_model(MedBLIP.from_config(config).eval(), trained, samples)


def test_the_model_card_follows_hugging_face_conventions(bundle):
    from huggingface_hub import ModelCard

    card = ModelCard.load(bundle / CARD_FILE)  # a local file: no network
    assert card.data.library_name == "lavis-medblip" and card.data.license == "other"
    assert {"medblip", "brain-mri", "tiny"} <= set(card.data.tags)
    for text in ("model type `tiny`", "a simulated cohort of 6 subjects", "| test/auroc | 0.71 |", "`vision.weights`",
                 "temperature 1.700", "Base weights (not in this folder)"):
        assert text in card.text, text


def test_the_card_names_the_papers_base_weights(tmp_path):
    from lavis_medblip.models.bundle import bundle_config
    from lavis_medblip.models.bundle_card import model_card

    config = bundle_config(MedBLIPConfig.from_dict(OmegaConf.load(MedBLIP.default_config_path("biomedlm_lora")).model))
    card = model_card(config, {}, Calibration(), None, None, "other")
    assert "eva_vit_g.pth` — EVA-CLIP ViT-g/14" in card and "blip2_pretrained.pth` — BLIP-2" in card
    assert f"`{config['model']['lm']['model']}`" in card and "base_model:" in card


def test_export_cli_turns_a_pth_checkpoint_into_the_same_bundle(checkpoint, trained, tmp_path, samples, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    out = tmp_path / "exported"
    assert export_main(["--model-type", "tiny", "--checkpoint", str(checkpoint), "--out", str(out),
                        "--metrics", str(metrics), "--training-data", "six subjects"]) == 0
    assert "wrote the model bundle" in capsys.readouterr().out
    assert_same_model(MedBLIP.from_pretrained(out).eval(), trained, samples)
    assert "| test/agg_metrics | 0.625 |" in (out / CARD_FILE).read_text()
    recorded = tmp_path / "from-recorded-config"  # no --model-type: the checkpoint's own config
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(recorded)]) == 0
    assert (recorded / CONFIG_FILE).read_text() == (out / CONFIG_FILE).read_text()
    assert load_file(recorded / WEIGHTS_FILE).keys() == load_file(out / WEIGHTS_FILE).keys()


def test_export_of_a_checkpoint_that_does_not_fit_names_it(checkpoint, tmp_path, capsys):
    assert export_main(["--model-type", "tiny", "--options", "qformer.num_queries=4", "--checkpoint",
                        str(checkpoint), "--out", str(tmp_path / "out")]) == 1
    assert f"{checkpoint}: does not fit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_module_entry_point_runs(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "lavis_medblip.export", "--model-type", "tiny", "--checkpoint",
                           str(checkpoint), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / WEIGHTS_FILE).is_file()


def predicted_rows(arguments: list[str], output: Path) -> list[dict[str, str]]:
    assert predict_main([*arguments, "--image", str(ICBM_T1), "--text", EHR, "--output", str(output)]) == 0
    with output.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_with_model_dir_equals_model_type_and_checkpoint(bundle, checkpoint, tmp_path):
    from_bundle = predicted_rows(["--model", str(bundle)], tmp_path / "bundle.csv")
    from_checkpoint = predicted_rows(["--model-type", "tiny", "--checkpoint", str(checkpoint)], tmp_path / "pth.csv")
    assert from_bundle == from_checkpoint and float(from_bundle[0]["p_NC"]) > 0


def test_predict_model_options_still_apply_and_model_excludes_checkpoint(bundle, checkpoint, capsys):
    with pytest.raises(SystemExit):
        predict_main(["--model", str(bundle), "--checkpoint", str(checkpoint), "--image", str(ICBM_T1)])
    assert "--checkpoint goes with --model-type" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main(["--model", str(bundle), "--model-type", "tiny", "--image", str(ICBM_T1)])
    assert "not allowed with argument" in capsys.readouterr().err
    assert predict_main(["--model", str(bundle), "--options", "qformer.num_queries=4", "--image", str(ICBM_T1)]) == 1
    assert "does not fit" in capsys.readouterr().err  # the option reached the model


def corrupt(bundle: Path, target: Path, damage: str) -> Path:
    shutil.copytree(bundle, target)
    weights = target / WEIGHTS_FILE
    state = {key: tensor.clone() for key, tensor in load_file(weights).items()}  # not the mmap of a file rewritten
    if damage == "no config":
        (target / CONFIG_FILE).unlink()
    elif damage == "no weights":
        weights.unlink()
    elif damage == "pickle named .safetensors":
        torch.save(state, weights)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage in ("wrong shape", "unknown key"):
        if damage == "wrong shape":
            state["query_tokens"] = torch.zeros(1, 4, 64)
        else:
            state["Qformer.no_such_layer.weight"] = torch.zeros(2)
        save_file(state, weights)
    elif damage == "bad calibration":
        (target / CALIBRATION_FILE).write_text('{"temperature": -1}')
    elif damage == "unknown config key":
        (target / CONFIG_FILE).write_text((target / CONFIG_FILE).read_text().replace("  init_seed: 0", "  init_sed: 0"))
    return target


@pytest.mark.parametrize("damage, file, message", [
    ("no config", CONFIG_FILE, "missing: a model bundle needs config.yaml and model.safetensors"),
    ("no weights", WEIGHTS_FILE, "missing"),
    ("pickle named .safetensors", WEIGHTS_FILE, "a zip archive .*not a safetensors file; it was not loaded"),
    ("truncated weights", WEIGHTS_FILE, "not a readable safetensors file"),
    ("wrong shape", WEIGHTS_FILE, r"shape mismatches \['query_tokens: checkpoint \(1, 4, 64\), model \(1, 8, 64\)"),
    ("unknown key", WEIGHTS_FILE, r"unexpected keys \['Qformer.no_such_layer.weight'\]"),
    ("bad calibration", CALIBRATION_FILE, "not a valid calibration: .*temperature must be a positive number"),
    ("unknown config key", CONFIG_FILE, "not a valid model config: model.init_sed"),
])
def test_a_bad_bundle_is_an_error_naming_the_file(bundle, tmp_path, monkeypatch, capsys, damage, file, message):
    broken = corrupt(bundle, tmp_path / "broken", damage)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a bundle loaded with torch.load"))
    with pytest.raises(CheckpointError, match=message) as raised:
        MedBLIP.from_pretrained(broken)
    assert raised.value.path == str(broken / file)
    assert predict_main(["--model", str(broken), "--image", str(ICBM_T1)]) == 1
    assert str(broken / file) in capsys.readouterr().err


def test_a_missing_folder_or_a_file_for_model_is_an_error_naming_it(bundle, capsys):
    assert predict_main(["--model", str(bundle / "nowhere"), "--image", str(ICBM_T1)]) == 1
    assert f"{bundle / 'nowhere'}: no such model bundle folder" in capsys.readouterr().err
    assert predict_main(["--model", str(bundle / WEIGHTS_FILE), "--image", str(ICBM_T1)]) == 1
    assert "a file, not a model bundle folder (pass the folder that holds it)" in capsys.readouterr().err


def test_a_hugging_face_snapshot_folder_loads(bundle, trained, tmp_path, samples):
    """The layout ``snapshot_download`` leaves in its cache (blobs, a snapshot of symlinks, refs/main), found
    with ``local_files_only``: no network."""
    from huggingface_hub import snapshot_download

    repo, commit = tmp_path / "hub" / "models--lab--medblip-tiny", "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(bundle.iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    folder = snapshot_download("lab/medblip-tiny", cache_dir=tmp_path / "hub", local_files_only=True)
    assert Path(folder) == snapshot
    assert_same_model(MedBLIP.from_pretrained(folder).eval(), trained, samples)


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory) -> Path:
    """One epoch of the classification task with a calibration split, checkpoints as bundles."""
    folder = tmp_path_factory.mktemp("run")
    annotations = write_small_cohort(folder / "cohort", {"train": 3, "val": 6, "test": 3})
    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "val", "test"]),
              "run": run_config(folder / "output", "medblip_classification", max_epoch=1, train_splits=["train"],
                                valid_splits=["val"], test_splits=["test"], calibration_split="val",
                                checkpoint_format="bundle")}
    launch("lavis_medblip.train", config, folder / "run.yaml")
    return only_job_dir(folder / "output")


def test_a_run_with_checkpoint_format_bundle_writes_its_models_as_bundles(bundle_run, samples):
    assert not (bundle_run / "checkpoint_best.pth").exists()
    best, calibrated = bundle_run / "model_best", bundle_run / "model_calibrated"
    assert sorted(path.name for path in best.iterdir()) == [CARD_FILE, CONFIG_FILE, WEIGHTS_FILE]
    latest = torch.load(bundle_run / "checkpoint_latest.pth", weights_only=True)  # resume's file: still a .pth
    assert {"optimizer", "epoch", "rng"} <= set(latest)
    weights = load_file(best / WEIGHTS_FILE)
    assert weights.keys() == latest["model"].keys()
    assert all(torch.equal(weights[key], latest["model"][key]) for key in weights)  # one epoch: best is latest
    model = MedBLIP.from_pretrained(best)
    assert all(torch.equal(model.state_dict()[key], weights[key]) for key in weights) and model.calibration.is_identity
    card = (best / CARD_FILE).read_text()
    assert "| val/agg_metrics |" in card and "splits ['train']" in card
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "lavis-medblip"

    # the tested weights with the calibration run.calibration_split fit, and the test metrics on the card
    fitted = MedBLIP.from_pretrained(calibrated).calibration
    assert fitted.num_samples == 6 and fitted.answers == ANSWERS and not fitted.is_identity
    assert load_file(calibrated / WEIGHTS_FILE).keys() == weights.keys()
    assert all(torch.equal(load_file(calibrated / WEIGHTS_FILE)[key], weights[key]) for key in weights)
    assert "| test/agg_metrics |" in (calibrated / CARD_FILE).read_text()


def test_a_safetensors_file_whose_first_byte_is_a_pickle_opcode_still_loads(tmp_path):
    """The first byte of a safetensors file is its header's length, which may be 0x80 (pickle's PROTO)."""
    from lavis_medblip.models.bundle import read_weights

    path = tmp_path / WEIGHTS_FILE
    for pad in range(256):
        save_file({"x": torch.arange(3.0)}, path, metadata={"pad": "p" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_weights(tmp_path)["x"], torch.arange(3.0))


def test_the_app_serves_a_bundle_with_the_predict_clis_probabilities(bundle, tmp_path):
    from fastapi.testclient import TestClient

    from lavis_medblip.app.cli import main as app_main
    from lavis_medblip.app.server import create_app
    from lavis_medblip.app.service import load_service

    (row,) = predicted_rows(["--model", str(bundle)], tmp_path / "results.csv")
    service = load_service(bundle=str(bundle), device="cpu", demo_root=tmp_path / "no_demo", relevance=False)
    try:
        assert service.info.model_type == "tiny" and service.info.checkpoint == str(bundle)
        with ICBM_T1.open("rb") as scan:
            answer = TestClient(create_app(service)).post(
                "/api/predict", files={"file": (ICBM_T1.name, scan, "application/gzip")}, data={"text": EHR}).json()
    finally:
        service.close()
    assert answer["prediction"] == row["prediction"]
    for code, probability in answer["probabilities"].items():
        assert probability == pytest.approx(float(row[f"p_{code}"]), abs=1e-6)
    with pytest.raises(SystemExit):
        app_main(["--model", str(bundle), "--checkpoint", "x.pth"])
