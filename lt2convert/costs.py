"""What a looped model costs to run: decoding-state memory exactly as the runtime allocates it, FLOPs, memory
traffic and a roofline projection of decoding speed.

One slot per (loop step, layer). Attention-like mixers grow with the context; GDN keeps a fixed state.
docs/cost-model.md states the assumptions and compares the projections with LT2's measurements.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, replace

from lt2convert.errors import ConfigError
from lt2convert.modeling import LT2Config
from lt2convert.modeling.configuration_lt2 import cache_capacity, window_capacity, window_keys

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RECURRENT_STATE_BYTES = 4  # GDN's recurrent state is kept in fp32 whatever the activation dtype


# A mixer made of others costs what its parts cost together: swa_gdn keeps a window and a GDN state, and does
# the work of both (its per-head gate is a multiply-add, not counted).
MIXER_PARTS = {"swa_gdn": ("swa", "gdn")}


def summed_over_parts(cost):
    """Lets `cost(config, mixer, ...)` take a composite mixer: the sum of its parts' costs."""

    @functools.wraps(cost)
    def composite_aware(config: LT2Config, mixer: str, *args):
        if mixer in MIXER_PARTS:
            return sum(cost(config, part, *args) for part in MIXER_PARTS[mixer])
        return cost(config, mixer, *args)

    return composite_aware


def gdn_dims(config: LT2Config) -> tuple[int, int, int]:
    """(heads, key dim, value dim) of the GDN mixer."""
    dk = config.gdn_head_k_dim
    return config.gdn_num_heads, dk, int(dk * config.gdn_expand_v)


@summed_over_parts
def slot_bytes_per_token(config: LT2Config, mixer: str, dtype_bytes: int) -> int:
    """Bytes one (step, layer) slot adds per cached token (for swa: until the window is full)."""
    kv = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    if mixer in ("full_attention", "swa"):
        return kv
    if mixer == "dsa":
        return kv + config.dsa_index_head_dim * dtype_bytes  # one shared index key per token
    if mixer == "gdn":
        return 0
    raise ValueError(f"unknown mixer {mixer!r}")


@summed_over_parts
def slot_fixed_bytes(config: LT2Config, mixer: str, dtype_bytes: int) -> int:
    """Bytes one slot holds whatever the context (per sequence): GDN's recurrent and short-conv states."""
    if mixer != "gdn":
        return 0
    heads, dk, dv = gdn_dims(config)
    state = heads * dk * dv * RECURRENT_STATE_BYTES
    conv = (config.gdn_conv_size - 1) * heads * (2 * dk + dv) * dtype_bytes if config.gdn_use_short_conv else 0
    return state + conv


@summed_over_parts
def slot_bytes(config: LT2Config, mixer: str, context: int, dtype_bytes: int) -> int:
    """Bytes one slot allocates after `context` tokens: growing caches hold whole blocks of tokens."""
    if mixer == "swa":
        tokens = window_capacity(config, context)
    elif context:
        tokens = cache_capacity(context)
    else:
        tokens = 0
    return slot_fixed_bytes(config, mixer, dtype_bytes) + tokens * slot_bytes_per_token(config, mixer, dtype_bytes)


def cache_bytes(config: LT2Config, context: int, dtype: str = "bf16", batch: int = 1) -> int:
    """Total decoding-state bytes after `context` tokens, over all T·L slots."""
    b = DTYPE_BYTES[dtype]
    per_step = sum(slot_bytes(config, m, context, b) for m in config.layer_types)
    return batch * config.total_ut_steps * per_step


def fixed_state_bytes(config: LT2Config, dtype: str = "bf16") -> int:
    """Bytes per sequence over all T·L slots that do not grow with the context (GDN's states)."""
    b = DTYPE_BYTES[dtype]
    return config.total_ut_steps * sum(slot_fixed_bytes(config, m, b) for m in config.layer_types)


def kv_cache_bytes_per_token(config: LT2Config, dtype: str = "bf16") -> int:
    """Bytes per cached token over all T·L slots (growing mixers only; fixed states excluded)."""
    b = DTYPE_BYTES[dtype]
    return config.total_ut_steps * sum(slot_bytes_per_token(config, m, b) for m in config.layer_types)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts from the config alone. The runtime's meta-device model gives the same counts (a test checks
