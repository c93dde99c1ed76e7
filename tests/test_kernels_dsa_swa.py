"""DSA against fla's naive_dsa and sliding-window attention against dense masked attention (fp32, CPU)."""

import pytest
import torch
import torch.nn.functional as F
from lt2convert.kernels import (
    dsa,
    dsa_reference,
    dsa_step,
    sliding_window_attention,
    sliding_window_attention_reference,
    sliding_window_attention_step,
)

fla_dsa = pytest.importorskip("fla.ops.dsa")

ATOL = 1e-5

# (B, T, HQ, H, K, V, HI, DI, topk, block_size, weighted)
DSA_SHAPES = [
    (2, 300, 4, 2, 32, 32, 4, 16, 64, 32, True),  # GQA, T not a multiple of the block
    (1, 257, 4, 4, 16, 24, 2, 8, 16, 64, False),
    (1, 200, 8, 1, 16, 16, 4, 16, 48, 7, True),  # MQA, odd block
    (2, 128, 2, 1, 16, 16, 2, 8, 32, 128, True),
]
# One ReLU indexer head: many exact zero-score ties at the top-k cut, where our rule (most recent key first)
# and fla's (torch.topk's layout order) legitimately differ.
TIE_SHAPE = (1, 300, 2, 1, 16, 16, 1, 8, 120, 32, False)


def make_dsa_inputs(
    B: int, T: int, HQ: int, H: int, K: int, V: int, HI: int, DI: int, weighted: bool, seed: int
) -> tuple[torch.Tensor, ...]:
    """q, k, v, q_idx, k_idx and w_idx (or None) in fla's layouts."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, T, HQ, K), (B, T, H, K), (B, T, H, V), (B, T, HI, DI), (B, T, DI)]
    tensors = [torch.randn(shape, generator=gen) for shape in shapes]
    w_idx = torch.randn(B, T, HI, generator=gen) if weighted else None
    return (*tensors, w_idx)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention in ``[B, T, H, D]`` layout, GQA by repeating key/value heads."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)


@pytest.mark.parametrize("shape", DSA_SHAPES)
def test_dsa_matches_fla_naive(shape: tuple) -> None:
    B, T, HQ, H, K, V, HI, DI, topk, block, weighted = shape
    q, k, v, q_idx, k_idx, w_idx = make_dsa_inputs(B, T, HQ, H, K, V, HI, DI, weighted, seed=T + topk)
    # Positive index vectors: no ReLU zeros, so no tied scores, where the two tie rules could differ.
    q_idx, k_idx = q_idx.abs(), k_idx.abs()
    expected = fla_dsa.naive_dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk)
    torch.testing.assert_close(
        dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk, block_size=block), expected, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        dsa_reference(q, k, v, q_idx, k_idx, w_idx, topk=topk), expected, atol=ATOL, rtol=0
    )


def test_dsa_local_selection_gathers_keys() -> None:
    """Scores rising with position select the most recent keys: blocks gather a small key subset."""
    B, T = 1, 512
    q, k, v, *_ = make_dsa_inputs(B, T, 4, 2, 16, 16, 2, 8, weighted=False, seed=0)
    q_idx = torch.ones(B, T, 2, 8)
    k_idx = (torch.arange(T, dtype=torch.float32) / T)[None, :, None].expand(B, T, 8).contiguous()
    expected = fla_dsa.naive_dsa(q, k, v, q_idx, k_idx, topk=64)
    torch.testing.assert_close(
        dsa(q, k, v, q_idx, k_idx, topk=64, block_size=32), expected, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("topk", [100, 4096])
def test_dsa_with_topk_at_least_t_is_causal_attention(topk: int) -> None:
    q, k, v, q_idx, k_idx, w_idx = make_dsa_inputs(2, 100, 4, 2, 16, 16, 2, 8, weighted=True, seed=1)
    torch.testing.assert_close(
        dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk), causal_attention(q, k, v), atol=ATOL, rtol=0
    )


def test_dsa_ties_go_to_the_most_recent_keys_in_prefill_and_decoding() -> None:
    B, T, HQ, H, K, V, HI, DI, topk, block, weighted = TIE_SHAPE
    q, k, v, q_idx, k_idx, w_idx = make_dsa_inputs(B, T, HQ, H, K, V, HI, DI, weighted, seed=T + topk)
    full = dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk, block_size=block)
    torch.testing.assert_close(full, dsa_reference(q, k, v, q_idx, k_idx, w_idx, topk=topk), atol=ATOL, rtol=0)
    scores = torch.einsum("thd,sd->ts", q_idx[0], k_idx[0]).relu()
    zero_ties = [(t, int((scores[t, : t + 1] > 0).sum())) for t in range(topk, T)]
    assert any(positive < topk for _, positive in zero_ties), "inputs must put ties at the cut"
    for t in range(topk, T, 17):  # decoding sees only t + 1 keys; it must pick the same ones
        step = dsa_step(q[:, t], k[:, : t + 1], v[:, : t + 1], q_idx[:, t], k_idx[:, : t + 1], topk=topk)
        torch.testing.assert_close(step, full[:, t], atol=ATOL, rtol=0)


def test_select_topk_prefers_recent_keys_among_equal_scores() -> None:
    from lt2convert.kernels.dsa import select_topk

    logits = torch.tensor([[0.0, 2.0, 0.0, -0.0, 0.0, 1.0, float("-inf")]])
    assert sorted(select_topk(logits, 4)[0].tolist()) == [1, 3, 4, 5]


@pytest.mark.parametrize("shape", [*DSA_SHAPES, TIE_SHAPE])
def test_dsa_step_equals_last_row(shape: tuple) -> None:
    B, T, HQ, H, K, V, HI, DI, topk, _, weighted = shape
    q, k, v, q_idx, k_idx, w_idx = make_dsa_inputs(B, T, HQ, H, K, V, HI, DI, weighted, seed=T * 3)
    full = dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk)
    for length in (T, topk):  # a cache longer than topk, and one that topk covers entirely
        step = dsa_step(
            q[:, length - 1],
            k[:, :length],
            v[:, :length],
            q_idx[:, length - 1],
            k_idx[:, :length],
            None if w_idx is None else w_idx[:, length - 1],
            topk=topk,
        )
        torch.testing.assert_close(step, full[:, length - 1], atol=ATOL, rtol=0)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Dense ``[T, T]`` band-masked attention, the definition sliding-window attention must match: key j is
    visible to query i when j <= i and it is among the last `window` keys or the first `sinks`."""
    T = q.shape[1]
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & ((i[None, :] > i[:, None] - window) | (i[None, :] < sinks))
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=band).transpose(1, 2)


