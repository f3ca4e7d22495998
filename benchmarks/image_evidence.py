"""Where the demo model's image evidence goes: a linear probe after each stage of the image path.
What it measures: README, Design notes.

    python benchmarks/image_evidence.py [--plant-cube 1.0] [--checkpoint PATH] [--threads 2]

Needs the demo's cohort (``make demo`` simulates it into .cache/demo/cohort).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

PROJECT_DIR = Path("projects/medblip")
COHORT_DIR = Path(".cache/demo/cohort")
DEFAULT_CHECKPOINT = Path(".cache/demo/runs/image_text")
CUBE = slice(18, 30)  # the central 12³ voxels of a 48³ volume
STAGES = ("ViT tokens (all)", "ViT tokens (mean)", "query outputs", "visual prefix")


def demo_eval_processor_config() -> DictConfig:
    """The demo evaluation's volume processor: the demo model's preprocessing, with demo_eval.yaml's cache."""
    from lavis_medblip.models.config import load_model_config

    config = OmegaConf.create(OmegaConf.to_container(load_model_config("demo").preprocess.vis_processor.eval,
                                                     resolve=True))
    config.merge_with(OmegaConf.load(PROJECT_DIR / "demo_eval.yaml").datasets.brain_mri.vis_processor.eval)
    return config


def load_split(split: str, processor, plant_cube: float,
               cohort_dir: Path = COHORT_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    from lavis_medblip.annotations.schema import CLASS_NAMES, read_annotations

    records = list(read_annotations(cohort_dir / f"{split}.jsonl"))
    volumes = torch.stack([processor(str(cohort_dir / record.image)) for record in records])
    labels = torch.tensor([CLASS_NAMES.index(record.label) for record in records])
    if plant_cube:
        volumes[:, :, CUBE, CUBE, CUBE] += plant_cube / 2 * labels.view(-1, 1, 1, 1, 1).float()
    return volumes, labels


@torch.no_grad()
def stage_outputs(model, volumes: torch.Tensor, batch_size: int = 16) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Each stage's output (flattened per subject) and the mean cross-attention entropy per layer."""
    outputs: dict[str, list[torch.Tensor]] = {stage: [] for stage in STAGES}
    entropies = []
    for start in range(0, len(volumes), batch_size):
        tokens = model.encode_image(volumes[start:start + batch_size])
        encoded = model.Qformer.bert(
            query_embeds=model.query_tokens.expand(tokens.shape[0], -1, -1),
            encoder_hidden_states=tokens,
            encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long),
            output_attentions=True,
            return_dict=True,
        )
        queries = encoded.last_hidden_state
        for stage, value in zip(STAGES, (tokens, tokens.mean(1), queries, model.llm_proj(queries))):
            outputs[stage].append(value.flatten(1))
        entropies.append([-(a * a.clamp_min(1e-12).log()).sum(-1).mean().item() for a in encoded.cross_attentions])
    return {stage: torch.cat(values) for stage, values in outputs.items()}, torch.tensor(entropies).mean(0).tolist()


def relative_variation(features: torch.Tensor) -> float:
    return ((features - features.mean(0)).pow(2).mean().sqrt() / features.pow(2).mean().sqrt()).item()


def probe_balanced_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                            test_labels: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train.numpy())
    probe = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(train.numpy()), train_labels.numpy())
    return balanced_accuracy_score(test_labels.numpy(), probe.predict(scaler.transform(test.numpy())))


def measure(model, train, test) -> tuple[dict[str, tuple[float, float]], list[float]]:
    train_outputs, _ = stage_outputs(model, train[0])
    test_outputs, entropies = stage_outputs(model, test[0])
    rows = {stage: (relative_variation(test_outputs[stage]),
                    probe_balanced_accuracy(train_outputs[stage], train[1], test_outputs[stage], test[1]))
            for stage in STAGES}
    return rows, entropies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plant-cube", type=float, default=0.0)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="trained checkpoint (default: the demo's image + text checkpoint, if present)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lavis.common.registry import registry

    import lavis_medblip  # noqa: F401  (registers the model and processors)

    if not (COHORT_DIR / "test.jsonl").exists():
        raise SystemExit(f"no demo cohort at {COHORT_DIR}: run `make demo` first")
    processor_cfg = demo_eval_processor_config()
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    train, test = load_split("train", processor, args.plant_cube), load_split("test", processor, args.plant_cube)

    model_class = registry.get_model_class("medblip")
    model_cfg = OmegaConf.load(model_class.default_config_path("demo")).model
    model = model_class.from_config(model_cfg).eval()
    results = {"init": measure(model, train, test)}
    checkpoint = args.checkpoint
    if checkpoint is None and DEFAULT_CHECKPOINT.exists():
        found = sorted(DEFAULT_CHECKPOINT.glob("*/checkpoint_latest.pth"))
        checkpoint = found[-1] if found else None
    if checkpoint is not None:
        model.load_checkpoint(str(checkpoint))
        results["trained"] = measure(model.eval(), train, test)

    print(f"Image evidence per stage: {len(train[1])} training-site and {len(test[1])} held-out subjects, "
          f"planted cube {args.plant_cube}" + (f", trained = {checkpoint}" if checkpoint else ""))
    header = f"{'stage':20s}" + "".join(f"{name + ' variation':>20s}{name + ' probe':>16s}" for name in results)
    print(header)
    for stage in STAGES:
        print(f"{stage:20s}" + "".join(f"{rows[stage][0]:20.4f}{rows[stage][1]:16.3f}" for rows, _ in results.values()))
    with torch.no_grad():
        num_tokens = model.encode_image(test[0][:1]).shape[1]
    for name, (_, entropies) in results.items():
        print(f"cross-attention entropy ({name}), per layer: " + " ".join(f"{value:.3f}" for value in entropies)
              + f"   (uniform: ln {num_tokens} = {math.log(num_tokens):.3f})")


if __name__ == "__main__":
    main()
