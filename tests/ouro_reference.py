"""Independent, deliberately simple reference for the Ouro looped-transformer forward pass.

Written straight from the Ouro spec (sandwich-norm decoder layers, final norm at the end of every
loop step, early-exit gate with the remaining mass on the last step). It imports only torch and the
standard library so tests can check the project's runtime against it. Everything is computed in
float32 with explicit per-head loops; it is meant for tiny models only.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["reference_forward", "reference_logits"]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Return a detached float32 copy-view of a tensor."""
    return t.detach().to(torch.float32)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * weight."""
    x = x.to(torch.float32)
    variance = (x * x).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T (no bias)."""
    return x @ weight.t()


def _rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, head_dim] for positions 0..S-1, angles concatenated twice ([θ, θ])."""
    half = head_dim // 2
    inv_freq = torch.tensor([theta ** (-(2.0 * i) / head_dim) for i in range(half)], dtype=torch.float64)
    pos = torch.arange(seq_len, dtype=torch.float64)
    angles = pos[:, None] * inv_freq[None, :]  # [S, half]
    emb = torch.cat([angles, angles], dim=-1)  # [S, head_dim]
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) where x1, x2 are the two halves of the last dimension."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, d] by position tables cos/sin [S, d]."""
    return x * cos + _rotate_half(x) * sin


def _attention(
    x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any]
) -> torch.Tensor:
    """Causal multi-head attention with RoPE and GQA, one head at a time."""
    bsz, seq, _ = x.shape
    n_heads = int(cfg["num_attention_heads"])
    n_kv = int(cfg["num_key_value_heads"])
    hd = _head_dim(cfg)
    group = n_heads // n_kv
    q = _linear(x, sd[prefix + "q_proj.weight"])  # [B, S, heads*hd]
    k = _linear(x, sd[prefix + "k_proj.weight"])  # [B, S, kv*hd]
    v = _linear(x, sd[prefix + "v_proj.weight"])
    cos, sin = _rope_cos_sin(seq, hd, float(cfg["rope_theta"]))
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()  # key s visible from query t iff s <= t
    scale = hd**-0.5
    head_outputs = []
    for h in range(n_heads):
        kv = h // group
        qh = _apply_rope(q[..., h * hd : (h + 1) * hd], cos, sin)  # [B, S, hd]
        kh = _apply_rope(k[..., kv * hd : (kv + 1) * hd], cos, sin)
        vh = v[..., kv * hd : (kv + 1) * hd]
        scores = (qh @ kh.transpose(-1, -2)) * scale  # [B, S, S]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        head_outputs.append(probs @ vh)  # [B, S, hd]
    attn = torch.cat(head_outputs, dim=-1)  # [B, S, heads*hd]
    assert attn.shape == (bsz, seq, n_heads * hd)
    return _linear(attn, sd[prefix + "o_proj.weight"])


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    gate = _linear(x, sd[prefix + "gate_proj.weight"])
    up = _linear(x, sd[prefix + "up_proj.weight"])
    return _linear(torch.nn.functional.silu(gate) * up, sd[prefix + "down_proj.weight"])


def _decoder_layer(x: torch.Tensor, sd: dict[str, torch.Tensor], i: int, cfg: dict[str, Any]) -> torch.Tensor:
    """Sandwich-norm decoder layer."""
    eps = float(cfg["rms_norm_eps"])
    p = f"model.layers.{i}."
    a = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)
    a = _attention(a, sd, p + "self_attn.", cfg)
    x = x + _rms_norm(a, sd[p + "input_layernorm_2.weight"], eps)
    m = _rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
    m = _mlp(m, sd, p + "mlp.")
    return x + _rms_norm(m, sd[p + "post_attention_layernorm_2.weight"], eps)


def _head_dim(cfg: dict[str, Any]) -> int:
    """head_dim from config, defaulting to hidden_size // num_attention_heads."""
    hd = cfg.get("head_dim")
    if hd is None:
        hd = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return int(hd)


