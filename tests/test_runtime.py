"""The looped runtime against an independent implementation of the Ouro spec, and cache/decoding invariants."""

from __future__ import annotations

import pytest
import torch
from ouro_reference import reference_logits
from safetensors.torch import load_file

from lt2convert import load_model
from lt2convert.costs import cache_bytes
from lt2convert.testing import llama_config, ouro_config, write_checkpoint

FP32_TOL = 1e-5
SEQ = 11


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def ouro_dir(request, tmp_path_factory):
    config = ouro_config(num_key_value_heads=request.param)
    return write_checkpoint(tmp_path_factory.mktemp(f"ouro_kv{request.param}"), config, seed=request.param)


@pytest.fixture(scope="module")
def ouro_model(ouro_dir):
    return load_model(ouro_dir)


@pytest.fixture(scope="module")
def ouro_reference_inputs(ouro_dir):
    import json

    config = json.loads((ouro_dir / "config.json").read_text())
    state = load_file(str(ouro_dir / "model.safetensors"))
    ids = torch.randint(0, config["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(7))
    return state, config, ids


EXIT_MODES = [
    pytest.param({}, id="default"),
    *[pytest.param({"exit_at_step": k}, id=f"step{k}") for k in range(4)],
    pytest.param({"use_weighted_exit": True}, id="weighted"),
    pytest.param({"exit_threshold": 0.5}, id="threshold0.5"),
]


@pytest.mark.parametrize("mode", EXIT_MODES)
def test_logits_match_independent_reference(ouro_model, ouro_reference_inputs, mode):
    state, config, ids = ouro_reference_inputs
    expected = reference_logits(state, config, ids, **mode)
    with torch.no_grad():
        got = ouro_model(ids, use_cache=False, **mode).logits
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= FP32_TOL


def test_threshold_half_really_exits_early(ouro_model, ouro_reference_inputs):
    """Guards the threshold test against a model whose tokens all leave at the last step anyway."""
    _, _, ids = ouro_reference_inputs
    with torch.no_grad():
        probs = ouro_model(ids, use_cache=False).exit_probs
    exit_step = (probs.cumsum(0) >= 0.5).float().argmax(0)
    assert exit_step.min() < probs.shape[0] - 1
    assert torch.allclose(probs.sum(0), torch.ones_like(probs[0]), atol=1e-6)


@pytest.mark.parametrize("step", [0, 1, 2, 3, None])
def test_cached_decoding_equals_full_forward(ouro_model, step):
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    mode = {} if step is None else {"exit_at_step": step}
    with torch.no_grad():
        full = ouro_model(ids, use_cache=False, **mode).logits
        out = ouro_model(ids[:, :5], use_cache=True, **mode)
        pieces, cache = [out.logits], out.cache
        for t in range(5, SEQ):
            out = ouro_model(ids[:, t : t + 1], cache=cache, use_cache=True, **mode)
            pieces.append(out.logits)
    assert relative_error(torch.cat(pieces, dim=1), full) <= FP32_TOL


def test_cache_has_one_slot_per_step_and_layer(ouro_model):
    config = ouro_model.config
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        cache = ouro_model(ids, use_cache=True).cache
    assert len(cache) == config.num_hidden_layers * config.total_ut_steps
    keys = [
        cache.slot(t, i)["k"] for t in range(config.total_ut_steps) for i in range(config.num_hidden_layers)
    ]
    # Every slot owns distinct keys: a shared slot would make two steps' keys identical.
    assert all(not torch.equal(keys[0], k) for k in keys[1:])
    assert cache.nbytes() == cache_bytes(config, 6, "fp32")


def test_generate_greedy_matches_uncached_argmax(ouro_model):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(11))
    generated = ouro_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = ouro_model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(generated, ids)


def test_generate_sampling_is_seeded_and_uses_the_cache(ouro_model):
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(5))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0
    )
    torch.manual_seed(0)
    first = ouro_model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    second = ouro_model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    uncached = ouro_model.generate(prompt, use_cache=False, **kwargs)
    assert first.shape == (1, 12)
    assert torch.equal(first, second)
    assert torch.equal(first, uncached)


