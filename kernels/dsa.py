"""DeepSeek Sparse Attention (DSA): lightning indexer + attention over the top-k keys per query.

Semantics are fla's ``fla.ops.dsa.naive_dsa``: for a query at ``t`` and a causal key at ``s <= t`` the
indexer scores ``I[t, s] = sum_j w[t, j] * relu(scale_idx * q_idx[t, j] . k_idx[s])`` with
``scale_idx = DI ** -0.5`` (equal head weights when ``w_idx`` is None); each query keeps its ``topk``
highest-scoring causal keys, shared by all query heads, and attends over those only. One deliberate
difference: equal scores (common: ReLU gives exact zeros) go to the most recent keys, so a query selects the
same keys in prefill and in decoding; fla's torch.topk resolves them by row layout instead.

Layouts follow fla: ``q [B, T, HQ, K]``, ``k [B, T, H, K]``, ``v [B, T, H, V]`` (GQA with ``HQ % H == 0``),
``q_idx [B, T, HI, DI]``, ``k_idx [B, T, DI]``, ``w_idx [B, T, HI]``. The indexer runs in fp32 (as fla's);
attention runs in the input dtype through SDPA, which accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .swa import check_gqa_heads

# A query block gathers the keys any of its queries selected when they are at most this fraction of the
# causal prefix (local selections); otherwise masking the whole prefix is cheaper than the gather copy.
GATHER_FRACTION = 0.75


def index_scores(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Lightning-indexer logits ``[Tq, Tk]`` for one sequence: ``q_idx [Tq, HI, DI]``, ``k_idx [Tk, DI]``.

    Written with fla's exact einsum expressions so that equal scores, and hence top-k ties, come out
    bitwise the same as ``naive_dsa``'s.
    """
    score = torch.einsum("m h d, n d -> h m n", q_idx.float(), k_idx.float()) * scale
    score = F.relu(score)
    if w_idx is None:
        return score.sum(0)
    return torch.einsum("h m n, m h -> m n", score, w_idx.float())


