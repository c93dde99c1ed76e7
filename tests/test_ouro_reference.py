"""Self-checks for the independent Ouro reference oracle in tests/ouro_reference.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ouro_reference import reference_forward, reference_logits, select_exit_steps


def _tiny_config(**overrides: Any) -> dict[str, Any]:
    """A tiny Ouro config.json-like dict (GQA: 4 query heads over 2 kv heads)."""
    cfg: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 48,
        "vocab_size": 64,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "total_ut_steps": 4,
        "early_exit_threshold": 0.6,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def _tiny_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights: projections ~N(0, 0.02..0.5), norms around 1."""
    g = torch.Generator().manual_seed(seed)
    hid, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm_w() -> torch.Tensor:
        return 1.0 + rnd(hid, scale=0.1)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, hid, scale=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rnd(nh * hd, hid, scale=0.2)
        sd[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, hid, scale=0.2)
        sd[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, hid, scale=0.2)
        sd[p + "self_attn.o_proj.weight"] = rnd(hid, nh * hd, scale=0.2)
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, hid, scale=0.2)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, hid, scale=0.2)
        sd[p + "mlp.down_proj.weight"] = rnd(hid, inter, scale=0.2)
        for name in (
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        ):
            sd[p + name + ".weight"] = norm_w()
    sd["model.norm.weight"] = norm_w()
    sd["model.early_exit_gate.weight"] = rnd(1, hid, scale=0.3)
    sd["model.early_exit_gate.bias"] = rnd(1, scale=0.02)
    sd["lm_head.weight"] = rnd(vocab, hid, scale=0.1)
    return sd


def _ids(cfg: dict[str, Any], bsz: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (bsz, seq), generator=g)


def test_shapes_and_exit_probs_sum_to_one() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    out = reference_forward(sd, cfg, ids)
    steps = cfg["total_ut_steps"]
    assert len(out["step_logits"]) == steps and len(out["hidden_per_step"]) == steps
    for logits in out["step_logits"]:
        assert logits.shape == (2, 7, cfg["vocab_size"]) and logits.dtype == torch.float32
    probs = out["exit_probs"]
    assert probs.shape == (steps, 2, 7)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(2, 7), atol=1e-6, rtol=0)
    # Steps differ from each other (the loop actually does something).
    assert not torch.allclose(out["step_logits"][0], out["step_logits"][-1])


def test_exit_probs_follow_gate_formula() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    out = reference_forward(sd, cfg, ids)
    lam = [
        torch.sigmoid(h @ sd["model.early_exit_gate.weight"].t() + sd["model.early_exit_gate.bias"])[..., 0]
        for h in out["hidden_per_step"]
    ]
    steps = cfg["total_ut_steps"]
    for t in range(steps):
        survive = torch.ones(2, 7)
        for j in range(t):
            survive = survive * (1 - lam[j])
        expected = survive if t == steps - 1 else lam[t] * survive
        torch.testing.assert_close(out["exit_probs"][t], expected)


def test_explicit_step_and_bounds() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    out = reference_forward(sd, cfg, ids)
    steps = cfg["total_ut_steps"]
    for k in range(steps):
        torch.testing.assert_close(reference_logits(sd, cfg, ids, exit_at_step=k), out["step_logits"][k])
    for bad in (-1, steps):
        with pytest.raises(ValueError):
            reference_logits(sd, cfg, ids, exit_at_step=bad)
    # Explicit step beats weighted exit and threshold.
    torch.testing.assert_close(
        reference_logits(sd, cfg, ids, exit_at_step=1, use_weighted_exit=True, exit_threshold=0.0),
        out["step_logits"][1],
    )


def test_weighted_exit() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    out = reference_forward(sd, cfg, ids)
    expected = sum(p.unsqueeze(-1) * lg for p, lg in zip(out["exit_probs"], out["step_logits"], strict=True))
    got = reference_logits(sd, cfg, ids, use_weighted_exit=True, exit_threshold=0.0)
    torch.testing.assert_close(got, expected)


