"""Training stages: a recipe's `stages:` section, validated, with token budgets that `--tokens` can rescale.

A stage is one optimiser run over its own token budget:
    align     teacher-forced: each converted layer's new mixer learns the attention output it replaces (MSE), for
              every loop step; DSA indexers also learn the teacher's attention distribution (KL, dense warm-up)
    kd        KL(teacher ‖ student) on the logits (optionally every loop step's, and the exit distribution)
    finetune  next-token cross-entropy on the data
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from lt2convert.plan import PlanError

KINDS = ("align", "kd", "finetune")
TRAINABLE = ("mixers", "all", "lora")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*$")
MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_tokens(value: object, where: str = "tokens") -> int:
    """A token count: an integer, or a number with a k/M/B suffix ("100M", "1.5B")."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a token count such as 2000000 or 2M, got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = SIZE.match(str(value))
        if not match:
            raise ValueError(f"{where}: expected a token count such as 2000000 or 2M, got {value!r}")
        count = int(float(match.group(1)) * MULTIPLIERS[match.group(2).lower()])
    if count < 1:
        raise ValueError(f"{where}: must be at least 1 token, got {value!r}")
    return count


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS


@dataclass
class Stage:
    name: str
    kind: str
    tokens: int
    seq_len: int = 512
    batch_size: int = 8
    micro_batch_size: int | None = None  # rows per forward/backward (gradient accumulation); None: batch_size
    lr: float = 1e-3
    warmup: float = 0.05  # share of the stage's steps spent warming the learning rate up linearly
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    trainable: str = "mixers"  # align always trains the converted layers' mixers only
    normalize: bool = True  # align: MSE relative to the teacher output's mean square
    indexer_weight: float = 1.0  # align: weight of the DSA indexer's KL warm-up
    temperature: float = 1.0  # kd
    every_step: bool = False  # kd: supervise every loop step's logits, not only the exit logits
    exit_weight: float = 0.0  # kd: weight of KL between the teacher's and student's exit distributions
    lora: LoraSettings | None = None  # trainable == "lora"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def micro_batches(self) -> int:
        """Forward/backward passes accumulated into each optimizer step."""
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps)

    def settings(self) -> dict:
        values = asdict(self)
        if self.lora is not None:
            values["lora"]["target_modules"] = list(self.lora.target_modules)
        return values


STAGE_KEYS = tuple(f.name for f in fields(Stage))


def check_stage(stage: Stage, where: str) -> list[str]:
    problems = []
    if stage.kind not in KINDS:
        problems.append(f"{where}.kind: expected one of {', '.join(KINDS)}, got {stage.kind!r}")
    if stage.trainable not in TRAINABLE:
        problems.append(f"{where}.trainable: expected one of {', '.join(TRAINABLE)}, got {stage.trainable!r}")
    if stage.kind == "align" and stage.trainable != "mixers":
        problems.append(f"{where}.trainable: the align stage trains the new mixers only ('mixers')")
    if (stage.trainable == "lora") != (stage.lora is not None):
        problems.append(f"{where}.lora: give LoRA settings exactly when trainable is 'lora'")
    for name in ("seq_len", "batch_size"):
        if not isinstance(getattr(stage, name), int) or getattr(stage, name) < 1:
            problems.append(f"{where}.{name}: expected a positive integer, got {getattr(stage, name)!r}")
    micro = stage.micro_batch_size
    if micro is not None and (not isinstance(micro, int) or isinstance(micro, bool) or micro < 1):
        problems.append(f"{where}.micro_batch_size: expected a positive integer, got {micro!r}")
    elif micro is not None and isinstance(stage.batch_size, int) and stage.batch_size % micro:
        problems.append(f"{where}.micro_batch_size: {micro} does not divide batch_size {stage.batch_size}")
    for name in ("lr", "grad_clip", "temperature"):
        if not isinstance(getattr(stage, name), int | float) or getattr(stage, name) <= 0:
            problems.append(f"{where}.{name}: expected a positive number, got {getattr(stage, name)!r}")
    for name in ("warmup", "min_lr_ratio"):
        if not isinstance(getattr(stage, name), int | float) or not 0 <= getattr(stage, name) <= 1:
            problems.append(f"{where}.{name}: expected a number in [0, 1], got {getattr(stage, name)!r}")
    for name in ("weight_decay", "indexer_weight", "exit_weight"):
        if not isinstance(getattr(stage, name), int | float) or getattr(stage, name) < 0:
            problems.append(f"{where}.{name}: expected a non-negative number, got {getattr(stage, name)!r}")
    if not problems and stage.steps < 1:
        problems.append(
            f"{where}.tokens: a budget of {stage.tokens} tokens is less than one step of "
            f"{stage.batch_size} x {stage.seq_len} tokens"
        )
    return problems


