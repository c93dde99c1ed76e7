"""Gated delta rule kernels against fla's naive recurrent reference (fp32, CPU)."""

import shutil
import subprocess
import sys
from pathlib import Path

import lt2convert.kernels
import lt2convert.kernels.gpu_check as gpu_check
import pytest
import torch
import torch.nn.functional as F
from lt2convert.kernels import gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step

naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")

FWD_ATOL = 1e-5
GRAD_ATOL = 1e-4

# (B, T, H, K, V, chunk_size): T = 63, 100, 500 are not multiples of the chunk.
SHAPES = [
    (1, 63, 2, 16, 16, 64),
    (2, 100, 3, 32, 48, 64),
    (1, 500, 2, 16, 32, 64),
    (2, 300, 2, 16, 16, 16),  # 16-token chunks: three segments, the last one partial
    (1, 100, 1, 8, 8, 128),
]


def make_inputs(B: int, T: int, H: int, K: int, V: int, seed: int) -> dict[str, torch.Tensor]:
    """Raw leaf tensors: q, k unnormalised, g and beta as logits, h0 an initial state."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "q": (B, T, H, K),
        "k": (B, T, H, K),
        "v": (B, T, H, V),
        "g": (B, T, H),
        "beta": (B, T, H),
        "h0": (B, H, K, V),
    }
    return {name: torch.randn(shape, generator=gen).requires_grad_() for name, shape in shapes.items()}


def activated(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What a GDN layer feeds the kernel: L2-normalised q/k, log-space decay, sigmoided beta."""
    return (
        F.normalize(x["q"], dim=-1),
        F.normalize(x["k"], dim=-1),
        x["v"],
        F.logsigmoid(x["g"]),
        x["beta"].sigmoid(),
    )


