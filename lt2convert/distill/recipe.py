"""Training stages: a recipe's `stages:` section, validated, with token budgets that `--tokens` can rescale.

A stage is one optimiser run over its own token budget:
    align     teacher-forced: each converted layer's new mixer learns the attention output it replaces (MSE), for
              every loop step; DSA indexers also learn the teacher's attention distribution (KL, dense warm-up)
    kd        KL(teacher ‖ student) on the logits (optionally every loop step's, and the exit distribution)
    finetune  next-token cross-entropy on the data
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from lt2convert.errors import ConfigError, PlanError
from lt2convert.recipes import read_recipe_data
from lt2convert.schema import (
    Flag,
    Fraction,
    NonNegativeNumber,
    PositiveInt,
    PositiveNumber,
    Text,
    problems_of,
    record,
)
from lt2convert.units import token_budget

Kind = Literal["align", "kd", "finetune"]
Trainable = Literal["mixers", "all", "lora"]
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_schema(schema: dict) -> None:
    """In a file, `lora: true` (or `{}`) means the default LoRA settings."""
    schema["anyOf"].append({"const": True})


TokenBudget = Annotated[int, BeforeValidator(token_budget), Field(json_schema_extra={"type": ["integer", "string"]})]


@record
class LoraSettings:
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.0
    target_modules: Annotated[tuple[Text, ...], Field(min_length=1)] = DEFAULT_LORA_TARGETS


# Frozen: a run's stages are saved and compared when it resumes.
@record
class Stage:
    name: Annotated[Text, Field(description="defaults to the kind")]
    kind: Kind
    tokens: TokenBudget
    seq_len: PositiveInt = 512
    batch_size: PositiveInt = 8
    micro_batch_size: PositiveInt | None = None  # rows per forward/backward (gradient accumulation); None: batch_size
    lr: PositiveNumber = 1e-3
    warmup: Fraction = 0.05  # share of the stage's steps spent warming the learning rate up linearly
    min_lr_ratio: Fraction = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: NonNegativeNumber = 0.0
    grad_clip: PositiveNumber = 1.0
    # align always trains the converted layers' mixers only; finetune defaults to "all"
    trainable: Trainable = "mixers"
    normalize: Flag = True  # align: MSE relative to the teacher output's mean square
    indexer_weight: NonNegativeNumber = 1.0  # align: weight of the DSA indexer's KL warm-up
    temperature: PositiveNumber = 1.0  # kd
    every_step: Flag = False  # kd: supervise every loop step's logits, not only the exit logits
    exit_weight: NonNegativeNumber = 0.0  # kd: weight of KL between the teacher's and student's exit distributions
    lora: Annotated[LoraSettings | None, Field(json_schema_extra=lora_schema)] = None  # trainable == "lora"

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


STAGE = TypeAdapter(Stage)


def check_stage(stage: Stage, where: str) -> list[str]:
    """The rules between fields (each field's type and range is the schema's)."""
    problems = []
    if stage.kind == "align" and stage.trainable != "mixers":
        problems.append(f"{where}.trainable: the align stage trains the new mixers only ('mixers')")
    if (stage.trainable == "lora") != (stage.lora is not None):
        problems.append(f"{where}.lora: give LoRA settings exactly when trainable is 'lora'")
    if stage.micro_batch_size is not None and stage.batch_size % stage.micro_batch_size:
        problems.append(
            f"{where}.micro_batch_size: {stage.micro_batch_size} does not divide batch_size {stage.batch_size}"
        )
    if not problems and stage.steps < 1:
        problems.append(
            f"{where}.tokens: a budget of {stage.tokens} tokens is less than one step of "
            f"{stage.batch_size} x {stage.seq_len} tokens"
        )
    return problems


def stage_defaults(data: dict) -> dict:
    """What a recipe may leave out: the name (the kind), finetune's trainable ("all") and LoRA's settings."""
    values = dict(data)
    values.setdefault("name", values.get("kind"))
    if values.get("kind") == "finetune":
        values.setdefault("trainable", "all")
    if values.get("lora") is True or (values.get("trainable") == "lora" and values.get("lora") is None):
        values["lora"] = {}
    return values


def parse_stage(data: object, index: int, problems: list[str]) -> Stage | None:
    where = f"stages[{index}]"
    try:
        stage = STAGE.validate_python(stage_defaults(data) if isinstance(data, dict) else data)
    except ValidationError as err:
        problems.extend(problems_of(err, where))
        return None
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
        raise ConfigError(f"--tokens {total_tokens}: " + "; ".join(problems))
    return scaled


def recipe_json_schema() -> dict:
    """The JSON Schema of a recipe file (docs/recipe.schema.json): its `plan:` and `stages:` sections."""
    from pydantic import create_model

    from lt2convert.plan import RecipePlan

    recipe = create_model(
        "Recipe",
        plan=(RecipePlan, Field(None, description="how `lt2convert plan` chooses the layers")),
        stages=(list[Stage], Field(None, min_length=1, description="the training stages of `distill`")),
    )
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **TypeAdapter(recipe).json_schema()}
    schema["$defs"]["Stage"]["required"].remove("name")  # a file may leave it out: it defaults to the kind
    return schema


def stage_from_settings(values: dict) -> Stage:
    """The inverse of Stage.settings() (a run folder's saved stages)."""
    return STAGE.validate_python(values)
