"""Kernel benchmark: our mixers beside fla's naive chunk GDN and SDPA attention, in one run.

    python -m lt2convert.kernels.bench [--quick] [--device cpu|cuda]

fp32, batch 1, 16 heads of dim 128. Every timing is the median of several calls after a warm-up call.
A parity check of every kernel against its naive reference runs first; if it fails, nothing is reported.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .dsa import dsa, dsa_reference, dsa_step
from .gdn import gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from .swa import sliding_window_attention, sliding_window_attention_reference, sliding_window_attention_step

Row = dict[str, object]

# Parity (rtol, atol): fp32 on CPU; fla's Triton kernels use TF32 dots for fp32 inputs on CUDA.
PARITY_TOLERANCE = {"cpu": (0.0, 1e-4), "cuda": (1e-2, 1e-2)}


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run; the DSA indexer is a light one (DeepSeek-V3.2 uses 64 x 128 in FP8)."""

    heads: int = 16
    head_dim: int = 128
    seq_lens: tuple[int, ...] = (512, 2048, 8192)
    train_len: int = 2048
    naive_max_len: int = 2048  # fla's naive chunk GDN loops in Python: ~5 s per call at 2048 on 2 CPU cores
    dsa_len: int = 8192
    dsa_topk: int = 2048
    dsa_memory_lens: tuple[int, ...] = (2048, 4096, 8192)
    index_heads: int = 4
    index_dim: int = 64
    swa_window: int = 2048
    decode_contexts: tuple[int, ...] = (2048, 8192, 32768)
    repeats: int = 5
    budget_s: float = 15.0  # per measured function: slow baselines get fewer repeats (at least one)


