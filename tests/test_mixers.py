"""Linear-time mixers inside the looped runtime: decoding equals the full forward, limits equal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lt2convert.costs import cache_bytes
from lt2convert.modeling import LT2Config, LT2ForCausalLM
from lt2convert.testing import lt2_config

FP32_TOL = 1e-5
# A whole GDN layer against fla's naive recurrence: the chunked kernel agrees to ~1e-6 relative on o, and the
# per-head RMSNorm after it rescales small outputs, so the layer output is compared a decade looser.
GDN_LAYER_TOL = 1e-4
SEQ = 13


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def build(config: LT2Config, seed: int = 0) -> LT2ForCausalLM:
    torch.manual_seed(seed)
    model = LT2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so that a skipped norm shows up; swa_gdn's gate opened
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("gdn_gate"):
                param.add_(0.1 * torch.randn_like(param))
    return model


MIXES = {
    "gdn": ["gdn", "gdn"],
    "dsa": ["dsa", "dsa"],
    "swa": ["swa", "swa"],
    "swa_gdn": ["swa_gdn", "swa_gdn"],
    "hybrid": ["full_attention", "gdn", "dsa", "swa", "swa_gdn"],
}


def prefill_then_decode(model, ids, prefill: int, **mode) -> tuple[torch.Tensor, object]:
    out = model(ids[:, :prefill], use_cache=True, **mode)
    pieces, cache = [out.logits], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True, **mode)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("step", [0, 2])
def test_prefill_plus_decoding_equals_full_forward(mix, step):
    model = build(lt2_config(MIXES[mix]))
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False, exit_at_step=step).logits
        decoded, _ = prefill_then_decode(model, ids, prefill=3, exit_at_step=step)
    assert relative_error(decoded, full) <= FP32_TOL


@pytest.mark.parametrize("mixer", ["swa", "swa_gdn"])
@pytest.mark.parametrize("prefill", [1, 3, 9])
def test_window_with_sinks_decodes_as_the_full_forward(mixer, prefill):
    """Sinks enter the cache during prefill or decoding (prefill 1 and 3 < sinks + window), and leave the ring
    before or after the prompt ends."""
    model = build(lt2_config([mixer, "full_attention"], swa_window=3, swa_sinks=2))
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        decoded, cache = prefill_then_decode(model, ids, prefill=prefill)
        chunked = model(ids[:, prefill:], cache=model(ids[:, :prefill], use_cache=True).cache).logits
    assert relative_error(decoded, full) <= FP32_TOL
    assert relative_error(chunked, full[:, prefill:]) <= FP32_TOL
    assert cache.nbytes() == cache_bytes(model.config, SEQ, "fp32", batch=2)


def test_sinks_change_a_windowed_model():
    """Guards the test above: with the window full, the sinks must change the output."""
    ids = torch.randint(0, 128, (1, SEQ))
    plain, sunk = (build(lt2_config(["swa", "swa"], swa_window=3, swa_sinks=s)) for s in (0, 2))
    with torch.no_grad():
        assert relative_error(sunk(ids).logits, plain(ids).logits) > 1e-3


@pytest.mark.parametrize("mix", MIXES)
def test_cache_bytes_match_cost_model(mix):
    config = lt2_config(MIXES[mix])
    model = build(config)
    ids = torch.randint(0, 128, (1, SEQ))
    with torch.no_grad():
        _, cache = prefill_then_decode(model, ids, prefill=4)
    assert len(cache) == config.num_hidden_layers * config.total_ut_steps
    assert cache.nbytes() == cache_bytes(config, SEQ, "fp32")


def copy_attention(source: LT2ForCausalLM, target: LT2ForCausalLM) -> None:
    """Load the attention model's weights into a DSA/SWA model (extra indexer weights stay random)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(".indexer." in name for name in missing)


@pytest.mark.parametrize(("mixer", "limit"), [("dsa", {"dsa_topk": SEQ}), ("swa", {"swa_window": SEQ})])
def test_sparse_mixers_at_full_reach_equal_attention(mixer, limit):
    attention = build(lt2_config(["full_attention"] * 2))
    sparse = build(lt2_config([mixer] * 2, **limit), seed=5)
    copy_attention(attention, sparse)
    ids = torch.randint(0, 128, (2, SEQ))
    with torch.no_grad():
        assert relative_error(sparse(ids).logits, attention(ids).logits) <= FP32_TOL


