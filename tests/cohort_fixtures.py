"""A few subjects made from the real ICBM-2009c template, written in the project's annotation schema."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lavis_medblip.assets import ICBM_T1
from lavis_medblip.annotations.ehr import describe_ehr
from lavis_medblip.annotations.schema import AnnotationRecord, write_annotations

LABELS = ("NC", "MCI", "AD")


def write_small_cohort(root: Path, subjects_per_split: dict[str, int], seed: int = 0) -> Path:
    """NIfTI scans (the template at 4 mm, with noise) + ``annotations/<split>.jsonl``; returns that folder."""
    template = nib.load(ICBM_T1)
    small = ndimage.zoom(np.asarray(template.dataobj, dtype=np.float32), 0.25, order=1)
    affine = template.affine @ np.diag([4, 4, 4, 1])
    rng = np.random.default_rng(seed)
    annotations = root / "annotations"
    number = 0
    for split, count in subjects_per_split.items():
        records = []
        for _ in range(count):
            label = LABELS[number % 3]
            image = Path("scans") / f"sub-{number:03d}.nii.gz"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            volume = small * (1.0 - 0.1 * LABELS.index(label)) + rng.normal(0, 3, small.shape)
            nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), root / image)
            ehr = {"age": float(rng.integers(60, 90)), "sex": "F" if number % 2 else "M", "mmse": 29 - 3 * LABELS.index(label)}
            records.append(AnnotationRecord(image=f"../{image}", subject_id=f"sub-{number:03d}", label=label, split=split,
                                            text=describe_ehr(ehr), visit="bl", cohort="TEST", site="site-a", ehr=ehr))
            number += 1
        write_annotations(annotations / f"{split}.jsonl", records)
    return annotations