def parse_lora(data: object, where: str, problems: list[str]) -> LoraSettings | None:
    if data is None:
        return None
    if data is True or data == {}:
        return LoraSettings()
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping (r, alpha, dropout, target_modules)")
        return None
    unknown = sorted(set(data) - {"r", "alpha", "dropout", "target_modules"})
    if unknown:
        problems.append(f"{where}: unknown keys {', '.join(unknown)}")
        return None
    targets = data.get("target_modules", DEFAULT_LORA_TARGETS)
    if not isinstance(targets, list | tuple) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append(f"{where}.target_modules: expected a list of module names")
        return None
    defaults = LoraSettings()
    return LoraSettings(
        r=data.get("r", defaults.r),
        alpha=data.get("alpha", defaults.alpha),
        dropout=data.get("dropout", defaults.dropout),
        target_modules=tuple(targets),
    )


def parse_stage(data: object, index: int, problems: list[str]) -> Stage | None:
    where = f"stages[{index}]"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping")
        return None
    unknown = sorted(set(data) - set(STAGE_KEYS))
    if unknown:
        problems.append(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(STAGE_KEYS)})")
        return None
    missing = [key for key in ("kind", "tokens") if key not in data]
    if missing:
        problems.append(f"{where}: missing {', '.join(missing)}")
        return None
    values = dict(data)
    values.setdefault("name", values["kind"])
    if values["kind"] == "finetune":
        values.setdefault("trainable", "all")
    try:
        values["tokens"] = parse_tokens(values["tokens"], f"{where}.tokens")
    except ValueError as err:
        problems.append(str(err))
        return None
    values["lora"] = parse_lora(values.get("lora"), f"{where}.lora", problems)
    if values.get("trainable") == "lora" and values["lora"] is None:
        values["lora"] = LoraSettings()
    stage = Stage(**values)
    problems.extend(check_stage(stage, where))
    return stage


def parse_stages(data: object, origin: str) -> list[Stage]:
    """The validated stages of a recipe's `stages:` list; every problem is reported in one PlanError."""
    if not isinstance(data, list) or not data:
        raise PlanError(origin, ["stages: expected a non-empty list of stages"])
    problems: list[str] = []
    stages = [parse_stage(item, i, problems) for i, item in enumerate(data)]
    names = [s.name for s in stages if s is not None]
    if len(set(names)) != len(names):
        problems.append(f"stages: names must be unique, got {', '.join(names)}")
    if problems:
        raise PlanError(origin, problems)
    return [s for s in stages if s is not None]


def load_stages(recipe: str) -> list[Stage]:
    """The stages of a shipped recipe (by name) or a recipe file."""
    from lt2convert.plan import read_recipe_data

    data, origin = read_recipe_data(recipe)
    if "stages" not in data:
        raise PlanError(origin, ["no stages: section (distill needs one; see recipes/smollm2-135m-full-gdn.yaml)"])
    return parse_stages(data["stages"], origin)


def scale_budgets(stages: list[Stage], total_tokens: int) -> list[Stage]:
    """The same stages with budgets rescaled to sum to `total_tokens`, keeping the recipe's ratios."""
    recipe_total = sum(s.tokens for s in stages)
    scaled = [replace(s, tokens=max(1, round(s.tokens * total_tokens / recipe_total))) for s in stages]
    problems = [p for i, s in enumerate(scaled) for p in check_stage(s, f"stages[{i}] ({s.name})")]
    if problems:
        raise ValueError(f"--tokens {total_tokens}: " + "; ".join(problems))
    return scaled


def stage_from_settings(values: dict) -> Stage:
    """The inverse of Stage.settings() (a run folder's saved stages)."""
    values = dict(values)
    if values.get("lora") is not None:
        values["lora"] = LoraSettings(**{**values["lora"], "target_modules": tuple(values["lora"]["target_modules"])})
    return Stage(**values)
