"""Adaptive exit in decoding: the cache-fill policy against an independent parallel implementation, threshold 1
as today's runtime, and the compute it skips."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.modeling import LoopedCache, LT2Config, LT2ForCausalLM
from lt2convert.testing import SMALL_OURO_SHAPE, ouro_config, write_checkpoint

FP32_TOL = 1e-5
STEPS = 4
PROMPT = 4
SEQ = 12
MIXES = {
    "attention": ["full_attention", "full_attention"],
    "gdn": ["gdn", "full_attention"],
    "swa_sinks": ["swa", "swa_gdn"],
    "dsa": ["dsa", "gdn"],
}


def tiny_model(layer_types: list[str], seed: int = 0) -> LT2ForCausalLM:
    """A tiny looped model whose exit gate sends tokens out at different steps (a steep gate on random states)."""
    config = LT2Config(
        **{**SMALL_OURO_SHAPE, "total_ut_steps": STEPS},
        vocab_size=128,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        max_position_embeddings=64,
        dsa_topk=3,
        dsa_index_n_heads=2,
        swa_window=3,
        swa_sinks=2,
        eos_token_id=None,  # generate() runs the full length
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LT2ForCausalLM(config).eval()
    with torch.no_grad():
        gate = model.model.early_exit_gate
        gate.weight.normal_(0.0, 1.0)
        gate.bias.fill_(-1.0)
        for name, param in model.named_parameters():  # swa_gdn's memory switched on
            if name.endswith("gdn_gate"):
                param.fill_(0.5)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def decode(model: LT2ForCausalLM, ids: torch.Tensor, **mode) -> tuple[torch.Tensor, torch.Tensor | None, LoopedCache]:
    """Prefill PROMPT tokens, then decode the rest one at a time -> (decoded tokens' logits, exit steps, cache)."""
    cache = model(ids[:, :PROMPT], use_cache=True, **mode).cache
    logits, exits = [], []
    for t in range(PROMPT, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True, **mode)
        logits.append(out.logits)
        exits.append(out.exit_steps)
    return torch.cat(logits, 1), torch.cat(exits, 1) if exits[0] is not None else None, cache


def reference_policy(
    model: LT2ForCausalLM, ids: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, LoopedCache]:
    """The policy's parallel form, written independently: one pass over the whole sequence (prefill kernels),
    layer by layer. At step s, a token that exited at e < s presents its step-e input to every layer and keeps
    its step-e output; prompt tokens never exit. -> (logits, exit steps of the decoded tokens, cache)."""
    inner, config = model.model, model.config
    cache = LoopedCache(config.num_hidden_layers, STEPS)
    h = inner.embed_tokens(ids)
    ctx = inner.mixer_context(h, None, None, 0)
    exit_at = torch.full(ids.shape, STEPS - 1)
    done = torch.zeros(ids.shape, dtype=torch.bool)
    may_exit = (torch.arange(ids.shape[1]) >= PROMPT).expand_as(ids)
    inputs: list[list[torch.Tensor]] = []  # inputs[step][layer]
    outputs: list[torch.Tensor] = []
    survive, mass = torch.ones(ids.shape), torch.zeros(ids.shape)
    for step in range(STEPS):
        inputs.append([])
        for i, layer in enumerate(inner.layers):
            if step:
                earlier = torch.stack([inputs[e][i] for e in range(step)])
                frozen = earlier.gather(0, exit_at.clamp(max=step - 1)[None, ..., None].expand_as(earlier[:1]))[0]
                h = torch.where(done[..., None], frozen, h)
            inputs[step].append(h)
            h = layer(h, ctx, cache.slot(step, i))
        h = inner.norm(h)
        if step:
            kept = torch.stack(outputs).gather(0, exit_at.clamp(max=step - 1)[None, ..., None].expand_as(h[None]))[0]
            h = torch.where(done[..., None], kept, h)
        outputs.append(h)
        if step < STEPS - 1:
            gate = inner.early_exit_gate
            lam = torch.sigmoid(h.float() @ gate.weight.float()[0] + gate.bias.float())
            mass, survive = mass + lam * survive, survive * (1 - lam)
            leaving = (mass >= threshold) & may_exit & ~done
            exit_at = torch.where(leaving, step, exit_at)
            done = done | leaving
    final = torch.stack(outputs).gather(0, exit_at[None, ..., None].expand_as(h[None]))[0]
    cache.seen_tokens = ids.shape[1]
    return model.lm_head(final), exit_at[:, PROMPT:], cache


def slot_contents(model: LT2ForCausalLM, cache: LoopedCache) -> list[dict[str, torch.Tensor]]:
    """Each slot's filled state: attention/DSA keys up to their length, the SWA sinks and ring, GDN states."""
    config = model.config
    contents = []
    for step in range(STEPS):
        for layer, mixer in enumerate(config.layer_types):
            slot, kept = cache.slot(step, layer), {}
            for name, value in slot.items():
                if not torch.is_tensor(value):
                    kept[name] = torch.tensor(value)
                elif mixer == "full_attention":
                    kept[name] = value[:, :, : slot["length"]]
                elif mixer == "dsa":
                    kept[name] = value[:, : slot["length"]]
                elif name in ("k", "v"):  # SWA: sinks (all filled: the prompt is longer) and the full ring
                    kept[name] = value[:, :, : config.swa_sinks + config.swa_window]
                else:
                    kept[name] = value
            contents.append(kept)
    return contents


def assert_same_caches(model: LT2ForCausalLM, got: LoopedCache, expected: LoopedCache) -> None:
    assert got.seen_tokens == expected.seen_tokens
    for a, b in zip(slot_contents(model, got), slot_contents(model, expected), strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert relative_error(a[name].float(), b[name].float()) <= FP32_TOL, name


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mix", MIXES)
def test_decoding_with_adaptive_exit_equals_the_parallel_policy(mix, batch):
    model = tiny_model(MIXES[mix])
    ids = torch.randint(0, 128, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    threshold = 0.5
    with torch.no_grad():
        logits, exits, cache = decode(model, ids, exit_threshold=threshold)
        expected, expected_exits, expected_cache = reference_policy(model, ids, threshold)
        prompt_cache = model(ids[:, :PROMPT], use_cache=True).cache
        parallel = model(ids[:, PROMPT:], cache=prompt_cache, exit_threshold=threshold, adaptive_exit=True)
    assert torch.equal(exits, expected_exits)
    assert torch.equal(parallel.exit_steps, expected_exits)
    # The test means something only if tokens exit at different steps, some before the last.
    assert len(exits.unique()) >= 2 and exits.min() < STEPS - 1
    assert relative_error(logits, expected[:, PROMPT:]) <= FP32_TOL
    assert relative_error(parallel.logits, expected[:, PROMPT:]) <= FP32_TOL
    assert_same_caches(model, cache, expected_cache)
    assert_same_caches(model, parallel.cache, expected_cache)


def test_the_policy_changes_later_tokens():
    """Guards the test above: the copied keys of exited tokens differ from their own later steps' keys, so a
    decode that recomputed every step would disagree with the reference."""
    model = tiny_model(MIXES["gdn"])
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adaptive, _, _ = decode(model, ids, exit_threshold=0.5)
        every_step, _, _ = decode(model, ids, exit_threshold=0.5, adaptive_exit=False)
    assert relative_error(adaptive, every_step) > 1e-3


def saturated_gate_model() -> LT2ForCausalLM:
    """A gate so sure that the fp32 exit mass reaches 1.0 at step 0: threshold 1 'exits' there by selection."""
    model = tiny_model(MIXES["gdn"])
    with torch.no_grad():
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(30.0)
    return model


@pytest.mark.parametrize("make_model", [lambda: tiny_model(MIXES["swa_sinks"]), saturated_gate_model])
def test_threshold_one_decodes_exactly_as_before(make_model):
    model = make_model()
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        default, default_exits, default_cache = decode(model, ids)
        explicit, _, explicit_cache = decode(model, ids, exit_threshold=1.0)
        every_step, _, every_cache = decode(model, ids, exit_threshold=1.0, adaptive_exit=False)
    assert default_exits is None
    assert torch.equal(default, every_step) and torch.equal(explicit, every_step)
    for a, b in zip(slot_contents(model, default_cache), slot_contents(model, every_cache), strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)
    for a, b in zip(slot_contents(model, explicit_cache), slot_contents(model, every_cache), strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)


def count_layer_calls(model: LT2ForCausalLM) -> list[int]:
    """A running count of MLP and mixer calls (each decoder layer has one of each per loop step it runs)."""
    calls = [0]
    for layer in model.model.layers:
        for module in (layer.mlp, layer.self_attn):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("batch", [1, 2])
def test_decoding_runs_only_the_steps_before_exit(batch):
    model = tiny_model(MIXES["dsa"])
    calls = count_layer_calls(model)
    ids = torch.randint(0, 128, (batch, SEQ), generator=torch.Generator().manual_seed(4))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        cache = model(ids[:, :PROMPT], use_cache=True).cache
        assert calls[0] == 2 * layers * STEPS  # prefill runs every step
        run = []
        for t in range(PROMPT, SEQ):
            calls[0] = 0
            out = model(ids[:, t : t + 1], cache=cache, exit_threshold=0.5)
            # A step runs while some row is still looping.
            assert calls[0] == 2 * layers * (int(out.exit_steps.max()) + 1)
            run.append(int(out.exit_steps.max()) + 1)
    assert sum(run) < STEPS * len(run)


def test_generate_passes_the_threshold_and_skips_steps():
    model = tiny_model(MIXES["gdn"])
    calls = count_layer_calls(model)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    new = 6
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=new, do_sample=False, exit_threshold=0.5, pad_token_id=0)
        generate_calls, calls[0] = calls[0], 0
        out = model(ids, use_cache=True, exit_threshold=0.5)
        tokens, cache = [out.logits[:, -1].argmax(-1)], out.cache
        for _ in range(new - 1):
            out = model(tokens[-1][:, None], cache=cache, exit_threshold=0.5)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(generated[:, PROMPT:], torch.stack(tokens, 1))
    assert generate_calls == calls[0] < 2 * model.config.num_hidden_layers * STEPS * new


def test_a_whole_sequence_keeps_ouro_selection_unless_asked():
    """Without adaptive_exit=True a multi-token forward runs every step and selects per token (Ouro's meaning)."""
    model = tiny_model(MIXES["attention"])
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids, exit_threshold=0.5, output_step_hidden_states=True)
        steps = torch.stack([model.lm_head(h) for h in out.step_hidden_states])
        first = (out.exit_probs.cumsum(0) >= 0.5).float().argmax(0)
    assert out.exit_steps is None and len(out.step_hidden_states) == STEPS
    assert torch.equal(out.logits, steps.gather(0, first[None, ..., None].expand_as(steps[:1]))[0])


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ({"exit_threshold": 1.5}, "exit_threshold=1.5"),
        ({"exit_threshold": -0.1}, "exit_threshold=-0.1"),
        ({"adaptive_exit": True, "exit_at_step": 1}, "adaptive_exit=True"),
        ({"adaptive_exit": True, "use_weighted_exit": True}, "adaptive_exit=True"),
    ],
)
def test_bad_exit_settings_are_errors(mode, message):
    model = tiny_model(MIXES["attention"])
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[1, 2, 3]]), **mode)


def test_bench_reports_loop_steps_under_adaptive_exit(tmp_path):
    """A freshly initialised gate gives λ ≈ 0.5 at every step, so threshold 0.3 exits every token at step 0."""
    source = write_checkpoint(tmp_path / "ouro", ouro_config())
    args = [
        "bench",
        str(source),
        "--random",
        "--contexts",
        "8",
        "--decode-tokens",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--device",
        "cpu",
    ]
    runner = CliRunner()
    result = runner.invoke(main, [*args, "--json", "--exit-threshold", "0.3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["exit_threshold"] == 0.3
    assert report["models"][0]["decode"]["8"]["loop_steps_per_token"] == 1.0
    every_step = json.loads(runner.invoke(main, [*args, "--json"]).output)
    assert every_step["models"][0]["decode"]["8"]["loop_steps_per_token"] == STEPS
    text = runner.invoke(main, [*args, "--exit-threshold", "0.3"]).output
    assert "loop steps run per decoded token [0] 1.00 at 8 (of 4)" in " ".join(text.split())
    refused = runner.invoke(main, [*args, "--exit-threshold", "1.5"])
    assert refused.exit_code != 0 and "--exit-threshold must be within (0, 1], got 1.5" in refused.output
