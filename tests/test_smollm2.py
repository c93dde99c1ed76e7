"""A real pretrained model (SmolLM2-135M, from a registry package) through our runtime, offline."""

from __future__ import annotations

import pytest
import torch

from lt2convert import load_model

pytestmark = pytest.mark.asset
PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def smollm2(fetched_asset):
    return fetched_asset("smollm2-135m")


def test_runtime_logits_equal_transformers_llama(smollm2):
    from transformers import LlamaForCausalLM

    ours = load_model("smollm2-135m", dtype="fp32")
    assert ours.config.total_ut_steps == 1 and ours.config.num_key_value_heads == 3
    theirs = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= PARITY_TOL


def test_greedy_decoding_names_paris(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = load_model(smollm2, dtype="fp32")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    completion = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in completion, completion
