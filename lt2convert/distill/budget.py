"""What a distillation recipe costs on a GPU cluster, before running it: tokens/s, hours and memory per GPU.

Time comes from FLOPs per token at a stated model FLOP utilisation (MFU):
    seconds = tokens * FLOPs per token / (GPUs * peak FLOP/s * MFU)
FLOPs are counted as `lt2convert.costs` counts them (2 per weight per token per loop step, plus each mixer's
context-dependent work, averaged over the sequence). A training step costs its forward passes plus a backward of
about twice the forward for the parts whose gradients are needed:
    align     teacher forward; each converted mixer forward and backward on the teacher's inputs (3x its forward)
    kd        teacher forward; student forward; backward through the whole student for the activations' gradients
              (1x) plus the weights' gradients of what trains (1x of that part); every_step adds the LM head
              at every loop step to both models
    finetune  student forward and backward (3x), nothing of the teacher
Gradient checkpointing adds one more student forward.

Memory per GPU, as `distill` holds it (data parallel: every process keeps whole copies):
    teacher    its weights in fp32 (the trainer loads it so, once for every stage; bf16 autocast casts on the fly)
    student    its weights in fp32, fp32 gradients of what trains, AdamW's two fp32 moments of what trains
    activations  per row of the micro-batch: the student's saved activations, ACTIVATION_BYTES x hidden size bytes
              per token per layer application (16-bit activations of one transformer layer, after Korthikanti
              et al. 2022, without the attention-score term that fused attention never stores), or with
              gradient checkpointing only each layer's bf16 input plus one layer's worth; and the logits (fp32
              teacher targets, the student's logits with their fp32 log-softmax and gradient)
The sharded column divides the weights, gradients and optimizer state by the number of GPUs (FSDP / ZeRO-3);
activations stay per GPU. CUDA context, allocator fragmentation and kernel workspaces are not counted, so a stage
fits when its total is within USABLE_MEMORY of the GPU's memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lt2convert.costs import Hardware, mixer_prefill_flops, weight_params
from lt2convert.distill.recipe import Stage
from lt2convert.errors import ConfigError
from lt2convert.modeling import LT2Config

DEFAULT_MFU = 0.35  # model FLOP utilisation: what 1-3B models typically reach in bf16 on H100s at these lengths
ACTIVATION_BYTES = 34  # saved activation bytes per token per hidden unit per layer application (16-bit)
CHECKPOINTED_BYTES = 2  # with gradient checkpointing: the layer's bf16 input only
FP32 = 4
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32
TEACHER_LOGIT_BYTES = 4  # fp32 targets per vocabulary entry per supervised position
STUDENT_LOGIT_BYTES = 12  # bf16 logits, their fp32 log-softmax and its gradient
USABLE_MEMORY = 0.9  # of the GPU's memory; the rest for the CUDA context, workspaces and fragmentation


@dataclass(frozen=True)
class StageCost:
    stage: str
    kind: str
    tokens: int
    seq_len: int
    rows_per_gpu: float  # rows of one micro-batch on each GPU (< 1 or fractional: the batch does not split)
    flops_per_token: float
    tokens_per_s: float
    hours: float
    teacher_gb: float
    student_gb: float  # weights
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float  # data parallel, as distill runs
    sharded_total_gb: float  # weights, gradients and optimizer sharded over the GPUs
    fits: bool | None  # total_gb within USABLE_MEMORY of the GPU's memory; None: unknown
    max_rows_per_gpu: int | None  # the most micro-batch rows per GPU that fit (data parallel); None: unknown
    note: str


def mixer_params(params: dict[str, int], config: LT2Config, layers: list[int]) -> int:
    """Parameters of the given layers' mixers: a mixer type's total divided over its layers (equal shapes)."""
    total = 0
    for index in layers:
        mixer = config.layer_types[index]
        total += params.get(f"mixer:{mixer}", 0) // config.layer_types.count(mixer)
    return total


def forward_flops_per_token(config: LT2Config, params: dict[str, int], seq_len: int, logits: int) -> float:
    """One forward pass per token at `seq_len`, with `logits` LM-head applications per token."""
    per_step, head = weight_params(config, params)
    mixers = sum(mixer_prefill_flops(config, m, seq_len) for m in config.layer_types) / seq_len
    return config.total_ut_steps * (2 * per_step + mixers) + 2 * head * logits


def converted_flops_per_token(config: LT2Config, params: dict[str, int], layers: list[int], seq_len: int) -> float:
    """One forward of the converted layers' mixers per token, over all loop steps."""
    mixers = sum(mixer_prefill_flops(config, config.layer_types[i], seq_len) for i in layers) / seq_len
    return config.total_ut_steps * (2 * mixer_params(params, config, layers) + mixers)


