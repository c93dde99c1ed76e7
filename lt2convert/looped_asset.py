"""Asset `smollm2-looped`: a small *trained* looped model in Ouro's exact on-disk format, built offline.

No trained Ouro checkpoint is reachable offline, so one is made from SmolLM2-135M (asset `smollm2-135m`):

1. Init ("scaled full depth"): the shared block is the teacher's whole stack (`block_layers` = its depth; fewer
   layers are picked evenly, "stepwise", or averaged in groups, "average"). Two facts shape it:
   - Ouro's sandwich norms would give every token's sublayer output one fixed RMS, which SmolLM2 does not survive
     (held-out perplexity in the millions). All norms share one epsilon (config `rms_norm_eps`), so it is raised
     until every sublayer output lies far below sqrt(eps) (`sandwich_margin`), where RMSNorm is linear, and the
     residual stream (the embeddings) is scaled up by G until it lies far above, where the pre-norms and the final
     norm still normalise. Each sandwich norm is then an exact identity times `contribution_scale` (its weight
     undoes the 1/sqrt(eps) and applies G), at Ouro's exact forward, and every matrix keeps the teacher's scale,
     so the model trains with ordinary learning rates (the pipeline's distill included).
   - Running the stack again on its own output wrecks the prediction (every layer's contribution lands twice).
     The final norm, which feeds each step into the next, is calibrated near an identity and then multiplied by
     `state_gain`, so each later step starts as a small correction of the state; lm_head absorbs the gain and the
     teacher's final-norm scale. With `contribution_scale` < 1, step 1 is the teacher with its embeddings
     over-weighted: a little worse than the teacher, leaving the later steps something to improve.
2. Loop training: KD from the teacher on the training texts, supervising every step's logits (weights 1:8:27:64,
   later steps matter more) at a random subset of positions, with the embeddings and lm_head frozen. Each norm
   weight's learning rate is relative to its size (the calibrated sandwich and final norms are far larger than the
   teacher's).
3. Exit gate (Ouro's stage II): LM frozen; per token, the loss improvement the *next* step brings gives a soft
   "continue" target sigmoid(k·(improvement − γ)), and the gate's exit probability λ_t is fitted to its complement
   with a binary cross-entropy. k=50 and γ=0.005 are the paper's constants as we recall them (not re-checked
   against the paper offline); both are recipe fields.

Everything runs on CPU with a fixed seed and thread count, in bf16 autocast (weights stay fp32 while training and
are stored in bf16, like Ouro's). The figures in `asset.json` are measured on the stored checkpoint, on held-out
text from other domains (the Jargon File and The Devil's Dictionary), never on the training texts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lt2convert.distill.data import (
    PackedTokenStream,
    default_training_data,
    hf_encode,
    load_token_ids,
    load_tokenizer,
    tokenizer_fingerprint,
)
from lt2convert.distill.losses import kd_loss
from lt2convert.distill.train import forward_precision, lr_factor
from lt2convert.errors import ConfigError
from lt2convert.export import copy_tokenizer
from lt2convert.io.assets import cache_dir, fetch_asset
from lt2convert.loading import config_from_dict, load_model
from lt2convert.modeling import LT2ForCausalLM, OuroForCausalLM
from lt2convert.modeling.modeling_lt2 import LT2DecoderLayer, LT2RMSNorm, MixerContext

__all__ = ["LoopedRecipe", "build_looped", "build_smollm2_looped", "continue_targets", "exit_gate_loss"]

Log = Callable[[str], None]

HELDOUT_ASSETS = ("jargon", "devils-dictionary")
INIT_METHODS = ("stepwise", "average")
LR_FLOOR = 0.1  # the cosine schedule ends at 10% of the peak learning rate


@dataclasses.dataclass(frozen=True)
class LoopedRecipe:
    """How the looped model is made; every field is recorded in asset.json."""

    block_layers: int = 30
    steps: int = 4
    init: str = "stepwise"
    contribution_scale: float = 0.5  # each sublayer's residual contribution, relative to the teacher's
    state_gain: float = 30.0  # the final norm's gain over an identity: later steps start as small corrections
    # sublayer outputs lie at most this far below sqrt(eps) (RMS), the residual stream at least its inverse above
    sandwich_margin: float = 0.01
    seq_len: int = 256
    batch_size: int = 4
    kd_steps: int = 90
    lr: float = 1e-3
    warmup: int = 10
    kd_temperature: float = 1.0
    # KD weight of loop step t ∝ t**power: the later steps, which start as the least accurate, count most.
    step_weight_power: float = 3.0
    kd_positions: int = 64  # positions per window whose logits are distilled (all positions run through the model)
    gate_batches: int = 8
    gate_iterations: int = 100  # L-BFGS iterations
    # Ouro stage II: continue while the next step improves the token's loss by more than gamma (nats), slope k.
    gate_k: float = 50.0
    gate_gamma: float = 0.005
    eval_windows: int = 16
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init={self.init!r}; expected one of {list(INIT_METHODS)}")
        for name in (
            "block_layers",
            "steps",
            "seq_len",
            "batch_size",
            "kd_positions",
            "gate_batches",
            "eval_windows",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("contribution_scale", "state_gain", "sandwich_margin"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.steps < 2:
            raise ConfigError(f"steps must be >= 2 for a looped model with an exit gate, got {self.steps}")


# --------------------------------------------------------------------------------------------------- format


def ouro_config(teacher: dict, recipe: LoopedRecipe) -> dict:
    """config.json of the looped model in Ouro's published layout, shapes taken from the teacher's config.json."""
    rope = teacher.get("rope_parameters") or {}
    head_dim = teacher.get("head_dim") or teacher["hidden_size"] // teacher["num_attention_heads"]
    return {
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "hidden_size": teacher["hidden_size"],
        "intermediate_size": teacher["intermediate_size"],
        "num_hidden_layers": recipe.block_layers,
        "num_attention_heads": teacher["num_attention_heads"],
        "num_key_value_heads": teacher.get("num_key_value_heads") or teacher["num_attention_heads"],
        "head_dim": head_dim,
        "vocab_size": teacher["vocab_size"],
        "max_position_embeddings": teacher["max_position_embeddings"],
        "rope_theta": float(rope.get("rope_theta", teacher.get("rope_theta", 10000.0))),
        "rms_norm_eps": teacher["rms_norm_eps"],
        "hidden_act": teacher["hidden_act"],
        "tie_word_embeddings": False,
        "total_ut_steps": recipe.steps,
        "early_exit_threshold": 1.0,
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": teacher.get("bos_token_id"),
        "eos_token_id": teacher.get("eos_token_id"),
    }


def write_ouro_checkpoint(student: OuroForCausalLM, config: dict, folder: Path) -> None:
    """config.json + one bf16 model.safetensors with exactly Ouro's tensor names (no rotary buffer)."""
    from safetensors.torch import save_file

    state = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in student.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------- init


