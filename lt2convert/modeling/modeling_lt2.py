"""Looped decoder runtime: Ouro, LT2 hybrids, and Llama-family checkpoints (the one-step case).

Reads top to bottom: norms and RoPE, the token mixers, the decoder layer, the per-(step, layer) cache, the loop
and its exit gate (with adaptive exit, which skips a decoded token's steps after it exits), the causal-LM head.
Parameter names are exactly the on-disk names of Ouro checkpoints.
Self-contained (imports nothing else from lt2convert) because exported checkpoints ship it as remote code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_lt2 import LT2Config, OuroConfig, cache_capacity


@functools.cache
def mixer_kernels() -> SimpleNamespace:
    """The linear-time mixer kernels, imported on first use: lt2convert's when installed, else the flat copy an
    exported checkpoint ships beside this file (so the export loads without lt2convert)."""
    try:
        from lt2convert.kernels import (
            dsa,
            dsa_step,
            gated_delta_rule,
            gated_delta_rule_step,
            sliding_window_attention,
        )
    except ImportError:
        from .lt2_kernels import (
            dsa,
            dsa_step,
            gated_delta_rule,
            gated_delta_rule_step,
            sliding_window_attention,
        )
    return SimpleNamespace(
        dsa=dsa,
        dsa_step=dsa_step,
        gated_delta_rule=gated_delta_rule,
        gated_delta_rule_step=gated_delta_rule_step,
        sliding_window_attention=sliding_window_attention,
    )


# ---------------------------------------------------------------------------------------------------------------
# Norms and rotary embeddings


class LT2RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (Ouro and Llama both normalise in fp32, then scale in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def rope_inverse_frequencies(config: LT2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE variant (transformers computes the
    scaled variants; the default one is computed here because transformers keeps it per model)."""
    params = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        return 1.0 / (config.rope_theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported by the looped runtime")
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)


class LT2RotaryEmbedding(nn.Module):
    def __init__(self, config: LT2Config):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, head_dim] in x's dtype (angles computed in fp32)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.float().to(x.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B, S, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------------
# Token mixers. Each takes (x [B, S, H], MixerContext, state) and returns [B, S, H]. `state` is the dict owned by
# one (loop step, layer) slot of the cache, or None when no cache is kept; a mixer stores whatever it needs there.


@dataclass
class MixerContext:
    """What every mixer may need besides its input: RoPE tables, the padding mask and the cache offset."""

    cos: torch.Tensor  # [B, S, head_dim]
    sin: torch.Tensor
    key_padding_mask: torch.Tensor | None  # [B, past + S] bool, True = real token; None = no padding
    past_length: int


def causal_attention_mask(
    ctx: MixerContext, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B|1, 1, q_len, kv_len] mask (True = attend), or None when plain `is_causal` suffices."""
    if ctx.key_padding_mask is None and (ctx.past_length == 0 or q_len == 1):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if ctx.key_padding_mask is not None:
        mask = mask & ctx.key_padding_mask[:, None, None, -kv_len:].to(device)
        # A padding query sees no key at all; letting it see itself keeps softmax finite (its output is unused).
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


def reserve(state: dict, name: str, like: torch.Tensor, dim: int, needed: int, keep: int, limit: int | None = None):
    """Make state[name] hold at least `needed` entries along `dim` (shaped like `like` elsewhere), growing it by
    whole blocks and keeping its first `keep` entries. Returns the buffer."""
    buffer = state.get(name)
    if buffer is None or buffer.shape[dim] < needed:
        shape = list(like.shape)
        shape[dim] = cache_capacity(needed, limit)
        grown = like.new_empty(shape)
        if buffer is not None and keep:
            grown.narrow(dim, 0, keep).copy_(buffer.narrow(dim, 0, keep))
        state[name] = buffer = grown
    return buffer


def cache_append(state: dict, name: str, new: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Write `new` after the first `length` entries of state[name] along `dim`; return all entries so far."""
    count = new.shape[dim]
    buffer = reserve(state, name, new, dim, length + count, keep=length)
    buffer.narrow(dim, length, count).copy_(new)
    return buffer.narrow(dim, 0, length + count)


