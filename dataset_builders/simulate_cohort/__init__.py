"""A deterministic simulated Alzheimer's-atrophy cohort made from one real brain (ICBM 2009c + CerebrA).

Every subject is the ICBM-2009c T1 template (with skull) resampled once, with trilinear
interpolation, through a chain of smooth warps, then "scanned" by one of several sites::

    output voxel --affine--> world y --head pose, size--> y' --atrophy--> y'' --anatomy--> template

Read from the template outwards, this is the subject's story: the template becomes the subject's own
healthy brain (anatomy), that brain atrophies, and the head is placed in the scanner. So atrophy is
relative to each subject's own anatomy, and a model's decision thresholds cannot fit one brain.

* **head pose / size**: a few degrees of rotation and a few mm of translation about the brain centre
  (``HEAD_ROTATION_SD_DEG``, ``HEAD_SHIFT_SD_MM``), and the subject's head size (an anatomy draw);
* **atrophy** (class-dependent): a curl-free displacement ``u = grad(psi)`` with ``laplacian(psi) = s``
  (solved by FFT on a 2 mm grid), where the source ``s`` is a smoothed, signed mask: positive inside
  the hippocampus, amygdala, entorhinal and parahippocampal cortex (pull-back divergence > 0, so these
  structures shrink in the output), positive in the cortex (global thinning) balanced by a negative
  source in the sulcal/extra-cerebral CSF (which widens), and negative in the lateral and
  inferior-lateral ventricles (which enlarge). Left and right are separate basis fields (the
  *structure basis*), so a subject's field is ``sum_k rate_k * u_k`` and costs a few multiply-adds;
* **anatomy** (class-independent, an ``AnatomyFamily``), in pull-back order: a brain torque, a smooth
  random warp, then natural structure sizes -- the structure basis again, with natural rates, sampled
  nearest the template, where the basis lives.

Approximation: the atrophy basis fields stay in template space and are applied at the subject's
coordinates ``y'`` instead of being carried through the subject's anatomy map. The atrophy pattern is
therefore the template's, displaced by the subject's anatomy (~3 mm RMS, more at the walls of
ventricles far from template size). The fields vary over 1-2 cm (Poisson potentials of smoothed
sources), so the shrinkage still falls on the subject's own structures.

Anatomy of the training family (``TRAINING_ANATOMY``); sources are from general knowledge of the
literature, and the measured values are below:

* **intracranial size**: linear head scale sd 0.035 (volume sd ~10%), +-0.02 by sex (men ~12% larger).
  ICV CV ~10%, men 10-12% larger (Buckner et al. 2004, NeuroImage 23:724; ADNI). All structures
  scale with the head (real ones scale sub-linearly), so raw volumes vary a little too much.
* **ventricles**: natural rate ~N(0.3, 0.45) (mean > 0: elderly ventricles are larger than those of
  the young-adult ICBM template), left-right asymmetry sd 0.12. The ventricles' log-volume moves
  ~0.5 per rate unit (measured: rate -0.8 gives 0.64x, +1.4 gives 1.97x the template volume), and
  ``RATE_LIMITS`` caps the rates where the Jacobian stays positive. Lateral ventricle volume CV is
  40-50% among healthy elderly, with a several-fold range (Nestor et al. 2008, Brain 131:2443, ADNI).
* **hippocampus / MTL**: natural rate sd 0.08, asymmetry sd 0.04. Hippocampal volume CV is ~10%
  (ADNI NC). The smooth warp alone already changes the hippocampal volume by ~9% (measured), so the
  rate sd is below the 0.17 that would give 10% on its own. The cortex rate sd is 0.012 (kept from 1.x).
* **smooth warp**: RMS 3 mm, Gaussian smoothing sigma ("correlation length") 25 mm, on an 8 mm control
  grid (``WARP_GRID_MM``). Residual nonlinear shape differences after affine registration are a few
  mm (e.g. Klein et al. 2009, NeuroImage 46:786).
* **brain torque** (petalia): pull-back ``u_x = t tanh((y - y_c) / 40 mm)`` with ``y_c`` the brain
  centre and ``t ~ N(1.5, 1)`` mm. For t > 0 the frontal midline moves left and the occipital one
  right: the usual right-frontal / left-occipital petalia ("Yakovlevian torque") of a few mm (Toga &
  Thompson 2003, Nat Rev Neurosci 4:37).

The held-out family (``HELD_OUT_ANATOMY``, split ``test_anatomy``) is one training never sees: warp
RMS 4 mm with sigma 45 mm (a different field), an anisotropic head (scale sd 0.04 per axis) and a
mirrored torque (mean -1.5 mm). The base is not mirrored left-right: the ICBM 2009c symmetric template
is its own mirror image (its mirrored T1 has identical voxels), so mirroring would only swap label ids.

Jacobians, checked for every subject (generation fails if one is <= 0): ``min_jacobian_atrophy`` of
the atrophy field, and ``min_jacobian_anatomy``, a lower bound for the anatomy map (the product of the
warp's and the natural sizes' minima; the torque is a shear with determinant 1).

Measured on the volumes in ``subjects.jsonl``, taken in the output images (brain mask as the ICV
proxy, soft hippocampus and lateral + inferior-lateral ventricle masks). The cohort is the demo's:
100 subjects/class, seed 0, ``--atrophy-scale 2.5``; version 1.1's values are in brackets:

* NC of the training anatomy (n = 100): ICV CV 0.125 [0.09], men 14% larger; ventricle volume CV
  0.35 [0.20], range 13-58 mL, 4.4x [2.6x] (5th-95th percentile 3.2x); hippocampal CV 0.20 raw,
  0.14 ICV-normalised [0.13]. The age term of the atrophy, exaggerated 2.5x, is part of this;
* NC of the held-out anatomy (n = 25): ICV CV 0.10, ventricles 0.27, hippocampus 0.15 raw / 0.11
  normalised;
* the smallest Jacobians over all 375 subjects: 0.063 for the anatomy (lower bound) and 0.113 for
  the atrophy;
* at the default ``atrophy_scale`` 1 (60/class), among the 60 training-anatomy NC: ICV CV 0.12,
  ventricles 0.35 (3.7x range), hippocampus 0.19 raw / 0.13 normalised;
* generation time: 87 s for the 375 subjects with ``--workers 2`` on 2 busy cores [101 s for 300].

Severity: a latent disease stage ``d`` per class (``CLASS_SEVERITY``, normal, overlapping) plus an
age term present in every class (``AGE_EFFECT`` per 10 years, older means more atrophy) gives the
atrophy index ``A``; the atrophy rates are ``A`` times ``ATROPHY_RATES`` (capped by ``RATE_LIMITS``).
Only the image sees ``A``. All disease-free variation is in the anatomy stage.

EHR (``age, sex, education_years, mmse, cdr_global``) is drawn from class-conditional
distributions loosely following MedBLIP's Table 1 (ADNI), then made weak on purpose: two knobs,

* ``ehr_informativeness`` (kappa in [0, 1], default 0.3): class means of MMSE/education are pulled
  towards the pooled mean and CDR class probabilities mixed with the pooled ones by ``1 - kappa``,
  and MMSE gets extra measurement noise growing with ``1 - kappa``;
* ``missing_prob`` (default 0.4): each field is independently missing (``null`` in ``ehr``,
  omitted from ``text`` by :func:`lavis_medblip.annotations.ehr.describe_ehr`).

:class:`EHRDistribution` holds these distributions; :func:`ehr_log_likelihood` scores a recorded EHR under
them, so the Bayes-optimal reader of the text is known (``benchmarks/text_only_vs_regression.py``: 0.54
balanced accuracy on 1,125 EHRs of the demo's settings).

With the defaults (measured on 60 subjects/class, seed 0, train on ``train``, test on ``test``):
logistic regression on the recorded EHR fields reaches ~0.45 balanced accuracy (0.45 on 6000
simulated EHRs; measured at version 1.1, and 2.0 draws the same EHRs), on the ICV-normalised
hippocampus and log ventricle volumes measured in the images 0.58 on ``test`` and 0.53 on
``test_anatomy`` (chance 0.33; 1.1: ~0.7 on ``test``). On the demo's cohort (100/class,
``--atrophy-scale 2.5``) the same regression reaches 0.68 and 0.57 [1.1: 0.81 on ``test``]. Raise
``ehr_informativeness`` / lower ``missing_prob`` for a more informative text; ``atrophy_scale``
scales the image signal.

Sites (``SITES``): three training sites and one held-out site, each with its own voxel size
(anisotropic for some), field of view (crop/pad and centre), stored orientation (RAS, LPS, a
permuted sagittal PIR, and the held-out LIA; the affine is always right, so
``nibabel.as_closest_canonical`` recovers RAS anatomy), data type and intensity scale, contrast
(gamma), smooth multiplicative bias field and Gaussian or Rician noise. The held-out site differs
from every training site in voxel size, orientation, dtype, contrast, bias and noise.

Output layout (one annotation file per split, all at the root, image paths relative to it)::

    OUT/cohort.json                    generation parameters, seed, version, sites, counts (cache key)
    OUT/train.jsonl, val.jsonl, test.jsonl, test_anatomy.jsonl
                                       lavis_medblip.annotations.schema records ("split" also set;
                                       "test" in both held-out files: the schema knows no other)
    OUT/subjects.jsonl                 ground truth per subject (split, severity, atrophy rates,
                                       anatomy draws, complete EHR, volumes measured in the output
                                       image, min Jacobians); not for training
    OUT/images/<site>/<subject>.nii.gz the T1 volume
    OUT/labels/<site>/<subject>.nii.gz warped CerebrA labels (only with save_labels=True)

Splits (``COHORT_SPLITS``): the training-anatomy subjects of the training sites go to
``train``/``val`` (subject-wise, stratified by class); the held-out site's subjects are ``test``
(``test_fraction`` of each class, training anatomy); ``test_anatomy`` holds as many more subjects per
class, of the held-out anatomy family at the training sites. Ids (``<site>-<number>``, numbered in a
shuffled order per site) name no class, and at a training site no split. Everything is
deterministic by seed: each subject's random numbers come from
``numpy.random.default_rng([seed, class_index, k])``, so volumes and annotations are byte-identical
across reruns, orderings and worker counts. A rerun whose parameters match
``cohort.json`` (and whose files exist) is a cache hit and does nothing.

Usage::

    python -m dataset_builders.simulate_cohort --out data/sim --subjects-per-class 60 --seed 0
    python -m dataset_builders.simulate_cohort --out /tmp/sim --subjects-per-class 4 --voxel-mm 4

    from dataset_builders.simulate_cohort import simulate_cohort
    result = simulate_cohort("data/sim", subjects_per_class=60, seed=0)
    result.annotation_files["train"]   # Path to train.jsonl

Where each part lives (``dataset_builders/simulate_cohort/``): ``fields.py`` the template, the structure basis
and the warps; ``anatomy.py`` the class-independent anatomy families; ``disease.py`` the atrophy model;
``ehr.py`` the EHR model; ``sites.py`` the scanners; ``subject.py`` one subject's scan, EHR and ground truth;
``cohort.py`` the plan, the files and the command line.
"""
from dataset_builders.simulate_cohort.anatomy import (
    ANATOMY_FAMILIES, HELD_OUT_ANATOMY, TRAINING_ANATOMY, AnatomyFamily,
)
from dataset_builders.simulate_cohort.cohort import (
    COHORT_NAME, COHORT_SPLITS, GENERATOR_VERSION, CohortResult, main, plan_cohort, simulate_cohort,
    simulate_ehr_records,
)
from dataset_builders.simulate_cohort.ehr import EHRDistribution, ehr_log_likelihood
from dataset_builders.simulate_cohort.fields import (
    AMYGDALA, BASIS_NAMES, ENTORHINAL, HIPPOCAMPUS, INFERIOR_LATERAL_VENTRICLE, LATERAL_VENTRICLE, PARAHIPPOCAMPAL,
    RATE_LIMITS, VENTRICLE_IDS, jacobian_determinant, structure_basis, structure_displacement,
)
from dataset_builders.simulate_cohort.sites import HELD_OUT_SITE, SITES, TRAINING_SITES, Site
from dataset_builders.simulate_cohort.subject import SimulatedSubject, SubjectSpec, simulate_subject

__all__ = [
    "AMYGDALA", "ENTORHINAL", "INFERIOR_LATERAL_VENTRICLE", "LATERAL_VENTRICLE", "PARAHIPPOCAMPAL",
    "ANATOMY_FAMILIES", "BASIS_NAMES", "COHORT_NAME", "COHORT_SPLITS", "GENERATOR_VERSION", "HELD_OUT_ANATOMY",
    "HELD_OUT_SITE", "HIPPOCAMPUS", "RATE_LIMITS", "SITES", "TRAINING_ANATOMY", "TRAINING_SITES", "VENTRICLE_IDS",
    "AnatomyFamily", "CohortResult", "EHRDistribution", "SimulatedSubject", "Site", "SubjectSpec",
    "ehr_log_likelihood", "jacobian_determinant", "main", "plan_cohort", "simulate_cohort", "simulate_ehr_records",
    "simulate_subject", "structure_basis", "structure_displacement",
]