def test_threshold_selection() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    out = reference_forward(sd, cfg, ids)
    probs, steps = out["exit_probs"], cfg["total_ut_steps"]
    cum = probs.cumsum(0)
    for q in (0.0, 0.3, 0.6, 0.9, 1.0):
        got = reference_logits(sd, cfg, ids, exit_threshold=q)
        for b in range(2):
            for s in range(7):
                hits = [t for t in range(steps) if cum[t, b, s] >= q]
                t_sel = hits[0] if hits else steps - 1
                torch.testing.assert_close(got[b, s], out["step_logits"][t_sel][b, s])
    # Threshold 0 always picks step 0; threshold None uses the config value.
    torch.testing.assert_close(reference_logits(sd, cfg, ids, exit_threshold=0.0), out["step_logits"][0])
    torch.testing.assert_close(
        reference_logits(sd, cfg, ids), reference_logits(sd, cfg, ids, exit_threshold=0.6)
    )


def test_threshold_one_picks_last_unless_cumsum_hits_one() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    steps = cfg["total_ut_steps"]
    # Ordinary gate: cumulative mass before the last step stays below 1, so the last step is chosen.
    out = reference_forward(sd, cfg, ids)
    assert (out["exit_probs"][:-1].sum(0) < 1).all()
    torch.testing.assert_close(reference_logits(sd, cfg, ids, exit_threshold=1.0), out["step_logits"][-1])
    torch.testing.assert_close(reference_logits(sd, cfg, ids, exit_at_step=steps - 1), out["step_logits"][-1])
    # Saturated gate (λ = 1 exactly in fp32): all mass at step 0, so cumsum reaches 1 at step 0.
    sat = dict(sd)
    sat["model.early_exit_gate.weight"] = torch.zeros_like(sd["model.early_exit_gate.weight"])
    sat["model.early_exit_gate.bias"] = torch.tensor([100.0])
    out_sat = reference_forward(sat, cfg, ids)
    assert (out_sat["exit_probs"][0] == 1).all()
    torch.testing.assert_close(reference_logits(sat, cfg, ids, exit_threshold=1.0), out_sat["step_logits"][0])
    # Mixed: the selector helper honours exact hits per token.
    probs = torch.tensor([[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]])  # [T=3, tokens=2]
    assert select_exit_steps(probs, 1.0).tolist() == [1, 0]
    assert select_exit_steps(torch.tensor([[0.2], [0.3], [0.5]]), 1.0).tolist() == [2]


def test_tied_embeddings_fallback() -> None:
    cfg = _tiny_config(tie_word_embeddings=True, total_ut_steps=2)
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    del sd["lm_head.weight"]
    out = reference_forward(sd, cfg, ids)
    h = out["hidden_per_step"][-1]
    torch.testing.assert_close(out["step_logits"][-1], h @ sd["model.embed_tokens.weight"].t())
    cfg_untied = _tiny_config(total_ut_steps=2)
    with pytest.raises(KeyError):
        reference_forward(sd, cfg_untied, ids)


def test_head_dim_default() -> None:
    cfg = _tiny_config(total_ut_steps=2)
    sd, ids = _tiny_state_dict(cfg), _ids(cfg)
    cfg_nohd = dict(cfg)
    del cfg_nohd["head_dim"]  # 32 // 4 == 8 == head_dim
    torch.testing.assert_close(
        reference_logits(sd, cfg_nohd, ids, exit_at_step=1), reference_logits(sd, cfg, ids, exit_at_step=1)
    )


