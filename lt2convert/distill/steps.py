"""What one distillation step computes: which layers train, and the align, kd and finetune steps.

`STEPS[stage.kind](setup, ids)` runs one forward and backward on a batch's rows and returns the step's metrics;
the trainer (`lt2convert.distill.train`) owns everything around it: data, optimizer, checkpoints, processes.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lt2convert.calibrate import capture_mixer_calls, head_averaged_attention, indexer_logits
from lt2convert.distill.losses import align_loss, exit_kl_loss, indexer_kl_loss, kd_loss
from lt2convert.distill.recipe import Stage
from lt2convert.errors import ConfigError
from lt2convert.modeling import LT2Config, LT2ForCausalLM
from lt2convert.modeling.modeling_lt2 import LT2SparseAttention, MixerContext

# --------------------------------------------------------------------------------------------------- layers


def converted_layers(teacher: LT2Config, student: LT2Config) -> list[int]:
    if len(teacher.layer_types) != len(student.layer_types) or teacher.total_ut_steps != student.total_ut_steps:
        raise ConfigError(
            f"student ({len(student.layer_types)} layers, {student.total_ut_steps} loop steps) does not match the "
            f"teacher ({len(teacher.layer_types)} layers, {teacher.total_ut_steps} loop steps)"
        )
    converted = [i for i, (a, b) in enumerate(zip(teacher.layer_types, student.layer_types, strict=True)) if a != b]
    if not converted:
        raise ConfigError("the student has no converted layers: its layer_types equal the teacher's")
    return converted


def check_pair(teacher: LT2Config, student: LT2Config) -> None:
    """The student must be a conversion of the teacher: same vocabulary and loop."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"tokenizer mismatch: the teacher has a vocabulary of {teacher.vocab_size} tokens, the student "
            f"{student.vocab_size}; a student must be converted from its teacher"
        )
    converted_layers(teacher, student)


def mixer_prefixes(converted: list[int]) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.self_attn." for i in converted)


def make_trainable(student: LT2ForCausalLM, stage: Stage, converted: list[int]) -> tuple[torch.nn.Module, dict]:
    """(the module to train, {name: parameter} of what trains) for the stage's trainable set."""
    student.requires_grad_(False)
    model: torch.nn.Module = student
    if stage.trainable == "mixers":
        for i in converted:
            student.model.layers[i].self_attn.requires_grad_(True)
    elif stage.trainable == "all":
        student.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        lora = stage.lora
        settings = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        )
        model = get_peft_model(student, settings)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if stage.trainable == "mixers" and set(named) != {
        n for n, _ in student.named_parameters() if n.startswith(mixer_prefixes(converted))
    }:
        raise RuntimeError("the trainable parameters differ from the converted layers' mixers")
    if not named:
        raise ConfigError(f"stage {stage.name}: nothing to train")
    return model, named


def base_model(model: torch.nn.Module) -> LT2ForCausalLM:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------------------- steps