def grads(
    o: torch.Tensor, state: torch.Tensor, x: dict[str, torch.Tensor], names: list[str]
) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of (o, state) with respect to ``x[names]``."""
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (
        state * torch.randn(state.shape, generator=gen)
    ).sum()
    return torch.autograd.grad(loss, [x[n] for n in names], retain_graph=True)


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_recurrent(shape: tuple[int, ...], with_h0: bool) -> None:
    B, T, H, K, V, chunk = shape
    x = make_inputs(B, T, H, K, V, seed=T + H)
    q, k, v, g, beta = activated(x)
    h0 = x["h0"] if with_h0 else None
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, state_ref = naive.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, initial_state=h0, output_final_state=True
    )
    assert o.shape == (B, T, H, V) and o.dtype == q.dtype and state.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=FWD_ATOL, rtol=0)

    names = ["q", "k", "v", "g", "beta"] + (["h0"] if with_h0 else [])
    for name, ours, ref in zip(
        names, grads(o, state, x, names), grads(o_ref, state_ref, x, names), strict=True
    ):
        torch.testing.assert_close(ours, ref, atol=GRAD_ATOL, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


def test_l2norm_in_kernel() -> None:
    x = make_inputs(2, 100, 2, 16, 16, seed=7)
    q, k, v, g, beta = activated(x)
    o, state = gated_delta_rule(
        x["q"], x["k"], v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o_ref, state_ref = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=FWD_ATOL, rtol=0)
    for name, ours, ref in zip(
        "qk", grads(o, state, x, ["q", "k"]), grads(o_ref, state_ref, x, ["q", "k"]), strict=True
    ):
        torch.testing.assert_close(ours, ref, atol=GRAD_ATOL, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


def test_strong_decay_is_exact() -> None:
    """Decays far below the cut-off (exp(-30)) within one chunk: zeroed factors must not change the result."""
    x = make_inputs(1, 150, 2, 16, 16, seed=3)
    q, k, v, _, beta = activated(x)
    g = -torch.rand(1, 150, 2, generator=torch.Generator().manual_seed(4)) * 20
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=x["h0"], output_final_state=True)
    o_ref, state_ref = naive.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, initial_state=x["h0"], output_final_state=True
    )
    torch.testing.assert_close(o, o_ref, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=FWD_ATOL, rtol=0)


@pytest.mark.parametrize("l2norm", [False, True])
def test_step_chain_equals_full(l2norm: bool) -> None:
    B, T, H, K, V = 2, 70, 2, 16, 24
    x = make_inputs(B, T, H, K, V, seed=11)
    q, k, v, g, beta = (t.detach() for t in activated(x))
    if l2norm:
        q, k = x["q"].detach(), x["k"].detach()
    h0 = x["h0"].detach()
    o, state = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm
    )
    stepped = torch.full((B, T, H, V), float("nan"))
    step_state = h0
    for t in range(T):
        stepped[:, t], step_state = gated_delta_rule_step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], step_state, use_qk_l2norm_in_kernel=l2norm
        )
    torch.testing.assert_close(stepped, o, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(step_state, state, atol=FWD_ATOL, rtol=0)


def test_reference_matches_naive() -> None:
    x = make_inputs(2, 40, 2, 8, 8, seed=5)
    q, k, v, g, beta = (t.detach() for t in activated(x))
    o, state = gated_delta_rule_reference(
        q, k, v, g, beta, initial_state=x["h0"].detach(), output_final_state=True
    )
    o_ref, state_ref = naive.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, initial_state=x["h0"].detach(), output_final_state=True
    )
    torch.testing.assert_close(o, o_ref, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=FWD_ATOL, rtol=0)


def test_final_state_only_on_request() -> None:
    x = make_inputs(1, 10, 1, 8, 8, seed=1)
    assert gated_delta_rule(*activated(x))[1] is None


def test_bf16_returns_input_dtype() -> None:
    x = make_inputs(1, 65, 2, 16, 16, seed=2)
    q, k, v, g, beta = (t.detach().bfloat16() for t in activated(x))
    o, state = gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_flat_copy_runs_without_fla(tmp_path: Path) -> None:
    """The kernel files copied flat beside a checkpoint, on a torch-only machine (no fla, no triton)."""
    package = tmp_path / "checkpoint_code"
    package.mkdir()
    for source in Path(lt2convert.kernels.__file__).parent.glob("*.py"):
        shutil.copy(source, package / source.name)
    code = (
        "import sys; sys.modules['fla'] = None; sys.modules['triton'] = None\n"
        "import torch\n"
        "from checkpoint_code import gated_delta_rule, dsa, sliding_window_attention\n"
        "x = torch.rand(1, 9, 1, 4)\n"
        "o, _ = gated_delta_rule(x, x, x, -torch.rand(1, 9, 1), torch.rand(1, 9, 1))\n"
        "assert o.shape == (1, 9, 1, 4)\n"
        "assert dsa(x, x, x, x, x[:, :, 0], topk=4).shape == (1, 9, 1, 4)\n"
        "assert sliding_window_attention(x, x, x, window=3).shape == (1, 9, 1, 4)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_gpu_check_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main()


def test_gpu_check_distill_step_timing_runs_on_the_cpu() -> None:
    """The distill section's models, stages and step calls, at a tiny size on the CPU path."""
    tiny = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 16, "gdn_num_heads": 2, "gdn_head_k_dim": 16}
    timings = gpu_check.time_distill_steps("cpu", batch=2, seq_len=20, repeats=1, model=tiny)
    assert set(timings) == {"align_ms", "kd_ms"} and all(ms > 0 for ms in timings.values())


def test_gradcheck_of_the_chunked_path() -> None:
    """Finite differences against the hand-written backward in fp64 (the kernel then works in fp64): several
    segments of 2-token chunks, an initial state and a final partial chunk."""
    x = make_inputs(1, 19, 1, 3, 2, seed=5)
    inputs = [t.detach().double().requires_grad_() for t in (*activated(x), x["h0"])]

    def run(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=2)

    assert run(*inputs)[1].dtype == torch.float64
    assert torch.autograd.gradcheck(run, inputs)
