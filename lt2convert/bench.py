"""Measured prefill and decoding speed, peak memory and cache bytes of looped models, side by side on one device.

Decoding at a long context needs a cache holding that context. A real prefill of 32K tokens through full
attention takes many minutes on a CPU, so by default on a CPU the cache is *synthetic*: every slot is filled
with random tensors of exactly the shapes, dtypes and bytes a real prefill of N tokens leaves (attention and
DSA: N keys/values, DSA also N index keys; SWA: min(N, window) entries and `tokens = N`; GDN: its fixed
recurrent and short-conv states), and `seen_tokens = N`. The timed decoding steps then run through the model's
normal forward (`model(ids, cache=cache, use_cache=True)`), so they do exactly the work a real decode at that
context does; only the values in the cache are not a real prompt's. `context_mode="prefill"` (the default on
CUDA, `--prefill-context` on the CLI) prefills a real random prompt instead.

Timing: warm-up steps first, then the median over the timed steps (prefill: over repeats), under
`torch.no_grad()`, with `torch.cuda.synchronize()` around every timed region on CUDA.

Peak memory: CUDA, `torch.cuda.max_memory_allocated()` above the memory allocated before the cache was built;
CPU, the rise of the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above
the resident set before the cache was built. Both cover the cache plus the decoding workspace, not the weights.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lt2convert.costs import cache_bytes
from lt2convert.errors import ConfigError
from lt2convert.modeling import LoopedCache, LT2Config, LT2ForCausalLM
from lt2convert.modeling.configuration_lt2 import cache_capacity, window_capacity
from lt2convert.units import parse_context, parse_contexts

BENCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTEXT_MODES = ("synthetic", "prefill")
MIXER_LETTERS = {"full_attention": "F", "gdn": "G", "dsa": "D", "swa": "S", "swa_gdn": "M"}


def mixer_summary(config: LT2Config) -> str:
    """'F×2 G×6' in order of first appearance."""
    counts: dict[str, int] = {}
    for mixer in config.layer_types:
        counts[mixer] = counts.get(mixer, 0) + 1
    return " ".join(f"{MIXER_LETTERS.get(m, m)}×{n}" for m, n in counts.items())


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class BenchModel:
    name: str
    model: LT2ForCausalLM


def random_model(config: LT2Config, seed: int = 0) -> LT2ForCausalLM:
    """A randomly initialised model of `config` (the model's own init)."""
    from lt2convert.loading import model_class

    torch.manual_seed(seed)
    return model_class(config)(config).eval()


def is_plan_file(spec: str) -> bool:
    return isinstance(spec, str) and spec.endswith((".yaml", ".yml")) and Path(spec).is_file()


def resolve_models(
    models: list,
    names: list[str] | None,
    random: bool,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> list[BenchModel]:
    """Each entry: an in-memory model, an LT2Config (random init), a plan.yaml (random init of the first model's
    config with the plan's layers) or anything `load_model` accepts (random init of its config with `random`)."""
    from lt2convert.loading import load_config, load_model
    from lt2convert.plan import plan_to_config, read_plan

    resolved: list[BenchModel] = []
    for i, entry in enumerate(models):
        if isinstance(entry, LT2ForCausalLM):
            model, name = entry, getattr(entry.config, "name_or_path", "") or f"model {i}"
        elif isinstance(entry, LT2Config):
            model, name = random_model(entry, seed), f"config {i}"
        elif is_plan_file(str(entry)):
            if not resolved:
                raise ConfigError(f"{entry}: a plan needs a source model before it (bench SOURCE --vs PLAN)")
            config = plan_to_config(read_plan(entry), resolved[0].model.config)
            model, name = random_model(config, seed), f"{entry} (random init)"
        elif random:
            config, _ = load_config(str(entry))
            model, name = random_model(config, seed), f"{entry} (random init)"
        else:
            model, name = load_model(str(entry), dtype=dtype, device=device), str(entry)
        if names is not None and i < len(names):
            name = names[i]
        resolved.append(BenchModel(name, model.to(device=device, dtype=dtype).eval()))
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Caches


def synthetic_slot(
    model: LT2ForCausalLM, layer: int, batch: int, context: int, dtype: torch.dtype, device: torch.device,
    generator: torch.Generator,
) -> dict:
    """The state one (step, layer) slot holds after a real prefill of `context` tokens, with random values."""
    config = model.config
    mixer = config.layer_types[layer]

    def rand(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.5).to(device=device, dtype=dt)

    kv, d = config.num_key_value_heads, config.head_dim
    capacity = cache_capacity(context)  # growing caches allocate whole blocks of tokens
    if mixer == "full_attention":
        return {"k": rand(batch, kv, capacity, d), "v": rand(batch, kv, capacity, d), "length": context}
    if mixer in ("swa", "swa_gdn"):
        ring = window_capacity(config, context)
        window = {"k": rand(batch, kv, ring, d), "v": rand(batch, kv, ring, d), "tokens": context}
        if mixer == "swa":
            return window
        # swa_gdn: its window and its GDN branch's states share the slot (their keys differ).
        return window | synthetic_gdn_slot(model.model.layers[layer].self_attn.gdn, config, batch, rand)
    if mixer == "dsa":
        return {
            "k": rand(batch, capacity, kv, d),
            "v": rand(batch, capacity, kv, d),
            "k_idx": rand(batch, capacity, config.dsa_index_head_dim),
            "length": context,
        }
    if mixer == "gdn":
        return synthetic_gdn_slot(model.model.layers[layer].self_attn, config, batch, rand)
    raise ConfigError(f"layer {layer}: unknown mixer {mixer!r}")


def synthetic_gdn_slot(gdn, config: LT2Config, batch: int, rand) -> dict:
    """A GDN module's recurrent and short-conv states, as its prefill leaves them, with random values."""
    heads, dk, dv = gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim
    # A contracting recurrent state (as decay and L2-normed keys keep real ones), fp32 like the kernels'.
    slot = {"recurrent": rand(batch, heads, dk, dv, dt=torch.float32) * dk**-0.5}
    if gdn.use_short_conv:
        # The q, k and v convolutions' last inputs, their channels together.
        slot["conv"] = rand(batch, heads * (2 * dk + dv), config.gdn_conv_size - 1)
    return slot


def synthetic_cache(
    model: LT2ForCausalLM, batch: int, context: int, seed: int = 0, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoopedCache:
    """A LoopedCache with exactly the key names, shapes, dtypes and bytes a real prefill of `context` tokens
    leaves, filled with random values, and `seen_tokens = context`."""
    config = model.config
    param = model.model.embed_tokens.weight
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    generator = torch.Generator().manual_seed(seed)
    cache = LoopedCache(config.num_hidden_layers, config.total_ut_steps)
    for step in range(config.total_ut_steps):
        for layer in range(config.num_hidden_layers):
            cache.slot(step, layer).update(synthetic_slot(model, layer, batch, context, dtype, device, generator))
    cache.seen_tokens = context
    return cache


def random_ids(model: LT2ForCausalLM, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return ids.to(model.model.embed_tokens.weight.device)


@torch.no_grad()
def prefill_cache(model: LT2ForCausalLM, ids: torch.Tensor) -> LoopedCache:
    """The cache a real prefill of `ids` leaves."""
    return model(ids, use_cache=True, logits_to_keep=1).cache


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above the level at `start()`: CUDA allocator statistics, or the CPU process's RSS high-water
    mark (reset through /proc/self/clear_refs); None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the allocation before the cache"
        elif self._rss_resettable():
            self.method = (
                "process RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) above RSS before the cache"
            )
        else:
            self.method = "unavailable (no /proc/self/clear_refs)"

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _rss_resettable(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return self._status("VmHWM") is not None

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif not self.method.startswith("unavailable"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS") or 0

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.method.startswith("unavailable"):
            return None
        return max(0, (self._status("VmHWM") or 0) - self.base)


@torch.no_grad()
def time_prefill(model: LT2ForCausalLM, batch: int, tokens: int, repeats: int, warmup: int, seed: int) -> dict:
    device = model.model.embed_tokens.weight.device
    ids = random_ids(model, batch, tokens, torch.Generator().manual_seed(seed))
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": batch * tokens / seconds, "repeats": repeats}


@torch.no_grad()
def time_decode(
    model: LT2ForCausalLM, cache: LoopedCache, batch: int, steps: int, warmup: int, seed: int,
    exit_threshold: float | None = None,
) -> dict:
    """Median seconds of one decoding step over `steps` timed steps, after `warmup` untimed ones, and the mean
    loop steps a timed step ran (with `exit_threshold`, adaptive exit: until the last row of the batch exits)."""
    device = model.model.embed_tokens.weight.device
    ids = random_ids(model, batch, warmup + steps, torch.Generator().manual_seed(seed))
    mode = {} if exit_threshold is None else {"exit_threshold": exit_threshold}
    times, loops = [], []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        out = model(ids[:, i : i + 1], cache=cache, use_cache=True, **mode)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            loops.append(loop_steps_run(model, out))
    seconds = statistics.median(times)
    return {
        "seconds_per_step": seconds, "tokens_per_s": batch / seconds, "steps": steps, "warmup": warmup,
        "loop_steps_per_token": statistics.fmean(loops),
    }


def loop_steps_run(model: LT2ForCausalLM, out) -> int:
    """Loop steps a decoding step ran: every step, or under adaptive exit until the batch's last row exited."""
    return model.config.total_ut_steps if out.exit_steps is None else int(out.exit_steps.max()) + 1


def check_exit_threshold(models: list[BenchModel], exit_threshold: float | None) -> None:
    if exit_threshold is None:
        return
    if not 0.0 < exit_threshold <= 1.0:
        raise ConfigError(f"--exit-threshold must be within (0, 1], got {exit_threshold}")
    for entry in models:
        if not entry.model.config.use_exit_gate:
            raise ConfigError(f"--exit-threshold: {entry.name} has no exit gate (not a looped model)")


def ratio(value: float | None, first: float | None) -> float | None:
    if value is None or not first:
        return None
    return value / first


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def bench(
    models: list,
    contexts: str | list[int] = (1024, 8192, 32768),
    batch: int = 1,
    *,
    decode_tokens: int = 8,
    prefill: int | str | None = None,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    context_mode: str | None = None,
    random: bool = False,
    names: list[str] | None = None,
    warmup: int = 2,
    repeats: int = 3,
    seed: int = 0,
    exit_threshold: float | None = None,
) -> dict:
    """Benchmark `models` (in-memory models, LT2Configs, plan files, or anything `load_model` accepts) on one
    device: prefill tokens/s at `prefill` tokens (default: the smallest context), decode tokens/s, peak memory
    and cache bytes (measured and the cost model's) at each context, and ratios to the first model.

    context_mode: 'synthetic' (random cache of a real prefill's exact shapes; default on CPU) or 'prefill' (a
    real prefill of a random prompt; default on CUDA).
    exit_threshold: decode with adaptive exit at this threshold (tokens stop looping once their exit mass
    reaches it; see LT2ForCausalLM); each context then reports the loop steps run per decoded token.
    """
    if not models:
        raise ConfigError("no model to benchmark")
    if batch <= 0:
        raise ConfigError(f"--batch-size must be > 0, got {batch}")
    if decode_tokens <= 0:
        raise ConfigError(f"--decode-tokens must be > 0, got {decode_tokens}")
    if repeats <= 0 or warmup < 0:
        raise ConfigError(f"repeats must be > 0 and warmup >= 0, got {repeats} and {warmup}")
    if dtype not in BENCH_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(BENCH_DTYPES)}")
    contexts = parse_contexts(contexts)
    prefill_tokens = parse_context(prefill) if prefill is not None else contexts[0]
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    mode = context_mode or ("prefill" if target.type == "cuda" else "synthetic")
    if mode not in CONTEXT_MODES:
        raise ConfigError(f"context mode {mode!r} is not one of {', '.join(CONTEXT_MODES)}")
    torch_dtype = BENCH_DTYPES[dtype]
    resolved = resolve_models(list(models), names, random, target, torch_dtype, seed)
    check_exit_threshold(resolved, exit_threshold)
    memory = PeakMemory(target)

    results = []
    for entry in resolved:
        model, config = entry.model, entry.model.config
        row = {
            "name": entry.name,
            "mixers": mixer_summary(config),
            "layer_types": list(config.layer_types),
            "loop_steps": config.total_ut_steps,
            "params": sum(p.numel() for p in model.parameters()),
            "prefill": time_prefill(model, batch, prefill_tokens, repeats, warmup, seed),
            "decode": {},
        }
        for context in contexts:
            memory.start()
            if mode == "synthetic":
                cache = synthetic_cache(model, batch, context, seed=seed)
            else:
                ids = random_ids(model, batch, context, torch.Generator().manual_seed(seed))
                cache = prefill_cache(model, ids)
            measured = cache.nbytes()
            timing = time_decode(model, cache, batch, decode_tokens, warmup, seed, exit_threshold)
            peak = memory.peak()
            del cache
            row["decode"][str(context)] = {
                "context": context,
                **timing,
                "cache_bytes": measured,
                "cost_model_cache_bytes": cache_bytes(config, context, dtype, batch),
                "peak_memory_bytes": peak,
            }
        results.append(row)

    first = results[0]
    for row in results:
        row["prefill"]["ratio"] = ratio(row["prefill"]["tokens_per_s"], first["prefill"]["tokens_per_s"])
        for key, figures in row["decode"].items():
            base = first["decode"][key]
            figures["ratio"] = ratio(figures["tokens_per_s"], base["tokens_per_s"])
            figures["cache_bytes_ratio"] = ratio(figures["cache_bytes"], base["cache_bytes"])
            figures["peak_memory_ratio"] = ratio(figures["peak_memory_bytes"], base["peak_memory_bytes"])

    return {
        "device": str(target),
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype,
        "batch": batch,
        "contexts": contexts,
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "context_mode": mode,
        "exit_threshold": exit_threshold,
        "memory_method": memory.method,
        "notes": [
            "decode tokens/s = batch / median seconds of one decoding step; prefill tokens/s = batch × prefill "
            "tokens / median seconds of one prefill",
            "synthetic context: each cache slot holds random tensors of exactly a real prefill's shapes and "
            "seen_tokens = context; the decoding steps are the model's real forward"
            if mode == "synthetic"
            else "prefill context: the cache comes from a real prefill of a random prompt",
            "ratios are to the first model; cache_bytes is LoopedCache.nbytes() at the context, "
            "cost_model_cache_bytes is lt2convert.costs.cache_bytes",
            *exit_notes(results, exit_threshold),
        ],
        "models": results,
    }


def exit_notes(results: list[dict], exit_threshold: float | None) -> list[str]:
    """With adaptive exit, the loop steps run per decoded token, per model and context."""
    if exit_threshold is None:
        return []
    per_model = [
        f"[{i}] " + ", ".join(f"{f['loop_steps_per_token']:.2f} at {f['context']:,}" for f in row["decode"].values())
        + f" (of {row['loop_steps']})"
        for i, row in enumerate(results)
    ]
    return [f"adaptive exit at threshold {exit_threshold:g}: loop steps run per decoded token " + "; ".join(per_model)]