def test_small_window_differs_from_attention():
    """Guards the test above: a window shorter than the sequence must change the output."""
    attention = build(lt2_config(["full_attention"] * 2))
    windowed = build(lt2_config(["swa"] * 2, swa_window=3))
    copy_attention(attention, windowed)
    ids = torch.randint(0, 128, (1, SEQ))
    with torch.no_grad():
        assert relative_error(windowed(ids).logits, attention(ids).logits) > 1e-3


def test_gdn_left_padding_leaves_no_trace():
    model = build(lt2_config(["gdn", "full_attention"]))
    ids = torch.randint(1, 128, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        together = model(padded, attention_mask=mask).logits[:, 3:]
    assert relative_error(together, alone) <= FP32_TOL


def test_gdn_module_matches_fla_reference_composition():
    """Our GDN layer = fla's recipe (conv+SiLU, L2-normed q/k, g, β, naive recurrence, gated norm) on the
    same parameters, with fla's own naive recurrent kernel as the oracle."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    layer = build(lt2_config(["gdn"])).model.layers[0].self_attn
    x = torch.randn(2, SEQ, 64)

    def conv(proj, conv_mod):
        y = F.conv1d(
            F.pad(proj(x).transpose(1, 2), (conv_mod.kernel_size - 1, 0)),
            conv_mod.weight,
            groups=conv_mod.weight.shape[0],
        )
        return F.silu(y).transpose(1, 2)

    with torch.no_grad():
        q = conv(layer.q_proj, layer.q_conv1d).view(2, SEQ, 4, 16)
        k = conv(layer.k_proj, layer.k_conv1d).view(2, SEQ, 4, 16)
        v = conv(layer.v_proj, layer.v_conv1d).view(2, SEQ, 4, 16)
        g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
        beta = layer.b_proj(x).sigmoid()
        o, _ = naive_recurrent_gated_delta_rule(
            F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6), v, beta, g
        )
        o = F.rms_norm(o, (16,), layer.o_norm.weight, eps=layer.NORM_EPS)
        o = o * F.silu(layer.g_proj(x).view(2, SEQ, 4, 16))
        expected = layer.o_proj(o.reshape(2, SEQ, -1))
        from lt2convert.modeling.modeling_lt2 import MixerContext

        ctx = MixerContext(cos=None, sin=None, key_padding_mask=None, past_length=0)
        got = layer(x, ctx, None)
    assert relative_error(got, expected) <= GDN_LAYER_TOL


def test_prefill_in_chunks_equals_full_forward():
    """A prompt appended to a non-empty cache (chunked prefill), the window overrun inside a chunk."""
    model = build(lt2_config(["swa_gdn", "full_attention", "swa", "gdn"]))
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False, exit_at_step=1).logits
        first = model(ids[:, :4], use_cache=True, exit_at_step=1)
        rest = model(ids[:, 4:], cache=first.cache, use_cache=True, exit_at_step=1)
    assert relative_error(torch.cat([first.logits, rest.logits], dim=1), full) <= FP32_TOL


def test_swa_gdn_with_closed_gate_is_sliding_window_attention_exactly():
    """A freshly built swa_gdn layer (gate zero) computes exactly what swa does with the same q/k/v/o."""
    torch.manual_seed(0)
    windowed = LT2ForCausalLM(lt2_config(["swa_gdn", "full_attention"])).eval()
    assert torch.equal(windowed.model.layers[0].self_attn.gdn_gate, torch.zeros(4))
    swa = LT2ForCausalLM(lt2_config(["swa", "full_attention"])).eval()
    missing, unexpected = swa.load_state_dict(windowed.state_dict(), strict=False)
    assert not missing and all(".self_attn.gdn" in name for name in unexpected)
    ids = torch.randint(0, 128, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(windowed(ids).logits, swa(ids).logits)
        decoded, _ = prefill_then_decode(windowed, ids, prefill=3)
        expected, _ = prefill_then_decode(swa, ids, prefill=3)
    assert torch.equal(decoded, expected)


def test_swa_gdn_open_gate_adds_the_memory():
    """Guards the test above: an open gate must change the output."""
    model = build(lt2_config(["swa_gdn", "full_attention"]))
    ids = torch.randint(0, 128, (1, SEQ))
    with torch.no_grad():
        opened = model(ids).logits
        model.model.layers[0].self_attn.gdn_gate.zero_()
        closed = model(ids).logits
    assert relative_error(opened, closed) > 1e-3


def test_swa_gdn_rejects_heads_it_cannot_gate():
    with pytest.raises(ValueError, match="swa_gdn needs gdn_num_heads"):
        lt2_config(["swa_gdn"], gdn_num_heads=2)
