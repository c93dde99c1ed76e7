"""CUDA check: fla's Triton GDN (our CUDA dispatch) against our CPU path in bf16, the time of one distill align and
kd step of a small looped hybrid, then the bench on CUDA.

    python -m lt2convert.kernels.gpu_check [--quick]

Errors are fla's own test metric, the RMS error ratio ``rms(ours - ref) / rms(ref)``, with the limits of
fla's GDN tests: 5e-3 for outputs and final states, 8e-3 for gradients, 2e-2 for the gate and beta gradients.
The reference is the CPU chunked path fed the same bf16 values in fp32 (itself tested against fla's naive
recurrence to 1e-5). Exits non-zero on a failed check, and before doing anything without CUDA or fla.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from .bench import _sync, run_kernel_bench
from .gdn import gated_delta_rule

RATIO_LIMITS = {
    "o": 5e-3,
    "final_state": 5e-3,
    "dq": 8e-3,
    "dk": 8e-3,
    "dv": 8e-3,
    "dh0": 8e-3,
    "dg": 2e-2,
    "dbeta": 2e-2,
}

# (B, T, H, K, V): T values that are not multiples of fla's 64-token chunk on purpose.
SHAPES = [(2, 1000, 4, 128, 128), (1, 4100, 2, 64, 128), (3, 63, 4, 128, 64)]
# A whole swa_gdn layer in bf16 (projections, norms and the window's softmax included) against fp32: bf16
# rounding alone gives about 7e-3 (measured on the CPU); a layout mismatch with fla's kernel gives O(1).
SWA_GDN_LAYER_LIMIT = 2e-2


def error_ratio(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """fla's ``get_err_ratio``: RMS of the difference over RMS of the reference."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    return float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def _run(inputs: dict[str, torch.Tensor], l2norm: bool, seed: int) -> dict[str, torch.Tensor]:
    """Outputs, final state and gradients of a fixed random projection of both, for one device's inputs."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    q, k, v, g, beta, h0 = leaves.values()
    o, state = gated_delta_rule(
        q,
        k,
        v,
        F.logsigmoid(g),
        beta.sigmoid(),
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=l2norm,
    )
    gen = torch.Generator().manual_seed(seed)
    d_o, d_state = (torch.randn(x.shape, generator=gen).to(x.device) for x in (o, state))  # fp32 on both
    ((o.float() * d_o).sum() + (state * d_state).sum()).backward()
    return {"o": o, "final_state": state, **{f"d{name}": x.grad for name, x in leaves.items()}}


def check_gdn(shape: tuple[int, ...], l2norm: bool, seed: int = 0) -> dict[str, float]:
    """Error ratios of every output and gradient of the CUDA dispatch against the CPU path."""
    B, T, H, K, V = shape
    gen = torch.Generator().manual_seed(seed)
    sizes = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V), "g": (B, T, H), "beta": (B, T, H)}
    inputs = {name: torch.randn(size, generator=gen) for name, size in sizes.items()}
    if not l2norm:  # the kernel then expects unit-norm keys and queries from the caller
        inputs["q"], inputs["k"] = F.normalize(inputs["q"], dim=-1), F.normalize(inputs["k"], dim=-1)
    inputs = {name: x.bfloat16() for name, x in inputs.items()}
    inputs["h0"] = torch.randn(B, H, K, V, generator=gen)
    cuda = _run({name: x.cuda() for name, x in inputs.items()}, l2norm, seed)
    cpu = _run({name: x.float() for name, x in inputs.items()}, l2norm, seed)
    return {name: error_ratio(cuda[name], cpu[name]) for name in cpu}


@torch.no_grad()
def check_swa_gdn_layer(
    prompt: int = 1000, decoded: int = 8, window: int = 256, seed: int = 0, device: str = "cuda"
) -> dict[str, float]:
    """Error ratios of a swa_gdn layer (gate open) on `device` in bf16 (on CUDA its GDN branch runs fla's chunk
    kernel) against the same layer on the CPU in fp32: the prompt's outputs, then `decoded` tokens decoded one by
    one after it."""
    from lt2convert.modeling import LT2Config, LT2ForCausalLM
    from lt2convert.modeling.modeling_lt2 import MixerContext

    config = LT2Config(
        vocab_size=64, hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, total_ut_steps=1, layer_types=["swa_gdn"], swa_window=window,
        max_position_embeddings=prompt + decoded,
    )
    torch.manual_seed(seed)
    model = LT2ForCausalLM(config).eval()
    layer, rotary = model.model.layers[0].self_attn, model.model.rotary_emb
    layer.gdn_gate.normal_()
    x = torch.randn(2, prompt + decoded, config.hidden_size)

    def run(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        layer.to(device, dtype)
        rotary.to(device)
        h = x.to(device, dtype)
        cos, sin = rotary(h, torch.arange(prompt + decoded, device=device)[None].expand(2, -1))
        state: dict = {}
        outs = [layer(h[:, :prompt], MixerContext(cos[:, :prompt], sin[:, :prompt], None, 0), state)]
        for t in range(prompt, prompt + decoded):
            ctx = MixerContext(cos[:, t : t + 1], sin[:, t : t + 1], None, t)
            outs.append(layer(h[:, t : t + 1], ctx, state))
        return outs[0], torch.cat(outs[1:], dim=1)

    ours = run(device, torch.bfloat16)
    ref = run("cpu", torch.float32)
    return {name: error_ratio(a, b) for name, a, b in zip(("prefill", "decode"), ours, ref, strict=True)}


# A small looped hybrid for the distill step timing: 2 loop steps, GDN mixers in two of four layers.
DISTILL_MODEL = {
    "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
    "num_key_value_heads": 8, "head_dim": 64, "total_ut_steps": 2, "gdn_num_heads": 4, "gdn_head_k_dim": 128,
}
DISTILL_LAYERS = ["full_attention", "gdn", "full_attention", "gdn"]


def time_distill_steps(
    device: str = "cuda", batch: int = 4, seq_len: int = 1024, repeats: int = 3, model: dict | None = None
) -> dict[str, float]:
    """Milliseconds of one distill align step and one kd step (every loop step's logits; bf16 autocast, forward
    and backward, median of `repeats` after a warm-up that compiles the kernels) for a looped teacher and its GDN
    student on `device`."""
    from lt2convert.distill.recipe import Stage
    from lt2convert.distill.steps import STEPS, StepContext, add_step_logits, make_trainable
    from lt2convert.distill.train import forward_precision
    from lt2convert.modeling import LT2Config, LT2ForCausalLM

    shape = {**DISTILL_MODEL, **(model or {}), "num_hidden_layers": len(DISTILL_LAYERS)}
    torch.manual_seed(0)
    teacher = LT2ForCausalLM(LT2Config(**shape, layer_types=["full_attention"] * len(DISTILL_LAYERS)))
    student = LT2ForCausalLM(LT2Config(**shape, layer_types=DISTILL_LAYERS))
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    add_step_logits(student)
    converted = [i for i, kind in enumerate(DISTILL_LAYERS) if kind != "full_attention"]
    ids = torch.randint(0, shape["vocab_size"], (batch, seq_len), device=device)
    timings = {}
    for kind in ("align", "kd"):
        stage = Stage(  # kd on every loop step's logits, as the shipped recipes do
            name=kind, kind=kind, tokens=batch * seq_len, seq_len=seq_len, batch_size=batch, lr=1e-4,
            every_step=kind == "kd",
        )
        trained, _ = make_trainable(student, stage, converted)
        run = StepContext(teacher, trained, converted, stage, lambda loss: loss.backward(), torch.device(device))

        def step(run: StepContext = run) -> None:
            with forward_precision("bf16", {device}):
                loss = STEPS[run.stage.kind](run, ids)["loss"]
            if not math.isfinite(loss):
                raise SystemExit(f"distill {run.stage.kind} step: loss {loss} is not finite")

        step()  # warm-up: Triton compiles fla's kernels for these shapes
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        student.zero_grad(set_to_none=True)
        timings[f"{kind}_ms"] = sorted(times)[len(times) // 2]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the bench's shorter sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU: torch.cuda.is_available() is False on this machine.")
    try:
        import fla.ops.gated_delta_rule  # noqa: F401  (the dispatch target; its absence would be a fallback)
    except ImportError as err:
        raise SystemExit(f"gpu_check needs fla and triton for the CUDA dispatch: {err}") from err

    failures = []
    device = torch.cuda.get_device_name()
    print(f"# GDN: CUDA dispatch (fla Triton, bf16) vs CPU chunked path (fp32) on {device}")
    print(f"# RMS error ratio, limits {RATIO_LIMITS}")
    for shape in SHAPES:
        for l2norm in (False, True):
            for name, ratio in check_gdn(shape, l2norm).items():
                verdict = "ok" if ratio <= RATIO_LIMITS[name] else "FAIL"
                print(f"B,T,H,K,V={shape} l2norm={l2norm!s:5} {name:12} {ratio:.2e}  {verdict}")
                if verdict == "FAIL":
                    failures.append((shape, l2norm, name, ratio))
    print(f"# swa_gdn layer: CUDA bf16 (fla GDN branch) vs CPU fp32, RMS error ratio, limit {SWA_GDN_LAYER_LIMIT}")
    for name, ratio in check_swa_gdn_layer().items():
        verdict = "ok" if ratio <= SWA_GDN_LAYER_LIMIT else "FAIL"
        print(f"swa_gdn layer {name:8} {ratio:.2e}  {verdict}")
        if verdict == "FAIL":
            failures.append(("swa_gdn layer", name, ratio))
    if failures:
        raise SystemExit(f"CUDA/CPU check failed for {len(failures)} tensors: {failures}")
    layers = "/".join(DISTILL_LAYERS)
    print(f"# distill steps, looped hybrid ({layers}, 2 loop steps, hidden 512), batch 4 x 1024 tokens, bf16")
    for name, ms in time_distill_steps().items():
        print(f"distill {name.removesuffix('_ms'):5} step {ms:9.1f} ms")
    run_kernel_bench(quick=args.quick, device="cuda")


if __name__ == "__main__":
    main()
