"""The looped runtime: config, model, cache.

The config module is light (no modeling code), so that reading and planning configs stays fast; the model module
loads on first use of a model class, and registers "lt2"/"ouro" with transformers' Auto classes when it does.
"""

import importlib

from .configuration_lt2 import MIXER_TYPES, LT2Config, OuroConfig

_RUNTIME = ("LT2Model", "LT2ForCausalLM", "OuroForCausalLM", "LoopedCache", "LoopedOutput")

__all__ = ["MIXER_TYPES", "LT2Config", "OuroConfig", *_RUNTIME]


def __getattr__(name: str):
    if name in _RUNTIME:
        return getattr(importlib.import_module(".modeling_lt2", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