FULL = BenchConfig()
QUICK = BenchConfig(
    seq_lens=(512, 2048),
    dsa_len=2048,
    dsa_topk=512,
    dsa_memory_lens=(1024, 2048),
    decode_contexts=(2048, 8192),
    repeats=3,
)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(
    cfg: BenchConfig, device: str, fn: Callable[..., object], *args: object, **kwargs: object
) -> float:
    """Median wall time of ``fn(*args, **kwargs)`` in ms over up to ``cfg.repeats`` calls after a warm-up."""
    _sync(device)
    start = time.perf_counter()
    fn(*args, **kwargs)
    _sync(device)
    warm = time.perf_counter() - start
    times = []
    for _ in range(max(1, min(cfg.repeats, int(cfg.budget_s / max(warm, 1e-9))))):
        start = time.perf_counter()
        fn(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_memory_mib(device: str, fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Peak bytes torch allocates while ``fn(*args, **kwargs)`` runs, above what was live before, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args, **kwargs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU has no allocator statistics; replay the profiler's allocation/free events instead.
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn(*args, **kwargs)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _randn(*shape: int, device: str) -> torch.Tensor:
    return torch.randn(*shape, device=device)


def gdn_inputs(T: int, cfg: BenchConfig, device: str) -> tuple[torch.Tensor, ...]:
    """q, k (unit norm), v, g (log decay), beta for one sequence of length T."""
    H, D = cfg.heads, cfg.head_dim
    q, v = _randn(1, T, H, D, device=device), _randn(1, T, H, D, device=device)
    k = F.normalize(_randn(1, T, H, D, device=device), dim=-1)
    return q, k, v, F.logsigmoid(_randn(1, T, H, device=device)), torch.rand(1, T, H, device=device)


def head_major(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, T, H, D]`` -> contiguous ``[B, H, T, D]``, the layout SDPA runs fastest on (prepared untimed)."""
    return tuple(x.transpose(1, 2).contiguous() for x in xs)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention, the baseline, on head-major ``[B, H, T, D]`` tensors."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def swa_gdn_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    window: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """One decode step of the swa_gdn mixer's core: the window's attention plus the per-head gated GDN read-out
    (the layer feeds its GDN branch other projections of the token; one set stands in for both here)."""
    local = sliding_window_attention_step(q, k_cache, v_cache, window)
    memory, _ = gated_delta_rule_step(q, k_new, v_new, g, beta, state)
    return local + gate[:, None] * memory


def swa_gdn_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    gate: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """The swa_gdn mixer's core over a prompt: sliding-window attention plus the gated chunked GDN."""
    return sliding_window_attention(q, k, v, window) + gate[:, None] * gated_delta_rule(q, k, v, g, beta)[0]


def check_parity(device: str) -> None:
    """Raise unless every benchmarked kernel matches its naive reference on small inputs."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    rtol, atol = PARITY_TOLERANCE[device]
    B, T, H, D = 2, 150, 4, 32
    q, k, v = rand(B, T, H, D), F.normalize(rand(B, T, H, D), dim=-1), rand(B, T, H, D)
    g, beta, h0 = F.logsigmoid(rand(B, T, H)), rand(B, T, H).sigmoid(), rand(B, H, D, D)
    gate = rand(H)
    q_idx, k_idx, w_idx = rand(B, T, 2, 16), rand(B, T, 16), rand(B, T, 2)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    _, s_before_last = gated_delta_rule_reference(
        *(x[:, :-1] for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True
    )
    o_step, _ = gated_delta_rule_step(*(x[:, -1] for x in (q, k, v, g, beta)), s_before_last)
    checks = {
        "gated_delta_rule output": (o, o_ref),
        "gated_delta_rule state": (s, s_ref),
        "gated_delta_rule_step": (o_step, o_ref[:, -1]),
        "dsa": (
            dsa(q, k, v, q_idx, k_idx, w_idx, topk=40, block_size=32),
            dsa_reference(q, k, v, q_idx, k_idx, w_idx, topk=40),
        ),
        "dsa_step": (
            dsa_step(q[:, -1], k, v, q_idx[:, -1], k_idx, w_idx[:, -1], topk=40),
            dsa_reference(q, k, v, q_idx, k_idx, w_idx, topk=40)[:, -1],
        ),
        "sliding_window_attention": (
            sliding_window_attention(q, k, v, 33, block_size=32),
            sliding_window_attention_reference(q, k, v, 33),
        ),
        "sliding_window_attention_step": (
            sliding_window_attention_step(q[:, -1], k, v, 33),
            sliding_window_attention_reference(q, k, v, 33)[:, -1],
        ),
        "swa_gdn_step": (
            swa_gdn_step(q[:, -1], k, v, 33, *(x[:, -1] for x in (k, v, g, beta)), s_before_last, gate),
            sliding_window_attention_reference(q, k, v, 33)[:, -1] + gate[:, None] * o_ref[:, -1],
        ),
    }
    failed = {
        name: float((a - b).abs().max())
        for name, (a, b) in checks.items()
        if not torch.allclose(a, b, rtol, atol)
    }
    if failed:
        raise RuntimeError(
            f"parity check failed on {device} (max abs error; rtol {rtol}, atol {atol}): {failed}"
        )


def bench_gdn_prefill(cfg: BenchConfig, device: str, sdpa_ms: dict[int, float]) -> list[Row]:
    """GDN forward vs fla's naive chunk reference vs causal SDPA, per sequence length."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    except ImportError:
        naive_chunk_gated_delta_rule = None
    rows = []
    for T in cfg.seq_lens:
        inputs = gdn_inputs(T, cfg, device)
        naive, note = math.nan, ""
        with torch.inference_mode():
            ours = time_ms(cfg, device, gated_delta_rule, *inputs)
            sdpa_ms[T] = time_ms(cfg, device, sdpa_causal, *head_major(*inputs[:3]))
            if naive_chunk_gated_delta_rule is None:
                note = "fla not installed"
            elif cfg.naive_max_len < T:
                note = f"fla naive skipped above T={cfg.naive_max_len} (too slow)"
            else:
                naive = time_ms(cfg, device, naive_chunk_gated_delta_rule, *inputs)
        rows.append(
            {
                "section": "GDN prefill forward",
                "T": T,
                "gdn_ms": ours,
                "fla_naive_chunk_ms": naive,
                "sdpa_causal_ms": sdpa_ms[T],
                "speedup_vs_fla_naive": naive / ours,
                "speedup_vs_sdpa": sdpa_ms[T] / ours,
                "note": note,
            }
        )
    return rows


def bench_swa_gdn_prefill(cfg: BenchConfig, device: str, sdpa_ms: dict[int, float]) -> list[Row]:
    """The swa_gdn mixer's core (window attention + gated GDN) against its two parts and causal SDPA."""
    rows = []
    gate = _randn(cfg.heads, device=device)
    for T in cfg.seq_lens:
        q, k, v, g, beta = gdn_inputs(T, cfg, device)
        with torch.inference_mode():
            both = time_ms(cfg, device, swa_gdn_prefill, q, k, v, g, beta, gate, cfg.swa_window)
            swa = time_ms(cfg, device, sliding_window_attention, q, k, v, cfg.swa_window)
            gdn = time_ms(cfg, device, gated_delta_rule, q, k, v, g, beta)
        rows.append(
            {
                "section": "SWA+GDN (swa_gdn) prefill forward",
                "T": T,
                "swa_window": cfg.swa_window,
                "swa_gdn_ms": both,
                "swa_ms": swa,
                "gdn_ms": gdn,
                "sdpa_causal_ms": sdpa_ms[T],
                "speedup_vs_sdpa": sdpa_ms[T] / both,
            }
        )
    return rows


def bench_gdn_train(cfg: BenchConfig, device: str) -> list[Row]:
    """GDN forward+backward against its own forward at the training length."""
    T = cfg.train_len
    inputs = [x.requires_grad_() for x in gdn_inputs(T, cfg, device)]

    def forward_backward() -> None:
        gated_delta_rule(*inputs)[0].sum().backward()

    with torch.no_grad():
        forward = time_ms(cfg, device, gated_delta_rule, *inputs)
    both = time_ms(cfg, device, forward_backward)
    return [
        {
            "section": "GDN training step",
            "T": T,
            "fwd_ms": forward,
            "fwd_bwd_ms": both,
            "fwd_bwd_over_fwd": both / forward,
        }
    ]


def dsa_inputs(T: int, cfg: BenchConfig, device: str) -> tuple[torch.Tensor, ...]:
    """q, k, v (MHA, as Ouro's attention) and indexer q_idx, k_idx, w_idx for one sequence."""
    H, D, HI, DI = cfg.heads, cfg.head_dim, cfg.index_heads, cfg.index_dim
    return (
        *(_randn(1, T, H, D, device=device) for _ in range(3)),
        _randn(1, T, HI, DI, device=device),
        _randn(1, T, DI, device=device),
        _randn(1, T, HI, device=device),
    )


def bench_dsa(cfg: BenchConfig, device: str, sdpa_ms: dict[int, float]) -> list[Row]:
    """DSA prefill vs full causal attention, and DSA peak memory across lengths."""
    T, topk = cfg.dsa_len, cfg.dsa_topk
    inputs = dsa_inputs(T, cfg, device)
    with torch.inference_mode():
        ours = time_ms(cfg, device, dsa, *inputs, topk=topk)
        if T not in sdpa_ms:
            sdpa_ms[T] = time_ms(cfg, device, sdpa_causal, *head_major(*inputs[:3]))
    rows: list[Row] = [
        {
            "section": "DSA prefill",
            "T": T,
            "topk": topk,
            "indexer": f"{cfg.index_heads}x{cfg.index_dim}",
            "dsa_ms": ours,
            "full_attention_ms": sdpa_ms[T],
            "speedup_vs_full": sdpa_ms[T] / ours,
        }
    ]
    for T in cfg.dsa_memory_lens:
        inputs = dsa_inputs(T, cfg, device)
        with torch.inference_mode():
            peak = peak_memory_mib(device, dsa, *inputs, topk=topk)
        rows.append(
            {
                "section": "DSA prefill peak memory",
                "T": T,
                "topk": topk,
                "peak_mib": peak,
                "mib_per_1k_tokens": peak / (T / 1024),
            }
        )
    return rows


def full_attention_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One query ``[B, H, D]`` over the whole ``[B, Tc, H, D]`` KV cache (the baseline decode step)."""
    o = F.scaled_dot_product_attention(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2))
    return o[:, :, 0]


def bench_decode(cfg: BenchConfig, device: str) -> list[Row]:
    """One decode step of each mixer over a context of Tc tokens (the caches hold the new token)."""
    H, D, HI, DI = cfg.heads, cfg.head_dim, cfg.index_heads, cfg.index_dim
    rows = []
    for Tc in cfg.decode_contexts:
        q, k_new, v_new = (_randn(1, H, D, device=device) for _ in range(3))
        g, beta = -torch.rand(1, H, device=device), torch.rand(1, H, device=device)
        state, gate = _randn(1, H, D, D, device=device), _randn(H, device=device)
        k_cache, v_cache = _randn(1, Tc, H, D, device=device), _randn(1, Tc, H, D, device=device)
        q_idx, w_idx = _randn(1, HI, DI, device=device), _randn(1, HI, device=device)
        kidx_cache = _randn(1, Tc, DI, device=device)
        with torch.inference_mode():
            timings = {
                "gdn_step_ms": time_ms(cfg, device, gated_delta_rule_step, q, k_new, v_new, g, beta, state),
                "dsa_step_ms": time_ms(
                    cfg, device, dsa_step, q, k_cache, v_cache, q_idx, kidx_cache, w_idx, topk=cfg.dsa_topk
                ),
                "swa_step_ms": time_ms(
                    cfg, device, sliding_window_attention_step, q, k_cache, v_cache, cfg.swa_window
                ),
                "swa_gdn_step_ms": time_ms(
                    cfg, device, swa_gdn_step, q, k_cache, v_cache, cfg.swa_window, k_new, v_new, g, beta, state,
                    gate,
                ),
                "full_attention_step_ms": time_ms(cfg, device, full_attention_step, q, k_cache, v_cache),
            }
        rows.append(
            {
                "section": "Decode step (one token)",
                "context": Tc,
                **timings,
                "dsa_topk": cfg.dsa_topk,
                "swa_window": cfg.swa_window,
            }
        )
    return rows


def _find(rows: list[Row], section: str, key: str, value: int) -> Row | None:
    return next((r for r in rows if r["section"] == section and r.get(key) == value), None)


def target_rows(rows: list[Row], cfg: BenchConfig) -> list[Row]:
    """The CPU speed targets that this run's sizes cover, each with its measured value and verdict."""
    targets: list[tuple[str, float, str, float]] = []  # (what, measured, ">=" or "<=", goal)
    fwd = {T: _find(rows, "GDN prefill forward", "T", T) for T in cfg.seq_lens}
    if fwd.get(2048) is not None:
        targets += [
            ("GDN fwd T=2048: speedup vs fla naive chunk", fwd[2048]["speedup_vs_fla_naive"], ">=", 1.3),
            ("GDN fwd T=2048: speedup vs SDPA causal", fwd[2048]["speedup_vs_sdpa"], ">=", 1.0),
        ]
    if fwd.get(8192) is not None:
        targets.append(("GDN fwd T=8192: speedup vs SDPA causal", fwd[8192]["speedup_vs_sdpa"], ">=", 2.0))
        if fwd.get(2048) is not None:  # 4x the tokens: linear is 4x the time; allow 25% on top
            targets.append(
                ("GDN fwd time(8192) / time(2048)", fwd[8192]["gdn_ms"] / fwd[2048]["gdn_ms"], "<=", 5.0)
            )
    train = _find(rows, "GDN training step", "T", cfg.train_len)
    targets.append((f"GDN fwd+bwd / fwd at T={cfg.train_len}", train["fwd_bwd_over_fwd"], "<=", 2.9))
    decode = [r for r in rows if r["section"] == "Decode step (one token)"]
    targets.append(
        (
            f"GDN step time(ctx {decode[-1]['context']}) / time(ctx {decode[0]['context']})",
            decode[-1]["gdn_step_ms"] / decode[0]["gdn_step_ms"],
            "<=",
            1.5,
        )
    )
    dsa_row = _find(rows, "DSA prefill", "T", cfg.dsa_len)
    targets.append(
        (
            f"DSA T={cfg.dsa_len} k={cfg.dsa_topk}: speedup vs full attention",
            dsa_row["speedup_vs_full"],
            ">=",
            1.0,
        )
    )
    return [
        {
            "section": "Targets",
            "target": what,
            "measured": value,
            "goal": f"{op} {goal:g}",
            "met": "yes" if (value >= goal if op == ">=" else value <= goal) else "NO",
        }
        for what, value, op, goal in targets
    ]


def _format(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[Row]) -> str:
    """One aligned table per section, columns in first-seen order."""
    lines: list[str] = []
    for section in dict.fromkeys(r["section"] for r in rows):
        group = [r for r in rows if r["section"] == section]
        columns = [c for c in dict.fromkeys(c for r in group for c in r) if c != "section"]
        cells = [[_format(r.get(c, "")) for c in columns] for r in group]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines += ["", f"## {section}", "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def run_kernel_bench(quick: bool = False, device: str = "cpu", show: bool = True) -> list[Row]:
    """Run the parity check, then every benchmark; print the table when ``show`` and return the rows.

    ``device="cuda"`` times fla's Triton GDN (our dispatch) and runs fla's naive chunk GDN at every length.
    """
    cfg = QUICK if quick else FULL
    if device == "cuda":
        cfg = replace(cfg, naive_max_len=max(cfg.seq_lens))
    torch.manual_seed(0)
    load = os.getloadavg()
    check_parity(device)
    sdpa_ms: dict[int, float] = {}
    rows = bench_gdn_prefill(cfg, device, sdpa_ms)
    rows += bench_swa_gdn_prefill(cfg, device, sdpa_ms)
    rows += bench_gdn_train(cfg, device)
    rows += bench_dsa(cfg, device, sdpa_ms)
    rows += bench_decode(cfg, device)
    if device == "cpu":  # the targets are this project's CPU ones
        rows += target_rows(rows, cfg)
    if show:
        header = (
            f"# lt2convert kernel bench on {device} ({torch.get_num_threads()} threads), fp32, B=1, "
            f"H={cfg.heads}, D={cfg.head_dim}, median of <= {cfg.repeats} calls after a warm-up"
        )
        # Other processes on a small CPU machine skew timings; the load average says whether they did.
        loads = " / ".join(" ".join(f"{x:.2f}" for x in la) for la in (load, os.getloadavg()))
        print(f"{header}\n# load average before / after: {loads}{format_table(rows)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter sequences and contexts, fewer repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    run_kernel_bench(quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
