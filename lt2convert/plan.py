"""`plan`: which layer of a checkpoint becomes which token mixer, as a validated plan.yaml, and what it costs.

source config (preset, folder or hub id; config.json only) + strategy (a recipe's `plan:` section, optionally
overridden by --mix/--placement/--layers) -> `Plan` -> plan.yaml. `plan_to_config` derives the runtime config that
`convert` builds; `check_plan_matches` guards against applying a plan to another checkpoint. The file format is
documented in docs/plan-format.md, the cost model in docs/cost-model.md.
"""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from lt2convert.costs import (
    DTYPE_BYTES,
    MIXER_PARTS,
    Hardware,
    cache_bytes,
    decode_cost,
    fixed_state_bytes,
    hardware,
    kv_cache_bytes_per_token,
    parameter_counts,
    prefill_flops,
)
from lt2convert.errors import PlanError
from lt2convert.io.outputs import PLAN_HEADER, atomic_write_text
from lt2convert.loading import architecture, derive_config
from lt2convert.modeling import MIXER_TYPES, LT2Config
from lt2convert.placement import (
    FULL,
    LAYERS_SCHEMA,
    MIX_SCHEMA,
    PLACEMENTS,
    PlanSpec,
    choose_layers,
    parse_layer_assignments,
    parse_mix,
)
from lt2convert.placement import ends as ends  # re-exported: `from lt2convert.plan import ends` keeps working
from lt2convert.placement import interleave as interleave
from lt2convert.recipes import read_recipe_data
from lt2convert.schema import (
    Flag,
    NonNegativeInt,
    Number,
    OptionalText,
    PositiveInt,
    PositiveNumber,
    Text,
    overrides_of,
    problems_of,
    record,
)

PLAN_FORMAT = "lt2convert/plan"
PLAN_VERSION = 1
# How a plan's layers were chosen: a placement, or data-driven ranking (lt2convert.sensitivity).
STRATEGIES = (*PLACEMENTS, "sensitivity")
DEFAULT_RECIPE = "ouro-1.4b-full-gdn"
CACHE_CONTEXTS = (8192, 32768, 65536)  # the cache sizes `inspect` reports
DECODE_CONTEXTS = (8192, 32768)  # LT2 reports decoding speed at 8K


# ---------------------------------------------------------------------------------------------------------------
# The plan


@record
class GDNSettings:
    num_heads: PositiveInt
    head_k_dim: PositiveInt
    expand_v: PositiveNumber
    conv_size: PositiveInt
    use_short_conv: Flag
    use_gate: Flag
    allow_neg_eigval: Flag

    def __post_init__(self) -> None:
        if not float(self.head_k_dim * self.expand_v).is_integer():
            raise ValueError(
                f"head_k_dim × expand_v must be a whole number of value dims, got {self.head_k_dim} × {self.expand_v}"
            )


@record
class DSASettings:
    index_n_heads: PositiveInt
    index_head_dim: PositiveInt
    topk: PositiveInt


@record
class SWASettings:
    window: PositiveInt
    # Attention sinks: the first tokens stay visible to every query, as StreamingLLM keeps them. Pretrained models
    # park attention there; without them an untrained 1:3 Full+SWA SmolLM2 (window 512) has 1.5-1.7x the
    # teacher's perplexity on held-out text, with 4 of them 1.04-1.06x. Absent from a plan file: 0 (older plans).
    sinks: NonNegativeInt = 0


MixerSettings = GDNSettings | DSASettings | SWASettings
# Where a new plan's default differs from the runtime config's (which must keep older checkpoints exact).
NEW_MIXER_DEFAULTS: dict[str, dict] = {"swa": {"sinks": 4}}
# Mixer settings are global per mixer type; field `f` of mixer `m` is the runtime config field `m_f`.
SETTINGS: dict[str, type[MixerSettings]] = {"gdn": GDNSettings, "dsa": DSASettings, "swa": SWASettings}


def settings_used(mixers: typing.Iterable[str]) -> set[str]:
    """The settings sections layers of these mixers read: a mixer built from others (swa_gdn) reads its parts'."""
    return {section for m in mixers for section in MIXER_PARTS.get(m, (m,)) if section in SETTINGS}


