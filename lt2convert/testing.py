"""Random checkpoints in the exact on-disk layout of real Ouro and Llama-family models, for tests and benchmarks.

Written from the published key names and shapes (not from our model classes), so a loader that disagrees with
the real layout fails on them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lt2convert.modeling import LT2Config

TINY_OURO = {
    "architectures": ["OuroForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_ouro.OuroConfig",
        "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
    },
    "model_type": "ouro",
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "use_sliding_window": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 0,
}

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# The smallest shape the training tests use: 2 heads of 16, 2 loop steps (give num_hidden_layers per test).
SMALL_OURO_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "total_ut_steps": 2,
}


def ouro_config(**overrides) -> dict:
    """A tiny Ouro config.json; e.g. `ouro_config(num_key_value_heads=2)` for GQA."""
    return {**TINY_OURO, **overrides}


def llama_config(**overrides) -> dict:
    return {**TINY_LLAMA, **overrides}


# Every mixer of the LT2 runtime at a tiny size (4 heads of 16), for tests that build models directly.
TINY_LT2 = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "total_ut_steps": 3,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "dsa_index_n_heads": 2,
    "dsa_index_head_dim": 16,
    "dsa_topk": 4,
    "swa_window": 5,
    "gdn_num_heads": 4,
    "gdn_head_k_dim": 16,
    "dtype": "float32",
}


def lt2_config(layer_types: list[str], **overrides) -> LT2Config:
    """A tiny LT2Config with one layer per entry of `layer_types`, e.g. `lt2_config(["gdn", "full_attention"])`."""
    return LT2Config(**{**TINY_LT2, "num_hidden_layers": len(layer_types), "layer_types": layer_types, **overrides})


def write_ouro_with_tokenizer(folder: str | Path, tokenizer_folder: Path, num_hidden_layers: int) -> Path:
    """A random SMALL_OURO_SHAPE Ouro with the tokenizer files of the model in `tokenizer_folder` beside it (and
    its vocabulary size), so that real text can be tokenized for it (lm-eval, distill data)."""
    vocab_size = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    config = ouro_config(
        vocab_size=vocab_size, num_hidden_layers=num_hidden_layers, max_position_embeddings=2048, **SMALL_OURO_SHAPE
    )
    folder = write_checkpoint(folder, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as stored on disk for an Ouro (sandwich norms, exit gate) or Llama config."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    hd = config.get("head_dim") or h // heads
    ouro = config["model_type"] == "ouro"
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if ouro:
            shapes |= {p + "input_layernorm_2.weight": (h,), p + "post_attention_layernorm_2.weight": (h,)}
        if config["model_type"] == "qwen2":  # Qwen2 attention has q/k/v biases (no o bias)
            shapes |= {
                p + "self_attn.q_proj.bias": (heads * hd,),
                p + "self_attn.k_proj.bias": (kv * hd,),
                p + "self_attn.v_proj.bias": (kv * hd,),
            }
    shapes["model.norm.weight"] = (h,)
    if ouro:
        shapes |= {"model.early_exit_gate.weight": (1, h), "model.early_exit_gate.bias": (1,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights near 1 (so sandwich norms stay well conditioned), other weights small and random."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if "early_exit_gate" in name:
        return 0.5 * torch.randn(shape, generator=generator)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn(shape, generator=generator) * (0.5 if "embed" in name else fan_in**-0.5)


def write_checkpoint(
    folder: str | Path,
    config: dict,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Path:
    """Write config.json and random safetensors weights (sharded with an index when shards > 1)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    tensors = {n: random_tensor(n, s, generator).to(dtype) for n, s in checkpoint_shapes(config).items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_full_size_ouro(folder: str | Path, *, seed: int = 0, num_layers: int = 24) -> Path:
    """A random checkpoint with Ouro-1.4B's exact config and tensor shapes (bf16, one model.safetensors of
    ~2.9 GB), streamed tensor by tensor so writing it needs one tensor's memory. For benchmarks only."""
    from lt2convert.io.writer import ShardedWriter
    from lt2convert.presets import preset_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**preset_config("ouro-1.4b"), "num_hidden_layers": num_layers}
    generator = torch.Generator().manual_seed(seed)
    writer = ShardedWriter(folder, max_shard_bytes=2**62)
    for name, shape in checkpoint_shapes(config).items():
        writer.add(name, random_tensor(name, shape, generator).to(torch.bfloat16))
    writer.finish()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