def test_left_padded_batch_generates_like_single_prompts(ouro_model):
    short = torch.tensor([[5, 6, 7]])
    long = torch.tensor([[9, 8, 7, 6, 5]])
    batch = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    opts = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    together = ouro_model.generate(batch, attention_mask=mask, **opts)
    alone = [ouro_model.generate(p, attention_mask=torch.ones_like(p), **opts)[0, -4:] for p in (short, long)]
    assert torch.equal(together[0, -4:], alone[0])
    assert torch.equal(together[1, -4:], alone[1])


def test_exit_at_step_out_of_range_is_an_error(ouro_model):
    with pytest.raises(ValueError, match="exit_at_step=4"):
        ouro_model(torch.tensor([[1, 2]]), exit_at_step=4)


def test_sharded_checkpoint_loads_identically(tmp_path):
    config = ouro_config(num_key_value_heads=2)
    single = load_model(write_checkpoint(tmp_path / "single", config, seed=1))
    sharded = load_model(write_checkpoint(tmp_path / "sharded", config, seed=1, shards=3))
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_checkpoint_keeps_its_dtype_and_exit_gate_in_fp32(tmp_path):
    model = load_model(write_checkpoint(tmp_path, ouro_config(torch_dtype="bfloat16"), dtype=torch.bfloat16))
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]))
    assert out.exit_probs.dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make_config", "hf_class"),
    [
        pytest.param(lambda: llama_config(), "LlamaForCausalLM", id="llama-tied-gqa"),
        pytest.param(
            lambda: llama_config(
                tie_word_embeddings=False,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
            "LlamaForCausalLM",
            id="llama3-rope-untied",
        ),
        pytest.param(
            lambda: llama_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
            "Qwen2ForCausalLM",
            id="qwen2-bias",
        ),
    ],
)
def test_llama_family_matches_transformers(tmp_path, make_config, hf_class):
    import transformers

    folder = write_checkpoint(tmp_path, make_config(), seed=2)
    ours = load_model(folder)
    theirs = getattr(transformers, hf_class).from_pretrained(folder).eval()
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids).logits) <= FP32_TOL
        ours_gen = ours.generate(
            ids[:, :6],
            attention_mask=torch.ones_like(ids[:, :6]),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
        theirs_gen = theirs.generate(
            ids[:, :6],
            attention_mask=torch.ones_like(ids[:, :6]),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(ours_gen, theirs_gen)


def test_auto_classes_resolve_ouro_without_remote_code(ouro_dir, ouro_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    import lt2convert  # noqa: F401  (registration happens on import)

    assert type(AutoConfig.from_pretrained(ouro_dir)).__name__ == "OuroConfig"
    auto = AutoModelForCausalLM.from_pretrained(ouro_dir).eval()  # config.json carries an auto_map: ignored
    assert type(auto).__name__ == "OuroForCausalLM"
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, ouro_model(ids).logits)


def classic_decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """The decoding loop written the pre-transformers-5 way: prefill, then one token at a time, `past_key_values`."""
    out = model(ids[:, :prefill], use_cache=True)
    pieces, past = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_key_values
    return torch.cat(pieces, dim=1)


def test_classic_past_key_values_loop_equals_full_forward(ouro_model):
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = ouro_model(ids, use_cache=False).logits
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            stepped = classic_decode_logits(ouro_model, ids, prefill=4)
    assert (stepped - full).abs().max().item() <= FP32_TOL


def test_unknown_keyword_is_a_type_error(ouro_model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="foo"):
        ouro_model(ids, foo=1)


def test_foreign_cache_object_is_refused(ouro_model):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="LoopedCache"):
        ouro_model(torch.tensor([[1, 2, 3]]), cache=DynamicCache())


def test_return_dict_false_gives_a_tuple(ouro_model):
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        as_tuple = ouro_model(ids, use_cache=False, return_dict=False)
        as_output = ouro_model(ids, use_cache=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_output.logits)


def test_import_is_light_and_registers_when_transformers_loads_auto_classes(ouro_dir):
    """`import lt2convert` imports neither torch nor transformers, yet the Auto classes know ouro/lt2 afterwards,
    including when transformers first loads them from inside one of its own modules (modeling_layers does)."""
    import subprocess
    import sys

    script = f"""
import sys
import lt2convert
assert "torch" not in sys.modules and "transformers" not in sys.modules, "heavy import at import lt2convert"
import transformers.modeling_layers  # loads the Auto classes while modeling_layers is half-imported
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(ouro_dir)!r})
print(type(model).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "OuroForCausalLM"