# every mixer); counting here keeps `plan` from importing the model code, which costs seconds of start-up.


def linear_params(fan_in: int, fan_out: int, bias: bool = False) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def attention_params(config: LT2Config) -> int:
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return (
        linear_params(h, q, config.attention_bias)
        + 2 * linear_params(h, kv, config.attention_bias)
        + linear_params(q, h, config.o_proj_bias)
    )


def gdn_params(config: LT2Config, output_projection: bool = True) -> int:
    h = config.hidden_size
    heads, head_k, head_v = gdn_dims(config)
    key_dim, value_dim = heads * head_k, heads * head_v
    total = linear_params(h, 2 * key_dim + value_dim) + 2 * linear_params(h, heads) + 2 * heads  # A_log, dt_bias
    if config.gdn_use_short_conv:
        total += (2 * key_dim + value_dim) * config.gdn_conv_size
    if config.gdn_use_gate:
        total += linear_params(h, value_dim)
    total += head_v  # the output norm's weight
    if output_projection:
        total += linear_params(value_dim, h)
    return total


def indexer_params(config: LT2Config) -> int:
    h, heads, dim = config.hidden_size, config.dsa_index_n_heads, config.dsa_index_head_dim
    return linear_params(h, heads * dim) + linear_params(h, dim) + linear_params(h, heads, bias=True)


def mixer_params(config: LT2Config, mixer: str) -> int:
    if mixer in ("full_attention", "swa"):
        return attention_params(config)
    if mixer == "dsa":
        return attention_params(config) + indexer_params(config)
    if mixer == "gdn":
        return gdn_params(config)
    if mixer == "swa_gdn":  # the window's attention, a GDN sharing its output projection, a per-head gate
        return attention_params(config) + gdn_params(config, output_projection=False) + config.num_attention_heads
    raise ValueError(f"unknown mixer {mixer!r}")


def parameter_counts(config: LT2Config) -> dict[str, int]:
    """Parameter counts by component, as `lt2convert.summary.parameter_breakdown` reports them."""
    h, mlp = config.hidden_size, config.intermediate_size
    counts: Counter[str] = Counter()
    for mixer in config.layer_types:
        counts[f"mixer:{mixer}"] += mixer_params(config, mixer)
    layers = config.num_hidden_layers
    counts["mlp"] = layers * (2 * linear_params(h, mlp, config.mlp_bias) + linear_params(mlp, h, config.mlp_bias))
    counts["layer_norms"] = layers * h * (4 if config.sandwich_norm else 2)
    counts["embeddings"] = config.vocab_size * h
    if not config.tie_word_embeddings:
        counts["lm_head"] = config.vocab_size * h
    counts["final_norm"] = h
    if config.use_exit_gate:
        counts["exit_gate"] = h + 1
    return dict(counts)


# Compute and memory traffic, and a roofline projection of decoding speed.
#
# Weights: 2 FLOPs per parameter per token (the matrix-multiply rule; vectors such as norm weights are < 0.1% of
# the parameters and are counted the same way). The layer stack, the per-step final norm and the exit gate run
# once per loop step; the LM head runs once per token; the embedding lookup is free. Mixers add the work that
# depends on the context (attention scores, the indexer, the delta-rule state update) on top of their projections.


@dataclass(frozen=True)
class Hardware:
    """A roofline device. Rough public figures: real kernels reach 60–90% of them."""

    name: str
    tflops: float  # peak dense matmul throughput in the cost dtype, 10^12 FLOP/s
    gbps: float  # memory bandwidth, 10^9 bytes/s
    memory_gb: float | None  # device memory, 10^9 bytes; None: not modelled
    note: str


