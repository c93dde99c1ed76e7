"""The looped runtime (config, model, cache). Registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_lt2 import MIXER_TYPES, LT2Config, OuroConfig
from .modeling_lt2 import LoopedCache, LoopedOutput, LT2ForCausalLM, LT2Model, OuroForCausalLM

AutoConfig.register("lt2", LT2Config, exist_ok=True)
AutoConfig.register("ouro", OuroConfig, exist_ok=True)
AutoModelForCausalLM.register(LT2Config, LT2ForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)

__all__ = [
    "MIXER_TYPES",
    "LT2Config",
    "OuroConfig",
    "LT2Model",
    "LT2ForCausalLM",
    "OuroForCausalLM",
    "LoopedCache",
    "LoopedOutput",
]
