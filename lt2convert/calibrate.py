"""Attention statistics on calibration text, and how far new mixers start from the attention they replace.

Both hook the mixers of a looped model: every (loop step, layer) application is seen, with its real input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lt2convert.modeling import LT2ForCausalLM


@dataclass
class LayerStats:
    """Attention statistics of one layer from calibration text (averaged over loop steps and tokens)."""

    mean_distance: torch.Tensor  # [heads] expected look-back t − s under the attention distribution
    concentration: torch.Tensor  # [heads] mean max attention probability (how peaked each head is)
    inputs: torch.Tensor  # [B, S, H] the mixer's inputs at loop step 0, to calibrate GDN's output scale
    outputs: torch.Tensor  # [B, S, H] the attention's outputs for those inputs


def capture_mixer_calls(model: LT2ForCausalLM, input_ids: torch.Tensor, on_call: Callable) -> None:
    """Run the model once; call on_call(layer, step, module, x, ctx, output) for every mixer application."""
    counts: dict[int, int] = defaultdict(int)
    handles = []
    for index, layer in enumerate(model.model.layers):

        def hook(module, args, output, index=index):
            x, ctx, _ = args
            on_call(index, counts[index], module, x, ctx, output)
            counts[index] += 1

        handles.append(layer.self_attn.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def attention_probabilities(module, x: torch.Tensor, ctx) -> torch.Tensor:
    """[B, heads, S, S] causal softmax attention of a full-attention module on input x."""
    q, k, _ = module.project_qkv(x, ctx)
    k = k.repeat_interleave(module.num_heads // module.num_kv_heads, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * module.scaling
    seq = x.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def head_averaged_attention(module, x: torch.Tensor, ctx) -> torch.Tensor:
    """[B, S, S] the attention distribution of each query, averaged over heads (still sums to 1 per query)."""
    return attention_probabilities(module, x, ctx).mean(1)


def indexer_logits(sparse, x: torch.Tensor, ctx) -> torch.Tensor:
    """[B, S, S] a DSA layer's lightning-indexer scores for input x (the kernel's own formula and scale; the
    causal mask is left to the caller)."""
    from lt2convert.kernels import index_scores

    q_idx, k_idx, w_idx = sparse.indexer(x, ctx)
    scale = q_idx.shape[-1] ** -0.5
    return torch.stack([index_scores(q_idx[b], k_idx[b], w_idx[b], scale) for b in range(x.shape[0])])


def calibration_stats(model: LT2ForCausalLM, input_ids: torch.Tensor) -> dict[int, LayerStats]:
    """Per full-attention layer: mean look-back distance and concentration per head (averaged over loop steps),
    and the layer's step-0 inputs and attention outputs."""
    sums: dict[int, dict] = {}

    def collect(index, step, module, x, ctx, output):
        if model.config.layer_types[index] != "full_attention":
            return
        probs = attention_probabilities(module, x, ctx)
        seq = x.shape[1]
        distance = (torch.arange(seq)[:, None] - torch.arange(seq)[None, :]).clamp(min=0).float()
        entry = sums.setdefault(index, {"distance": 0.0, "peak": 0.0, "n": 0, "inputs": x, "outputs": output})
        entry["distance"] = entry["distance"] + (probs * distance).sum(-1).mean(dim=(0, 2))
        entry["peak"] = entry["peak"] + probs.amax(-1).mean(dim=(0, 2))
        entry["n"] += 1

    capture_mixer_calls(model, input_ids, collect)
    return {
        index: LayerStats(
            mean_distance=e["distance"] / e["n"],
            concentration=e["peak"] / e["n"],
            inputs=e["inputs"],
            outputs=e["outputs"],
        )
        for index, e in sums.items()
    }


def mixer_output_errors(teacher: LT2ForCausalLM, student: LT2ForCausalLM, input_ids: torch.Tensor) -> dict:
    """Relative MSE ‖student − teacher‖² / ‖teacher‖² of every converted layer's mixer output, fed the teacher's
    own mixer inputs (teacher-forced), averaged over loop steps. Keys: layer index -> float."""
    errors: dict[int, list[float]] = defaultdict(list)
    converted = [
        i for i, (a, b) in enumerate(zip(teacher.config.layer_types, student.config.layer_types, strict=True)) if a != b
    ]

    def compare(index, step, module, x, ctx, output):
        if index not in converted:
            return
        mine = student.model.layers[index].self_attn(x, ctx, None)
        errors[index].append(((mine.float() - output.float()).pow(2).sum() / output.float().pow(2).sum()).item())

    capture_mixer_calls(teacher, input_ids, compare)
    return {index: sum(v) / len(v) for index, v in errors.items()}


def topk_attention_recall(teacher: LT2ForCausalLM, student: LT2ForCausalLM, input_ids: torch.Tensor) -> dict:
    """For each DSA layer: the share of the teacher's attention mass (summed over heads, renormalised) that
    lands on the keys the student's indexer selects, averaged over loop steps and over the queries that have
    more than top-k causal keys (for the others every key is kept and recall is trivially 1).
    Keys: layer index -> float, or None when no query has more than top-k keys."""
    recalls: dict[int, list[float]] = defaultdict(list)
    dsa_layers = [i for i, kind in enumerate(student.config.layer_types) if kind == "dsa"]

    def measure(index, step, module, x, ctx, output):
        if index not in dsa_layers:
            return
        sparse = student.model.layers[index].self_attn
        mass = head_averaged_attention(module, x, ctx)  # [B, S, S]
        scores = indexer_logits(sparse, x, ctx)
        seq = x.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        chosen = scores.masked_fill(~causal, float("-inf")).topk(min(sparse.topk, seq), dim=-1).indices
        captured = mass.gather(-1, chosen).sum(-1)  # [B, S]
        rows = torch.arange(seq, device=x.device) >= sparse.topk
        if rows.any():
            recalls[index].append(captured[:, rows].mean().item())

    capture_mixer_calls(teacher, input_ids, measure)
    return {i: (sum(recalls[i]) / len(recalls[i]) if recalls[i] else None) for i in dsa_layers}
