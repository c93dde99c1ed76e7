"""`inspect`: what a checkpoint is, from its config (and its files when local), without loading weights."""

from __future__ import annotations

from collections import Counter

from lt2convert.costs import DTYPE_BYTES, cache_bytes, kv_cache_bytes_per_token
from lt2convert.loading import load_config, meta_model
from lt2convert.modeling import LT2Config

CONTEXTS = (8192, 32768, 65536)


def parameter_breakdown(config: LT2Config, model=None) -> dict[str, int]:
    """Parameter counts by component, from the model on the meta device (no memory, exact shapes)."""
    model = model if model is not None else meta_model(config)
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():  # tied weights are yielded once
        counts[component_of(name, config)] += param.numel()
    return dict(counts)


def component_of(name: str, config: LT2Config) -> str:
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        if ".self_attn." in name:
            return f"mixer:{config.layer_types[layer]}"
        return "mlp" if ".mlp." in name else "layer_norms"
    for prefix, component in (
        ("model.embed_tokens", "embeddings"),
        ("lm_head", "lm_head"),
        ("model.norm", "final_norm"),
        ("model.early_exit_gate", "exit_gate"),
    ):
        if name.startswith(prefix):
            return component
    return "other"


def inspect_source(source: str) -> dict:
    """A JSON-ready description of a checkpoint source (preset, local folder or hub id)."""
    config, resolved = load_config(source)
    model = meta_model(config)
    params = parameter_breakdown(config, model)
    report = {
        "source": source,
        "model_type": config.model_type,
        "architecture": "looped decoder" if config.total_ut_steps > 1 else "decoder",
        "params_total": sum(params.values()),
        "params_by_component": params,
        "num_layers": config.num_hidden_layers,
        "loop_steps": config.total_ut_steps,
        "cache_slots": config.num_hidden_layers * config.total_ut_steps,
        "layer_types": list(config.layer_types),
        "mixer_counts": dict(Counter(config.layer_types)),
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "tied_embeddings": config.tie_word_embeddings,
        "exit_gate": config.use_exit_gate,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, "bf16"),
        "kv_cache_bytes_per_token_by_dtype": {d: kv_cache_bytes_per_token(config, d) for d in DTYPE_BYTES},
        "cache_bytes_at_context": {str(c): cache_bytes(config, c, "bf16") for c in CONTEXTS},
        "config_dtype": str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
    }
    report["checkpoint"] = checkpoint_files(source, resolved, model)
    return report


def checkpoint_files(source: str, resolved, model) -> dict:
    """The files of a local checkpoint, after checking every tensor name and shape against the config."""
    if resolved is None:  # a preset: described by its embedded config, nothing downloaded
        from lt2convert.presets import get_preset

        preset = get_preset(source)
        return {
            "hub_id": preset.hub_id,
            "revision": preset.revision,
            "files": None,
            "note": "embedded preset config; weights not downloaded",
        }
    from lt2convert.io.checkpoint import LazyCheckpoint
    from lt2convert.loading import check_tensors, expected_shapes

    checkpoint = LazyCheckpoint(resolved.folder)
    check_tensors(checkpoint, expected_shapes(model), model.config.tie_word_embeddings)
    return {
        "folder": str(resolved.folder),
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in checkpoint.files],
        "tensor_dtypes": checkpoint.dtypes(),
        "tensors": len(checkpoint.tensors),
    }