def stage_flops_per_token(
    stage: Stage, teacher: LT2Config, teacher_params: dict[str, int], student: LT2Config,
    student_params: dict[str, int], converted: list[int], checkpointing: bool,
) -> float:
    logits = student.total_ut_steps if stage.every_step else 1
    if stage.kind == "align":
        return forward_flops_per_token(teacher, teacher_params, stage.seq_len, 0) + 3 * converted_flops_per_token(
            student, student_params, converted, stage.seq_len
        )
    forward = forward_flops_per_token(student, student_params, stage.seq_len, logits)
    trained = (
        converted_flops_per_token(student, student_params, converted, stage.seq_len)
        if stage.trainable == "mixers" else forward
    )
    student_work = 2 * forward + trained + (forward if checkpointing else 0)
    if stage.kind == "finetune":
        return student_work
    return forward_flops_per_token(teacher, teacher_params, stage.seq_len, logits) + student_work


def trainable_params(stage: Stage, student: LT2Config, params: dict[str, int], converted: list[int]) -> int:
    if stage.trainable == "mixers":
        return mixer_params(params, student, converted)
    if stage.trainable == "lora":
        lora = stage.lora
        # r x (in + out) per adapted matrix; each layer's q/k/v/o and MLP projections, roughly hidden-sized
        per_matrix = lora.r * 2 * student.hidden_size if lora is not None else 0
        matrices = len(lora.target_modules) if lora is not None else 0
        return per_matrix * matrices * student.num_hidden_layers
    return sum(params.values())


def activation_bytes_per_row(stage: Stage, student: LT2Config, checkpointing: bool) -> float:
    """Bytes one micro-batch row keeps for the backward pass (and the logits it compares)."""
    applications = student.total_ut_steps * student.num_hidden_layers
    tokens, hidden, vocab = stage.seq_len, student.hidden_size, student.vocab_size
    if stage.kind == "align":  # one converted mixer's graph at a time, plus the teacher's layer in flight
        return 2 * ACTIVATION_BYTES * hidden * tokens
    if checkpointing:
        saved = (CHECKPOINTED_BYTES * applications + ACTIVATION_BYTES) * hidden * tokens
    else:
        saved = ACTIVATION_BYTES * applications * hidden * tokens
    supervised = student.total_ut_steps if stage.every_step else 1
    logits = STUDENT_LOGIT_BYTES * supervised * vocab * tokens
    if stage.kind == "kd":
        logits += TEACHER_LOGIT_BYTES * supervised * vocab * tokens
    return saved + logits


