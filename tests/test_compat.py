"""lavis_medblip.compat: each shim applies exactly where the installed transformers lacks the feature.

``make test`` runs this file twice: on the lock (transformers 4.51.3, where every shim must be a no-op)
and on requirements/newest.txt (transformers 4.57.6, where each must be applied).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
import transformers.modeling_utils as modeling_utils
import transformers.pytorch_utils as pytorch_utils

import lavis  # noqa: F401  (imported through the plugin's finder, so the shims are in place)
from lavis_medblip import compat
from test_light_imports import run_python


def test_in_a_fresh_interpreter_exactly_the_missing_features_are_shimmed():
    found = json.loads(run_python("""
        import json
        import transformers.modeling_utils as modeling_utils
        from transformers import GenerationMixin, PreTrainedModel
        from lavis_medblip import compat
        missing = [name for name in compat.PYTORCH_UTILS_NAMES if not hasattr(modeling_utils, name)]
        generates = issubclass(PreTrainedModel, GenerationMixin)
        import lavis
        print(json.dumps({"missing": missing, "generates": generates, "applied": compat.applied()}))
    """))
    reexported = [name.rpartition(".")[2] for name in found["applied"] if name.startswith("transformers.modeling_utils.")]
    given_generation = sorted(name.split(" + ")[0] for name in found["applied"] if name.endswith("+ GenerationMixin"))
    assert reexported == found["missing"]
    if found["generates"]:  # transformers <= 4.51: nothing to give
        assert given_generation == []
    else:
        assert given_generation == sorted([
            "lavis.models.blip2_models.Qformer.BertLMHeadModel", "lavis.models.blip2_models.modeling_opt.OPTForCausalLM",
            "lavis.models.blip2_models.modeling_t5.T5ForConditionalGeneration", "lavis.models.med.BertForMaskedLM",
            "lavis.models.med.BertLMHeadModel"])
    if transformers.__version__ == "4.51.3":  # the lock: the module must change nothing
        assert found["applied"] == []


def test_a_missing_name_is_taken_from_pytorch_utils(monkeypatch):
    monkeypatch.delattr(modeling_utils, "prune_linear_layer", raising=False)
    compat.before_lavis()
    assert modeling_utils.prune_linear_layer is pytorch_utils.prune_linear_layer


@pytest.mark.parametrize("module", ["lavis.models.blip2_models.Qformer", "lavis.models.med"])
def test_lavis_bert_lm_heads_generate_with_a_generation_config(module):
    lavis_module = __import__(module, fromlist=["BertLMHeadModel"])
    config = lavis_module.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, add_cross_attention=False,
                                     add_type_embeddings=False, encoder_width=16, cross_attention_freq=1)
    model = lavis_module.BertLMHeadModel(config).eval()
    assert isinstance(model, transformers.GenerationMixin) and model.generation_config is not None
    queries = {"query_embeds": torch.zeros(1, 1, 16)} if module.endswith("Qformer") else {}  # its own generate's
    out = model.generate(input_ids=torch.tensor([[1, 2]]), max_length=5, min_length=5, num_beams=2,
                         pad_token_id=0, eos_token_id=None, **queries)
    assert out.shape == (1, 5)