HARDWARE = {
    "h100": Hardware(
        name="H100 SXM",
        tflops=989.0,
        gbps=3350.0,
        memory_gb=80.0,
        note="NVIDIA H100 datasheet: 989 TFLOP/s dense BF16 (1979 with 2:4 sparsity), 3.35 TB/s HBM3, 80 GB",
    ),
    "h200": Hardware(
        name="H200 SXM",
        tflops=989.0,
        gbps=4800.0,
        memory_gb=141.0,
        note="NVIDIA H200 datasheet: H100's compute (989 TFLOP/s dense BF16), 4.8 TB/s HBM3e, 141 GB",
    ),
    "a100": Hardware(
        name="A100 SXM 80GB",
        tflops=312.0,
        gbps=2039.0,
        memory_gb=80.0,
        note="NVIDIA A100 datasheet: 312 TFLOP/s dense BF16, 2.039 TB/s HBM2e (80 GB SXM)",
    ),
    "cpu": Hardware(
        name="CPU (rough)",
        tflops=0.17,
        gbps=20.0,
        memory_gb=None,
        note="very rough: 8 AVX2 cores in fp32 and achievable dual-channel DDR bandwidth; measure your machine "
        "and pass --tflops/--gbps",
    ),
}


def hardware(device: str = "h100", tflops: float | None = None, gbps: float | None = None) -> Hardware:
    """A device from HARDWARE, with the figures given explicitly replacing its own (memory is kept)."""
    if device not in HARDWARE:
        raise ConfigError(f"unknown device {device!r}; expected one of {', '.join(HARDWARE)}")
    base = HARDWARE[device]
    for name, value in (("tflops", tflops), ("gbps", gbps)):
        if value is not None and value <= 0:
            raise ConfigError(f"--{name} must be > 0, got {value}")
    if tflops is None and gbps is None:
        return base
    return replace(
        base,
        name=f"{base.name}, custom figures",
        tflops=base.tflops if tflops is None else tflops,
        gbps=base.gbps if gbps is None else gbps,
        note=f"{base.note}; overridden by --tflops/--gbps",
    )


def weight_params(config: LT2Config, params: dict[str, int]) -> tuple[int, int]:
    """(parameters applied at every loop step, parameters applied once per token), from `parameter_breakdown`."""
    head = params["embeddings"] if config.tie_word_embeddings else params["lm_head"]
    per_step = sum(n for component, n in params.items() if component not in ("embeddings", "lm_head"))
    return per_step, head


def causal_pairs(tokens: int, limit: int | None = None) -> int:
    """Σ_t min(t, limit) over t = 1..tokens: the (query, key) pairs of causal attention over `limit` keys."""
    if limit is None or tokens <= limit:
        return tokens * (tokens + 1) // 2
    return limit * (limit + 1) // 2 + (tokens - limit) * limit


def gdn_state_flops(config: LT2Config) -> int:
    """Delta-rule work per token per slot: decay S (dk·dv), Sᵀk (2·dk·dv), rank-1 update (2·dk·dv), Sᵀq
    (2·dk·dv). The chunked prefill kernel does about as much plus small intra-chunk terms, ignored here."""
    heads, dk, dv = gdn_dims(config)
    return 7 * heads * dk * dv


@summed_over_parts
def mixer_decode_flops(config: LT2Config, mixer: str, context: int) -> int:
    """FLOPs one slot spends on a new token beyond its projections, with `context` tokens cached."""
    attend = 4 * config.num_attention_heads * config.head_dim  # q·k and p·v per key
    if mixer == "full_attention":
        return attend * context
    if mixer == "swa":
        return attend * window_keys(config, context)
    if mixer == "dsa":  # the indexer scores every key (ReLU(q·k) per index head, then weighted); top-k ignored
        return 2 * config.dsa_index_n_heads * (config.dsa_index_head_dim + 1) * context + attend * min(
            context, config.dsa_topk
        )
    if mixer == "gdn":
        return gdn_state_flops(config)
    raise ValueError(f"unknown mixer {mixer!r}")


