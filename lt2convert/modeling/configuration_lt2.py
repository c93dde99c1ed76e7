"""Configuration of looped decoders: Ouro, its LT2 hybrids, and the Llama family as the one-step case.

Self-contained (imports nothing from lt2convert) because exported checkpoints ship this file as remote code.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

MIXER_TYPES = ("full_attention", "gdn", "dsa", "swa", "swa_gdn")


class LT2Config(PreTrainedConfig):
    """A decoder stack of `num_hidden_layers` layers applied `total_ut_steps` times.

    `layer_types[i]` names the token mixer of layer i (`full_attention`, `gdn`, `dsa`, `swa`, `swa_gdn`); the
    mixer settings live in the `gdn_*`, `dsa_*` and `swa_*` fields (`swa_gdn` uses both the `swa_*` and the
    `gdn_*` ones). `sandwich_norm` adds Ouro's post-mixer and
    post-MLP RMSNorms; `use_exit_gate` adds Ouro's early-exit gate. A Llama-family checkpoint is the case
    `total_ut_steps=1, sandwich_norm=False, use_exit_gate=False`.
    """

    model_type = "lt2"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    o_proj_bias: bool | None = None  # None: same as attention_bias (Llama); Qwen2 has q/k/v biases only
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # Looping and exit.
    total_ut_steps: int = 4
    early_exit_threshold: float = 1.0
    sandwich_norm: bool = True
    use_exit_gate: bool = True
    # Token mixers.
    layer_types: list[str] | None = None
    gdn_num_heads: int | None = None
    gdn_head_k_dim: int | None = None
    gdn_expand_v: float = 1.0
    gdn_conv_size: int = 4
    gdn_use_short_conv: bool = True
    gdn_use_gate: bool = True
    gdn_allow_neg_eigval: bool = False
    dsa_index_n_heads: int = 4
    dsa_index_head_dim: int | None = None
    dsa_topk: int = 2048
    swa_window: int = 2048
    swa_sinks: int = 0  # first tokens every SWA query also sees (attention sinks); plans default to 4

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        if self.gdn_num_heads is None:
            self.gdn_num_heads = self.num_attention_heads
        if self.gdn_head_k_dim is None:
            self.gdn_head_k_dim = self.head_dim
        if self.dsa_index_head_dim is None:
            # One head-dim block per kv head the index heads use: room for an indexer built from the attention's
            # own q/k (see convert), with RoPE per block.
            groups = self.num_attention_heads // self.num_key_value_heads
            blocks = min(-(-self.dsa_index_n_heads // groups), self.num_key_value_heads)
            self.dsa_index_head_dim = self.head_dim * blocks
        super().__post_init__(**kwargs)
        self.check_mixers()

    def check_mixers(self) -> None:
        """Reject layer lists that do not describe this stack (one entry per layer, known mixers)."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries; expected num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        unknown = sorted({t for t in self.layer_types if t not in MIXER_TYPES})
        if unknown:
            raise ValueError(f"layer_types: unknown mixer(s) {unknown}; expected one of {list(MIXER_TYPES)}")
        if self.total_ut_steps < 1:
            raise ValueError(f"total_ut_steps must be >= 1, got {self.total_ut_steps}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.dsa_topk <= 0:
            raise ValueError(f"dsa_topk must be > 0, got {self.dsa_topk}")
        if self.swa_window <= 0:
            raise ValueError(f"swa_window must be > 0, got {self.swa_window}")
        if self.swa_sinks < 0:
            raise ValueError(f"swa_sinks must be >= 0, got {self.swa_sinks}")
        if "swa_gdn" in self.layer_types:
            self.check_swa_gdn_heads()

    def check_swa_gdn_heads(self) -> None:
        """swa_gdn gates the GDN's heads against the attention's, one to one, before their shared o_proj."""
        value_dim = self.gdn_head_k_dim * self.gdn_expand_v
        if self.gdn_num_heads != self.num_attention_heads or value_dim != self.head_dim:
            raise ValueError(
                f"swa_gdn needs gdn_num_heads == num_attention_heads ({self.num_attention_heads}) and "
                f"gdn_head_k_dim × gdn_expand_v == head_dim ({self.head_dim}); got {self.gdn_num_heads} and "
                f"{value_dim:g}"
            )

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))


class OuroConfig(LT2Config):
    """Ouro's own `model_type`, so that its published config.json loads unchanged."""

    model_type = "ouro"


# Cache geometry: how many entries the runtime allocates. Here rather than in the model file so that the cost
# model can use it without importing torch.
CACHE_BLOCK = 256  # growing caches are allocated in blocks of tokens, so decoding appends in place


def cache_capacity(tokens: int, limit: int | None = None) -> int:
    """Entries a growing cache allocates to hold `tokens`: whole blocks, at most `limit` (a sliding window)."""
    capacity = -(-tokens // CACHE_BLOCK) * CACHE_BLOCK
    return capacity if limit is None else min(capacity, limit)


def window_capacity(config: LT2Config, context: int) -> int:
    """Entries an SWA slot allocates after `context` tokens: the sink slots, then the ring of the last
    `swa_window` keys, grown in whole blocks."""
    sinks, window = config.swa_sinks, config.swa_window
    return cache_capacity(sinks + min(context, window), sinks + window)


def window_keys(config: LT2Config, context: int) -> int:
    """Keys an SWA query reads with `context` tokens cached (itself included): its window and the sinks."""
    return min(context, config.swa_window + config.swa_sinks)


__all__ = ["LT2Config", "OuroConfig", "MIXER_TYPES", "cache_capacity", "window_capacity", "window_keys"]
