"""Data-driven layer selection (`plan --strategy sensitivity`): which layers must stay full attention.

Following KL-guided layer selection: convert every layer to the recipe's linear mixer, align all of them for a
short budget, then put one aligned layer at a time into the otherwise untouched teacher and measure the KL it
causes on held-out text. The layers whose swap hurts most stay full attention; the rest are converted.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from pathlib import Path

import torch

from lt2convert.errors import ConfigError
from lt2convert.plan import FULL, Plan, PlanError, PlanSpec, Strategy, build_plan, write_plan


def linear_mixer(plan: Plan) -> str:
    """The one non-full mixer of a mix (sensitivity ranks full attention against a single replacement)."""
    others = sorted({kind for kind in plan.layer_types if kind != FULL})
    if len(others) != 1 or FULL not in plan.layer_types:
        raise PlanError(
            "--strategy sensitivity",
            [f"needs a mix of full_attention and one other mixer, got {', '.join(sorted(set(plan.layer_types)))}"],
        )
    return others[0]


def swap_kl(teacher, student, layer: int, ids: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """KL(teacher ‖ teacher with `layer`'s mixer replaced by the student's), averaged over tokens."""
    block = teacher.model.layers[layer]
    original = block.self_attn
    block.self_attn = student.model.layers[layer].self_attn
    try:
        with torch.no_grad():
            logp = torch.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)
    finally:
        block.self_attn = original
    return float((teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean())


def layer_scores(teacher_path: str, student_path: str, ids: torch.Tensor) -> list[float]:
    """Per layer, the KL its (aligned) replacement causes on its own in the teacher."""
    from lt2convert.loading import load_model

    teacher = load_model(teacher_path, dtype="float32")
    student = load_model(student_path, dtype="float32")
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)
    return [swap_kl(teacher, student, i, ids, teacher_logp) for i in range(teacher.config.num_hidden_layers)]


def ranked(scores: list[float]) -> list[int]:
    """Layer indices from the highest score down (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def keep_most_sensitive(scores: list[float], keep: int, mixer: str, reserved: tuple[int, ...] = ()) -> dict[int, str]:
    """Explicit layer assignments: the `reserved` layers and then the highest-scoring others, `keep` in all,
    stay full attention."""
    kept = set(reserved)
    kept.update([i for i in ranked(scores) if i not in kept][: max(keep - len(kept), 0)])
    return {i: FULL if i in kept else mixer for i in range(len(scores))}


def retrieval_layers(folder: Path, count: int, tokenizer: str) -> tuple[list[int], list[float]]:
    """The `count` layers of the source with the most copy attention on recall prompts, and every layer's score."""
    from lt2convert.distill.data import byte_encode
    from lt2convert.loading import load_model
    from lt2convert.retrieval import retrieval_scores

    if tokenizer == "student":
        from transformers import AutoTokenizer

        encoder = AutoTokenizer.from_pretrained(folder)

        def encode(text: str) -> list[int]:
            return encoder(text, add_special_tokens=False).input_ids
    else:
        encode = byte_encode
    scores = retrieval_scores(load_model(str(folder), dtype="float32"), encode)
    return ranked(scores)[:count], scores


def evaluation_ids(folder: Path, text: str, tokens: int, windows: int, tokenizer: str) -> torch.Tensor:
    """[windows, tokens] held-out ids, tokenised as the align stage does ("student" tokenizer or UTF-8 "bytes")."""
    from lt2convert.convert import calibration_ids
    from lt2convert.distill.data import byte_encode

    if tokenizer == "student":
        return calibration_ids(folder, text, tokens, windows)
    ids = byte_encode(Path(text).read_text(encoding="utf-8")[: tokens * windows * 2])
    if len(ids) < tokens * windows:
        raise ConfigError(f"{text}: {len(ids)} tokens; scoring needs at least {tokens * windows}")
    return torch.tensor(ids[: tokens * windows]).view(windows, tokens)


def sensitivity_plan(
    source: str,
    spec: PlanSpec,
    *,
    data: list[str],
    tokens: int = 65_536,
    seq_len: int = 256,
    batch_size: int = 4,
    lr: float = 3e-3,
    eval_tokens: int = 512,
    eval_windows: int = 2,
    eval_text: str | None = None,
    seed: int = 0,
    tokenizer: str = "student",
    init=None,
    keep_retrieval: int = 0,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> Plan:
    """A plan with the recipe's mix, whose full-attention layers are the most sensitive ones (see module doc);
    with `keep_retrieval` N, the N layers that copy most from context (lt2convert.retrieval) come first."""
    from lt2convert.convert import convert_model
    from lt2convert.distill import DistillConfig, Stage, run_distillation
    from lt2convert.io.assets import fetch_asset
    from lt2convert.loading import load_config, resolve_checkpoint

    config, _ = load_config(source)
    base = build_plan(source, config, spec)
    mixer = linear_mixer(base)
    keep = Counter(base.layer_types)[FULL]
    every_layer = build_plan(source, config, dataclasses.replace(spec, mix={mixer: 1}, placement="interleave",
                                                                 layers=None))
    if not 0 <= keep_retrieval <= keep:
        raise PlanError("--keep-retrieval", [f"{keep_retrieval} is not within 0..{keep} (the plan's full layers)"])
    align = Stage(name="align", kind="align", tokens=tokens, seq_len=seq_len, batch_size=batch_size, lr=lr)
    if align.steps < 1:
        raise ConfigError(f"--align-tokens {tokens}: less than one align step of {batch_size} x {seq_len} tokens")
    folder = resolve_checkpoint(source).folder
    held_out = eval_text or str(fetch_asset("shakespeare") / "heldout.txt")
    ids = evaluation_ids(folder, held_out, eval_tokens, eval_windows, tokenizer)
    # Scored before the align: seconds of teacher forwards that, if they fail, should not cost the align.
    reserved, copy_scores = retrieval_layers(folder, keep_retrieval, tokenizer) if keep_retrieval else ([], None)
    with tempfile.TemporaryDirectory(prefix="lt2-sensitivity-", dir=work_dir) as work:
        work = Path(work)
        write_plan(every_layer, work / "plan.yaml")
        converted = convert_model(folder, work / "plan.yaml", work / "converted", calibration=data[0], init=init)
        result = run_distillation(DistillConfig(
            teacher=str(folder), student=str(converted), data=data, out=str(work / "run"), stages=[align],
            seed=seed, tokenizer=tokenizer, progress=progress,
        ))
        scores = layer_scores(str(folder), str(result.final), ids)
    assignments = keep_most_sensitive(scores, keep, mixer, tuple(reserved))
    chosen = build_plan(source, config, dataclasses.replace(spec, placement="explicit", layers=assignments))
    params = {
        "mix": dict(spec.mix), "mixer": mixer, "kept_full": keep, "align_tokens": align.steps * align.tokens_per_step,
        "seq_len": seq_len, "eval_tokens": eval_tokens * eval_windows, "seed": seed,
    }
    if keep_retrieval:
        params.update(retrieval_layers=sorted(reserved), retrieval_scores=[round(x, 6) for x in copy_scores])
    strategy = Strategy(name="sensitivity", recipe=spec.recipe, params=params, scores=tuple(scores))
    return dataclasses.replace(chosen, strategy=strategy)
