"""Can the demo model's image path learn the diagnosis at all, with the strongest possible signal?
Supervised cross-entropy from a linear head on its pooled image features (options and output:
README, Design notes).

    python benchmarks/image_path_learnability.py [--cohort .cache/demo/cohort] [--inputs demo|head_quantiles]
        [--features vit_mean|queries] [--steps 600] [--set vision.patch_size=16 vision.patch_stride=16]

Needs a simulated cohort (``make demo`` writes one to .cache/demo/cohort).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from torch.nn import functional as F

from image_evidence import demo_eval_processor_config, load_split


def balanced_accuracy(labels: torch.Tensor, predictions: torch.Tensor) -> float:
    from lavis_medblip.annotations.schema import CLASS_NAMES
    from lavis_medblip.tasks.metrics import classification_metrics

    return classification_metrics(labels.tolist(), predictions.tolist(), CLASS_NAMES)["balanced_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=Path(".cache/demo/cohort"))
    parser.add_argument("--features", choices=("vit_mean", "queries"), default="vit_mean")
    parser.add_argument("--inputs", choices=("demo", "head_quantiles"), default="demo")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="demo model overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from lavis.common.registry import registry

    import lavis_medblip  # noqa: F401  (registers the model and processors)

    if not (args.cohort / "test.jsonl").exists():
        raise SystemExit(f"no simulated cohort at {args.cohort}: run `make demo` first")
    processor_cfg = demo_eval_processor_config()
    if args.inputs == "head_quantiles":
        processor_cfg.register_to_template, processor_cfg.template_deviation_scale = False, None
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    splits = {split: load_split(split, processor, 0.0, cohort_dir=args.cohort) for split in ("train", "val", "test")}

    model_class = registry.get_model_class("medblip")
    model_cfg = OmegaConf.load(model_class.default_config_path("demo")).model
    for override in args.set:
        key, value = override.split("=", 1)
        OmegaConf.update(model_cfg, key, yaml.safe_load(value))
    model = model_class.from_config(model_cfg)

    def features(volumes: torch.Tensor) -> torch.Tensor:
        tokens = model.encode_image(volumes)
        return (tokens if args.features == "vit_mean" else model.encode_queries(tokens)).mean(1)

    image_path = [p for name, p in model.named_parameters()
                  if p.requires_grad and not name.startswith(("language_model.", "llm_proj."))]
    with torch.no_grad():
        width = features(splits["train"][0][:1]).shape[-1]
    head = torch.nn.Linear(width, 3)
    optimizer = torch.optim.AdamW([*image_path, *head.parameters()], lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay (as the demo's runner)
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    @torch.no_grad()
    def predict(volumes: torch.Tensor) -> torch.Tensor:
        model.eval()
        predictions = torch.cat([head(features(volumes[i:i + 25])).argmax(1) for i in range(0, len(volumes), 25)])
        model.train()
        return predictions

    volumes, labels = splits["train"]
    order: list[int] = []
    rng, start, losses = random.Random(0), time.perf_counter(), []
    print(f"{len(labels)} training, {len(splits['val'][1])} validation, {len(splits['test'][1])} held-out "
          f"subjects; features {args.features}, inputs {args.inputs}, overrides {args.set}")
    print(f"{'step':>6}{'train loss':>12}{'val bal acc':>13}{'held-out bal acc':>18}  held-out predictions")
    model.train()
    for step in range(1, args.steps + 1):
        if not order:
            order = list(range(len(labels)))
            rng.shuffle(order)
        batch = [order.pop() for _ in range(min(args.batch_size, len(order)))]
        loss = F.cross_entropy(head(features(volumes[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val = balanced_accuracy(splits["val"][1], predict(splits["val"][0]))
            held_out = predict(splits["test"][0])
            counts = torch.bincount(held_out, minlength=3).tolist()
            recent = sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:])
            print(f"{step:>6}{recent:>12.3f}{val:>13.3f}{balanced_accuracy(splits['test'][1], held_out):>18.3f}  "
                  f"NC/MCI/AD {counts}   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