@dataclass
class StepContext:
    teacher: LT2ForCausalLM
    model: torch.nn.Module  # the student, or its LoRA wrapper
    converted: list[int]
    stage: Stage
    backward: Callable[[torch.Tensor], None]
    device: torch.device
    num_processes: int = 1

    def batch_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-process mean over the processes (each holds an equal share of the batch)."""
        if self.num_processes > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.num_processes
        return value


def context_to(ctx: MixerContext, device: torch.device) -> MixerContext:
    moved = {
        f.name: getattr(ctx, f.name).to(device) if torch.is_tensor(getattr(ctx, f.name)) else getattr(ctx, f.name)
        for f in dataclasses.fields(ctx)
    }
    return MixerContext(**moved)


def align_step(setup: StepContext, ids: torch.Tensor) -> dict:
    """Run the teacher once; for every (converted layer, loop step) backpropagate that call's align loss (plus a
    DSA indexer's KL warm-up), scaled so the gradients are those of the mean over calls."""
    student, stage = base_model(setup.model), setup.stage
    calls = len(setup.converted) * setup.teacher.config.total_ut_steps
    per_layer: dict[int, float] = defaultdict(float)
    indexer: dict[int, float] = defaultdict(float)

    def on_call(index, step, module, x, ctx, output):
        if index not in setup.converted:
            return
        mixer = student.model.layers[index].self_attn
        x_s, ctx_s = x.to(setup.device), context_to(ctx, setup.device)
        target = output.to(setup.device)
        # With several processes, normalise by the whole batch's mean square so they follow one process exactly.
        mean_square = setup.batch_mean(target.float().pow(2).mean()) if setup.num_processes > 1 else None
        with torch.enable_grad():
            loss = align_loss(mixer(x_s, ctx_s, None), target, stage.normalize, mean_square)
            total = loss
            if isinstance(mixer, LT2SparseAttention) and stage.indexer_weight > 0:
                kl = indexer_kl_loss(indexer_logits(mixer, x_s, ctx_s), head_averaged_attention(module, x, ctx))
                indexer[index] += kl.item() / setup.teacher.config.total_ut_steps
                total = total + stage.indexer_weight * kl.to(setup.device)
            setup.backward(total / calls)
        per_layer[index] += loss.item() / setup.teacher.config.total_ut_steps

    capture_mixer_calls(setup.teacher, ids.to(setup.teacher.device), on_call)
    record = {
        "loss": sum(per_layer.values()) / len(per_layer),
        "layer_loss": {str(i): v for i, v in sorted(per_layer.items())},
    }
    if indexer:
        record["indexer_kl"] = {str(i): v for i, v in sorted(indexer.items())}
    return record


def kd_step(setup: StepContext, ids: torch.Tensor) -> dict:
    """KL(teacher ‖ student) on the exit logits, or averaged over every loop step's logits, plus the exit
    distributions' KL when the stage weights it."""
    stage, every = setup.stage, setup.stage.every_step
    with torch.no_grad():
        taught = setup.teacher(ids.to(setup.teacher.device), use_cache=False, output_step_hidden_states=every)
    out = setup.model(input_ids=ids, use_cache=False, output_step_hidden_states=every)
    if every:
        with torch.no_grad():
            targets = [setup.teacher.lm_head(t).to(setup.device) for t in taught.step_hidden_states]
        losses = [kd_loss(s, t, stage.temperature) for s, t in zip(out.step_logits, targets, strict=True)]
        logit_loss = torch.stack(losses).mean()
    else:
        logit_loss = kd_loss(out.logits, taught.logits.to(setup.device), stage.temperature)
    loss = logit_loss
    record = {}
    if stage.exit_weight > 0 and taught.exit_probs is not None:
        exit_loss = exit_kl_loss(out.exit_probs, taught.exit_probs.to(setup.device))
        loss = loss + stage.exit_weight * exit_loss
        record["exit_kl"] = exit_loss.item()
    setup.backward(loss)
    return {"loss": loss.item(), "logit_kl": logit_loss.item(), **record}


def add_step_logits(student: LT2ForCausalLM) -> None:
    """Make the student's forward also return `step_logits`, its head applied to every loop step's hidden state,
    when asked for the step hidden states (kd's every_step). Computed inside the forward, not by the caller: a
    sharded (FSDP) student's head is gathered, and its gradient reduced, only around its own forward."""

    def head_on_every_step(module: LT2ForCausalLM, args: tuple, kwargs: dict, output):
        if kwargs.get("output_step_hidden_states"):
            output["step_logits"] = tuple(module.lm_head(h) for h in output.step_hidden_states)
        return output

    # Registered before any sharding wraps the student, so it runs ahead of FSDP's own post-forward hook.
    student.register_forward_hook(head_on_every_step, with_kwargs=True)


def finetune_step(setup: StepContext, ids: torch.Tensor) -> dict:
    loss = setup.model(input_ids=ids, labels=ids, use_cache=False).loss
    setup.backward(loss)
    return {"loss": loss.item()}


STEPS = {"align": align_step, "kd": kd_step, "finetune": finetune_step}
