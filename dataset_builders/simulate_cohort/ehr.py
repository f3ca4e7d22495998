"""The EHR model (ADNI-like, Table 1 of the paper, made weak on purpose): what a subject's record is drawn from,
and its likelihood, so that the Bayes-optimal reader of the text is known."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from lavis_medblip.annotations.schema import CLASS_NAMES


#: Per class: (mean, sd) of each number, P(male), P(each CDR value); loosely MedBLIP's Table 1 (ADNI), before
#: ``ehr_informativeness`` pulls the classes together.
EHR_AGE = {"NC": (74.0, 6.0), "MCI": (73.0, 8.0), "AD": (75.0, 8.0)}
EHR_P_MALE = {"NC": 0.48, "MCI": 0.58, "AD": 0.55}
EHR_EDUCATION = {"NC": (16.4, 2.7), "MCI": (15.9, 2.9), "AD": (15.2, 3.0)}
EHR_MMSE = {"NC": (29.0, 1.1), "MCI": (27.5, 1.8), "AD": (23.3, 2.1)}
CDR_VALUES = (0.0, 0.5, 1.0, 2.0)
AGE_RANGE, EDUCATION_RANGE, MMSE_RANGE = (55.0, 95.0), (6, 20), (10, 30)
EHR_CDR_P = {"NC": (0.94, 0.06, 0.0, 0.0), "MCI": (0.04, 0.92, 0.04, 0.0), "AD": (0.0, 0.55, 0.40, 0.05)}


@dataclass(frozen=True)
class EHRDistribution:
    """The simulator's EHR model of one class at one informativeness (kappa): what :func:`draw_ehr` draws from
    and :func:`ehr_log_likelihood` scores. Numbers are drawn as normals, then clipped and rounded."""

    age: tuple[float, float]  # mean, sd (years; clipped to AGE_RANGE, rounded to 0.1)
    p_male: float
    education: tuple[float, float]  # mean, sd (years; clipped to EDUCATION_RANGE, rounded)
    mmse: tuple[float, float]  # mean, sd with measurement noise (clipped to MMSE_RANGE, rounded)
    cdr: tuple[float, ...]  # probability of each of CDR_VALUES

    @classmethod
    def of(cls, label: str, kappa: float) -> "EHRDistribution":
        def pulled(table: dict) -> tuple[float, float]:
            pooled = float(np.mean([mean for mean, _ in table.values()]))
            mean, sd = table[label]
            return pooled + kappa * (mean - pooled), sd

        mmse_mean, mmse_sd = pulled(EHR_MMSE)
        pooled_cdr = np.mean([EHR_CDR_P[name] for name in CLASS_NAMES], axis=0)
        p_cdr = kappa * np.asarray(EHR_CDR_P[label]) + (1.0 - kappa) * pooled_cdr
        return cls(age=EHR_AGE[label], p_male=EHR_P_MALE[label], education=pulled(EHR_EDUCATION),
                   mmse=(mmse_mean, math.hypot(mmse_sd, 2.5 * (1.0 - kappa))),  # noise grows as kappa falls
                   cdr=tuple(p_cdr / p_cdr.sum()))


def draw_ehr(rng: np.random.Generator, label: str, kappa: float, missing_prob: float) -> tuple[dict, dict]:
    """Complete (true) EHR and the recorded one with missing fields set to None."""
    model = EHRDistribution.of(label, kappa)
    age = float(np.clip(rng.normal(*model.age), *AGE_RANGE))
    sex = "M" if rng.random() < model.p_male else "F"
    education = int(np.clip(round(rng.normal(*model.education)), *EDUCATION_RANGE))
    mmse = int(np.clip(round(rng.normal(*model.mmse)), *MMSE_RANGE))
    cdr = float(CDR_VALUES[int(rng.choice(len(CDR_VALUES), p=model.cdr))])
    true = {"age": round(age, 1), "sex": sex, "education_years": education, "mmse": mmse, "cdr_global": cdr}
    missing = rng.random(len(true)) < missing_prob
    shown = {key: (None if gone else value) for (key, value), gone in zip(true.items(), missing)}
    return true, shown


def ehr_log_likelihood(ehr: dict[str, Any], label: str, kappa: float) -> float:
    """log p(recorded EHR | class) under the simulator's EHR model, for the Bayes-optimal reader of the text.

    Fields go missing independently of the class, so a missing one (None) adds nothing. Integers and ages are
    the probabilities of their rounding intervals (at a clipping bound: everything beyond it).
    """
    model = EHRDistribution.of(label, kappa)

    def interval(value: float, mean_sd: tuple[float, float], bounds: tuple[float, float], step: float) -> float:
        low = -np.inf if value <= bounds[0] else value - step / 2
        high = np.inf if value >= bounds[1] else value + step / 2
        return float(np.log(max(norm.cdf(high, *mean_sd) - norm.cdf(low, *mean_sd), 1e-300)))

    log_likelihood = 0.0
    if ehr.get("age") is not None:
        log_likelihood += interval(ehr["age"], model.age, AGE_RANGE, 0.1)
    if ehr.get("sex") is not None:
        log_likelihood += math.log(model.p_male if ehr["sex"] == "M" else 1.0 - model.p_male)
    if ehr.get("education_years") is not None:
        log_likelihood += interval(ehr["education_years"], model.education, EDUCATION_RANGE, 1.0)
    if ehr.get("mmse") is not None:
        log_likelihood += interval(ehr["mmse"], model.mmse, MMSE_RANGE, 1.0)
    if ehr.get("cdr_global") is not None:
        log_likelihood += math.log(max(model.cdr[CDR_VALUES.index(ehr["cdr_global"])], 1e-300))
    return log_likelihood
