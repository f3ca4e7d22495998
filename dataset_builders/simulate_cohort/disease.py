"""The disease model: a latent stage per class and an age term give each subject's atrophy index; the atrophy
rates are that index times ``ATROPHY_RATES`` (magnitudes: the package docstring)."""
from __future__ import annotations

from typing import Any

import numpy as np

from dataset_builders.simulate_cohort.fields import capped_rates


#: Latent disease stage per class: (mean, sd) of a normal, clipped to [-0.2, 1.4]; overlapping.
CLASS_SEVERITY = {"NC": (0.0, 0.14), "MCI": (0.45, 0.17), "AD": (0.95, 0.2)}
#: Atrophy index increase per 10 years above REFERENCE_AGE, in every class.
AGE_EFFECT = 0.25
REFERENCE_AGE = 73.0
#: Source strength (~ fractional volume change) per unit atrophy index.
ATROPHY_RATES = {"mtl": 0.48, "ventricles": 0.6, "cortex": 0.08}


def draw_atrophy(rng: np.random.Generator, label: str, age: float, atrophy_scale: float) -> dict[str, Any]:
    mean, sd = CLASS_SEVERITY[label]
    stage = float(np.clip(rng.normal(mean, sd), -0.2, 1.4))
    index = float(np.clip(stage + AGE_EFFECT * (age - REFERENCE_AGE) / 10.0, -0.3, 1.6)) * atrophy_scale
    rates = capped_rates({group: rate * index for group, rate in ATROPHY_RATES.items()}, {})
    return {"disease_stage": stage, "atrophy_index": index, "rates": rates}