@record
class PlanSource:
    """The checkpoint a plan was made for: where it comes from and the shape it must have."""

    id: Text  # preset name, hub id or absolute folder path
    kind: Literal["preset", "hub", "path"]
    hub_id: OptionalText
    revision: OptionalText
    model_type: Text
    num_hidden_layers: PositiveInt
    hidden_size: PositiveInt


@record
class LayerPlan:
    index: Annotated[int, Field(strict=True)]  # in range for the source: checked against source.num_hidden_layers
    mixer: Literal[MIXER_TYPES]  # type: ignore[valid-type]  # the runtime's mixers, spelled once there


@record
class Strategy:
    """How the layers were chosen. Provenance only: `layers` is what convert follows."""

    name: Literal[STRATEGIES]  # type: ignore[valid-type]  # a placement, or sensitivity
    recipe: OptionalText  # the recipe it started from; None when options replaced the default recipe
    params: dict  # the mix and, for explicit placement, the listed layers
    scores: tuple[Number, ...] | None  # per-layer scores of the data-driven 'sensitivity' strategy


@dataclass(frozen=True)
class Plan:
    source: PlanSource
    layers: tuple[LayerPlan, ...]
    mixers: dict[str, MixerSettings]  # settings of every mixer type the layers use besides full attention
    strategy: Strategy

    @property
    def layer_types(self) -> list[str]:
        return [layer.mixer for layer in self.layers]

    def config_overrides(self) -> dict:
        """The runtime config fields this plan sets: `layer_types` and the mixer settings."""
        overrides: dict = {"layer_types": self.layer_types}
        for mixer, settings in self.mixers.items():
            overrides |= {f"{mixer}_{name}": value for name, value in asdict(settings).items()}
        return overrides

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "source": asdict(self.source),
            "layers": [asdict(layer) for layer in self.layers],
            "mixers": {mixer: asdict(settings) for mixer, settings in self.mixers.items()},
            "strategy": {
                "name": self.strategy.name,
                "recipe": self.strategy.recipe,
                "params": self.strategy.params,
                "scores": None if self.strategy.scores is None else list(self.strategy.scores),
            },
        }


def plan_to_config(plan: Plan, source_config: LT2Config) -> LT2Config:
    """The runtime config of the converted model: the source's architecture with the plan's mixers."""
    check_plan_matches(plan, source_config)
    return derive_config(source_config, plan.config_overrides())


def check_plan_matches(plan: Plan, source_config: LT2Config, source: str | None = None) -> None:
    """Raise PlanError unless `plan` was made for this checkpoint: same model type, depth and width, the same hub
    repository (and revision, when both name one) if `source` names one, and every layer the checkpoint does not
    have as full attention left as it is (a plan converts attention layers only)."""
    problems = [
        f"source.{name}: the plan was made for {planned}, the checkpoint has {actual}"
        for name in ("model_type", "num_hidden_layers", "hidden_size")
        if (planned := getattr(plan.source, name)) != (actual := getattr(source_config, name))
    ]
    if source is not None:
        problems += identity_problems(plan.source, source)
    problems += [
        f"layers[{i}].mixer: layer {i} is {was} in the checkpoint; only full_attention layers can be converted"
        for i, (was, now) in enumerate(zip(source_config.layer_types, plan.layer_types, strict=False))
        if was != FULL and was != now
    ]
    if problems:
        raise PlanError(f"plan for {plan.source.id} does not match the checkpoint", problems)


