"""The align stage: teacher-forced training of a converted hybrid's new mixers against the attention they replace.

For every converted layer (student.layer_types[i] != teacher.layer_types[i]) and every loop step, the student's
new mixer is fed the teacher's own mixer input (and context) and trained with `align_loss` against the teacher
attention's output. Everything else in the student stays frozen and bit-identical.

Run folder (`AlignConfig.out`):
    align_config.json                 the settings; a resumed run must use the same ones
    metrics.jsonl                     one line per optimizer step
    checkpoints/step-NNNNNNNN/        written atomically every `checkpoint_every` steps and at the end:
        mixers.safetensors            the new mixers' weights
        trainer_state.pt              optimizer, scheduler, RNG states, data position, step, tokens seen
        metrics.jsonl                 the metrics up to this step (restored on resume)
        state.json                    step, tokens and data position, for people
    final/                            the whole student, a checkpoint folder `load_model` reads
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lt2convert.calibrate import capture_mixer_calls
from lt2convert.distill.data import PackedTokenStream, byte_encode, hf_encode
from lt2convert.distill.losses import align_loss
from lt2convert.io.checkpoint import INDEX_FILE
from lt2convert.io.writer import ShardedWriter, atomic_directory, write_json
from lt2convert.loading import load_config, load_model, resolve_checkpoint, resolve_dtype
from lt2convert.modeling import LT2Config, LT2ForCausalLM

TOKENIZERS = ("student", "bytes")
CHECKPOINT_PREFIX = "step-"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped before updating any weight."""


@dataclass
class AlignConfig:
    teacher: str  # the source checkpoint (folder, preset or hub id)
    student: str  # the converted hybrid's folder
    data: list[str]  # .txt / .jsonl training text files
    out: str  # the run folder
    tokens: int  # token budget: steps = tokens // (batch_size * seq_len)
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm of the new mixers
    normalize_loss: bool = True  # MSE / teacher mean square (see align_loss)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # the most recent checkpoints kept on disk
    seed: int = 0
    tokenizer: str = "student"  # "student": the student folder's tokenizer; "bytes": UTF-8 bytes as ids

    def __post_init__(self):
        self.data = [str(p) for p in self.data]
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        for name in ("tokens", "seq_len", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {self.warmup_steps}")

    @property
    def steps(self) -> int:
        steps = self.tokens // (self.batch_size * self.seq_len)
        if steps < 1:
            raise ValueError(
                f"a budget of {self.tokens} tokens is less than one step of {self.batch_size} x {self.seq_len}"
            )
        return steps

    def settings(self) -> dict:
        return asdict(self)


@dataclass
class AlignResult:
    final: Path  # the exported student
    steps: int
    tokens: int
    loss: float | None  # the last step's loss (None when resuming a finished run trained no step)


def converted_layers(teacher: LT2Config, student: LT2Config) -> list[int]:
    if len(teacher.layer_types) != len(student.layer_types) or teacher.total_ut_steps != student.total_ut_steps:
        raise ValueError(
            f"student ({len(student.layer_types)} layers, {student.total_ut_steps} loop steps) does not match the "
            f"teacher ({len(teacher.layer_types)} layers, {teacher.total_ut_steps} loop steps)"
        )
    converted = [i for i, (a, b) in enumerate(zip(teacher.layer_types, student.layer_types, strict=True)) if a != b]
    if not converted:
        raise ValueError("the student has no converted layers: its layer_types equal the teacher's")
    return converted


def mixer_prefixes(converted: list[int]) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.self_attn." for i in converted)


def freeze_all_but_mixers(student: LT2ForCausalLM, converted: list[int]) -> list[torch.nn.Parameter]:
    """Make only the converted layers' mixer parameters trainable, check that, and return them."""
    student.requires_grad_(False)
    for i in converted:
        student.model.layers[i].self_attn.requires_grad_(True)
    prefixes = mixer_prefixes(converted)
    named = dict(student.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    expected = {n for n in named if n.startswith(prefixes)}
    if trainable != expected or not expected:
        raise RuntimeError(f"trainable parameters {sorted(trainable ^ expected)[:5]} differ from the new mixers'")
    return [named[n] for n in sorted(expected)]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 down to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (partial ones are hidden temp folders, never listed)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def align_step(
    teacher: LT2ForCausalLM,
    student: LT2ForCausalLM,
    converted: list[int],
    ids: torch.Tensor,
    normalize: bool,
    backward,
) -> dict[int, float]:
    """Run the teacher once; for every (converted layer, loop step) backpropagate that call's align loss
    (scaled so the gradients are those of the mean over calls). Returns each layer's loss, averaged over steps."""
    steps = teacher.config.total_ut_steps
    calls = len(converted) * steps
    per_layer: dict[int, float] = defaultdict(float)

    def on_call(index, step, module, x, ctx, output):
        if index not in converted:
            return
        with torch.enable_grad():
            loss = align_loss(student.model.layers[index].self_attn(x, ctx, None), output, normalize)
            backward(loss / calls)
        per_layer[index] += loss.item() / steps

    capture_mixer_calls(teacher, ids, on_call)
    return dict(per_layer)


def save_checkpoint(run: Path, step: int, tokens: int, student, converted, optimizer, scheduler, stream, keep: int):
    target = run / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    prefixes = mixer_prefixes(converted)
    weights = {n: t.detach().cpu().contiguous() for n, t in student.state_dict().items() if n.startswith(prefixes)}
    with atomic_directory(target, overwrite=True) as staging:
        save_file(weights, str(staging / "mixers.safetensors"), metadata={"format": "pt"})
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "data": stream.state_dict(),
                "step": step,
                "tokens": tokens,
            },
            staging / "trainer_state.pt",
        )
        shutil.copyfile(run / "metrics.jsonl", staging / "metrics.jsonl")
        write_json(staging / "state.json", {"step": step, "tokens": tokens, "data": stream.state_dict()})
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return target