def _lm_head_weight(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> torch.Tensor:
    """lm_head.weight, or the embedding when tied and lm_head is absent."""
    if "lm_head.weight" in sd:
        return sd["lm_head.weight"]
    if cfg.get("tie_word_embeddings", False):
        return sd["model.embed_tokens.weight"]
    raise KeyError("lm_head.weight missing and tie_word_embeddings is false")


def reference_forward(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], input_ids: torch.LongTensor
) -> dict[str, Any]:
    """Run the Ouro loop; returns step_logits (T x [B,S,V]), exit_probs [T,B,S], hidden_per_step."""
    sd = {k: _f32(v) for k, v in state_dict.items()}
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    n_layers = int(config["num_hidden_layers"])
    n_steps = int(config["total_ut_steps"])
    eps = float(config["rms_norm_eps"])
    lm_w = _lm_head_weight(sd, config)
    gate_w = sd["model.early_exit_gate.weight"]  # [1, H]
    gate_b = sd["model.early_exit_gate.bias"]  # [1]

    with torch.no_grad():
        h = sd["model.embed_tokens.weight"][ids]  # [B, S, H]
        step_logits: list[torch.Tensor] = []
        hidden_per_step: list[torch.Tensor] = []
        lambdas: list[torch.Tensor] = []
        for _t in range(n_steps):
            for i in range(n_layers):
                h = _decoder_layer(h, sd, i, config)
            h = _rms_norm(h, sd["model.norm.weight"], eps)  # normed h feeds the next step
            hidden_per_step.append(h.clone())
            step_logits.append(_linear(h, lm_w))
            lam = torch.sigmoid(_linear(h, gate_w) + gate_b)[..., 0]  # [B, S]
            lambdas.append(lam)

        probs: list[torch.Tensor] = []
        survive = torch.ones_like(lambdas[0])  # Π_{j<t} (1 - λ_j)
        for t in range(n_steps):
            if t < n_steps - 1:
                probs.append(lambdas[t] * survive)
                survive = survive * (1.0 - lambdas[t])
            else:
                probs.append(survive.clone())
        exit_probs = torch.stack(probs, dim=0)  # [T, B, S]

    return {"step_logits": step_logits, "exit_probs": exit_probs, "hidden_per_step": hidden_per_step}


def select_exit_steps(exit_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the first step whose cumulative exit probability reaches threshold, else the last."""
    n_steps = exit_probs.shape[0]
    cum = torch.zeros_like(exit_probs[0])
    chosen = torch.full(exit_probs.shape[1:], n_steps - 1, dtype=torch.long)
    decided = torch.zeros(exit_probs.shape[1:], dtype=torch.bool)
    for t in range(n_steps):
        cum = cum + exit_probs[t]
        hit = (cum >= threshold) & ~decided
        chosen[hit] = t
        decided |= hit
    return chosen


def reference_logits(
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    input_ids: torch.LongTensor,
    *,
    exit_at_step: int | None = None,
    exit_threshold: float | None = None,
    use_weighted_exit: bool = False,
) -> torch.Tensor:
    """Final logits [B, S, V] under the output-selection rule: step > weighted > threshold."""
    out = reference_forward(state_dict, config, input_ids)
    step_logits: list[torch.Tensor] = out["step_logits"]
    exit_probs: torch.Tensor = out["exit_probs"]
    n_steps = len(step_logits)

    if exit_at_step is not None:
        if not 0 <= exit_at_step < n_steps:
            raise ValueError(f"exit_at_step={exit_at_step} outside [0, {n_steps})")
        return step_logits[exit_at_step]

    if use_weighted_exit:
        total = torch.zeros_like(step_logits[0])
        for t in range(n_steps):
            total = total + exit_probs[t].unsqueeze(-1) * step_logits[t]
        return total

    q = float(config["early_exit_threshold"]) if exit_threshold is None else float(exit_threshold)
    chosen = select_exit_steps(exit_probs, q)  # [B, S]
    result = torch.empty_like(step_logits[0])
    bsz, seq = chosen.shape
    for b in range(bsz):
        for s in range(seq):
            result[b, s] = step_logits[int(chosen[b, s])][b, s]
    return result