def identity_problems(planned: PlanSource, spec: str) -> list[str]:
    """A folder is identified by its shape only (a plan may travel with a copied checkpoint); presets and hub
    ids must name the same repository, and the same revision when both pin one."""
    from lt2convert.io.hub import parse_source

    given = parse_source(spec)
    if given.kind == "path" or planned.hub_id is None:
        return []
    if given.hub_id.lower() != planned.hub_id.lower():
        return [f"source.hub_id: the plan was made for {planned.hub_id}, the checkpoint is {given.hub_id}"]
    if given.revision and planned.revision and given.revision != planned.revision:
        return [f"source.revision: the plan was made for {planned.revision}, the checkpoint is {given.revision}"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing plan.yaml (every problem is collected, then reported at once)


def read_plan(path: str | Path) -> Plan:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PlanError(str(path), ["plan file not found (write one with `lt2convert plan SOURCE -o FILE`)"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PlanError(str(path), [f"not valid YAML{where}"]) from err
    return parse_plan(data, str(path))


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Write plan.yaml atomically: a temporary file beside it, renamed into place."""
    import yaml

    class PlanDumper(yaml.SafeDumper):
        """Block style, except one line per layer entry and per mix."""

    PlanDumper.add_representer(
        FlowMap, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)
    )
    document = plan.to_dict()
    document["layers"] = [FlowMap(layer) for layer in document["layers"]]
    params = document["strategy"]["params"]
    document["strategy"]["params"] = {key: FlowMap(v) if isinstance(v, dict) else v for key, v in params.items()}
    body = yaml.dump(document, Dumper=PlanDumper, sort_keys=False, default_flow_style=False)
    path = Path(path)
    text = f"{PLAN_HEADER} (format {PLAN_FORMAT}, version {PLAN_VERSION}; see docs/plan-format.md)\n{body}"
    # Only an earlier plan is replaced: `-o SRC/config.json` must not turn a checkpoint's config into YAML.
    return atomic_write_text(path, text, kind="plan")


class FlowMap(dict):
    """A mapping plan.yaml writes on one line."""


@record
class PlanMixers:
    """Settings of every mixer type the layers use besides full attention (the keys of SETTINGS)."""

    gdn: GDNSettings | None = None
    dsa: DSASettings | None = None
    swa: SWASettings | None = None


@record
class PlanFile:
    """plan.yaml as written by `lt2convert plan` (docs/plan-format.md, docs/plan.schema.json)."""

    format: Literal[PLAN_FORMAT]
    version: Literal[PLAN_VERSION]
    source: PlanSource
    layers: list[LayerPlan]
    mixers: PlanMixers
    strategy: Strategy

    def to_plan(self) -> Plan:
        mixers = {name: getattr(self.mixers, name) for name in SETTINGS if getattr(self.mixers, name) is not None}
        layers = tuple(sorted(self.layers, key=lambda layer: layer.index))
        return Plan(self.source, layers, mixers, self.strategy)


PLAN_FILE = TypeAdapter(PlanFile)


def plan_json_schema() -> dict:
    """The JSON Schema of plan.yaml (docs/plan.schema.json)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **PLAN_FILE.json_schema()}


def parse_plan(data: object, origin: str = "plan") -> Plan:
    """A plan document, checked against the schema (PlanFile) and the rules between its fields; every problem
    is reported in one PlanError."""
    try:
        document, problems = PLAN_FILE.validate_python(data), []
    except ValidationError as err:
        document, problems = None, problems_of(err)
    problems += plan_rule_problems(data)
    if problems or document is None:
        raise PlanError(origin, problems)
    return document.to_plan()


def plan_rule_problems(data: object) -> list[str]:
    """The rules between plan.yaml's fields, read from the raw document so that they are reported together with
    the schema's problems: one entry per layer of the source, in range, and a settings section for every mixer
    the layers use, and one score per layer."""
    if not isinstance(data, dict):
        return []
    source = data.get("source")
    count = source.get("num_hidden_layers") if isinstance(source, dict) else None
    num_layers = count if type(count) is int and count > 0 else None
    layers = data.get("layers")
    listed = layers if isinstance(layers, list) else []
    entries = [(k, entry) for k, entry in enumerate(listed) if isinstance(entry, dict)]
    problems = []
    seen: set[int] = set()  # indices listed, valid or not: only the others are reported missing
    for k, entry in entries:
        index = entry.get("index")
        if type(index) is not int:
            continue
        if num_layers is not None and not 0 <= index < num_layers:
            problems.append(f"layers[{k}].index: layer {index} is out of range 0..{num_layers - 1}")
        elif index in seen:
            problems.append(f"layers[{k}].index: layer {index} is listed twice")
        seen.add(index)
    if num_layers is not None and isinstance(layers, list):
        missing = [i for i in range(num_layers) if i not in seen]
        if missing:
            problems.append(f"layers: no entry for layer(s) {missing} (one entry per layer of the source)")
    sections = data.get("mixers") if isinstance(data.get("mixers"), dict) else {}
    used = {entry.get("mixer") for _, entry in entries} & set(MIXER_TYPES) - {FULL}
    problems += [
        f"mixers.{section}: missing (layers use {m})"
        for m in sorted(used)
        for section in sorted(settings_used([m]))
        if section not in sections
    ]
    strategy = data.get("strategy")
    scores = strategy.get("scores") if isinstance(strategy, dict) else None
    if isinstance(scores, list) and num_layers is not None and len(scores) != num_layers:
        problems.append(f"strategy.scores: expected null or one number per layer ({num_layers})")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Recipes: YAML files whose `plan:` section is a PlanSpec (other top-level keys belong to other commands)


GDNOverrides, DSAOverrides, SWAOverrides = (overrides_of(cls) for cls in (GDNSettings, DSASettings, SWASettings))


@record
class RecipeMixers:
    """A recipe's mixer settings: any of each mixer's, the rest derived from the source."""

    gdn: GDNOverrides | None = None  # type: ignore[valid-type]
    dsa: DSAOverrides | None = None  # type: ignore[valid-type]
    swa: SWAOverrides | None = None  # type: ignore[valid-type]

    def overrides(self) -> dict[str, dict]:
        given = {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}
        return {name: section.model_dump(exclude_unset=True) for name, section in given.items()}


@record
class RecipePlan:
    """A recipe's `plan:` section (docs/recipe.schema.json): how to choose the layers."""

    mix: Annotated[Any, Field(json_schema_extra=MIX_SCHEMA)]  # read by parse_mix, which also reads --mix
    placement: Literal[PLACEMENTS] = "interleave"  # type: ignore[valid-type]
    layers: Annotated[Any, Field(json_schema_extra=LAYERS_SCHEMA)] = None  # read by parse_layer_assignments
    mixers: RecipeMixers = Field(default_factory=RecipeMixers)


RECIPE_PLAN = TypeAdapter(RecipePlan)


def load_recipe(name: str) -> PlanSpec:
    """The `plan:` section of a shipped recipe by name, or of a recipe file by path."""
    data, origin = read_recipe_data(name)
    if "plan" not in data:
        raise PlanError(origin, ["expected a mapping with a plan: section"])
    section, problems = data["plan"], []
    try:
        plan_section = RECIPE_PLAN.validate_python(section)
    except ValidationError as err:
        plan_section, problems = None, problems_of(err, "plan")
    if isinstance(section, dict):  # the mix and layers are read even when other fields are wrong
        mix = parse_mix(section["mix"], "plan.mix", problems) if "mix" in section else {}
        layers = parse_layer_assignments(section["layers"], "plan.layers", problems) if "layers" in section else None
        if (layers is not None) != (section.get("placement", "interleave") == "explicit"):
            problems.append("plan.layers: given exactly when placement is 'explicit'")
    if problems or plan_section is None:
        raise PlanError(origin, problems)
    return PlanSpec(
        mix=mix, placement=plan_section.placement, layers=layers, mixers=plan_section.mixers.overrides(), recipe=name
    )


def resolve_spec(
    recipe: str | None = None,
    mix: str | Mapping[str, int] | None = None,
    placement: str | None = None,
    layers: str | Mapping[int, str] | list[int] | None = None,
) -> PlanSpec:
    """The recipe (the default one when none is named) with whatever was given explicitly on top. Giving
    --layers implies explicit placement; choosing another placement drops a recipe's listed layers."""
    base = load_recipe(recipe or DEFAULT_RECIPE)
    problems: list[str] = []
    new_mix = base.mix if mix is None else parse_mix(mix, "--mix", problems)
    new_layers = None if layers is None else parse_layer_assignments(layers, "--layers", problems)
    new_placement = placement or ("explicit" if layers is not None else base.placement)
    if new_placement not in PLACEMENTS:
        problems.append(f"--placement: expected one of {', '.join(PLACEMENTS)}, got {new_placement!r}")
    if new_placement == "explicit":
        new_layers = new_layers if new_layers is not None else base.layers
        if new_layers is None:
            problems.append("--placement explicit: needs --layers (e.g. --layers 4,9,14,19)")
    elif new_layers is not None:
        problems.append(f"--layers: only with --placement explicit, not {new_placement}")
    if problems:
        raise PlanError("strategy", problems)
    overridden = mix is not None or placement is not None or layers is not None
    return PlanSpec(
        mix=new_mix, placement=new_placement, layers=new_layers if new_placement == "explicit" else None,
        mixers=base.mixers, recipe=recipe or (None if overridden else DEFAULT_RECIPE),
    )


def mixer_settings(
    source: LT2Config, mixer: str, overrides: dict, where: str, problems: list[str]
) -> MixerSettings | None:
    """A mixer's settings: the recipe's overrides, the rest as the runtime config derives them for this source.
    For a mixer the source does not use yet that is LT2Config's own derivation (GDN with the attention's heads and
    head_dim, so q/k/v/o copy over; DSA's index dims from the heads it indexes; SWA 2048 tokens), recomputed after
    the overrides; a mixer the source already uses keeps the settings of its existing layers."""
    names = [f"{mixer}_{f.name}" for f in fields(SETTINGS[mixer])]
    data = architecture(source)
    if mixer not in settings_used(source.layer_types):
        for name in names:
            data.pop(name)
        overrides = {**NEW_MIXER_DEFAULTS.get(mixer, {}), **overrides}
    try:
        derived = LT2Config(**{**data, **{f"{mixer}_{key}": value for key, value in overrides.items()}})
    except ValueError as err:
        problems.append(f"{where}: {err}")
        return None
    values = {name.removeprefix(f"{mixer}_"): getattr(derived, name) for name in names}
    try:
        return SETTINGS[mixer](**values)
    except ValidationError as err:
        problems.extend(problems_of(err, where))
        return None


def build_plan(source: str, config: LT2Config, spec: PlanSpec) -> Plan:
    """Apply a strategy to a source config."""
    mixers_used = choose_layers(spec, config.num_hidden_layers)
    problems: list[str] = []
    settings = {
        mixer: mixer_settings(config, mixer, spec.mixers.get(mixer, {}), f"mixers.{mixer}", problems)
        for mixer in SETTINGS
        if mixer in settings_used(mixers_used)
    }
    if problems:
        raise PlanError(f"recipe {spec.recipe}" if spec.recipe else "strategy", problems)
    params: dict = {"mix": dict(spec.mix)}
    if spec.layers is not None:
        params["layers"] = dict(sorted(spec.layers.items()))
    plan = Plan(
        source=source_record(source, config),
        layers=tuple(LayerPlan(i, mixer) for i, mixer in enumerate(mixers_used)),
        mixers={mixer: s for mixer, s in settings.items() if s is not None},
        strategy=Strategy(name=spec.placement, recipe=spec.recipe, params=params, scores=None),
    )
    check_plan_matches(plan, config)
    return plan


def source_record(spec: str, config: LT2Config) -> PlanSource:
    from lt2convert.io.hub import parse_source

    parsed = parse_source(spec)
    ident = {"preset": parsed.preset, "hub": parsed.hub_id, "path": str(Path(spec).resolve())}[parsed.kind]
    return PlanSource(
        id=ident, kind=parsed.kind, hub_id=parsed.hub_id, revision=parsed.revision, model_type=config.model_type,
        num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
    )


# ---------------------------------------------------------------------------------------------------------------
# Costs, source and plan side by side


ASSUMPTIONS = (
    "decode time per step = max(FLOPs / peak FLOP/s, bytes / bandwidth) for the whole batch (a roofline)",
    "every loop step reads every layer's weights from memory once for the whole batch: T reads per token",
    "each sequence reads its own cache in every (loop step, layer) slot: attention every cached key/value, SWA "
    "its window, DSA every index key plus the top-k keys/values, GDN its whole fp32 state (read and written)",
    "2 FLOPs per parameter per token; the LM head runs once per token, the embedding lookup is free",
    "activations stay on chip; kernel launch, Python and framework overheads are not modelled",
    "device figures are datasheet peaks; real kernels reach about 60-90% of them",
    "memory = weights + the batch's cache at the context; 'fits' ignores activations and workspace",
)


def side_costs(
    config: LT2Config, device: Hardware, batch: int, contexts: tuple[int, ...], dtype: str
) -> dict:
    params = parameter_counts(config)
    return {
        "params_total": sum(params.values()),
        "params_by_component": params,
        "mixer_layers": dict(Counter(config.layer_types)),
        "cache_bytes_per_token": kv_cache_bytes_per_token(config, dtype),
        "cache_fixed_bytes": fixed_state_bytes(config, dtype),
        "cache_bytes_at_context": {str(c): cache_bytes(config, c, dtype) for c in CACHE_CONTEXTS},
        "prefill_flops": {str(c): prefill_flops(config, params, c) for c in contexts},
        "decode": {str(c): asdict(decode_cost(config, params, c, batch, device, dtype)) for c in contexts},
    }


def plan_costs(
    plan: Plan,
    source_config: LT2Config,
    device: Hardware,
    batch: int = 8,
    contexts: tuple[int, ...] = DECODE_CONTEXTS,
    dtype: str = "bf16",
) -> dict:
    """The cost model for the source and the planned model, with the projected decoding speedups."""
    problems = [f"--batch-size must be > 0, got {batch}"] if batch <= 0 else []
    problems += [f"--contexts must be > 0, got {c}" for c in contexts if c <= 0]
    if dtype not in DTYPE_BYTES:
        problems.append(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if problems:
        raise PlanError("cost model", problems)
    source = side_costs(source_config, device, batch, contexts, dtype)
    target = side_costs(plan_to_config(plan, source_config), device, batch, contexts, dtype)
    components = sorted(set(source["params_by_component"]) | set(target["params_by_component"]))
    return {
        "assumptions": {
            "device": asdict(device), "batch": batch, "dtype": dtype, "contexts": list(contexts),
            "notes": list(ASSUMPTIONS),
        },
        "source": source,
        "plan": target,
        "params_delta": {
            c: target["params_by_component"].get(c, 0) - source["params_by_component"].get(c, 0)
            for c in components
            if target["params_by_component"].get(c, 0) != source["params_by_component"].get(c, 0)
        },
        "decode_speedup": {
            str(c): source["decode"][str(c)]["seconds_per_step"] / target["decode"][str(c)]["seconds_per_step"]
            for c in contexts
        },
    }


def make_plan(
    source: str,
    *,
    recipe: str | None = None,
    mix: str | Mapping[str, int] | None = None,
    placement: str | None = None,
    layers: str | Mapping[int, str] | list[int] | None = None,
    plan_file: str | Path | None = None,
    output: str | Path | None = None,
    device: str = "h100",
    tflops: float | None = None,
    gbps: float | None = None,
    batch: int = 8,
    contexts: tuple[int, ...] = DECODE_CONTEXTS,
    dtype: str = "bf16",
    choose: Callable[[PlanSpec], Plan] | None = None,
) -> dict:
    """Make a plan for `source` (or check and cost an existing `plan_file`), optionally write it to `output`, and
    return it as a dict together with its `cost`. `choose` (e.g. a `lt2convert.sensitivity.sensitivity_plan` bound
    to its data) picks the full-attention layers for the recipe's spec instead of placing them: strategies that
    train live above this module, which only builds, checks and costs plans."""
    from lt2convert.io.outputs import check_replaceable
    from lt2convert.loading import load_config

    if output is not None:
        check_replaceable(Path(output), "plan")  # before any work: a refusal costs nothing
    config, _ = load_config(source)
    if plan_file is not None:
        if any(given is not None for given in (recipe, mix, placement, layers, choose)):
            raise PlanError("--plan", ["cannot be combined with --recipe, --mix, --placement, --layers or --strategy"])
        chosen = read_plan(plan_file)
        check_plan_matches(chosen, config, source)
    elif choose is not None:
        if placement is not None or layers is not None:
            raise PlanError("--strategy sensitivity", ["chooses the layers itself: drop --placement and --layers"])
        chosen = choose(resolve_spec(recipe, mix))
    else:
        chosen = build_plan(source, config, resolve_spec(recipe, mix, placement, layers))
    report = {**chosen.to_dict(), "cost": plan_costs(chosen, config, hardware(device, tflops, gbps), batch,
                                                     tuple(contexts), dtype)}
    report["plan_file"] = str(write_plan(chosen, output)) if output is not None else None
    return report
