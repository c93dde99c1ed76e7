"""Causal sliding-window attention: each query sees the last ``window`` keys, itself included.

Layouts follow fla: ``q [B, T, HQ, K]``, ``k [B, T, H, K]``, ``v [B, T, H, V]`` (GQA with ``HQ % H == 0``).
Attention runs in the input dtype through SDPA, which accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_gqa_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """GQA needs the query heads to be a whole multiple of the key/value heads."""
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")


def _band_mask(start: int, end: int, key_start: int, window: int, device: torch.device) -> torch.Tensor:
    """``[end - start, end - key_start]`` mask: query ``i`` attends key ``j`` iff ``i - window < j <= i``."""
    rows = torch.arange(start, end, device=device)[:, None]
    cols = torch.arange(key_start, end, device=device)[None, :]
    return (cols <= rows) & (cols > rows - window)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    block_size: int = 256,
) -> torch.Tensor:
    """Causal sliding-window attention with memory linear in ``T``.

    Queries go ``block_size`` at a time against the ``block_size + window - 1`` keys they can reach, under a
    band mask, so nothing ``[T, T]`` is formed. ``window >= T`` is plain causal attention.

    Args:
        q: ``[B, T, HQ, K]``; k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        window: keys visible to each query, itself included (``>= 1``).
        scale: attention scale, default ``K ** -0.5``.
        block_size: queries per SDPA call.

    Returns:
        ``[B, T, HQ, V]`` in ``q``'s dtype.
    """
    check_gqa_heads(q, k)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, HQ, _ = q.shape
    # Head-major copies: SDPA on [B, T, H, D] views runs ~40% slower (measured, T=8192).
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, heads, T, D]
    if window >= T:
        o = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).contiguous()
    o = q.new_empty(B, T, HQ, v.shape[-1])
    o_t = o.transpose(1, 2)
    for start in range(0, T, block_size):
        end = min(start + block_size, T)
        key_start = max(0, start - window + 1)
        mask = _band_mask(start, end, key_start, window, q.device)
        o_t[:, :, start:end] = F.scaled_dot_product_attention(
            q_t[:, :, start:end],
            k_t[:, :, key_start:end],
            v_t[:, :, key_start:end],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
    return o


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    block_size: int = 256,
) -> torch.Tensor:
    """Naive dense ``[T, T]``-mask reference with :func:`sliding_window_attention`'s signature (fp32 math).

    ``block_size`` is accepted for signature parity and unused: the reference has no blocks.
    """
    del block_size
    check_gqa_heads(q, k)
    T, HQ = q.shape[1], q.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    group = HQ // k.shape[2]
    k, v = (x.float().repeat_interleave(group, dim=2) for x in (k, v))
    score = torch.einsum("b m h d, b n h d -> b h m n", q.float(), k) * scale
    score = score.masked_fill(~_band_mask(0, T, 0, window, q.device), float("-inf"))
    return torch.einsum("b h m n, b n h d -> b m h d", torch.softmax(score, dim=-1), v).to(q.dtype)


def sliding_window_attention_step(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int, scale: float | None = None
) -> torch.Tensor:
    """One new query over a cache that already holds the new token (its last entry); reads ``window`` keys.

    Args:
        q: ``[B, HQ, K]``; k_cache: ``[B, Tc, H, K]``; v_cache: ``[B, Tc, H, V]``.
        window: keys visible to the query, itself included.
        scale: attention scale, default ``K ** -0.5``.

    Returns:
        ``[B, HQ, V]`` in ``q``'s dtype.
    """
    check_gqa_heads(q, k_cache)
    k_win, v_win = (x[:, -window:].transpose(1, 2) for x in (k_cache, v_cache))
    o = F.scaled_dot_product_attention(q[:, :, None], k_win, v_win, scale=scale, enable_gqa=True)
    return o[:, :, 0]