def make_swa_inputs(B: int, T: int, HQ: int, H: int, K: int, V: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen) for shape in [(B, T, HQ, K), (B, T, H, K), (B, T, H, V)])


@pytest.mark.parametrize("window", [100, 1000])
def test_swa_with_window_at_least_t_is_causal_attention(window: int) -> None:
    q, k, v = make_swa_inputs(2, 100, 4, 2, 16, 24, seed=2)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, window), causal_attention(q, k, v), atol=ATOL, rtol=0
    )


# (B, T, HQ, H, window, block_size, sinks)
SWA_SHAPES = [
    (2, 300, 4, 2, 17, 64, 0),
    (1, 513, 8, 1, 64, 256, 0),
    (1, 200, 2, 2, 1, 32, 0),
    (2, 130, 4, 4, 129, 50, 0),
    (2, 300, 4, 2, 17, 64, 4),  # sinks before the band of most blocks
    (1, 200, 2, 2, 1, 32, 40),  # sinks longer than the window and than a block
    (1, 90, 4, 1, 60, 16, 8),  # early blocks' bands start inside the sinks
]


@pytest.mark.parametrize("shape", SWA_SHAPES)
def test_swa_matches_dense_band(shape: tuple[int, ...]) -> None:
    B, T, HQ, H, window, block, sinks = shape
    q, k, v = make_swa_inputs(B, T, HQ, H, 16, 24, seed=T + window)
    expected = band_attention(q, k, v, window, sinks)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, window, block_size=block, sinks=sinks), expected, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        sliding_window_attention_reference(q, k, v, window, sinks=sinks), expected, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("shape", SWA_SHAPES)
def test_swa_step_equals_last_row(shape: tuple[int, ...]) -> None:
    B, T, HQ, H, window, _, sinks = shape
    q, k, v = make_swa_inputs(B, T, HQ, H, 16, 24, seed=T)
    expected = band_attention(q, k, v, window, sinks)
    for length in (T, min(window, T), min(window + sinks // 2, T)):
        step = sliding_window_attention_step(q[:, length - 1], k[:, :length], v[:, :length], window, sinks=sinks)
        torch.testing.assert_close(step, expected[:, length - 1], atol=ATOL, rtol=0)


def test_sinks_change_the_output() -> None:
    """Guards the sink cases above: keeping the first keys must matter once they leave the window."""
    q, k, v = make_swa_inputs(1, 64, 2, 2, 16, 16, seed=3)
    plain, sunk = (sliding_window_attention(q, k, v, 8, sinks=s) for s in (0, 4))
    assert (plain[:, 8:] - sunk[:, 8:]).abs().max() > 1e-3
    torch.testing.assert_close(plain[:, :8], sunk[:, :8], atol=ATOL, rtol=0)


def test_heads_must_group() -> None:
    q, k, v = make_swa_inputs(1, 8, 3, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        sliding_window_attention(q, k, v, window=4)