def test_causal_prefix_consistency() -> None:
    """Logits at a position do not depend on later tokens."""
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg, seq=9)
    full = reference_forward(sd, cfg, ids)
    prefix = reference_forward(sd, cfg, ids[:, :5])
    for t in range(cfg["total_ut_steps"]):
        torch.testing.assert_close(
            prefix["step_logits"][t], full["step_logits"][t][:, :5], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(prefix["exit_probs"], full["exit_probs"][:, :, :5], atol=1e-6, rtol=1e-5)


def test_batch_rows_independent() -> None:
    cfg = _tiny_config()
    sd, ids = _tiny_state_dict(cfg), _ids(cfg, bsz=3)
    full = reference_logits(sd, cfg, ids)
    for b in range(3):
        torch.testing.assert_close(
            reference_logits(sd, cfg, ids[b : b + 1])[0], full[b], atol=1e-5, rtol=1e-5
        )


def _manual_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def test_single_token_single_layer_by_hand() -> None:
    """S = 1: softmax over one key is 1 and RoPE at position 0 is the identity, so attention = o(v)."""
    cfg = _tiny_config(num_hidden_layers=1, total_ut_steps=2)
    sd = _tiny_state_dict(cfg, seed=3)
    ids = torch.tensor([[5]])
    eps = cfg["rms_norm_eps"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = {k: v.double() for k, v in sd.items()}
    p = "model.layers.0."

    h = w["model.embed_tokens.weight"][5]  # [H]
    hiddens, logits, lams = [], [], []
    for _ in range(cfg["total_ut_steps"]):
        a_in = _manual_rms(h, w[p + "input_layernorm.weight"], eps)
        v = w[p + "self_attn.v_proj.weight"] @ a_in  # [kv*hd]
        # Query head j reads kv head j // (nh // nkv).
        per_head = [v[(j // (nh // nkv)) * hd : (j // (nh // nkv) + 1) * hd] for j in range(nh)]
        attn = w[p + "self_attn.o_proj.weight"] @ torch.cat(per_head)
        h = h + _manual_rms(attn, w[p + "input_layernorm_2.weight"], eps)
        m_in = _manual_rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = w[p + "mlp.gate_proj.weight"] @ m_in
        up = w[p + "mlp.up_proj.weight"] @ m_in
        mlp = w[p + "mlp.down_proj.weight"] @ (gate * torch.sigmoid(gate) * up)
        h = h + _manual_rms(mlp, w[p + "post_attention_layernorm_2.weight"], eps)
        h = _manual_rms(h, w["model.norm.weight"], eps)
        hiddens.append(h)
        logits.append(w["lm_head.weight"] @ h)
        lams.append(
            torch.sigmoid(w["model.early_exit_gate.weight"][0] @ h + w["model.early_exit_gate.bias"][0])
        )

    out = reference_forward(sd, cfg, ids)
    for t in range(2):
        torch.testing.assert_close(out["hidden_per_step"][t][0, 0].double(), hiddens[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["step_logits"][t][0, 0].double(), logits[t], atol=1e-5, rtol=1e-5)
    expected_p = torch.stack([lams[0], 1 - lams[0]])
    torch.testing.assert_close(out["exit_probs"][:, 0, 0].double(), expected_p, atol=1e-6, rtol=1e-5)


def _rotate_pairs(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) by angle pos * theta^(-2i/d), written out element by element."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        ang = torch.tensor(pos * theta ** (-2.0 * i / d), dtype=torch.float64)
        a, b = x[i], x[i + d // 2]
        out[i] = a * torch.cos(ang) - b * torch.sin(ang)
        out[i + d // 2] = b * torch.cos(ang) + a * torch.sin(ang)
    return out


def test_three_token_attention_by_hand() -> None:
    """Attention over 3 tokens, computed per head and per position in float64 (RoPE, scale, causal, GQA)."""
    import ouro_reference

    cfg = _tiny_config(rope_theta=100.0)
    sd = _tiny_state_dict(cfg, seed=5)
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p = "model.layers.0.self_attn."
    x = torch.randn(1, 3, cfg["hidden_size"], generator=torch.Generator().manual_seed(9))
    got = ouro_reference._attention(x, sd, p, cfg)

    w = {k: sd[p + k + "_proj.weight"].double() for k in "qkvo"}
    xs = x[0].double()
    outs = []
    for t in range(3):
        heads = []
        for j in range(nh):
            kv = j // (nh // nkv)
            q = _rotate_pairs((w["q"] @ xs[t])[j * hd : (j + 1) * hd], t, 100.0)
            keys = [_rotate_pairs((w["k"] @ xs[s])[kv * hd : (kv + 1) * hd], s, 100.0) for s in range(t + 1)]
            vals = [(w["v"] @ xs[s])[kv * hd : (kv + 1) * hd] for s in range(t + 1)]
            scores = torch.stack([q @ k / hd**0.5 for k in keys])
            weights = torch.softmax(scores, dim=0)
            heads.append(sum(wt * v for wt, v in zip(weights, vals, strict=True)))
        outs.append(w["o"] @ torch.cat(heads))
    torch.testing.assert_close(got[0].double(), torch.stack(outs), atol=1e-5, rtol=1e-5)
