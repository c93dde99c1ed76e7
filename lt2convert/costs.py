"""Memory a looped model's decoding state takes, per mixer, exactly as the runtime allocates it.

One slot per (loop step, layer). Attention-like mixers grow with the context; GDN keeps a fixed state.
"""

from __future__ import annotations

from lt2convert.modeling import LT2Config

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RECURRENT_STATE_BYTES = 4  # GDN's recurrent state is kept in fp32 whatever the activation dtype


def gdn_dims(config: LT2Config) -> tuple[int, int, int]:
    """(heads, key dim, value dim) of the GDN mixer."""
    dk = config.gdn_head_k_dim
    return config.gdn_num_heads, dk, int(dk * config.gdn_expand_v)


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


def slot_fixed_bytes(config: LT2Config, mixer: str, dtype_bytes: int) -> int:
    """Bytes one slot holds whatever the context (per sequence): GDN's recurrent and short-conv states."""
    if mixer != "gdn":
        return 0
    heads, dk, dv = gdn_dims(config)
    state = heads * dk * dv * RECURRENT_STATE_BYTES
    conv = (
        (config.gdn_conv_size - 1) * heads * (2 * dk + dv) * dtype_bytes if config.gdn_use_short_conv else 0
    )
    return state + conv


def slot_bytes(config: LT2Config, mixer: str, context: int, dtype_bytes: int) -> int:
    tokens = min(context, config.swa_window) if mixer == "swa" else context
    return slot_fixed_bytes(config, mixer, dtype_bytes) + tokens * slot_bytes_per_token(
        config, mixer, dtype_bytes
    )


def cache_bytes(config: LT2Config, context: int, dtype: str = "bf16", batch: int = 1) -> int:
    """Total decoding-state bytes after `context` tokens, over all T·L slots."""
    b = DTYPE_BYTES[dtype]
    per_step = sum(slot_bytes(config, m, context, b) for m in config.layer_types)
    return batch * config.total_ut_steps * per_step


def kv_cache_bytes_per_token(config: LT2Config, dtype: str = "bf16") -> int:
    """Bytes per cached token over all T·L slots (growing mixers only; fixed states excluded)."""
    b = DTYPE_BYTES[dtype]
    return config.total_ut_steps * sum(slot_bytes_per_token(config, m, b) for m in config.layer_types)