def block_sources(num_teacher_layers: int, recipe: LoopedRecipe) -> list[list[int]]:
    """For each shared layer, the teacher layers it is made from: one each, evenly spaced from the first to the last
    (stepwise), or the groups j, j+L, j+2L, ... averaged (average)."""
    n, size = num_teacher_layers, recipe.block_layers
    if size > n:
        raise ConfigError(f"block_layers={size} exceeds the teacher's {n} layers")
    if recipe.init == "stepwise":
        return [[round(j * (n - 1) / max(size - 1, 1))] for j in range(size)]
    return [list(range(j, n, size)) for j in range(size)]


def initial_student(
    teacher: LT2ForCausalLM, config: dict, recipe: LoopedRecipe, calibration: torch.Tensor
) -> tuple[OuroForCausalLM, dict]:
    """The looped student before training and its config.json: the shared block from the teacher, the norms'
    epsilon and scales calibrated on `calibration` ids (see `calibrate_norms`)."""
    student = OuroForCausalLM(config_from_dict(config))
    teacher_state = teacher.state_dict()
    state = student.state_dict()
    for name in state:
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if rest.startswith(("input_layernorm_2", "post_attention_layernorm_2")):
                continue  # new in Ouro: calibrated below
            sources = block_sources(teacher.config.num_hidden_layers, recipe)[int(index)]
            state[name] = torch.stack([teacher_state[f"model.layers.{i}.{rest}"].float() for i in sources]).mean(0)
        elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            state[name] = teacher_state[name].float()
    student.load_state_dict(state)
    eps = calibrate_norms(student, teacher.model.norm.weight.detach().float(), calibration, recipe)
    return student, {**config, "rms_norm_eps": eps}


