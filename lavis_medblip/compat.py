"""What LAVIS 1.0.2 needs from newer transformers releases, applied only where a release lacks it.

LAVIS 1.0.2 was written against transformers 4.2x. Two changes since then break it:

* transformers 4.56 stopped re-exporting ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``
  and ``prune_linear_layer`` from ``transformers.modeling_utils`` (they live in ``transformers.pytorch_utils``);
  LAVIS's ``med.py``, ``Qformer.py`` and ``nlvr_encoder.py`` import them from there, so ``import lavis``
  fails. :func:`before_lavis` puts them back.
* transformers 4.50 announced, and 4.52 did, that ``PreTrainedModel`` no longer inherits ``GenerationMixin``:
  LAVIS's own BERT (Q-Former, ``med.py``), T5 and OPT classes then have no ``.generate`` and no
  ``generation_config``. :func:`after_lavis` gives each LAVIS model class that defines
  ``prepare_inputs_for_generation`` ``GenerationMixin`` as a last base, before any is instantiated, so
  ``PreTrainedModel.__init__`` gives each instance its generation config as for any generative model.

Each shim checks for the feature itself (never a version string), so on transformers 4.51.3 both are no-ops.

Not supported, measured with transformers 5.25.0 (huggingface_hub 2.4.0, tokenizers 0.23.3), in this order:
``find_pruneable_heads_and_indices`` is gone from ``pytorch_utils`` too and ``transformers.utils.model_parallel_utils``
(LAVIS's T5) is gone, so ``import lavis`` fails; past that, LAVIS's models call ``init_weights()`` in ``__init__``
where 5.x needs ``post_init()`` (``all_tied_weights_keys`` is unset); ``ModuleUtilsMixin`` lost
``get_extended_attention_mask``, ``invert_attention_mask`` and ``get_head_mask``, which LAVIS's BERT calls;
and ``BertTokenizer`` lost ``additional_special_tokens_ids`` (LAVIS's BLIP tokenizer, the caption model). A
probe mending all of that (~100 lines, mostly copied from 4.57) got the MedBLIP model tests to pass, not the
caption ones. numpy 2 needs no shim: opencv-python-headless 4.11 and decord 0.6 import and read under 2.4.6;
only ``Posterize`` of LAVIS's ``RandomAugment`` raises there (``np.uint8(255 << n)``), which no LAVIS
processor's list of augmentations includes.
:func:`applied` lists what was done in this process. Neither function touches LAVIS's installed files.
Called by :mod:`lavis_medblip_autoregister` (right before LAVIS's ``__init__`` runs) and by
:func:`lavis_medblip.registration.register_all` (right after); importing this module imports nothing heavy.
"""
from __future__ import annotations

import sys

#: Names LAVIS imports from ``transformers.modeling_utils`` that 4.56+ keeps only in ``transformers.pytorch_utils``.
PYTORCH_UTILS_NAMES = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")

_applied: list[str] = []


def applied() -> list[str]:
    """The shims applied in this process, e.g. ``['transformers.modeling_utils.prune_linear_layer', ...]``."""
    return list(_applied)


def before_lavis() -> None:
    """Make ``transformers`` importable by LAVIS 1.0.2 (transformers 4.56+); idempotent."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in PYTORCH_UTILS_NAMES:
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):  # transformers >= 4.56
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
            _applied.append(f"transformers.modeling_utils.{name}")


def after_lavis() -> None:
    """Give LAVIS's generative model classes ``GenerationMixin`` (transformers 4.52+); idempotent."""
    from transformers import GenerationMixin, PreTrainedModel

    if issubclass(PreTrainedModel, GenerationMixin):  # transformers <= 4.51: every model generates
        return
    for name, module in list(sys.modules.items()):
        if not name.startswith("lavis.") or module is None:
            continue
        for cls in list(vars(module).values()):
            if (isinstance(cls, type) and cls.__module__ == name and issubclass(cls, PreTrainedModel)
                    and "prepare_inputs_for_generation" in vars(cls) and not issubclass(cls, GenerationMixin)):
                cls.__bases__ = (*cls.__bases__, GenerationMixin)
                _applied.append(f"{name}.{cls.__qualname__} + GenerationMixin")
