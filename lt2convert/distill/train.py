"""The distillation trainer: a converted hybrid (the student) learns from its source (the teacher), stage by stage.
What one step computes (align, kd, finetune) is in `lt2convert.distill.steps`; this module runs the steps: data,
optimizer, processes, checkpoints and the run folder.

Stages come from a recipe (see `lt2convert.distill.recipe`). Each stage starts from the previous stage's
output, trains its own parameter set on its own token budget, and ends by writing the whole student (fp32) to
`stages/`; the next stage, whether in the same process or after a resume, starts from that folder, so an
interrupted run continues bit-identically.

Run folder (`DistillConfig.out`):
    run.json                              the resolved settings and stages; a resumed run must use the same ones
    metrics.jsonl                         one line per optimizer step (every stage)
    checkpoints/<k>-<stage>/step-NNNNNNNN/  every `checkpoint_tokens` tokens and at the stage's end, atomically:
        accelerate state                  optimizer, scheduler, every process's RNG, the progress (step, tokens,
                                          data position), via Accelerator.save_state
        trainable.safetensors             the parameters this stage trains (LoRA adapters in a LoRA stage)
        metrics.jsonl                     the metrics up to this step (restored on resume)
    stages/<k>-<stage>/                   the student after the stage (fp32, a checkpoint folder)
    final/                                the student after the last stage, in the student's dtype, with its
                                          config, tokenizer and remote code: loads without lt2convert

Several processes (`accelerate launch --num_processes N`) split each batch's rows between them and average
their gradients before every optimizer step, so N processes follow the single-process run. Launched with FSDP2
(`accelerate launch --use_fsdp --fsdp_version 2`), kd and finetune stages shard the student (parameters,
gradients, optimizer state) through accelerate, which then averages the gradients; the teacher stays whole on
every process, in eval mode. Align and LoRA stages stay data parallel (see `shards_student`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lt2convert.distill.checkpoints import (
    checkpoints,
    export_student,
    load_usable_checkpoint,
    save_checkpoint,
    whole,
    write_student,
)
from lt2convert.distill.data import DataError, PackedTokenStream, byte_encode, hf_encode, load_token_ids
from lt2convert.distill.recipe import Stage, stage_from_settings
from lt2convert.distill.steps import (
    STEPS,
    StepContext,
    add_step_logits,
    check_pair,
    converted_layers,
    make_trainable,
)
from lt2convert.errors import ConfigError, InputNotFoundError, LT2Error, OutputExistsError
from lt2convert.io.outputs import atomic_directory, atomic_write_text, sigterm_as_interrupt
from lt2convert.loading import load_config, load_model, resolve_checkpoint, resolve_dtype
from lt2convert.modeling import LT2ForCausalLM

TOKENIZERS = ("student", "bytes")
PRECISIONS = ("bf16", "fp32")  # of the teacher's and student's forward (autocast); weights and optimizer stay fp32
TRACKERS = ("tensorboard", "wandb")
DISPLAY_ONLY = ("progress", "log_with")  # options a resumed run may change
TRACKED = ("loss", "lr", "grad_norm", "tokens_per_s", "logit_kl", "exit_kl")  # metrics mirrored to the trackers


class TrainingDiverged(LT2Error, RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped before updating any weight."""


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # the source checkpoint (folder, preset or hub id)
    student: str  # the converted hybrid's folder
    data: list[str]  # training text: files, folders or hf:NAME datasets (tokenised once into a cache:
    # $LT2CONVERT_TOKEN_CACHE, else the asset cache's tokens/ folder)
    out: str  # the run folder
    stages: list[Stage]
    seed: int = 0
    tokenizer: str = "student"  # "student": the student folder's tokenizer; "bytes": UTF-8 bytes as ids
    text_field: str = "text"
    checkpoint_tokens: int = 2_000_000  # a checkpoint about every this many tokens, and at each stage's end
    keep_checkpoints: int = 2  # the most recent checkpoints of a stage kept on disk
    teacher_device: str | None = None  # default: the student's device
    gradient_checkpointing: bool = False  # recompute each layer in backward (kd/finetune) to save memory
    precision: str = "bf16"  # forward passes under bf16 autocast ("bf16"), or in fp32 throughout ("fp32")
    progress: bool = True  # a progress bar on the main process
    log_with: list[str] = field(default_factory=list)  # experiment trackers through accelerate (TRACKERS)

    def __post_init__(self):
        # Normalised once here (the config is frozen afterwards). Local paths are stored absolute, so `--resume`
        # works from any working directory.
        normalised = {
            "data": [local_path_absolute(str(p)) for p in self.data],
            "teacher": local_path_absolute(self.teacher),
            "student": local_path_absolute(self.student),
            "out": str(Path(self.out).absolute()),
            "log_with": list(self.log_with),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        unknown = [name for name in self.log_with if name not in TRACKERS]
        if unknown:
            raise ConfigError(f"log_with: unknown tracker {unknown[0]!r}; expected {' or '.join(TRACKERS)}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.checkpoint_tokens < 1 or self.keep_checkpoints < 1:
            raise ConfigError("checkpoint_tokens and keep_checkpoints must be at least 1")
        if not self.stages:
            raise ConfigError("no stages to run")
        if not self.data:
            raise ConfigError("no training data given")

    def settings(self) -> dict:
        """What defines the run (a resume must match it); display-only options are left out."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in DISPLAY_ONLY}
        values["stages"] = [s.settings() for s in self.stages]
        return values


def local_path_absolute(spec: str) -> str:
    """An existing local path as an absolute path; presets, hub ids and hf: datasets unchanged."""
    return str(Path(spec).absolute()) if not spec.startswith("hf:") and Path(spec).exists() else spec


@dataclass
class DistillResult:
    final: Path  # the exported student
    stages: list[Path]  # each stage's output folder
    tokens: int  # tokens trained on in all
    losses: dict[str, float | None] = field(default_factory=dict)  # each stage's last loss (None: resumed past it)


# --------------------------------------------------------------------------------------------------- helpers


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 down to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def shards_student(distributed_type, fsdp_plugin, stage: Stage) -> bool:
    """Whether this stage shards the student with FSDP2, given accelerate's launch mode; unsupported modes fail.

    Align stages run the converted mixers one by one outside the student's forward, where FSDP's hooks would
    never gather them, and LoRA stages merge their adapters into whole weights: both stay data parallel (every
    process holds the whole student, distill averages the gradients) in an FSDP launch too.
    """
    from accelerate.utils import DistributedType

    supported = "plain data-parallel processes (accelerate launch --multi_gpu) or FSDP2 (--use_fsdp --fsdp_version 2)"
    if distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(f"distill does not run under DeepSpeed; launch {supported}")
    if distributed_type != DistributedType.FSDP:
        return False
    if fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            f"distill shards the student with FSDP2 only (got fsdp_version {fsdp_plugin.fsdp_version}); "
            f"launch {supported}"
        )
    return stage.kind != "align" and stage.trainable != "lora"


def average_gradients(params: list[torch.nn.Parameter], num_processes: int) -> None:
    """Give every parameter a gradient (zeros where none flowed) and average them over the processes."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if num_processes == 1:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    torch.distributed.all_reduce(flat)
    flat /= num_processes
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def process_rows(ids: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """This process's share of a global batch (contiguous rows)."""
    share = ids.shape[0] // count
    return ids[index * share : (index + 1) * share]


class Progress:
    """Where a stage stands; saved with the accelerate state so a resume continues at the same data position."""

    def __init__(self, stream: PackedTokenStream):
        self.stream, self.step, self.tokens = stream, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "data": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.stream.load_state_dict(state["data"])


def stage_key(index: int, stage: Stage) -> str:
    return f"{index}-{stage.name}"


def check_run_folder(run: Path, config: DistillConfig, resume: bool) -> bool:
    """Check the run folder against `resume` without touching it; True when it is new and must be created."""
    settings_file = run / "run.json"
    if settings_file.exists():
        if not resume:
            raise OutputExistsError(f"{run}: already holds a distill run; pass --resume to continue it")
        saved = json.loads(settings_file.read_text())
        mine = json.loads(json.dumps(config.settings()))
        # `out` is the folder itself (it may have moved); older runs stored paths relative to their directory.
        saved = {k: v for k, v in saved.items() if k != "out"}
        mine = {k: v for k, v in mine.items() if k != "out"}
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if changed:
            raise ConfigError(f"{run}: cannot resume a run with different settings ({', '.join(changed)})")
        return False
    if run.exists() and any(run.iterdir()):
        raise OutputExistsError(f"{run}: exists and is not a distill run folder; choose another output folder")
    return True


def read_run_settings(run: Path) -> dict:
    settings_file = Path(run) / "run.json"
    if not settings_file.is_file():
        raise InputNotFoundError(f"{run}: no run.json; not a distill run folder")
    try:
        return json.loads(settings_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{settings_file}: not a readable run settings file ({err})") from err


def config_from_run(run: Path) -> DistillConfig:
    """The configuration a run folder was started with (for `distill --resume RUN`)."""
    values = read_run_settings(run)
    values["stages"] = [stage_from_settings(s) for s in values["stages"]]
    values["out"] = str(Path(run).absolute())
    return DistillConfig(**values)


# ----------------------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, config: DistillConfig):
        from accelerate import PartialState

        self.config = config
        self.run = Path(config.out)
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.student_folder = resolve_checkpoint(config.student).folder
        student_config, _ = load_config(config.student)
        self.export_dtype = resolve_dtype(None, student_config)
        self.device = self.state.device
        self.teacher = load_model(config.teacher, dtype="float32").to(config.teacher_device or self.device)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        check_pair(self.teacher.config, student_config)
        self.converted = converted_layers(self.teacher.config, student_config)
        self.ids = self.load_data()
        self.check_data_length()
        self.trackers: list = []  # opened by train(), once the inputs have passed every check

    def check_data_length(self) -> None:
        longest = max(stage.seq_len for stage in self.config.stages)
        if self.ids.numel() < longest:
            raise DataError(
                f"{', '.join(self.config.data)}: {self.ids.numel()} tokens in all, fewer than one window of "
                f"{longest} tokens (the recipe's seq_len); give more training text"
            )

    def load_data(self) -> torch.Tensor:
        from lt2convert.io.assets import cache_dir

        if self.config.tokenizer == "bytes":
            encode, eos_id, fingerprint = byte_encode, None, "bytes"
        else:
            from lt2convert.distill.data import check_same_tokenizer, load_tokenizer, tokenizer_fingerprint

            hint = "copy the teacher's tokenizer files into it, or pass --tokenizer bytes"
            tokenizer = load_tokenizer(self.student_folder, "the student", hint)
            teacher_folder = resolve_checkpoint(self.config.teacher).folder
            if (teacher_folder / "tokenizer_config.json").is_file():
                teacher_tokenizer = load_tokenizer(teacher_folder, "the teacher")
                check_same_tokenizer(teacher_tokenizer, tokenizer, self.config.teacher, self.config.student)
            encode, eos_id, fingerprint = hf_encode(tokenizer), tokenizer.eos_token_id, tokenizer_fingerprint(tokenizer)
        streaming = any(source.startswith("hf:") for source in self.config.data)
        budget = sum(stage.tokens for stage in self.config.stages) if streaming else None
        tokens_dir = Path(os.environ.get("LT2CONVERT_TOKEN_CACHE") or cache_dir() / "tokens")
        with self.state.main_process_first():  # the main process tokenises; the others read its cache
            return load_token_ids(
                self.config.data, encode, eos_id, cache_dir=tokens_dir, max_tokens=budget,
                text_field=self.config.text_field, fingerprint=fingerprint,
            )

    def train(self) -> DistillResult:
        if self.state.is_main_process:
            self.trackers = open_trackers(self.config.log_with, self.run, self.config.settings())
        try:
            return self.train_stages()
        finally:
            for tracker in self.trackers:
                tracker.finish()

    def train_stages(self) -> DistillResult:
        outputs, losses = [], {}
        source = self.student_folder
        for index, stage in enumerate(self.config.stages):
            done = self.run / "stages" / stage_key(index, stage)
            if not done.is_dir():
                losses[stage.name] = self.train_stage(index, stage, source, done)
            else:
                losses[stage.name] = None
            outputs.append(done)
            source = done
        final = self.run / "final"
        tokens = sum(stage.steps * stage.tokens_per_step for stage in self.config.stages)
        if self.state.is_main_process:
            from lt2convert.cards import final_losses, training_record

            student = load_model(source, dtype="float32")
            training = training_record(self.config.settings(), tokens, final_losses(self.run / "metrics.jsonl"))
            export_student(student, self.student_folder, final, self.export_dtype, training)
        self.state.wait_for_everyone()
        return DistillResult(final=final, stages=outputs, tokens=tokens, losses=losses)

    def train_stage(self, index: int, stage: Stage, source: Path, done: Path) -> float | None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        # Mixed precision is our own autocast (see forward_precision), not accelerate's: accelerate fixes it once
        # per process, and the teacher may sit on another device than the student.
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            step_scheduler_with_optimizer=False,
            mixed_precision="no",
            gradient_accumulation_steps=stage.micro_batches,
        )
        sharded = shards_student(accelerator.distributed_type, getattr(accelerator.state, "fsdp_plugin", None), stage)
        micro_rows = stage.batch_size // stage.micro_batches  # rows of one micro-batch, over all processes
        if micro_rows % accelerator.num_processes:
            field_name = "micro_batch_size" if stage.micro_batches > 1 else "batch_size"
            raise ConfigError(
                f"stage {stage.name}: {field_name} {micro_rows} does not split over "
                f"{accelerator.num_processes} processes"
            )
        set_seed(self.config.seed + index)
        student = load_model(source, dtype="float32").to(self.device)
        add_step_logits(student)
        if self.config.gradient_checkpointing and stage.kind != "align":
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model, named = make_trainable(student, stage, self.converted)
        model.train()
        params = list(named.values())
        stream = PackedTokenStream(self.ids, stage.seq_len, seed=self.config.seed + index)
        progress = Progress(stream)
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, stage.steps, stage.warmup_steps, stage.min_lr_ratio)
        )
        if sharded:
            # fully_shard swaps the parameters for sharded DTensors under the same names.
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
            named = {name: p for name, p in model.named_parameters() if p.requires_grad}
            params = list(named.values())
        elif accelerator.distributed_type == DistributedType.FSDP:
            # accelerate saves an FSDP launch's optimizers only beside a sharded model: this unsharded stage's
            # optimizer (identical on every process) is checkpointed as a plain registered object instead.
            accelerator.register_for_checkpointing(optimizer, scheduler)
        else:
            optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        accelerator.register_for_checkpointing(progress)

        folder = self.run / "checkpoints" / stage_key(index, stage)
        found = checkpoints(folder)
        metrics = self.run / "metrics.jsonl"
        resumed = load_usable_checkpoint(accelerator, found, named) if found else None
        if resumed is not None:
            if accelerator.is_main_process:
                shutil.copyfile(resumed / "metrics.jsonl", metrics)
        elif accelerator.is_main_process:
            previous = self.run / "stages" / stage_key(index - 1, self.config.stages[index - 1]) if index else None
            # Lines written after the last checkpoint (or stage) by a killed run are void.
            if previous is not None:
                shutil.copyfile(previous / "metrics.jsonl", metrics)
            else:
                metrics.write_text("")
        accelerator.wait_for_everyone()

        devices = {self.device.type, self.teacher.device.type}

        def backward(loss: torch.Tensor) -> None:
            with forward_precision("fp32", devices):  # autocast covers forward passes only
                accelerator.backward(loss)

        setup = StepContext(
            self.teacher, model, self.converted, stage, backward, self.device, accelerator.num_processes
        )
        every = max(1, round(self.config.checkpoint_tokens / stage.tokens_per_step))
        bar = self.progress_bar(index, stage, progress.tokens, accelerator.is_main_process)
        last_good, loss = resumed, None
        synced = [model] if sharded else []
        stage_started = time.perf_counter()
        while progress.step < stage.steps:
            started = time.perf_counter()
            ids, positions = stream.next_batch(stage.batch_size)
            lr = optimizer.param_groups[0]["lr"]
            records = []
            # Micro-batches accumulate gradients (accelerator.backward divides each loss by their number); the
            # processes average once, after the last one. Checkpoints fall between optimizer steps only, so a
            # resume replays a half-accumulated step from its first micro-batch.
            for micro in ids.split(micro_rows):
                rows = process_rows(micro, accelerator.process_index, accelerator.num_processes).to(self.device)
                # Only a sharded model has gradient syncs to skip; a plain module needs none.
                with accelerator.accumulate(*synced), forward_precision(self.config.precision, devices):
                    records.append(STEPS[stage.kind](setup, rows))
            record = mean_record(records)
            average_gradients(params, 1 if sharded else accelerator.num_processes)  # FSDP averaged them already
            loss = float(accelerator.reduce(torch.tensor(record["loss"], device=self.device), "mean"))
            grad_norm = whole(accelerator.clip_grad_norm_(params, stage.grad_clip)).item()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
                raise TrainingDiverged(
                    f"{stage.name} step {progress.step + 1}: loss {loss}, gradient norm {grad_norm} (not finite); "
                    f"stopped without updating the weights; {where}"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens += ids.numel()
            seconds = time.perf_counter() - started
            record.update(
                stage=stage.name, step=progress.step, tokens=progress.tokens, loss=loss, lr=lr, grad_norm=grad_norm,
                tokens_per_s=ids.numel() / seconds, windows=positions,
                elapsed=time.perf_counter() - stage_started,  # seconds since this process started the stage
            )
            if accelerator.is_main_process:
                with metrics.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                self.log_scalars(stage.name, record)
            bar.update(ids.numel())
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if progress.step % every == 0 or progress.step == stage.steps:
                last_good = save_checkpoint(
                    accelerator, folder, progress.step, named, metrics, self.config.keep_checkpoints
                )
        bar.close()
        # A sharded student's whole weights are gathered by every process, for the main one to write.
        weights = accelerator.get_state_dict(model) if sharded else None
        self.finish_stage(accelerator, model, student, done, metrics, weights)
        return loss

    def log_scalars(self, stage: str, record: dict) -> None:
        """Mirror the numeric metrics to the experiment trackers (`log_with`), against the stage's tokens."""
        values = {f"{stage}/{key}": record[key] for key in TRACKED if key in record}
        for tracker in self.trackers:
            tracker.log(values, step=record["tokens"])

    def progress_bar(self, index: int, stage: Stage, done: int, is_main: bool):
        from tqdm.auto import tqdm

        return tqdm(
            total=stage.steps * stage.tokens_per_step, initial=done, unit="tok", unit_scale=True,
            desc=f"stage {index + 1}/{len(self.config.stages)} {stage.name}",
            disable=not (is_main and self.config.progress), dynamic_ncols=True,
        )

    def finish_stage(
        self, accelerator, model, student: LT2ForCausalLM, done: Path, metrics: Path, weights: dict | None = None
    ) -> None:
        """Merge LoRA adapters into the weights, and write the student (fp32) as the stage's output (`weights`: its
        gathered state dict when it is sharded)."""
        if model is not student:
            check_ids = self.ids[: min(64, len(self.ids))].view(1, -1).long().to(self.device)
            with torch.no_grad():
                adapted = model(input_ids=check_ids, use_cache=False).logits
                student = model.merge_and_unload()
                merged = student(input_ids=check_ids, use_cache=False).logits
            if not torch.allclose(adapted, merged, rtol=1e-4, atol=1e-4):
                raise RuntimeError(
                    f"merging the LoRA adapters changed the logits (max |diff| {(adapted - merged).abs().max():.3g})"
                )
        if accelerator.is_main_process:
            with atomic_directory(done, overwrite=True, kind="run-output") as staging:
                write_student(student, self.student_folder, staging, torch.float32, weights)
                shutil.copyfile(metrics, staging / "metrics.jsonl")
        accelerator.wait_for_everyone()


def forward_precision(precision: str, devices: set[str]) -> contextlib.ExitStack:
    """bf16 autocast on every device the teacher and student run on (CPU included: bf16 matmuls are about twice
    as fast as fp32 on AVX-512 CPUs); fp32 leaves everything as it is. Losses are computed in fp32 either way."""
    stack = contextlib.ExitStack()
    for device in sorted(devices):
        if precision == "fp32":  # also switches off an enclosing autocast (backward runs outside it)
            stack.enter_context(torch.autocast(device, enabled=False))
        elif device != "cuda" or torch.cuda.is_bf16_supported():
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
    return stack


def mean_record(records: list[dict]) -> dict:
    """The micro-batches' metrics averaged (numbers, and {key: number} maps such as per-layer losses)."""
    if len(records) == 1:
        return records[0]
    merged = {}
    for key, value in records[0].items():
        if isinstance(value, dict):
            merged[key] = {k: sum(r[key][k] for r in records) / len(records) for k in value}
        else:
            merged[key] = sum(r[key] for r in records) / len(records)
    return merged


def open_trackers(names: list[str], run: Path, settings: dict) -> list:
    """accelerate's trackers for `names`, started, with the run's settings as hyperparameters. One that is not
    installed is skipped with a warning: metrics.jsonl holds every value anyway. TensorBoard writes to
    run/trackers/, wandb to run/wandb/ (project "lt2convert-distill", run named after the run folder)."""
    import warnings

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    trackers = []
    for name in names:
        if not installed[name]():
            warnings.warn(f"log_with: {name} is not installed (pip install {name}); metrics.jsonl only", stacklevel=2)
            continue
        if name == "tensorboard":
            tracker = LOGGER_TYPE_TO_CLASS[name](run.name, logging_dir=str(run / "trackers"))
        else:
            tracker = LOGGER_TYPE_TO_CLASS[name]("lt2convert-distill", name=run.name, dir=str(run))
        tracker.start()
        tracker.store_init_configuration(flat_settings(settings))
        trackers.append(tracker)
    return trackers


def flat_settings(values: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as flat scalar hyperparameters ("stages.1.lr"), which every tracker accepts."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flat_settings(item, f"{name}.{i}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:  # None, lists of strings
            flat[name] = json.dumps(value)
    return flat


def run_distillation(config: DistillConfig, resume: bool = False) -> DistillResult:
    """Run every stage (with resume=True, continue a run folder from its last checkpoint) and export the student."""
    from accelerate import PartialState

    # Without a GPU, processes launched together (accelerate launch --multi_gpu) form a gloo (CPU) group.
    state = PartialState(cpu=not torch.cuda.is_available())
    run = Path(config.out)
    with sigterm_as_interrupt():
        create = check_run_folder(run, config, resume)  # every process checks before any writes
        # Validate first, write second: models, tokenizers and data are loaded and checked before the run
        # folder exists, so bad input leaves no run.json that a corrected rerun would trip over.
        trainer = Trainer(config)
        state.wait_for_everyone()
        if create and state.is_main_process:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run / "run.json", json.dumps(config.settings(), indent=2) + "\n")
        state.wait_for_everyone()
        return trainer.train()
