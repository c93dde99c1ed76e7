"""Adaptive exit on a looped checkpoint: loop steps run, decoding speed and held-out perplexity per threshold.

Adaptive exit stops a token's loop once its cumulative exit mass reaches the threshold (the cache-fill policy is
in lt2convert.modeling's LT2ForCausalLM, docs/adaptive-exit.md). Threshold 1.0 is the baseline: every step runs.
For each threshold:

- steps/token: the mean loop steps a token runs, over the held-out windows (teacher-forced, see below);
- decode tok/s and its ratio to every step: batch 1, the first `prompt_tokens` tokens of the held-out text
  prefilled (every step), then `decode_tokens` tokens of the same text fed one at a time and timed. Measured side
  by side: the thresholds take turns within each of `rounds` rounds (so drifting machine load falls on all of them
  alike) and each reports its median round; `decode_steps` is the mean loop steps a decoding step ran;
- held-out perplexity and its ratio to every step: teacher-forced under the same policy, i.e. one forward over
  each window with `adaptive_exit=True`, the policy's parallel form, which gives the logits decoding the window
  token by token would give (every token of the window follows the policy).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lt2convert.errors import ConfigError
from lt2convert.modeling import LT2Config, LT2ForCausalLM

__all__ = ["DEFAULT_THRESHOLDS", "SweepSettings", "format_table", "is_looped", "parse_thresholds", "sweep_model"]

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep measures on: held-out texts (asset names or text files), windows per text, and the decoding."""

    texts: tuple[str, ...] = ("jargon",)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    windows: int = 4  # perplexity windows per text
    window_tokens: int = 512
    prompt_tokens: int = 64  # prefilled before the timed decoding
    decode_tokens: int = 64  # timed decoding steps per round
    rounds: int = 3
    device: str | None = None  # default: cuda when available
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("windows", "window_tokens", "prompt_tokens", "decode_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.texts:
            raise ConfigError("texts: give at least one held-out text")
        if self.prompt_tokens + self.decode_tokens > self.window_tokens:
            raise ConfigError("prompt_tokens + decode_tokens must fit in window_tokens")
        check_thresholds(self.thresholds, "thresholds")


def check_thresholds(values: tuple[float, ...], field: str) -> None:
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise ConfigError(f"{field} {list(values)}: expected values within (0, 1]")


def parse_thresholds(spec: str) -> tuple[float, ...]:
    """'0.5,0.3' -> (0.3, 0.5, 1.0): sorted, and the baseline 1.0 is always measured."""
    try:
        values = sorted({float(item) for item in spec.split(",") if item.strip()})
    except ValueError:
        raise ConfigError(f"--thresholds {spec!r}: expected comma-separated numbers within (0, 1]") from None
    check_thresholds(tuple(values), "--thresholds")
    return tuple(values if 1.0 in values else [*values, 1.0])


def is_looped(config: LT2Config) -> bool:
    """Adaptive exit needs more than one loop step and an exit gate."""
    return config.total_ut_steps > 1 and config.use_exit_gate


def held_out_ids(folder: Path, texts: tuple[str, ...], tokens: int, windows: int) -> torch.Tensor:
    """[windows × len(texts), tokens] ids of held-out texts (asset names such as `jargon`, or files), tokenised
    with the checkpoint's tokenizer, or as UTF-8 bytes when the folder has none (random test checkpoints)."""
    from lt2convert.distill.data import has_tokenizer
    from lt2convert.io.assets import fetch_asset
    from lt2convert.sensitivity import evaluation_ids

    tokenizer = "student" if has_tokenizer(folder) else "bytes"
    paths = [text if Path(text).is_file() else str(fetch_asset(text) / "heldout.txt") for text in texts]
    return torch.cat([evaluation_ids(folder, p, tokens, windows, tokenizer) for p in paths])


def exit_mode(threshold: float) -> dict:
    """Threshold 1.0 is the baseline: every step, today's runtime; below it, adaptive exit."""
    if threshold >= 1.0:
        return {"exit_threshold": 1.0, "adaptive_exit": False}
    return {"exit_threshold": threshold, "adaptive_exit": True}


@torch.no_grad()
def score(model: LT2ForCausalLM, windows: torch.Tensor, threshold: float) -> dict:
    """Teacher-forced perplexity and mean loop steps per token under the policy, over all windows."""
    losses, steps = [], []
    for window in windows.split(1):
        out = model(window, labels=window, use_cache=False, **exit_mode(threshold))
        losses.append(out.loss.item())
        every_step = out.exit_steps is None
        steps.append(model.config.total_ut_steps if every_step else (out.exit_steps + 1).float().mean().item())
    return {"perplexity": math.exp(statistics.fmean(losses)), "steps_per_token": statistics.fmean(steps)}


@torch.no_grad()
def time_decode(model: LT2ForCausalLM, ids: torch.Tensor, prompt: int, threshold: float) -> tuple[float, float]:
    """Prefill ids[:, :prompt], then decode the rest one token at a time -> (decode tokens/s, mean loop steps a
    decoding step ran)."""
    from lt2convert.bench import loop_steps_run, synchronize

    device = ids.device
    mode = exit_mode(threshold)
    cache = model(ids[:, :prompt], use_cache=True, logits_to_keep=1).cache
    loop_steps = []
    synchronize(device)
    start = time.perf_counter()
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True, **mode)
        loop_steps.append(loop_steps_run(model, out))
    synchronize(device)
    seconds = time.perf_counter() - start
    return (ids.shape[1] - prompt) / seconds, statistics.fmean(loop_steps)