def load_checkpoint(run: Path, checkpoint: Path, student, converted, optimizer, scheduler, stream) -> tuple[int, int]:
    """Restore everything a checkpoint holds; returns (step, tokens seen)."""
    weights = load_file(str(checkpoint / "mixers.safetensors"))
    params = student.state_dict()
    expected = {n for n in params if n.startswith(mixer_prefixes(converted))}
    if set(weights) != expected:
        raise ValueError(f"{checkpoint}: its mixer weights do not match the student's converted layers")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)  # our own file: includes RNG states
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    shutil.copyfile(checkpoint / "metrics.jsonl", run / "metrics.jsonl")
    return state["step"], state["tokens"]


def export_student(student: LT2ForCausalLM, student_folder: Path, out: Path, dtype: torch.dtype) -> Path:
    """The whole student as a checkpoint folder: its weights (in `dtype`) plus every other file of the student's
    own folder (config, tokenizer, remote code, provenance) copied as is."""
    with atomic_directory(out, overwrite=True) as staging:
        writer = ShardedWriter(staging)
        for name, tensor in student.state_dict().items():
            if name == "lm_head.weight" and student.config.tie_word_embeddings:
                continue
            writer.add(name, tensor.to(dtype))
        writer.finish()
        for item in student_folder.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_FILE:
                shutil.copy2(item, staging / item.name)
    return out


def prepare_run(run: Path, config: AlignConfig, resume: bool) -> Path | None:
    """Check the run folder against `resume`; returns the checkpoint to resume from, if any."""
    settings_file = run / "align_config.json"
    found = checkpoints(run)
    if not resume:
        if settings_file.exists() or found:
            raise FileExistsError(f"{run}: already holds an align run; pass resume=True to continue it")
        run.mkdir(parents=True, exist_ok=True)
        write_json(settings_file, config.settings())
        return None
    if settings_file.exists():
        saved = json.loads(settings_file.read_text())
        changed = sorted(k for k in set(saved) | set(config.settings()) if saved.get(k) != config.settings().get(k))
        if changed:
            raise ValueError(f"{run}: cannot resume with different settings ({', '.join(changed)})")
    else:
        run.mkdir(parents=True, exist_ok=True)
        write_json(settings_file, config.settings())
    return found[-1] if found else None


def train_align(config: AlignConfig, resume: bool = False) -> AlignResult:
    """Run (or, with resume=True, continue from its last checkpoint) the align stage; export the student."""
    from accelerate import Accelerator

    total_steps = config.steps
    run = Path(config.out)
    last = prepare_run(run, config, resume)
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise RuntimeError("the align stage runs in a single process for now")
    device = accelerator.device
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    student_config, _ = load_config(config.student)
    export_dtype = resolve_dtype(None, student_config)
    student_folder = resolve_checkpoint(config.student).folder
    teacher = load_model(config.teacher, dtype="float32").to(device)
    teacher.requires_grad_(False)
    student = load_model(config.student, dtype="float32").to(device)
    converted = converted_layers(teacher.config, student.config)
    params = freeze_all_but_mixers(student, converted)

    if config.tokenizer == "bytes":
        encode, eos_id = byte_encode, None
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(student_folder)
        encode, eos_id = hf_encode(tokenizer), tokenizer.eos_token_id
    stream = PackedTokenStream(config.data, encode, config.seq_len, config.seed, eos_id)

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.warmup_steps, config.min_lr_ratio)
    )
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    step, tokens = 0, 0
    if last is not None:
        step, tokens = load_checkpoint(run, last, student, converted, optimizer, scheduler, stream)
    else:
        (run / "metrics.jsonl").write_text("")  # lines from a run killed before its first checkpoint are void
    last_good = last
    loss = None
    while step < total_steps:
        started = time.perf_counter()
        ids, positions = stream.next_batch(config.batch_size)
        lr = optimizer.param_groups[0]["lr"]
        per_layer = align_step(teacher, student, converted, ids.to(device), config.normalize_loss, accelerator.backward)
        loss = sum(per_layer.values()) / len(per_layer)
        grad_norm = float(accelerator.clip_grad_norm_(params, config.grad_clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
            raise TrainingDiverged(
                f"align step {step + 1}: loss {loss}, gradient norm {grad_norm} (not finite); stopped without "
                f"updating the weights; {where}"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        record = {
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "layer_loss": {str(i): v for i, v in sorted(per_layer.items())},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": ids.numel() / (time.perf_counter() - started),
            "windows": positions,
        }
        with (run / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if step % config.checkpoint_every == 0 or step == total_steps:
            last_good = save_checkpoint(
                run, step, tokens, student, converted, optimizer, scheduler, stream, config.keep_checkpoints
            )
    final = export_student(student, student_folder, run / "final", export_dtype)
    return AlignResult(final=final, steps=step, tokens=tokens, loss=loss)