def needs_grad(tensors: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_tensor(owner: nn.Module, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)` along dim 0 without autograd, kept on `owner` for inference (one matmul instead of
    several small ones per decoding step) and rebuilt whenever one of `tensors` changes: an in-place update
    (optimiser step, load_state_dict) bumps its version, a move or cast replaces its storage. On-disk names and
    parameters stay as they are; the copy lives outside the state dict."""
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    fused = owner.__dict__.setdefault("_fused_tensors", {})
    hit = fused.get(key)
    if hit is None or hit[0] != stamp:
        with torch.no_grad():
            hit = fused[key] = (stamp, torch.cat([t.detach() for t in tensors]))
    return hit[1]


def fused_linear(owner: nn.Module, key: str, linears: list[nn.Linear], x: torch.Tensor) -> torch.Tensor | None:
    """The outputs of `linears` on `x`, concatenated on the last axis, as one matmul; None where it does not
    apply (autograd needs the separate weights, only some layers have a bias, or a layer is wrapped, e.g. by a
    LoRA adapter, whose output its `weight` alone does not give)."""
    if any(type(lin) is not nn.Linear for lin in linears):
        return None
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    if needs_grad(weights + [b for b in biases if b is not None]):
        return None
    if all(b is None for b in biases):
        return F.linear(x, fused_tensor(owner, key, weights))
    if any(b is None for b in biases):
        return None
    return F.linear(x, fused_tensor(owner, key, weights), fused_tensor(owner, key + ".bias", biases))


class LT2Attention(nn.Module):
    """Causal softmax attention with RoPE and GQA (SDPA), keeping a growing KV cache in its slot."""

    def __init__(self, config: LT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        qkv_bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)

    def project_qkv(
        self, x: torch.Tensor, ctx: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q [B, heads, S, D], k/v [B, kv_heads, S, D], RoPE applied to q and k."""
        bsz, seq, _ = x.shape
        qkv = fused_linear(self, "qkv", [self.q_proj, self.k_proj, self.v_proj], x)
        if qkv is not None:  # inference: one projection, and RoPE on q and k together
            heads = self.num_heads + self.num_kv_heads
            qkv = qkv.view(bsz, seq, heads + self.num_kv_heads, self.head_dim).transpose(1, 2)
            qk = apply_rotary(qkv[:, :heads], ctx.cos, ctx.sin)
            return qk[:, : self.num_heads], qk[:, self.num_heads :], qkv[:, heads:]
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin), v

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self.project_qkv(x, ctx)
        if state is not None:  # slot: k, v [B, kv_heads, capacity, D] and the number of tokens held
            length = state.get("length", 0)
            k = cache_append(state, "k", k, 2, length)
            v = cache_append(state, "v", v, 2, length)
            state["length"] = length + seq
        mask = causal_attention_mask(ctx, seq, k.shape[2], x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and seq > 1,
            scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))

    def replay(self, x: torch.Tensor, source: dict, targets: list[dict]) -> None:
        """Adaptive exit: append to `targets` (this layer's slots at the loop steps a decoded token skips) the
        key and value the token left in `source` (its slot at the exit step). The weights are shared across
        steps, so these are exactly the keys the skipped steps would compute from the same input; `x` (that
        input, normed) is not needed."""
        last = source["length"] - 1
        for state in targets:
            length = state["length"]
            for name in ("k", "v"):
                cache_append(state, name, source[name].narrow(2, last, 1), 2, length)
            state["length"] = length + 1


def no_padding(ctx: MixerContext, mixer: str) -> None:
    if ctx.key_padding_mask is not None:
        raise NotImplementedError(
            f"{mixer} layers do not take padded batches yet; run with batch size 1 or unpadded inputs"
        )


def decode_token_by_token(step, x_len: int, *tensors: torch.Tensor) -> torch.Tensor:
    """Run a one-token `step(*slices)` over each new position: the exact path for a prompt appended to a
    non-empty cache (rare: chunked prefill), reusing the decoding code instead of a second prefill variant."""
    outs = [step(*(t[:, i : i + 1] for t in tensors)) for i in range(x_len)]
    return torch.cat(outs, dim=1)


class LT2SlidingWindowAttention(LT2Attention):
    """Attention over the last `swa_window` tokens (the current one included) and the first `swa_sinks` tokens
    (attention sinks). A slot's `k`/`v` buffer holds `sinks` sink entries, token j < sinks at index sinks-1-j,
    then a ring of `window` entries, token t at index sinks + t % window: the keys a query reads are then one
    contiguous range (the sinks that left the ring, then the ring), and the state stops growing once the window
    is full."""

    def __init__(self, config: LT2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = config.swa_window
        self.sinks = config.swa_sinks

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        return self.o_proj(self.attend(x, ctx, state).reshape(bsz, seq, -1))

    def attend(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        """Per-head attention output [B, S, heads, D] before o_proj (the window kept in `state`)."""
        no_padding(ctx, "swa")
        seq = x.shape[1]
        q, k, v = self.project_qkv(x, ctx)  # [B, heads, S, D]
        if state is not None and state.get("tokens", 0) > 0 and seq == 1:  # decoding: no per-token loop
            out = self.step_cached(q, k, v, state).transpose(1, 2)
        elif state is not None and state.get("tokens", 0) > 0:
            out = decode_token_by_token(
                lambda *t: self.attend_cached(*t, state),
                seq,
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
            )
        else:
            out = mixer_kernels().sliding_window_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window, scale=self.scaling,
                sinks=self.sinks,
            )
            if state is not None:
                self.store_window(state, k, v)
        return out

    def store_window(self, state: dict, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the first `sinks` and the last `window` keys/values of a prompt, at their slot indices."""
        seq, sinks = k.shape[2], self.sinks
        keep = min(seq, self.window)
        ring = sinks + torch.arange(seq - keep, seq, device=k.device) % self.window
        first = min(seq, sinks)
        sink_slots = sinks - 1 - torch.arange(first, device=k.device)
        for name, new in (("k", k), ("v", v)):
            buffer = reserve(state, name, new, 2, sinks + keep, keep=0, limit=sinks + self.window)
            buffer[:, :, ring] = new[:, :, seq - keep :]
            buffer[:, :, sink_slots] = new[:, :, :first]
        state["tokens"] = seq

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict) -> torch.Tensor:
        """One token [B, 1, H, D]: write its key/value at ring index tokens % window (softmax is order-free and
        RoPE is already in the keys, so overwriting the oldest entry is exact), attend over every entry held."""
        return self.step_cached(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), state).transpose(1, 2)

    def step_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict) -> torch.Tensor:
        """attend_cached on head-major tensors: q [B, heads, 1, D], k/v [B, kv_heads, 1, D] -> [B, heads, 1, D]."""
        self.write_token(k, v, state)
        tokens, sinks = state["tokens"], self.sinks
        held = min(tokens, self.window)
        first = sinks - min(sinks, tokens - held)  # the sinks that have left the ring, then the ring
        return F.scaled_dot_product_attention(
            q,
            state["k"][:, :, first : sinks + held],
            state["v"][:, :, first : sinks + held],
            scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )

    def write_token(self, k: torch.Tensor, v: torch.Tensor, state: dict) -> None:
        """Store one token's key/value [B, kv_heads, 1, D] at ring index tokens % window, and at its sink index
        while it is one of the first `sinks` tokens."""
        tokens, sinks = state["tokens"], self.sinks
        slot = sinks + tokens % self.window
        held = min(tokens, self.window)
        for name, new in (("k", k), ("v", v)):
            buffer = reserve(state, name, new, 2, slot + 1, keep=sinks + held, limit=sinks + self.window)
            buffer[:, :, slot] = new[:, :, 0]
            if tokens < sinks:
                buffer[:, :, sinks - 1 - tokens] = new[:, :, 0]
        state["tokens"] = tokens + 1

    def replay(self, x: torch.Tensor, source: dict, targets: list[dict]) -> None:
        """As LT2Attention.replay: the key/value the token wrote in `source` (at its ring index)."""
        index = self.sinks + (source["tokens"] - 1) % self.window
        k, v = (source[name].narrow(2, index, 1) for name in ("k", "v"))
        for state in targets:
            self.write_token(k, v, state)


class LT2LightningIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer: a few index heads score every causal key against one shared index key.

    When the index dim is a multiple of the attention head dim, RoPE is applied per head-dim block, so an
    indexer built from attention heads' own q/k (one block per head) scores keys with their true relative
    positions.
    """

    def __init__(self, config: LT2Config):
        super().__init__()
        self.n_heads, self.head_dim = config.dsa_index_n_heads, config.dsa_index_head_dim
        self.wq = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        # A bias lets a converted indexer start with constant positive head weights (DeepSeek's has none).
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=True)
        self.rope_block = config.head_dim if self.head_dim % config.head_dim == 0 else None

    def rotate(self, x: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        """x [B, S, ..., DI] -> RoPE applied to each head-dim block of the last axis."""
        if self.rope_block is None:
            return x
        shape = x.shape
        blocks = x.reshape(shape[0], shape[1], -1, self.rope_block).transpose(1, 2)  # [B, blocks, S, D]
        return apply_rotary(blocks, ctx.cos, ctx.sin).transpose(1, 2).reshape(shape)

    def forward(self, x: torch.Tensor, ctx: MixerContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q_idx [B, S, HI, DI], k_idx [B, S, DI], w_idx [B, S, HI]."""
        bsz, seq, _ = x.shape
        q_idx = self.rotate(self.wq(x).view(bsz, seq, self.n_heads, self.head_dim), ctx)
        k_idx = self.rotate(self.wk(x), ctx)
        w_idx = self.weights_proj(x) * self.n_heads**-0.5
        return q_idx, k_idx, w_idx


class LT2SparseAttention(LT2Attention):
    """DeepSeek sparse attention: the attention's own q/k/v/o over the top-k keys its indexer selects
    (selection shared across query heads). Keeps the full KV cache plus one index key per token."""

    def __init__(self, config: LT2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.topk = config.dsa_topk
        self.indexer = LT2LightningIndexer(config)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        no_padding(ctx, "dsa")
        bsz, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project_qkv(x, ctx))  # [B, S, heads, D]
        q_idx, k_idx, w_idx = self.indexer(x, ctx)
        if state is not None and state.get("length", 0) > 0 and seq == 1:  # decoding: no per-token loop
            out = self.attend_cached(q, k, v, q_idx, k_idx, w_idx, state)
        elif state is not None and state.get("length", 0) > 0:
            out = decode_token_by_token(
                lambda *t: self.attend_cached(*t, state), seq, q, k, v, q_idx, k_idx, w_idx
            )
        else:
            out = mixer_kernels().dsa(q, k, v, q_idx, k_idx, w_idx, topk=self.topk, scale=self.scaling)
            if state is not None:  # slot: k, v [B, capacity, kv_heads, D], k_idx [B, capacity, DI], length
                self.append(state, k, v, k_idx)
        return self.o_proj(out.reshape(bsz, seq, -1))

    def attend_cached(self, q, k, v, q_idx, k_idx, w_idx, state: dict) -> torch.Tensor:
        """One token: append its keys, then attend over the top-k of the whole cache."""
        keys, values, index_keys = self.append(state, k, v, k_idx)
        out = mixer_kernels().dsa_step(  # one query: [B, heads, D] without the time axis
            q[:, 0], keys, values, q_idx[:, 0], index_keys, w_idx[:, 0], topk=self.topk, scale=self.scaling
        )
        return out[:, None]

    def replay(self, x: torch.Tensor, source: dict, targets: list[dict]) -> None:
        """As LT2Attention.replay, with the token's index key too."""
        last = source["length"] - 1
        k, v, k_idx = (source[name].narrow(1, last, 1) for name in ("k", "v", "k_idx"))
        for state in targets:
            self.append(state, k, v, k_idx)

    @staticmethod
    def append(state: dict, k: torch.Tensor, v: torch.Tensor, k_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = state.get("length", 0)
        held = tuple(cache_append(state, name, new, 1, length) for name, new in (("k", k), ("v", v), ("k_idx", k_idx)))
        state["length"] = length + k.shape[1]
        return held


class LT2ShortConvolution(nn.Module):
    """fla's ShortConvolution: causal depthwise conv over time followed by SiLU; weight [C, 1, K]."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor, state: dict | None, key: str) -> torch.Tensor:
        """x [B, S, C]; the last K-1 inputs are kept in state[key] ([B, C, K-1]) for the next call."""
        x = x.transpose(1, 2)
        history = state.get(key) if state is not None else None
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], self.kernel_size - 1)
        padded = torch.cat([history.to(x.dtype), x], dim=-1)
        if state is not None:
            state[key] = padded[..., -(self.kernel_size - 1) :].contiguous()
        out = F.conv1d(padded, self.weight.to(x.dtype), groups=x.shape[1])
        return F.silu(out).transpose(1, 2)


class LT2GatedRMSNorm(nn.Module):
    """fla's FusedRMSNormGated: RMSNorm(o)·w ⊙ SiLU(gate), in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        x = o.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            x = x * F.silu(gate.float())
        return x.to(o.dtype)


class LT2GatedDeltaNet(nn.Module):
    """Gated DeltaNet with fla's parameter names (`fla.layers.GatedDeltaNet`), so checkpoints interoperate.

    Per (step, layer) slot it keeps the recurrent state [B, heads, dk, dv] (fp32) under `recurrent` and the
    short convolutions' last inputs (q, k, v channels together) under `conv`.
    `output_projection=False` leaves out o_proj, for a layer that projects this output together with another's.
    """

    NORM_EPS = 1e-5  # fla's default for o_norm

    def __init__(self, config: LT2Config, layer_idx: int, output_projection: bool = True):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_k_dim = config.gdn_num_heads, config.gdn_head_k_dim
        self.head_v_dim = int(self.head_k_dim * config.gdn_expand_v)
        key_dim, value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        self.allow_neg_eigval = config.gdn_allow_neg_eigval
        self.q_proj = nn.Linear(h, key_dim, bias=False)
        self.k_proj = nn.Linear(h, key_dim, bias=False)
        self.v_proj = nn.Linear(h, value_dim, bias=False)
        self.a_proj = nn.Linear(h, self.num_heads, bias=False)
        self.b_proj = nn.Linear(h, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.use_short_conv = config.gdn_use_short_conv
        if self.use_short_conv:
            self.q_conv1d = LT2ShortConvolution(key_dim, config.gdn_conv_size)
            self.k_conv1d = LT2ShortConvolution(key_dim, config.gdn_conv_size)
            self.v_conv1d = LT2ShortConvolution(value_dim, config.gdn_conv_size)
        self.use_gate = config.gdn_use_gate
        if self.use_gate:
            self.g_proj = nn.Linear(h, value_dim, bias=False)
        self.o_norm = LT2GatedRMSNorm(self.head_v_dim, self.NORM_EPS)
        if output_projection:
            self.o_proj = nn.Linear(value_dim, h, bias=False)

    def mix_inputs(self, x: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, ...]:
        """q, k [B, S, heads, dk], v [B, S, heads, dv] after the short convolutions and SiLU."""
        return self.convolve(self.project_qkv(x), state)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The q, k and v projections of x [B, S, H], concatenated on the last axis."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        qkv = fused_linear(self, "qkv", projections, x)
        return torch.cat([proj(x) for proj in projections], dim=-1) if qkv is None else qkv

    def convolve(self, qkv: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, ...]:
        """mix_inputs from the q/k/v projections [B, S, C] (the short convolutions' history in `state`)."""
        bsz, seq, _ = qkv.shape
        # fla applies SiLU even without the convolution
        qkv = self.short_convolutions(qkv, state) if self.use_short_conv else F.silu(qkv)
        key_dim = self.num_heads * self.head_k_dim
        q, k, v = qkv.split([key_dim, key_dim, self.num_heads * self.head_v_dim], dim=-1)
        return (
            q.view(bsz, seq, self.num_heads, self.head_k_dim),
            k.view(bsz, seq, self.num_heads, self.head_k_dim),
            v.view(bsz, seq, self.num_heads, self.head_v_dim),
        )

    def decay_and_beta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g = −exp(A_log)·softplus(a_proj(x) + dt_bias) (log-space decay ≤ 0) and β = sigmoid(b_proj(x))."""
        return self.gates(self.a_proj(x), self.b_proj(x))

    def gates(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """decay_and_beta from the a/b projections."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        beta = torch.sigmoid(b.float())
        return g, beta * 2.0 if self.allow_neg_eigval else beta

    def input_layers(self) -> list[nn.Module]:
        """The projections of x, in the order decode_step fuses them, then the short convolutions."""
        layers = [self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj]
        layers += [self.g_proj] if self.use_gate else []
        return layers + ([self.q_conv1d, self.k_conv1d, self.v_conv1d] if self.use_short_conv else [])

    def replay(self, x: torch.Tensor, source: dict, targets: list[dict]) -> None:
        """Adaptive exit: advance `targets` (this layer's slots at the loop steps a decoded token skips) with the
        token's normed layer input at its exit step, x [B, 1, H]. Its projections are computed once; each slot's
        short convolution and recurrent state then take them as that step would. `source` is not needed."""
        qkv = self.project_qkv(x)
        g, beta = self.decay_and_beta(x)
        for state in targets:
            q, k, v = self.convolve(qkv, state)
            _, state["recurrent"] = mixer_kernels().gated_delta_rule_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state["recurrent"],
                use_qk_l2norm_in_kernel=True, inplace=True,
            )

    def decode_step(self, x: torch.Tensor, state: dict) -> torch.Tensor | None:
        """One token [B, 1, H] on a filled slot, in few ops (at batch 1 a step costs op overhead, not arithmetic):
        one fused projection, the three short convolutions as one multiply-add over their windows, the recurrent
        state updated in place. -> heads_output's [B, 1, heads, dv]; None when autograd needs the separate
        weights or a projection is wrapped (LoRA)."""
        layers = self.input_layers()
        if needs_grad([p for layer in layers for p in layer.parameters()]):
            return None
        proj = fused_linear(self, "proj", layers[: 6 if self.use_gate else 5], x[:, 0])
        if proj is None:
            return None
        bsz, heads = x.shape[0], self.num_heads
        key_dim, value_dim = heads * self.head_k_dim, heads * self.head_v_dim
        qkv, a, b, gate = proj.split([2 * key_dim + value_dim, heads, heads, value_dim if self.use_gate else 0], -1)
        qkv = self.short_convolutions(qkv[:, None], state)[:, 0] if self.use_short_conv else F.silu(qkv)
        q, k, v = qkv.split([key_dim, key_dim, value_dim], -1)
        g, beta = self.gates(a, b)
        o, state["recurrent"] = mixer_kernels().gated_delta_rule_step(
            q.view(bsz, heads, -1),
            k.view(bsz, heads, -1),
            v.view(bsz, heads, -1),
            g,
            beta,
            state["recurrent"],
            use_qk_l2norm_in_kernel=True,
            inplace=True,
        )
        gate = gate.view(bsz, 1, heads, self.head_v_dim) if self.use_gate else None
        return self.o_norm(o.view(bsz, 1, heads, self.head_v_dim), gate)

    def short_convolutions(self, qkv: torch.Tensor, state: dict | None) -> torch.Tensor:
        """The q, k and v short convolutions (each fla's ShortConvolution: causal depthwise conv, then SiLU) as
        one depthwise conv over qkv [B, S, C]; the slot keeps the last K-1 inputs under `conv` ([B, C, K-1])."""
        convs = [self.q_conv1d, self.k_conv1d, self.v_conv1d]
        weights = [conv.weight for conv in convs]
        weight = torch.cat(weights) if needs_grad(weights) else fused_tensor(self, "conv", weights)
        weight = weight.to(qkv.dtype)  # [C, 1, K]
        keep = weight.shape[-1] - 1
        x = qkv.transpose(1, 2)
        history = state.get("conv") if state is not None else None
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], keep)
        padded = torch.cat([history.to(x.dtype), x], dim=-1)
        if x.shape[-1] == 1:  # one token: a multiply-add (conv1d's per-call setup costs more than the work)
            out = (padded * weight[:, 0]).sum(-1, keepdim=True)
            kept = padded[..., 1:]  # a view of this step's window: no copy
        else:
            out = F.conv1d(padded, weight, groups=x.shape[1])
            kept = padded[..., -keep:].contiguous()  # not a view: the prompt-long buffer would stay alive
        if state is not None:
            state["conv"] = kept
        return F.silu(out).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        return self.o_proj(self.heads_output(x, ctx, state).reshape(bsz, seq, -1))

    def heads_output(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        """Per-head output [B, S, heads, dv] after the gated norm, before o_proj."""
        bsz, seq, _ = x.shape
        pad = ctx.key_padding_mask
        if seq == 1 and pad is None and state is not None and "recurrent" in state:
            stepped = self.decode_step(x, state)
            if stepped is not None:
                return stepped
        if pad is not None:  # padded positions must leave no trace: zero conv input, no decay, no update
            x = x * pad[:, -seq:, None].to(x.dtype)
        q, k, v = self.mix_inputs(x, state)
        g, beta = self.decay_and_beta(x)
        if pad is not None:
            real = pad[:, -seq:, None].to(g.dtype)
            g, beta = g * real, beta * real
        previous = state.get("recurrent") if state is not None else None
        if seq == 1 and previous is not None:
            o, final = mixer_kernels().gated_delta_rule_step(  # one token: [B, H, D] without the time axis
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], previous, use_qk_l2norm_in_kernel=True
            )
            o = o[:, None]
        else:
            o, final = mixer_kernels().gated_delta_rule(
                q,
                k,
                v,
                g,
                beta,
                initial_state=previous,
                output_final_state=state is not None,
                use_qk_l2norm_in_kernel=True,
            )
        if state is not None:
            state["recurrent"] = final
        gate = self.g_proj(x).view(bsz, seq, self.num_heads, self.head_v_dim) if self.use_gate else None
        return self.o_norm(o, gate)


class LT2SlidingWindowGatedDeltaNet(LT2SlidingWindowAttention):
    """`swa_gdn`: exact softmax attention over the last `swa_window` tokens plus a Gated DeltaNet memory of the
    whole sequence, mixed per head by a learned gate (after LoLCATs): o_proj(swa_h + gate_h · gdn_h).

    The attention keeps its own q/k/v/o names; the GDN branch sits under `gdn.` with fla's names and no o_proj,
    since both branches share o_proj (a decode step pays one output projection, and GDN's o_proj would be a copy
    of the attention's anyway). The GDN reads every token, the window's too: then prefill, decoding and chunked
    prefill are exactly the `gdn` mixer's, whereas a state of only the tokens older than the window would need a
    delayed update. The gate starts at zero, so an untrained layer is its SWA conversion bit for bit. A slot
    holds the window's keys/values and the GDN states (their keys do not overlap), constant in the context.
    """

    def __init__(self, config: LT2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gdn = LT2GatedDeltaNet(config, layer_idx, output_projection=False)
        self.gdn_gate = nn.Parameter(torch.zeros(self.num_heads))

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        local = self.attend(x, ctx, state)  # [B, S, heads, D]
        memory = self.gdn.heads_output(x, ctx, state)  # [B, S, heads, D]: the config ties the GDN heads to these
        mixed = local + self.gdn_gate.to(local.dtype)[:, None] * memory
        return self.o_proj(mixed.reshape(bsz, seq, -1))

    def replay(self, x: torch.Tensor, source: dict, targets: list[dict]) -> None:
        """Both branches' replay: the window takes the token's key/value, the GDN its projections."""
        super().replay(x, source, targets)
        self.gdn.replay(x, source, targets)


MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "full_attention": LT2Attention,
    "swa": LT2SlidingWindowAttention,
    "dsa": LT2SparseAttention,
    "gdn": LT2GatedDeltaNet,
    "swa_gdn": LT2SlidingWindowGatedDeltaNet,
}


def build_mixer(config: LT2Config, layer_idx: int) -> nn.Module:
    kind = config.layer_types[layer_idx]
    if kind not in MIXER_CLASSES:
        raise NotImplementedError(f"layer {layer_idx}: mixer {kind!r} is not available in this runtime")
    return MIXER_CLASSES[kind](config, layer_idx)


# ---------------------------------------------------------------------------------------------------------------
# Decoder layer


class LT2MLP(nn.Module):
    def __init__(self, config: LT2Config):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (expected 'silu')")
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LT2DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block; with `sandwich_norm` (Ouro) the mixer and MLP outputs are normed again.
    Training without a cache may recompute it in backward (`gradient_checkpointing_enable()`)."""

    def __init__(self, config: LT2Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = build_mixer(config, layer_idx)
        self.mlp = LT2MLP(config)
        self.input_layernorm = LT2RMSNorm(h, eps)
        self.post_attention_layernorm = LT2RMSNorm(h, eps)
        if config.sandwich_norm:
            self.input_layernorm_2 = LT2RMSNorm(h, eps)
            self.post_attention_layernorm_2 = LT2RMSNorm(h, eps)
        self.sandwich = config.sandwich_norm

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: dict | None) -> torch.Tensor:
        mixed = self.self_attn(self.input_layernorm(x), ctx, state)
        x = x + (self.input_layernorm_2(mixed) if self.sandwich else mixed)
        out = self.mlp(self.post_attention_layernorm(x))
        return x + (self.post_attention_layernorm_2(out) if self.sandwich else out)

    def replay(self, x: torch.Tensor, source: dict, targets: list[dict]) -> None:
        """Adaptive exit: fill this layer's slots `targets` at the loop steps a decoded token skips with what it
        presented at its exit step (layer input x, its slot there `source`); no output, no MLP."""
        self.self_attn.replay(self.input_layernorm(x), source, targets)


# ---------------------------------------------------------------------------------------------------------------
# Cache: one slot per (loop step, layer), L·T slots


class LoopedCache(Cache):
    """Decoding state of a looped model: slot `step * num_layers + layer` belongs to that layer at that loop step.

    A slot is a dict the layer's mixer fills (attention: `k`, `v`; recurrent mixers: their states). Sharing one
    slot across steps would silently corrupt decoding, which is the bug generic L-slot caches have with Ouro.
    """

    is_compileable = False

    def __init__(self, num_layers: int, num_steps: int):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.num_steps = num_steps
        self.slots: list[dict] = [{} for _ in range(num_layers * num_steps)]
        self.seen_tokens = 0

    def slot(self, step: int, layer: int) -> dict:
        return self.slots[step * self.num_layers + layer]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        # Tells generate() that inputs must be sliced to the tokens not yet in the cache.
        return [False]

    def nbytes(self) -> int:
        """Bytes held by every tensor in every slot."""
        return sum(t.numel() * t.element_size() for s in self.slots for t in s.values() if torch.is_tensor(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for slot in self.slots:
            for key, value in slot.items():
                if torch.is_tensor(value):
                    slot[key] = value.index_select(0, beam_idx.to(value.device))

    def __len__(self) -> int:
        return len(self.slots)

    def __repr__(self) -> str:
        return (
            f"LoopedCache(steps={self.num_steps}, layers={self.num_layers}, seen_tokens={self.seen_tokens})"
        )


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopedOutput(CausalLMOutputWithPast):
    """`exit_probs` [T, B, S]: the exit distribution p_t per token (None without an exit gate, or under adaptive
    exit); `exit_steps` [B, S]: under adaptive exit, the loop step each token exited at (it ran that many steps
    plus one); `step_hidden_states`: the normed hidden state after each loop step run (when requested)."""

    exit_probs: torch.Tensor | None = None
    exit_steps: torch.Tensor | None = None
    step_hidden_states: tuple[torch.Tensor, ...] | None = None


class LT2PreTrainedModel(PreTrainedModel):
    config_class = LT2Config
    config: LT2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LT2DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, LT2RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, LT2RotaryEmbedding):
            module.inv_freq.copy_(rope_inverse_frequencies(self.config)[0])
        elif isinstance(module, LT2GatedRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, LT2ShortConvolution):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)  # nn.Conv1d's default, as fla uses
        elif isinstance(module, LT2GatedDeltaNet):
            init_gdn_decay(module.A_log, module.dt_bias)
        elif isinstance(module, LT2SlidingWindowGatedDeltaNet):
            module.gdn_gate.zero_()  # gate closed: the layer starts as sliding-window attention

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our forward creates its own L·T-slot LoopedCache; a DynamicCache has L slots and would be wrong.
        return False


def fla_gdn_decay(
    heads: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's default (A_log, dt_bias), fp32: A ~ U(0, 16), A_log = log A; dt log-uniform in [1e-3, 1e-1]
    (floor 1e-4) and dt_bias = softplus⁻¹(dt) so that softplus(dt_bias) = dt at initialisation."""
    a_log = torch.empty(heads, device=device).uniform_(0, 16, generator=generator).log()
    log_lo, log_hi = math.log(1e-3), math.log(1e-1)
    dt = torch.exp(torch.rand(heads, generator=generator, device=device) * (log_hi - log_lo) + log_lo)
    dt = dt.clamp(min=1e-4)
    return a_log, dt + torch.log(-torch.expm1(-dt))


def init_gdn_decay(a_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """Set a GDN layer's decay parameters in place to fla's defaults (see `fla_gdn_decay`)."""
    fla_a_log, fla_dt_bias = fla_gdn_decay(a_log.numel(), device=a_log.device)
    a_log.copy_(fla_a_log)
    dt_bias.copy_(fla_dt_bias)


def exit_distribution(gate_logits: list[torch.Tensor]) -> torch.Tensor:
    """λ_t = sigmoid(gate_t) per step -> p_t = λ_t Π_{j<t}(1−λ_j); the last step takes the remaining mass.
    gate_logits: T tensors [B, S] (fp32) -> [T, B, S]."""
    probs, survive = [], torch.ones_like(gate_logits[0])
    for gate in gate_logits[:-1]:
        p, survive = exit_mass(gate, survive)
        probs.append(p)
    probs.append(survive)
    return torch.stack(probs)


def exit_mass(gate_logit: torch.Tensor, survive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of exit_distribution: p_t = λ_t·survive and the mass that survives step t."""
    lam = torch.sigmoid(gate_logit)
    return lam * survive, survive * (1.0 - lam)


class LoopResult(NamedTuple):
    """LT2Model's output. `steps`: the normed hidden state after each loop step run, [B, S, H] each (under
    adaptive exit a token keeps its exit step's state at later steps, and decoding may stop before the last
    step); `exit_probs`: [T, B, S], None without an exit gate or under adaptive exit; `exit_steps`: [B, S] under
    adaptive exit, the step each token exited at."""

    steps: list[torch.Tensor]
    exit_probs: torch.Tensor | None
    cache: LoopedCache | None
    exit_steps: torch.Tensor | None


class LT2Model(LT2PreTrainedModel):
    """Embeddings, the shared layer stack applied `total_ut_steps` times, and the per-step final norm."""

    def __init__(self, config: LT2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LT2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LT2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LT2RotaryEmbedding(config)
        if config.use_exit_gate:
            self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopedCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        exit_threshold: float | None = None,
    ) -> LoopResult:
        """Every loop step for every token; with `exit_threshold`, adaptive exit (see `run_adaptive`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = LoopedCache(self.config.num_hidden_layers, self.config.total_ut_steps)
        past = cache.seen_tokens if cache is not None else 0
        ctx = self.mixer_context(h, attention_mask, position_ids, past)
        if exit_threshold is None:
            steps = self.run_every_step(h, ctx, cache)
            result = LoopResult(steps, self.exit_probs(steps), cache, None)
        else:
            result = self.run_adaptive(h, ctx, cache, exit_threshold)
        if cache is not None:
            cache.seen_tokens = past + h.shape[1]
        return result

    def run_every_step(self, h: torch.Tensor, ctx: MixerContext, cache: LoopedCache | None) -> list[torch.Tensor]:
        steps = []
        for step in range(self.config.total_ut_steps):
            for i, layer in enumerate(self.layers):
                h = layer(h, ctx, cache.slot(step, i) if cache is not None else None)
            h = self.norm(h)  # Ouro norms at the end of every step, and the normed state feeds the next step
            steps.append(h)
        return steps

    def run_adaptive(
        self, h: torch.Tensor, ctx: MixerContext, cache: LoopedCache | None, threshold: float
    ) -> LoopResult:
        """Adaptive exit (the policy is in LT2ForCausalLM's docstring): a token exits after the first step e whose
        cumulative exit mass reaches `threshold`. At every later step each layer sees the token's step-e input
        again (`presented`), which fills the layer's later slots as the policy says, and the token keeps its
        step-e output. One decoded token (a single new token on a filled cache) stops looping once every row has
        exited and fills the remaining slots by replay; a longer input runs every step for every token (the
        parallel form of the same policy: the same outputs and cache, no compute saved)."""
        num_steps = self.config.total_ut_steps
        skip_steps = h.shape[1] == 1 and ctx.past_length > 0 and cache is not None
        exited = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        exit_steps = torch.full(h.shape[:2], num_steps - 1, device=h.device)
        mass = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
        survive = torch.ones_like(mass)
        presented = [h] * len(self.layers)  # per layer, what each token presented to it at this step
        steps: list[torch.Tensor] = []
        some_exited = False
        for step in range(num_steps):
            for i, layer in enumerate(self.layers):
                if some_exited:
                    h = torch.where(exited[..., None], presented[i], h)
                presented[i] = h
                h = layer(h, ctx, cache.slot(step, i) if cache is not None else None)
            h = self.norm(h)
            if some_exited:
                h = torch.where(exited[..., None], steps[-1], h)
            steps.append(h)
            if step == num_steps - 1:
                break
            p, survive = exit_mass(self.gate_logits(h), survive)
            mass = mass + p  # the running cumsum of exit_distribution, as select_exit_hidden takes it
            newly = (mass >= threshold) & ~exited
            exit_steps.masked_fill_(newly, step)
            exited |= newly
            count = int(exited.sum())  # one device sync per step decides both
            some_exited = count > 0
            if skip_steps and count == exited.numel():
                self.replay_skipped_steps(presented, cache, step)
                break
        return LoopResult(steps, None, cache, exit_steps)

    def replay_skipped_steps(self, presented: list[torch.Tensor], cache: LoopedCache, last: int) -> None:
        """Fill the slots of the steps after `last`, which every row has exited by: from then on each row presents
        to layer i what it presented at `last` (`presented[i]`), whose keys slot (last, i) already holds."""
        later = range(last + 1, self.config.total_ut_steps)
        for i, layer in enumerate(self.layers):
            layer.replay(presented[i], cache.slot(last, i), [cache.slot(s, i) for s in later])

    def mixer_context(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past: int,
    ) -> MixerContext:
        seq = h.shape[1]
        padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only, as transformers' generate does.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=h.device)[None].expand(h.shape[0], -1)
        cos, sin = self.rotary_emb(h, position_ids.to(h.device))
        return MixerContext(cos=cos, sin=sin, key_padding_mask=padding, past_length=past)

    def exit_probs(self, steps: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.config.use_exit_gate:
            return None
        return exit_distribution([self.gate_logits(h) for h in steps])

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The exit gate's logits [B, S] on one step's hidden state."""
        gate = self.early_exit_gate
        # The gate runs in fp32: in bf16 the cumulative exit mass rounds to 1.0 before the last step.
        return F.linear(h.float(), gate.weight.float(), gate.bias.float()).squeeze(-1)


class LT2ForCausalLM(LT2PreTrainedModel, GenerationMixin):
    """Looped causal LM with Ouro's output selection.

    Output selection, an explicitly passed keyword winning over the config default:
    `exit_at_step=k` -> step k's logits; `use_weighted_exit=True` -> Σ_t p_t·logits_t; `exit_threshold=q` ->
    per token the first step whose cumulative exit mass reaches q; no keyword -> the config's
    `early_exit_threshold` (1.0: the last step, since the mass reaches 1 only there in fp32). Models without an
    exit gate (Llama family) always return the last step.

    Adaptive exit: the threshold rule that saves compute in decoding. A token exits after the first step e whose
    cumulative exit mass reaches the threshold q, and its logits are step e's. Cache-fill policy: the steps
    s > e are not run for it (no mixer output, no MLP), but each layer i's slot (s, i) takes what the token
    presented at (e, i). The layer weights are shared across steps, so attention, SWA and DSA slots get exactly
    step e's keys, values and index keys (copied, not recomputed), and GDN mixers (swa_gdn's GDN branch too)
    advance their recurrent state and short-convolution history with step e's projections. Later tokens read,
    at every step, each earlier token's entries as the policy left them.

    When it applies, by `adaptive_exit`:
    - None (default): to one new token on a filled cache (decoding, as generate() runs after the prefill) when
      the threshold (`exit_threshold`, else the config's) is below 1. A forward over several tokens (prefill,
      scoring) runs every step for every token and selects per token as Ouro does, so prompt tokens keep each
      step's own cache (Ouro's paper: prefill needs it). At threshold 1 nothing changes: every step runs.
    - True: every token of this forward follows the policy. Over several tokens this is the policy's parallel
      form, for teacher-forced scoring under it: the logits and cache of decoding them one by one, with every
      step computed (tokens that exited present their step-e inputs), so nothing is saved.
    - False: every step runs, with Ouro's selection, in decoding too.
    Batch > 1: rows exit at different steps. A step runs while some row has not exited, the exited rows
    presenting their step-e inputs (their share of that step's work is wasted), and the steps after the last
    row's exit are skipped. `exit_steps` in the output gives each token's exit step under the policy.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LT2Config):
        super().__init__(config)
        self.model = LT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # transformers 5 renamed `past_key_values` to `cache`; its own models accept the old name, with this warning,
    # until 5.40, and so do we. Any other unknown keyword is a TypeError rather than silently ignored.
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopedCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        use_weighted_exit: bool = False,
        output_step_hidden_states: bool = False,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        adaptive_exit: bool | None = None,
    ) -> LoopedOutput | tuple:
        """`return_dict`, `output_attentions` and `output_hidden_states` are the keywords generate() and peft pass
        to every model; attention weights and per-layer hidden states are not available (the loop's per-step states
        are: `output_step_hidden_states=True`). `adaptive_exit`: see the class docstring; generate() passes it and
        `exit_threshold` on to every step."""
        if output_attentions or output_hidden_states:
            raise ValueError(
                "output_attentions/output_hidden_states are not supported; use output_step_hidden_states=True"
            )
        if cache is not None and not isinstance(cache, LoopedCache):
            raise TypeError(
                f"cache must be the LoopedCache this model returned (out.cache), not {type(cache).__name__}"
            )
        if exit_threshold is not None and not 0.0 <= exit_threshold <= 1.0:
            raise ValueError(f"exit_threshold={exit_threshold} is outside [0, 1]")
        tokens = input_ids if input_ids is not None else inputs_embeds
        decoding = tokens is not None and tokens.shape[1] == 1 and cache is not None and cache.seen_tokens > 0
        adaptive = self.adaptive_threshold(adaptive_exit, exit_threshold, exit_at_step, use_weighted_exit, decoding)
        steps, probs, cache, exit_steps = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            exit_threshold=adaptive,
        )
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        if adaptive is None:
            kept = [h[:, keep] for h in steps]
            kept_probs = probs[:, :, keep] if probs is not None else None
            logits = self.select_logits(kept, kept_probs, exit_at_step, exit_threshold, use_weighted_exit)
        else:  # each token's last state is its exit step's
            logits = self.lm_head(steps[-1][:, keep])
            exit_steps = exit_steps[:, keep]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        output = LoopedOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache is not False else None,
            exit_probs=probs,
            exit_steps=exit_steps,
            step_hidden_states=tuple(steps) if output_step_hidden_states else None,
        )
        return output.to_tuple() if return_dict is False else output

    def adaptive_threshold(
        self,
        adaptive_exit: bool | None,
        exit_threshold: float | None,
        exit_at_step: int | None,
        use_weighted_exit: bool,
        decoding: bool,
    ) -> float | None:
        """The threshold at which this forward stops tokens looping (see the class docstring), or None when every
        step runs."""
        threshold_rule = exit_at_step is None and not use_weighted_exit and self.config.use_exit_gate
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if adaptive_exit and not threshold_rule:
            raise ValueError(
                "adaptive_exit=True needs the threshold rule: a model with an exit gate, and neither exit_at_step "
                "nor use_weighted_exit"
            )
        if adaptive_exit or (adaptive_exit is None and threshold_rule and decoding and threshold < 1.0):
            return threshold
        return None

    def select_logits(
        self,
        steps: list[torch.Tensor],
        probs: torch.Tensor | None,
        exit_at_step: int | None,
        exit_threshold: float | None,
        use_weighted_exit: bool,
    ) -> torch.Tensor:
        num_steps = len(steps)
        if exit_at_step is not None:
            if not 0 <= exit_at_step < num_steps:
                raise ValueError(f"exit_at_step={exit_at_step} is outside 0..{num_steps - 1}")
            return self.lm_head(steps[exit_at_step])
        if probs is None:  # no exit gate: a plain (Llama-family) model
            if use_weighted_exit or exit_threshold is not None:
                raise ValueError("this model has no exit gate; use_weighted_exit/exit_threshold do not apply")
            return self.lm_head(steps[-1])
        if use_weighted_exit:
            logits = 0.0
            for p, h in zip(probs, steps, strict=True):
                logits = logits + p.unsqueeze(-1) * self.lm_head(h).float()
            return logits.to(steps[-1].dtype)
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        return self.lm_head(select_exit_hidden(steps, probs, threshold))


def select_exit_hidden(steps: list[torch.Tensor], probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the hidden state of the first step whose cumulative exit mass reaches `threshold` (else the
    last step). Selecting hidden states before the linear head gives the same logits as selecting logits."""
    reached = probs.cumsum(0) >= threshold  # [T, B, S]
    reached[-1] = True
    exit_step = reached.float().argmax(0)  # first True
    stacked = torch.stack(steps)  # [T, B, S, H]
    index = exit_step[None, :, :, None].expand(1, *stacked.shape[1:])
    return stacked.gather(0, index).squeeze(0)


class OuroForCausalLM(LT2ForCausalLM):
    """Ouro's architecture name, so its published config.json (`architectures: [OuroForCausalLM]`) maps here."""

    config_class = OuroConfig


def register_auto_classes() -> None:
    """Map model_type "lt2" and "ouro" to these classes in transformers' Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("lt2", LT2Config, exist_ok=True)
    AutoConfig.register("ouro", OuroConfig, exist_ok=True)
    AutoModelForCausalLM.register(LT2Config, LT2ForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)


# lt2convert's copy registers itself once defined (transformers may trigger lt2convert's registration hook while
# this module is still importing, so the hook cannot do it). An exported checkpoint's remote-code copy is mapped
# by its config's auto_map instead and must not touch the global Auto classes.
if __name__ == "lt2convert.modeling.modeling_lt2":
    register_auto_classes()


__all__ = [
    "LT2Config",
    "OuroConfig",
    "LT2Model",
    "LT2ForCausalLM",
    "OuroForCausalLM",
    "LoopedCache",
    "LoopedOutput",
]