def stage_cost(
    stage: Stage, teacher: LT2Config, teacher_params: dict[str, int], student: LT2Config,
    student_params: dict[str, int], converted: list[int], device: Hardware, gpus: int, mfu: float = DEFAULT_MFU,
    checkpointing: bool = False,
) -> StageCost:
    if gpus < 1:
        raise ConfigError(f"gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {mfu}")
    flops = stage_flops_per_token(stage, teacher, teacher_params, student, student_params, converted, checkpointing)
    tokens_per_s = gpus * device.tflops * 1e12 * mfu / flops
    micro = stage.micro_batch_size or stage.batch_size
    rows = micro / gpus
    trained = trainable_params(stage, student, student_params, converted)
    teacher_bytes = FP32 * sum(teacher_params.values())
    student_bytes = FP32 * sum(student_params.values())
    gradient_bytes, optimizer_bytes = FP32 * trained, ADAM_STATE_BYTES * trained
    per_row = activation_bytes_per_row(stage, student, checkpointing)
    static = teacher_bytes + student_bytes + gradient_bytes + optimizer_bytes
    activations = per_row * max(1.0, math.ceil(rows))
    total = static + activations
    sharded = static / gpus + activations
    capacity = None if device.memory_gb is None else USABLE_MEMORY * device.memory_gb * 1e9
    notes = []
    if micro % gpus:
        notes.append(f"{'micro_batch_size' if stage.micro_batch_size else 'batch_size'} {micro} does not split over "
                     f"{gpus} GPUs")
    max_rows = None if capacity is None else max(0, int((capacity - static) // per_row))
    if capacity is not None and total > capacity:
        notes.append(f"does not fit: micro_batch_size {max_rows * gpus} ({max_rows} per GPU) would"
                     if max_rows else
                     "does not fit even at one row per GPU: " + ("shard (FSDP/ZeRO-3)" if checkpointing else
                                                                  "gradient checkpointing, or shard (FSDP/ZeRO-3)"))
    return StageCost(
        stage=stage.name, kind=stage.kind, tokens=stage.tokens, seq_len=stage.seq_len, rows_per_gpu=rows,
        flops_per_token=flops, tokens_per_s=tokens_per_s, hours=stage.tokens / tokens_per_s / 3600,
        teacher_gb=teacher_bytes / 1e9, student_gb=student_bytes / 1e9, gradients_gb=gradient_bytes / 1e9,
        optimizer_gb=optimizer_bytes / 1e9, activations_gb=activations / 1e9, total_gb=total / 1e9,
        sharded_total_gb=sharded / 1e9, fits=None if capacity is None else total <= capacity,
        max_rows_per_gpu=max_rows, note="; ".join(notes),
    )


def recipe_costs(
    stages: list[Stage], teacher: LT2Config, student: LT2Config, device: Hardware, gpus: int,
    mfu: float = DEFAULT_MFU, checkpointing: bool = False,
) -> dict:
    """Every stage's StageCost and the totals, as a JSON-ready dict."""
    from lt2convert.distill.steps import converted_layers
    from lt2convert.summary import parameter_breakdown

    converted = converted_layers(teacher, student)
    teacher_params, student_params = parameter_breakdown(teacher), parameter_breakdown(student)
    costs = [
        stage_cost(s, teacher, teacher_params, student, student_params, converted, device, gpus, mfu, checkpointing)
        for s in stages
    ]
    return {
        "device": device.name, "gpus": gpus, "mfu": mfu, "peak_tflops": device.tflops,
        "memory_gb": device.memory_gb, "gradient_checkpointing": checkpointing,
        "stages": [asdict(c) for c in costs],
        "tokens": sum(c.tokens for c in costs),
        "hours": sum(c.hours for c in costs),
        "gpu_hours": gpus * sum(c.hours for c in costs),
    }


def format_costs(report: dict) -> str:
    """The projection as a Markdown table, with its assumptions underneath."""
    lines = [
        f"Projection for {report['gpus']} x {report['device']} at {report['mfu']:.0%} MFU "
        f"({report['peak_tflops']:g} TFLOP/s peak each)"
        + (", gradient checkpointing" if report["gradient_checkpointing"] else ""),
        "",
        "| stage | tokens | seq | rows/GPU | GFLOP/token | tokens/s | hours | teacher GB | student GB | grads GB "
        "| Adam GB | activations GB | total GB/GPU | sharded GB/GPU | fits | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["stages"]:
        fits = "?" if c["fits"] is None else ("yes" if c["fits"] else "no")
        lines.append(
            f"| {c['stage']} | {c['tokens'] / 1e6:,.0f}M | {c['seq_len']} | {c['rows_per_gpu']:g} | "
            f"{c['flops_per_token'] / 1e9:.1f} | {c['tokens_per_s']:,.0f} | {c['hours']:.1f} | {c['teacher_gb']:.1f} | "
            f"{c['student_gb']:.1f} | {c['gradients_gb']:.1f} | {c['optimizer_gb']:.1f} | {c['activations_gb']:.1f} | "
            f"{c['total_gb']:.1f} | {c['sharded_total_gb']:.1f} | {fits} | {c['note']} |"
        )
    lines += [
        "",
        f"In all: {report['tokens'] / 1e6:,.0f}M tokens in {report['hours']:.1f} hours "
        f"({report['gpu_hours']:.0f} GPU-hours).",
    ]
    return "\n".join(lines)


def planned_student(teacher: str, recipe: str) -> LT2Config:
    """The config `plan` + `convert` would give the teacher under the recipe, without writing anything."""
    from lt2convert.loading import load_config
    from lt2convert.plan import build_plan, plan_to_config, resolve_spec

    config, _ = load_config(teacher)
    return plan_to_config(build_plan(teacher, config, resolve_spec(recipe)), config)