def sweep(model: LT2ForCausalLM, windows: torch.Tensor, settings: SweepSettings) -> list[dict]:
    """One row per threshold (the baseline 1.0 included), ratios to every step."""
    thresholds = sorted({*settings.thresholds, 1.0})
    decode_ids = windows[:1, : settings.prompt_tokens + settings.decode_tokens]
    rows = {t: {"threshold": t, **score(model, windows, t), "rounds": []} for t in thresholds}
    time_decode(model, decode_ids, settings.prompt_tokens, thresholds[0])  # warm-up
    for _ in range(settings.rounds):
        for t in thresholds:
            rows[t]["rounds"].append(time_decode(model, decode_ids, settings.prompt_tokens, t))
    for row in rows.values():
        rounds = row.pop("rounds")
        row["decode_tokens_per_s"] = statistics.median(speed for speed, _ in rounds)
        row["decode_steps"] = statistics.fmean(steps for _, steps in rounds)
    base = rows[1.0]
    for row in rows.values():
        row["speed_vs_every_step"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["perplexity_vs_every_step"] = row["perplexity"] / base["perplexity"]
    return list(rows.values())


def sweep_model(spec: str | Path, settings: SweepSettings) -> dict:
    """Load a looped checkpoint (folder, preset or hub id) and sweep it: the settings, the machine, and the rows."""
    from lt2convert.bench import BENCH_DTYPES
    from lt2convert.loading import load_model, resolve_checkpoint

    if settings.dtype not in BENCH_DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(BENCH_DTYPES)}, got {settings.dtype!r}")
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(spec, dtype=BENCH_DTYPES[settings.dtype], device=device).eval()
    if not is_looped(model.config):
        raise ConfigError(f"{spec}: one loop step or no exit gate, so no adaptive exit (not a looped model)")
    folder = resolve_checkpoint(spec).folder
    windows = held_out_ids(folder, settings.texts, settings.window_tokens, settings.windows).to(device)
    rows = sweep(model, windows, settings)
    return {
        "model": str(spec),
        "loop_steps": model.config.total_ut_steps,
        **asdict(settings),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def format_table(result: dict) -> list[str]:
    """A sweep as fixed-width text lines: a heading, then one line per threshold."""
    lines = [
        f"{result['model']}: {result['loop_steps']} loop steps, {result['device']} {result['dtype']}, "
        f"{result['torch_threads']} threads; perplexity on {', '.join(result['texts'])} ({result['windows']} × "
        f"{result['window_tokens']} tokens each); decoding {result['decode_tokens']} tokens after "
        f"{result['prompt_tokens']}, median of {result['rounds']} rounds"
    ]
    header = ("threshold", "steps/token", "decode steps", "decode tok/s", "× every step", "perplexity", "× every step")
    lines.append("  ".join(f"{h:>12}" for h in header))
    for row in result["rows"]:
        cells = (
            f"{row['threshold']:.2f}",
            f"{row['steps_per_token']:.2f}",
            f"{row['decode_steps']:.2f}",
            f"{row['decode_tokens_per_s']:.1f}",
            f"{row['speed_vs_every_step']:.2f}×",
            f"{row['perplexity']:.3f}",
            f"{row['perplexity_vs_every_step']:.4f}×",
        )
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return lines