def fitted_scale(values: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel g minimising ‖g·rmsnorm(values) − values‖²: the RMSNorm weight closest to an identity."""
    x = values.float().flatten(0, -2)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * x).sum(0) / normed.pow(2).sum(0).clamp(min=1e-12)


def sublayers(layer: LT2DecoderLayer, ctx: MixerContext) -> list[tuple[LT2RMSNorm, Callable, LT2RMSNorm]]:
    """(pre-norm, sublayer, sandwich norm) for the mixer and the MLP."""
    return [
        (layer.input_layernorm, lambda x: layer.self_attn(x, ctx, None), layer.input_layernorm_2),
        (layer.post_attention_layernorm, layer.mlp, layer.post_attention_layernorm_2),
    ]


def token_mean_square(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1)


@torch.no_grad()
def norm_regimes(student: OuroForCausalLM, ids: torch.Tensor, recipe: LoopedRecipe) -> tuple[float, float]:
    """(eps, residual gain G) that put every RMSNorm in the regime its role needs, from step 1 run as the teacher's
    stack (contributions × contribution_scale): eps = the largest token mean square of any sublayer output over
    margin², so the sandwich norms see inputs far below eps and are linear; G = the residual stream's scale-up
    that puts its smallest token mean square (× G²) margin⁻² above eps, so the pre-norms and the final norm still
    normalise as the teacher's do."""
    model = student.model
    h = model.embed_tokens(ids).float()
    ctx = model.mixer_context(h, None, None, 0)
    largest, smallest = 0.0, math.inf
    for layer in model.layers:
        for pre_norm, sublayer, _ in sublayers(layer, ctx):
            smallest = min(smallest, token_mean_square(h).min().item())
            out = sublayer(pre_norm(h))
            largest = max(largest, token_mean_square(out).max().item())
            h = h + recipe.contribution_scale * out
    margin = recipe.sandwich_margin**2
    eps = largest / margin
    return eps, math.sqrt(eps / (margin * max(smallest, 1e-30)))


@torch.no_grad()
def calibrate_norms(
    student: OuroForCausalLM, teacher_final_norm: torch.Tensor, ids: torch.Tensor, recipe: LoopedRecipe
) -> float:
    """Make Ouro's extra norms exact pass-throughs of the teacher's computation, at Ouro's exact forward and with
    every matrix at the teacher's scale (so that later training, ours or a user's, needs no special learning
    rates); returns the epsilon all norms now use (config `rms_norm_eps`).

    With eps and G from `norm_regimes`: the embeddings are scaled by G, each sandwich norm is linear on its
    sublayer's output and weighted contribution_scale·G·sqrt(eps), so it adds contribution_scale × G × the output;
    the pre-norms see a G-scaled stream and normalise it as before. The final norm is fitted to an identity on
    step 1's output times `state_gain`, with the teacher's final-norm scale folded into lm_head, so step 1's logits
    are the block's run as a plain Llama (contributions × contribution_scale)."""
    eps, gain = norm_regimes(student, ids, recipe)
    model = student.model
    student.config.rms_norm_eps = eps
    for module in student.modules():
        if isinstance(module, LT2RMSNorm):
            module.variance_epsilon = eps
    model.embed_tokens.weight.mul_(gain)
    h = model.embed_tokens(ids)
    ctx = model.mixer_context(h, None, None, 0)
    for layer in model.layers:
        for pre_norm, sublayer, post_norm in sublayers(layer, ctx):
            post_norm.weight.fill_(recipe.contribution_scale * gain * math.sqrt(eps))
            h = h + post_norm(sublayer(pre_norm(h)))
    final = fitted_scale(h, eps) * recipe.state_gain
    model.norm.weight.copy_(final)
    student.lm_head.weight.mul_(teacher_final_norm / final)
    return eps


# ------------------------------------------------------------------------------------------------- training


def step_weights(steps: int, power: float) -> torch.Tensor:
    """Loss weight of each loop step: proportional to its index to `power` (later steps matter more), summing to 1."""
    w = torch.arange(1, steps + 1, dtype=torch.float32).pow(power)
    return w / w.sum()


def step_logits(
    model: LT2ForCausalLM, ids: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each step's logits, at `positions` only when given; each step's normed hidden state)."""
    steps = model.model(input_ids=ids, use_cache=False).steps
    picked = steps if positions is None else [h[:, positions] for h in steps]
    return [model.lm_head(h) for h in picked], steps


def kd_positions(seq_len: int, count: int) -> torch.Tensor:
    """A random sorted subset of `count` positions: the vocabulary projection and softmax over 49K tokens dominate
    a KD update's cost on CPU, and neighbouring positions carry much the same signal."""
    return torch.randperm(seq_len)[: min(count, seq_len)].sort().values


def per_step_kd_loss(
    student_logits: list[torch.Tensor], teacher_logits: torch.Tensor, temperature: float, power: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t w_t · KL(teacher ‖ student step t) (weights from `step_weights`), and the per-step KLs."""
    kls = torch.stack([kd_loss(s, teacher_logits, temperature) for s in student_logits])
    return (step_weights(len(student_logits), power) * kls).sum(), kls.detach()


FROZEN = ("model.embed_tokens.", "lm_head.", "model.early_exit_gate.")


def learning_rate_scales(student: OuroForCausalLM) -> dict[str, float]:
    """Per trainable tensor, the factor on the learning rate. Adam moves every entry by about lr whatever its size:
    the matrices keep the teacher's scale (factor 1), but the norm weights range from the teacher's (about 1) to the
    calibrated sandwich and final norms' (G·sqrt(eps), far larger), so each vector gets its mean size."""
    return {
        name: param.abs().mean().item() if param.dim() == 1 else 1.0
        for name, param in student.named_parameters()
        if not name.startswith(FROZEN)
    }


def train_loops(
    student: OuroForCausalLM, teacher: LT2ForCausalLM, stream: PackedTokenStream, recipe: LoopedRecipe, log: Log
) -> list[list[float]]:
    """Per-step KD with the embeddings, lm_head and exit gate frozen (relative learning rates, see
    `learning_rate_scales`); returns each update's per-step KLs."""
    scales = learning_rate_scales(student)
    for name, param in student.named_parameters():
        param.requires_grad_(name in scales)
    trainable = {name: param for name, param in student.named_parameters() if name in scales}
    groups = [{"params": [param], "scale": scales[name]} for name, param in trainable.items()]
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, started = [], time.monotonic()
    student.train()
    for step in range(recipe.kd_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * group["scale"] * lr_factor(step, recipe.kd_steps, recipe.warmup, LR_FLOOR)
        ids, _ = stream.next_batch(recipe.batch_size)
        positions = kd_positions(recipe.seq_len, recipe.kd_positions)
        with torch.no_grad(), forward_precision("bf16", {"cpu"}):
            (target,), _ = step_logits(teacher, ids, positions)
        with forward_precision("bf16", {"cpu"}):
            logits, _ = step_logits(student, ids, positions)
            loss, kls = per_step_kd_loss(logits, target, recipe.kd_temperature, recipe.step_weight_power)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        history.append(kls.tolist())
        if step % 10 == 0 or step == recipe.kd_steps - 1:
            kl_text = " ".join(f"{k:.3f}" for k in kls.tolist())
            log(f"  loop KD {step + 1}/{recipe.kd_steps}: KL per step {kl_text} ({time.monotonic() - started:.0f} s)")
    student.eval()
    for param in student.parameters():
        param.requires_grad_(False)
    return history


def continue_targets(step_losses: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """Ouro stage II: the soft target "go on after step t" = sigmoid(k·(L_t − L_{t+1} − γ)), from per-token losses
    [T, ...] -> [T−1, ...]. The last step has no choice to make."""
    improvement = (step_losses[:-1] - step_losses[1:]).clamp(min=0)
    return torch.sigmoid(k * (improvement - gamma))


def exit_gate_loss(gate_logits: torch.Tensor, go_on: torch.Tensor) -> torch.Tensor:
    """BCE between the gate's exit probability λ_t = sigmoid(logit_t) and the target 1 − go_on, over the first T−1
    steps ([T, ...] logits, [T−1, ...] targets)."""
    return F.binary_cross_entropy_with_logits(gate_logits[:-1], 1.0 - go_on)


@torch.no_grad()
def gate_training_data(
    student: OuroForCausalLM, stream: PackedTokenStream, recipe: LoopedRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step hidden states [T, N, H] (fp32) and per-step token losses [T, N] of the frozen LM."""
    states, losses = [], []
    for _ in range(recipe.gate_batches):
        ids, _ = stream.next_batch(recipe.batch_size)
        with forward_precision("bf16", {"cpu"}):
            logits, steps = step_logits(student, ids)
        losses.append(torch.stack([token_losses(lg, ids) for lg in logits]))
        states.append(torch.stack([h[:, :-1].float().flatten(0, 1) for h in steps]))
    return torch.cat(states, 1), torch.cat(losses, 1)


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every position but the last, flattened ([B, S, V], [B, S] -> [B·(S−1)])."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")


def train_exit_gate(student: OuroForCausalLM, stream: PackedTokenStream, recipe: LoopedRecipe, log: Log) -> list[float]:
    """Stage II: fit only `model.early_exit_gate` (full batch) on cached hidden states; returns the losses."""
    states, losses = gate_training_data(student, stream, recipe)
    go_on = continue_targets(losses, recipe.gate_k, recipe.gate_gamma)
    gate = student.model.early_exit_gate
    # The states are G-scaled (see calibrate_norms): fit on unit-RMS features, then fold the scale into the weight.
    scale = states.pow(2).mean().sqrt().clamp(min=1e-12)
    features = states / scale
    with torch.no_grad():
        gate.weight.zero_()  # start from "exit with probability 1/2" rather than the random init's saturated logits
        gate.bias.zero_()
    for param in gate.parameters():
        param.requires_grad_(True)
    # A logistic regression on fixed features: L-BFGS converges in a few dozen evaluations, where Adam would need
    # tuning.
    optimizer = torch.optim.LBFGS(gate.parameters(), max_iter=recipe.gate_iterations, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = exit_gate_loss(gate(features).squeeze(-1), go_on)
        loss.backward()
        history.append(loss.item())
        return loss

    optimizer.step(closure)
    log(f"  exit gate: BCE {history[0]:.4f} -> {history[-1]:.4f} in {len(history)} evaluations")
    for param in gate.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        gate.weight.div_(scale)
    return history


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(student: LT2ForCausalLM, teacher: LT2ForCausalLM, windows: torch.Tensor) -> dict[str, Any]:
    """Perplexities (teacher, student per step, student's default output = last step, student with the gate's
    threshold-0.5 exit) and how the gate's exit step relates to the teacher's per-token loss."""
    teacher_loss, step_loss, probs = [], [], []
    for ids in windows.split(4):
        with forward_precision("bf16", {"cpu"}):
            teacher_loss.append(token_losses(teacher(ids, use_cache=False).logits, ids))
            result = student.model(input_ids=ids, use_cache=False)
            step_loss.append(torch.stack([token_losses(student.lm_head(h), ids) for h in result.steps]))
        probs.append(result.exit_probs[:, :, :-1].flatten(1))
    teacher_ce, ce, p = torch.cat(teacher_loss), torch.cat(step_loss, 1), torch.cat(probs, 1)
    step_index = torch.arange(1, ce.shape[0] + 1, dtype=torch.float32)
    expected_exit = (p * step_index[:, None]).sum(0)
    exit_at = (p.cumsum(0) >= 0.5).float().argmax(0)
    threshold_ce = ce.gather(0, exit_at[None]).squeeze(0)
    easy, hard = teacher_tercile_masks(teacher_ce)
    return {
        "tokens": int(teacher_ce.numel()),
        "teacher_ppl": ppl(teacher_ce),
        "ppl_per_step": [ppl(row) for row in ce],
        "ppl": ppl(ce[-1]),
        "ppl_ratio_to_teacher": ppl(ce[-1]) / ppl(teacher_ce),
        "gate": {
            "mean_exit_probs": [round(v, 4) for v in p.mean(1).tolist()],
            "expected_exit_step": round(expected_exit.mean().item(), 3),
            "expected_exit_step_easy_third": round(expected_exit[easy].mean().item(), 3),
            "expected_exit_step_hard_third": round(expected_exit[hard].mean().item(), 3),
            "corr_expected_exit_vs_teacher_loss": {
                "pearson": round(pearson(expected_exit, teacher_ce), 3),
                "spearman": round(pearson(rank(expected_exit), rank(teacher_ce)), 3),
            },
            "threshold_0.5": {"mean_exit_step": round(exit_at.float().mean().item() + 1, 3), "ppl": ppl(threshold_ce)},
        },
    }


def ppl(token_loss: torch.Tensor) -> float:
    return round(math.exp(token_loss.float().mean().item()), 3)


def teacher_tercile_masks(teacher_ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens the teacher predicts best (lowest third of its loss) and worst (highest third)."""
    low, high = torch.quantile(teacher_ce.float(), torch.tensor([1 / 3, 2 / 3]))
    return teacher_ce <= low, teacher_ce >= high


def rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum().item() / max(math.sqrt((x.pow(2).sum() * y.pow(2).sum()).item()), 1e-12)


# --------------------------------------------------------------------------------------------------- builder


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """A fixed thread count (part of what makes the build reproducible), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def heldout_windows(heldout: dict[str, torch.Tensor], recipe: LoopedRecipe) -> dict[str, torch.Tensor]:
    """The first `eval_windows` windows of each held-out domain (fixed, in text order)."""
    windows = {}
    for name, ids in heldout.items():
        count = min(recipe.eval_windows, ids.numel() // recipe.seq_len)
        if count == 0:
            raise ConfigError(f"held-out text {name!r} has fewer than {recipe.seq_len} tokens")
        windows[name] = ids[: count * recipe.seq_len].long().view(count, recipe.seq_len)
    return windows


def build_looped(
    teacher_folder: Path,
    out: Path,
    train_ids: torch.Tensor,
    heldout: dict[str, torch.Tensor],
    recipe: LoopedRecipe,
    log: Log,
) -> dict[str, Any]:
    """Make the looped model from the Llama-family checkpoint in `teacher_folder`, write it to `out` in Ouro's
    format, and return the build's figures (measured on `out` as stored, on the `heldout` token ids)."""
    seconds: dict[str, float] = {}
    started = time.monotonic()
    torch.manual_seed(recipe.seed)
    with fixed_threads(recipe.threads):
        teacher = load_model(teacher_folder, dtype="float32")
        config = ouro_config(json.loads((teacher_folder / "config.json").read_text(encoding="utf-8")), recipe)
        stream = PackedTokenStream(train_ids, recipe.seq_len, recipe.seed, name="looped-model training text")
        student, config = initial_student(teacher, config, recipe, stream.next_batch(recipe.batch_size)[0])
        windows = heldout_windows(heldout, recipe)
        initial = {name: evaluate(student, teacher, ids)["ppl_per_step"] for name, ids in windows.items()}
        log(f"  initial held-out perplexity per step: {initial}")
        seconds["init"] = time.monotonic() - started
        kd_history = train_loops(student, teacher, stream, recipe, log)
        seconds["loop_training"] = time.monotonic() - started - sum(seconds.values())
        gate_history = train_exit_gate(student, stream, recipe, log)
        seconds["gate_training"] = time.monotonic() - started - sum(seconds.values())
        write_ouro_checkpoint(student, config, out)
        stored = load_model(out, dtype="float32")
        figures = {name: evaluate(stored, teacher, ids) for name, ids in windows.items()}
        seconds["evaluation"] = time.monotonic() - started - sum(seconds.values())
    seconds["total"] = time.monotonic() - started
    for name, result in figures.items():
        log(f"  {name}: ppl {result['ppl']} (teacher {result['teacher_ppl']}), per step {result['ppl_per_step']}")
    return {
        "recipe": dataclasses.asdict(recipe),
        "block_sources": block_sources(teacher.config.num_hidden_layers, recipe),
        "training_tokens": recipe.kd_steps * recipe.batch_size * recipe.seq_len,
        "initial_heldout_ppl_per_step": initial,
        "loop_kd_first_last": [kd_history[0], kd_history[-1]] if kd_history else [],
        "gate_bce_first_last": [gate_history[0], gate_history[-1]] if gate_history else [],
        "heldout": figures,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


ASSET_RECIPE = LoopedRecipe()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout carries the asset's path only


def build_smollm2_looped(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
    """The `smollm2-looped` asset builder (see the module docstring). The assets it is made from are fetched first
    (from the cache when there); `force` rebuilds this asset only, so neither `force` nor `downloads` is passed on."""
    recipe = ASSET_RECIPE
    started = time.monotonic()
    teacher_folder = fetch_asset("smollm2-135m")
    progress("smollm2-looped: tokenising the training and held-out texts")
    tokenizer = load_tokenizer(teacher_folder, "smollm2-135m")
    encode, fingerprint = hf_encode(tokenizer), tokenizer_fingerprint(tokenizer)
    sources = default_training_data()
    train_ids = load_token_ids(sources, encode, tokenizer.eos_token_id, cache_dir() / "tokens", fingerprint=fingerprint)
    heldout = {
        name: load_token_ids(
            [str(fetch_asset(name) / "heldout.txt")],
            encode,
            tokenizer.eos_token_id,
            max_tokens=recipe.eval_windows * recipe.seq_len,
        )
        for name in HELDOUT_ASSETS
    }
    progress(f"smollm2-looped: building ({recipe.kd_steps} loop-KD updates, then the exit gate)")
    tokenising = time.monotonic() - started
    record = build_looped(teacher_folder, work, train_ids, heldout, recipe, progress)
    record["seconds"] = {"fetch_and_tokenise": round(tokenising, 1), **record["seconds"]}
    copy_tokenizer(teacher_folder, work)
    return {
        "source": {
            "teacher": "smollm2-135m",
            "training_text": [str(Path(s).relative_to(cache_dir())) for s in sources],
            "heldout_text": list(HELDOUT_ASSETS),
        },
        "model": f"looped SmolLM2: {recipe.block_layers} shared layers × {recipe.steps} steps, Ouro format",
        **record,
    }
