"""A distill run's files on disk: stage checkpoints (accelerate state plus the trainable weights, written atomically,
damaged ones skipped on resume) and the student written whole (a stage's output, `final/`). FSDP shards are
gathered here, so the trainer never handles a partial tensor when writing or reading.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lt2convert.errors import ConfigError
from lt2convert.io.checkpoint import INDEX_FILE, CheckpointError, read_safetensors_header
from lt2convert.io.outputs import atomic_directory, swap_folder
from lt2convert.io.writer import ShardedWriter
from lt2convert.modeling import LT2ForCausalLM

CHECKPOINT_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"


def checkpoints(folder: Path) -> list[Path]:
    """A stage's complete checkpoints, oldest first (partial ones are hidden temp folders, never listed)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def write_student(
    student: LT2ForCausalLM, student_folder: Path, folder: Path, dtype: torch.dtype, weights: dict | None = None
) -> None:
    """The whole student as a checkpoint in `folder`: its weights (in `dtype`; `weights` instead of its state dict
    when given) plus every other file of the student's own folder (config, tokenizer, remote code, provenance)
    copied as is."""
    writer = ShardedWriter(folder)
    for name, tensor in (student.state_dict() if weights is None else weights).items():
        if name == "lm_head.weight" and student.config.tie_word_embeddings:
            continue
        writer.add(name, tensor.detach().to(dtype))
    writer.finish()
    for item in student_folder.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_FILE:
            shutil.copy2(item, folder / item.name)


def export_student(
    student: LT2ForCausalLM, student_folder: Path, out: Path, dtype: torch.dtype, training: dict | None = None
) -> Path:
    """`final/`: the student's checkpoint and, given the training run, its own card and extended provenance."""
    from lt2convert.cards import write_distilled_card

    with atomic_directory(out, overwrite=True, kind="run-output") as staging:
        write_student(student, student_folder, staging, dtype)
        if training is not None:
            write_distilled_card(staging, training)
    return out


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the file when a checkpoint is visibly damaged (a file missing, or a
    safetensors file shorter than its header says, as a disk-full or a kill during the write leaves it)."""
    for name in (TRAINABLE_FILE, "metrics.jsonl"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing")
    for path in sorted(folder.glob("*.safetensors")):
        read_safetensors_header(path)


def load_usable_checkpoint(accelerator, found: list[Path], named: dict[str, torch.nn.Parameter]) -> Path:
    """Load the newest checkpoint that verifies and loads; a damaged one falls back to the one before it, with
    a warning naming both. Every load replaces the whole state (optimizer, scheduler, RNG, progress, weights),
    so a failed attempt leaves nothing behind."""
    import warnings

    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(found):
        try:
            verify_checkpoint(candidate)
            accelerator.load_state(str(candidate))
            restore_trainable(candidate / TRAINABLE_FILE, named)
        except Exception as err:  # torch, pickle and safetensors raise many types for a damaged file
            damaged.append((candidate, str(err).splitlines()[0] if str(err) else type(err).__name__))
            continue
        if damaged:
            skipped = "; ".join(f"{path} ({why})" for path, why in damaged)
            warnings.warn(f"damaged checkpoint(s) skipped: {skipped}; resuming from {candidate}", stacklevel=2)
        return candidate
    newest, why = damaged[0]
    raise CheckpointError(
        f"{newest}: damaged ({why}) and no earlier checkpoint of this stage loads; delete {newest.parent} to "
        "restart the stage"
    )


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an FSDP shard (a DTensor), which only exists once processes form a group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value: a sharded one is gathered, which every process must join."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def trainable_weights(named: dict[str, torch.nn.Parameter], is_main: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters' whole values on CPU for the main process to write (empty elsewhere). Every process
    must call it: sharded parameters are gathered first."""
    weights = {}
    for name, param in named.items():
        value = whole(param) if is_sharded(param) or is_main else None
        if is_main:
            weights[name] = value.detach().cpu().contiguous()
    return weights


def restore_trainable(path: Path, named: dict[str, torch.nn.Parameter]) -> None:
    weights = load_file(str(path))
    if set(weights) != set(named):
        raise ConfigError(f"{path}: its parameters do not match this stage's trainable set")
    with torch.no_grad():
        for name, tensor in weights.items():
            param = named[name]
            if is_sharded(param):  # every process holds the whole tensor: each keeps its own shard, no exchange
                from torch.distributed.tensor import distribute_tensor

                mesh, placements = param.device_mesh, param.placements
                tensor = distribute_tensor(tensor.to(param.device), mesh, placements, src_data_rank=None)
            param.copy_(tensor)


def save_checkpoint(accelerator, folder: Path, step: int, named: dict, metrics: Path, keep: int) -> Path:
    """Every process writes its part (accelerate's state: its RNG) into one staging folder, which the main process
    completes and renames into place, so a checkpoint folder either is complete or does not exist. Only the newest
    `keep` checkpoints of the stage stay."""
    target = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = folder / f".{target.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    weights = trainable_weights(named, accelerator.is_main_process)
    if accelerator.is_main_process:
        save_file(weights, str(staging / TRAINABLE_FILE), metadata={"format": "pt"})
        shutil.copyfile(metrics, staging / "metrics.jsonl")
        swap_folder(staging, target)  # replaces the same step reached again after resuming from an earlier one
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target
