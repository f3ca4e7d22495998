"""The CPU demo's PNG report (``make demo`` writes it to ``.cache/demo/report.png``): what the table says, drawn."""
from __future__ import annotations

from pathlib import Path

from lavis_medblip.annotations.schema import read_annotations
from lavis_medblip.cli.demo import HELD_OUT, ROWS


def write_report(cohort: Path, results: dict, rows: dict, path: Path) -> Path:
    """The demo's PNG report at ``path``: on the held-out anatomy, confusion matrices, the reliability diagram of
    image + text, the LM loss curves, and three subjects' slices with their predicted probabilities."""
    from matplotlib.figure import Figure
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    from lavis_medblip.models.config import load_model_config
    from lavis_medblip.visualize import (draw_confusion_matrix, draw_loss_curves, draw_probabilities,
                                         draw_reliability_diagram, draw_slices)

    split = "test_anatomy"
    records = {record.subject_id: record for record in read_annotations(cohort / f"{split}.jsonl")}
    # the demo model's preprocessing, at twice the size for the pictures, in intensities (not deviations)
    preprocess = load_model_config("demo").preprocess
    processor_cfg = OmegaConf.create(OmegaConf.to_container(preprocess.vis_processor.eval, resolve=True))
    processor_cfg.image_size, processor_cfg.template_deviation_scale = 96, None
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    class_names = rows["image_text"][split]["confusion_matrix"]["labels"]

    figure = Figure(figsize=(15, 11))
    grid = figure.add_gridspec(4, 4)
    for column, variant in enumerate(("image_text", "text_only")):
        metrics = rows[variant][split]
        draw_confusion_matrix(figure.add_subplot(grid[0, column]), metrics["confusion_matrix"],
                              f"{ROWS[variant]}, {HELD_OUT[split]}: bal. acc. {metrics['balanced_accuracy']:.2f}")
    predictions = results["image_text"][split]["predictions"]
    draw_reliability_diagram(figure.add_subplot(grid[0, 2]), [p["probs"] for p in predictions],
                             [p["label"] for p in predictions], f"{ROWS['image_text']}, {HELD_OUT[split]}")
    draw_loss_curves(figure.add_subplot(grid[0, 3]), {f"{ROWS[variant]} LM loss": [step["loss_lm"] for step in steps]
                                                      for variant, steps in results["steps"].items()})
    for row, example in enumerate(predictions[:3], start=1):
        record = records[example["instance_id"].split("/")[0]]
        volume = processor(str(cohort / record.image))[0].numpy()
        draw_slices([figure.add_subplot(grid[row, column]) for column in range(3)], volume,
                    f"{record.subject_id} ({record.label})")
        draw_probabilities(figure.add_subplot(grid[row, 3]), example["probs"], class_names,
                           f"image + text: {class_names[example['prediction']]}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