def select_topk(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` largest logits along the last axis; equal logits go to the most recent key.

    The tie rule must not depend on the row's length: decoding scores a query over its cache (``t + 1`` keys)
    while prefill scores it inside a ``T``-wide row, and ReLU makes exact-zero ties common. torch.topk breaks
    ties by memory layout, so each score is made unique by an int64 key: the float's order-preserving integer
    image in the high 32 bits, the key position in the low 32 bits.
    """
    bits = (logits.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)  # monotone in the float value
    position = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64)
    return (ordered * 2**32 + position).topk(topk, dim=-1, sorted=False).indices


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of ``q [1, HQ, n, K]`` over ``k, v [1, H, m, *]`` restricted to ``mask [n, m]`` (True = attend).

    When the block's queries jointly selected few of the ``m`` keys, only those columns are gathered.
    """
    used = mask.any(0)
    if int(used.sum()) <= GATHER_FRACTION * mask.shape[1]:
        cols = used.nonzero().squeeze(1)
        k, v, mask = k[:, :, cols], v[:, :, cols], mask[:, cols]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def dsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w_idx: torch.Tensor | None = None,
    topk: int = 2048,
    scale: float | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """DSA prefill with memory linear in ``T``.

    Queries ``t < topk`` see at most ``topk`` causal keys, so they select all of them: they run as plain
    causal attention without scoring. Later queries are scored ``block_size`` at a time (``[block, T]``
    logits, never ``[T, T]``), take fla's top-k, and attend over the selection through a boolean mask.

    Args:
        q: ``[B, T, HQ, K]``; k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        q_idx: ``[B, T, HI, DI]``; k_idx: ``[B, T, DI]``; w_idx: ``[B, T, HI]`` or None.
        topk: keys kept per query.
        scale: attention scale, default ``K ** -0.5``.
        block_size: queries scored and attended per step.

    Returns:
        ``[B, T, HQ, V]`` in ``q``'s dtype.
    """
    check_gqa_heads(q, k)
    B, T, HQ, _ = q.shape
    if scale is None:
        scale = q.shape[-1] ** -0.5
    index_scale = q_idx.shape[-1] ** -0.5
    # Head-major copies: SDPA on [B, T, H, D] views runs ~40% slower (measured, T=8192).
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, heads, T, D]
    o = q.new_empty(B, T, HQ, v.shape[-1])
    o_t = o.transpose(1, 2)
    dense = min(topk, T)
    o_t[:, :, :dense] = F.scaled_dot_product_attention(
        q_t[:, :, :dense], k_t[:, :, :dense], v_t[:, :, :dense], is_causal=True, scale=scale, enable_gqa=True
    )
    for b in range(B):
        for start in range(dense, T, block_size):
            end = min(start + block_size, T)
            mask = _select_block(
                q_idx[b], k_idx[b], None if w_idx is None else w_idx[b], start, end, topk, index_scale
            )
            o_t[b : b + 1, :, start:end] = _attend(
                q_t[b : b + 1, :, start:end], k_t[b : b + 1, :, :end], v_t[b : b + 1, :, :end], mask, scale
            )
    return o


def _select_block(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w_idx: torch.Tensor | None,
    start: int,
    end: int,
    topk: int,
    index_scale: float,
) -> torch.Tensor:
    """Boolean ``[end - start, end]`` mask of the keys that queries ``start .. end-1`` select.

    Needs ``start >= topk``: every row then has more than ``topk`` visible keys, none ``-inf`` is selected.

    Equal scores resolve toward the most recent key (:func:`select_topk`), as in decoding.
    """
    T = k_idx.shape[0]
    logits = q_idx.new_full((end - start, T), float("-inf"), dtype=torch.float32)
    scores = index_scores(
        q_idx[start:end], k_idx[:end], None if w_idx is None else w_idx[start:end], index_scale
    )
    rows = torch.arange(start, end, device=q_idx.device)[:, None]
    logits[:, :end] = scores.masked_fill(torch.arange(end, device=q_idx.device) > rows, float("-inf"))
    selected = select_topk(logits, topk)
    mask = torch.zeros(end - start, end, dtype=torch.bool, device=q_idx.device)
    return mask.scatter_(1, selected, True)


def dsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w_idx: torch.Tensor | None = None,
    topk: int = 2048,
    scale: float | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Naive dense ``[T, T]`` DSA with :func:`dsa`'s signature and shapes (fp32 math, like fla's naive).

    ``block_size`` is accepted for signature parity and unused: the reference has no blocks.
    """
    del block_size
    check_gqa_heads(q, k)
    B, T, HQ, _ = q.shape
    if scale is None:
        scale = q.shape[-1] ** -0.5
    group = HQ // k.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for b in range(B):
        logits = index_scores(
            q_idx[b], k_idx[b], None if w_idx is None else w_idx[b], q_idx.shape[-1] ** -0.5
        )
        logits = logits.masked_fill(~causal, float("-inf"))
        selected = select_topk(logits, min(topk, T))
        mask = torch.zeros(T, T, dtype=torch.bool, device=q.device).scatter_(1, selected, True) & causal
        k_b, v_b = (x[b].float().repeat_interleave(group, dim=1) for x in (k, v))
        score = torch.einsum("m h d, n h d -> h m n", q[b].float(), k_b) * scale
        p = torch.softmax(score.masked_fill(~mask, float("-inf")), dim=-1)
        outputs.append(torch.einsum("h m n, n h d -> m h d", p, v_b))
    return torch.stack(outputs).to(q.dtype)


def dsa_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_idx: torch.Tensor,
    kidx_cache: torch.Tensor,
    w_idx: torch.Tensor | None = None,
    topk: int = 2048,
    scale: float | None = None,
) -> torch.Tensor:
    """DSA for one new query over a cache that already holds the new token (its last entry).

    The indexer scores the whole cache (``O(Tc * HI * DI)``, the cheap part); attention reads only the
    ``topk`` selected keys. Equals the last row of :func:`dsa` over the same sequence.

    Args:
        q: ``[B, HQ, K]``; k_cache: ``[B, Tc, H, K]``; v_cache: ``[B, Tc, H, V]``.
        q_idx: ``[B, HI, DI]``; kidx_cache: ``[B, Tc, DI]``; w_idx: ``[B, HI]`` or None.
        topk: keys kept.
        scale: attention scale, default ``K ** -0.5``.

    Returns:
        ``[B, HQ, V]`` in ``q``'s dtype.
    """
    check_gqa_heads(q, k_cache)
    B, Tc = k_cache.shape[:2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if Tc > topk:
        index_scale = q_idx.shape[-1] ** -0.5
        selected = torch.cat(
            [
                select_topk(
                    index_scores(
                        q_idx[b, None], kidx_cache[b], None if w_idx is None else w_idx[b, None], index_scale
                    ),
                    topk,
                )
                for b in range(B)
            ]
        )  # [B, topk]
        batch = torch.arange(B, device=q.device)[:, None]
        k_cache, v_cache = k_cache[batch, selected], v_cache[batch, selected]
    o = F.scaled_dot_product_attention(
        q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2), scale=scale, enable_gqa=True
    )
    return o[:, :, 0]