@summed_over_parts
def mixer_decode_bytes(config: LT2Config, mixer: str, context: int, dtype_bytes: int) -> int:
    """Cache bytes one slot reads and writes for a new token, with `context` tokens cached (the new one
    included): attention reads every cached key/value it attends to and appends one; GDN reads and writes its
    whole state; DSA reads every index key but only the top-k keys/values."""
    entry = slot_bytes_per_token(config, mixer, dtype_bytes)
    if mixer == "full_attention":
        return (context + 1) * entry
    if mixer == "swa":
        return (window_keys(config, context) + 1) * entry
    if mixer == "dsa":
        index_key = config.dsa_index_head_dim * dtype_bytes
        return context * index_key + min(context, config.dsa_topk) * (entry - index_key) + entry
    if mixer == "gdn":
        return 2 * slot_fixed_bytes(config, mixer, dtype_bytes)
    raise ValueError(f"unknown mixer {mixer!r}")


@summed_over_parts
def mixer_prefill_flops(config: LT2Config, mixer: str, tokens: int) -> int:
    """FLOPs one slot spends on a `tokens`-long prompt beyond its projections."""
    attend = 4 * config.num_attention_heads * config.head_dim
    if mixer == "full_attention":
        return attend * causal_pairs(tokens)
    if mixer == "swa":
        return attend * causal_pairs(tokens, config.swa_window + config.swa_sinks)
    if mixer == "dsa":
        indexer = 2 * config.dsa_index_n_heads * (config.dsa_index_head_dim + 1)
        return indexer * causal_pairs(tokens) + attend * causal_pairs(tokens, config.dsa_topk)
    if mixer == "gdn":
        return gdn_state_flops(config) * tokens
    raise ValueError(f"unknown mixer {mixer!r}")


def prefill_flops(config: LT2Config, params: dict[str, int], tokens: int) -> int:
    """FLOPs of a `tokens`-long prompt through all loop steps, with logits for the last position only (what
    generation needs)."""
    per_step, head = weight_params(config, params)
    mixers = sum(mixer_prefill_flops(config, m, tokens) for m in config.layer_types)
    return config.total_ut_steps * (2 * per_step * tokens + mixers) + 2 * head


@dataclass(frozen=True)
class DecodeCost:
    """One decoding step of `batch` sequences, each with `context` tokens cached, under a roofline."""

    context: int
    batch: int
    flops_per_token: int
    bytes_per_token: int  # weights shared by the batch plus this sequence's cache traffic
    weight_bytes_per_step: int  # read once per layer application for the whole batch
    cache_bytes_per_token: int  # this sequence's cache reads and writes
    seconds_per_step: float
    tokens_per_s: float
    bound: str  # "memory" or "compute"
    memory_bytes: int  # weights + the whole batch's cache at `context`
    fits: bool | None  # within the device's memory (activations and workspace not counted); None: unknown


def decode_cost(
    config: LT2Config, params: dict[str, int], context: int, batch: int, device: Hardware, dtype: str = "bf16"
) -> DecodeCost:
    """Time per decoding step = max(FLOPs / peak, bytes / bandwidth): each loop step reads every layer's weights
    from memory once for the whole batch (the same weights are applied T times per token), and every sequence
    reads its own cache slots. Activations are assumed to stay on chip."""
    b = DTYPE_BYTES[dtype]
    per_step, head = weight_params(config, params)
    steps = config.total_ut_steps
    flops = 2 * (steps * per_step + head) + steps * sum(
        mixer_decode_flops(config, m, context) for m in config.layer_types
    )
    cache_traffic = steps * sum(mixer_decode_bytes(config, m, context, b) for m in config.layer_types)
    weight_bytes = (steps * per_step + head) * b
    compute_s = batch * flops / (device.tflops * 1e12)
    memory_s = (weight_bytes + batch * cache_traffic) / (device.gbps * 1e9)
    seconds = max(compute_s, memory_s)
    memory = sum(params.values()) * b + cache_bytes(config, context, dtype, batch)
    return DecodeCost(
        context=context,
        batch=batch,
        flops_per_token=flops,
        bytes_per_token=weight_bytes // batch + cache_traffic,
        weight_bytes_per_step=weight_bytes,
        cache_bytes_per_token=cache_traffic,
        seconds_per_step=seconds,
        tokens_per_s=batch / seconds,
        bound="memory" if memory_s >= compute_s else "compute",
        memory_bytes=memory,
        fits=None if device.memory_gb is None else memory <= device.memory_gb * 1e9,
    )
