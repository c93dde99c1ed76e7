"""Asset `smollm2-looped`: a small *trained* looped model in Ouro's exact on-disk format, built offline.

No trained Ouro checkpoint is reachable offline, so one is made from SmolLM2-135M (asset `smollm2-135m`):

1. Init (relaxed-recursive-transformer style): a block of `block_layers` of the teacher's layers, picked evenly
   through its depth ("stepwise", first and last layer included) or averaged in groups ("average"), is shared by
   all `steps` loop steps. The sandwich norms Ouro adds after the mixer and the MLP are calibrated on the first
   step (least-squares per channel), so each starts close to an identity on its sublayer's output; the final
   norm is calibrated the same way and the untied lm_head absorbs the teacher's final-norm scale, so step 1 starts
   near the picked layers run as a plain, shallower Llama (the sandwich norms still give every token's sublayer
   output one fixed RMS). SmolLM2 does not survive losing most of its layers (held-out perplexity in the
   millions at init, with or without looping), so the training below does the real work.
2. Loop training: KD from the teacher on the training texts, supervising every step's logits (weights 1:2:3:4,
   later steps matter more) at a random subset of positions, with the embeddings and lm_head frozen.
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

__all__ = ["LoopedRecipe", "build_looped", "build_smollm2_looped", "continue_targets", "exit_gate_loss"]

Log = Callable[[str], None]

HELDOUT_ASSETS = ("jargon", "devils-dictionary")
INIT_METHODS = ("stepwise", "average")
LR_FLOOR = 0.1  # the cosine schedule ends at 10% of the peak learning rate


@dataclasses.dataclass(frozen=True)
class LoopedRecipe:
    """How the looped model is made; every field is recorded in asset.json."""

    block_layers: int = 8
    steps: int = 4
    init: str = "stepwise"
    seq_len: int = 256
    batch_size: int = 4
    kd_steps: int = 100
    lr: float = 1e-3
    warmup: int = 10
    kd_temperature: float = 1.0
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


def initial_student(teacher: LT2ForCausalLM, config: dict, recipe: LoopedRecipe, calibration: torch.Tensor):
    """The looped student before training: shared block from the teacher, norms calibrated on `calibration` ids."""
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
    calibrate_norms(student, teacher.model.norm.weight.detach().float(), calibration)
    return student


def fitted_scale(values: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel g minimising ‖g·rmsnorm(values) − values‖²: the RMSNorm weight closest to an identity."""
    x = values.float().flatten(0, -2)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * x).sum(0) / normed.pow(2).sum(0).clamp(min=1e-12)


@torch.no_grad()
def calibrate_norms(student: OuroForCausalLM, teacher_final_norm: torch.Tensor, ids: torch.Tensor) -> None:
    """Fit the sandwich norms and the final norm on the first loop step, in order, then fold the teacher's final-norm
    scale into lm_head so that step 1's logits are those of the picked layers run as a plain Llama."""
    model = student.model
    eps = student.config.rms_norm_eps
    h = model.embed_tokens(ids)
    ctx = model.mixer_context(h, None, None, 0)
    for layer in model.layers:
        mixed = layer.self_attn(layer.input_layernorm(h), ctx, None)
        layer.input_layernorm_2.weight.copy_(fitted_scale(mixed, eps))
        h = h + layer.input_layernorm_2(mixed)
        out = layer.mlp(layer.post_attention_layernorm(h))
        layer.post_attention_layernorm_2.weight.copy_(fitted_scale(out, eps))
        h = h + layer.post_attention_layernorm_2(out)
    final = fitted_scale(h, eps)
    model.norm.weight.copy_(final)
    student.lm_head.weight.mul_(teacher_final_norm / final)


# ------------------------------------------------------------------------------------------------- training


def step_weights(steps: int) -> torch.Tensor:
    """Loss weight of each loop step: proportional to its index (later steps matter more), summing to 1."""
    w = torch.arange(1, steps + 1, dtype=torch.float32)
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


def per_step_kd_loss(student_logits: list[torch.Tensor], teacher_logits: torch.Tensor, temperature: float):
    """Σ_t w_t · KL(teacher ‖ student step t), and the per-step KLs."""
    kls = torch.stack([kd_loss(s, teacher_logits, temperature) for s in student_logits])
    return (step_weights(len(student_logits)) * kls).sum(), kls.detach()


def train_loops(
    student: OuroForCausalLM, teacher: LT2ForCausalLM, stream: PackedTokenStream, recipe: LoopedRecipe, log: Log
) -> list[list[float]]:
    """Per-step KD with the embeddings, lm_head and exit gate frozen; returns each update's per-step KLs."""
    frozen = ("model.embed_tokens.", "lm_head.", "model.early_exit_gate.")
    trainable = [p for n, p in student.named_parameters() if not n.startswith(frozen)]
    for name, param in student.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, started = [], time.monotonic()
    student.train()
    for step in range(recipe.kd_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, recipe.kd_steps, recipe.warmup, LR_FLOOR)
        ids, _ = stream.next_batch(recipe.batch_size)
        positions = kd_positions(recipe.seq_len, recipe.kd_positions)
        with torch.no_grad(), forward_precision("bf16", {"cpu"}):
            (target,), _ = step_logits(teacher, ids, positions)
        with forward_precision("bf16", {"cpu"}):
            logits, _ = step_logits(student, ids, positions)
            loss, kls = per_step_kd_loss(logits, target, recipe.kd_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
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
    with torch.no_grad():
        gate.weight.zero_()  # start from "exit with probability 1/2" rather than the random init's saturated logits
        gate.bias.zero_()
    for param in gate.parameters():
        param.requires_grad_(True)
    # A logistic regression on fixed features: L-BFGS converges in a few dozen evaluations whatever the scale of
    # the hidden states (the final norm's calibrated weights are large), where Adam would need tuning.
    optimizer = torch.optim.LBFGS(gate.parameters(), max_iter=recipe.gate_iterations, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = exit_gate_loss(gate(states).squeeze(-1), go_on)
        loss.backward()
        history.append(loss.item())
        return loss

    optimizer.step(closure)
    log(f"  exit gate: BCE {history[0]:.4f} -> {history[-1]:.4f} in {len(history)} evaluations")
    for param in gate.parameters():
        param.requires_grad_(False)
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
        student = initial_student(teacher, config, recipe, stream.next_batch(recipe.batch_size)[0])
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
