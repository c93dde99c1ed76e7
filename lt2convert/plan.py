"""`plan`: which layer of a checkpoint becomes which token mixer, as a validated plan.yaml, and what it costs.

source config (preset, folder or hub id; config.json only) + strategy (a recipe's `plan:` section, optionally
overridden by --mix/--placement/--layers) -> `Plan` -> plan.yaml. `plan_to_config` derives the runtime config that
`convert` builds; `check_plan_matches` guards against applying a plan to another checkpoint. The file format is
documented in docs/plan-format.md, the cost model in docs/cost-model.md.
"""

from __future__ import annotations

import math
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources
from pathlib import Path

from lt2convert.costs import (
    DTYPE_BYTES,
    MIXER_PARTS,
    Hardware,
    cache_bytes,
    decode_cost,
    fixed_state_bytes,
    hardware,
    kv_cache_bytes_per_token,
    prefill_flops,
)
from lt2convert.io.outputs import PLAN_HEADER, atomic_write_text
from lt2convert.loading import architecture, derive_config
from lt2convert.modeling import MIXER_TYPES, LT2Config

PLAN_FORMAT = "lt2convert/plan"
PLAN_VERSION = 1
FULL = "full_attention"
PLACEMENTS = ("interleave", "ends", "explicit")
# How a plan's layers were chosen: a placement, or data-driven ranking (lt2convert.sensitivity).
STRATEGIES = (*PLACEMENTS, "sensitivity")
NAMED_MIXES = {
    "all-gdn": {"gdn": 1},  # LT2-linear
    "all-dsa": {"dsa": 1},  # LT2-sparse
    "all-swa": {"swa": 1},  # LT2-sparse with a sliding window
    "gdn-dsa": {"gdn": 1, "dsa": 1},  # LT2-hybrid, fully linear-time
}
DEFAULT_RECIPE = "ouro-1.4b-full-gdn"
CACHE_CONTEXTS = (8192, 32768, 65536)  # the cache sizes `inspect` reports
DECODE_CONTEXTS = (8192, 32768)  # LT2 reports decoding speed at 8K


class PlanError(ValueError):
    """A plan, recipe or strategy that cannot be used; the one-line message names every offending field."""

    def __init__(self, origin: str, problems: list[str]):
        super().__init__(f"{origin}: {'; '.join(problems)}")
        self.problems = problems


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class GDNSettings:
    num_heads: int
    head_k_dim: int
    expand_v: float
    conv_size: int
    use_short_conv: bool
    use_gate: bool
    allow_neg_eigval: bool


@dataclass(frozen=True)
class DSASettings:
    index_n_heads: int
    index_head_dim: int
    topk: int


@dataclass(frozen=True)
class SWASettings:
    window: int
    # Attention sinks: the first tokens stay visible to every query, as StreamingLLM keeps them. Pretrained models
    # park attention there; without them an untrained 1:3 Full+SWA SmolLM2 (window 512) has 1.5-1.7x the
    # teacher's perplexity on held-out text, with 4 of them 1.04-1.06x. Absent from a plan file: 0 (older plans).
    sinks: int = 0


MixerSettings = GDNSettings | DSASettings | SWASettings
# Where a new plan's default differs from the runtime config's (which must keep older checkpoints exact).
NEW_MIXER_DEFAULTS: dict[str, dict] = {"swa": {"sinks": 4}}
# Mixer settings are global per mixer type; field `f` of mixer `m` is the runtime config field `m_f`.
SETTINGS: dict[str, type[MixerSettings]] = {"gdn": GDNSettings, "dsa": DSASettings, "swa": SWASettings}


def settings_used(mixers: typing.Iterable[str]) -> set[str]:
    """The settings sections layers of these mixers read: a mixer built from others (swa_gdn) reads its parts'."""
    return {section for m in mixers for section in MIXER_PARTS.get(m, (m,)) if section in SETTINGS}


@dataclass(frozen=True)
class PlanSource:
    """The checkpoint a plan was made for: where it comes from and the shape it must have."""

    id: str  # preset name, hub id or absolute folder path
    kind: str  # preset | hub | path
    hub_id: str | None
    revision: str | None
    model_type: str
    num_hidden_layers: int
    hidden_size: int


@dataclass(frozen=True)
class LayerPlan:
    index: int
    mixer: str


@dataclass(frozen=True)
class Strategy:
    """How the layers were chosen. Provenance only: `layers` is what convert follows."""

    name: str  # the placement: interleave | ends | explicit
    recipe: str | None  # the recipe it started from; None when options replaced the default recipe
    params: dict  # the mix and, for explicit placement, the listed layers
    scores: tuple[float, ...] | None  # per-layer scores, reserved for the data-driven 'sensitivity' strategy


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


def parse_plan(data: object, origin: str = "plan") -> Plan:
    problems: list[str] = []
    top = mapping(data, "", ("format", "version", "source", "layers", "mixers", "strategy"), problems)
    if top.get("format", PLAN_FORMAT) != PLAN_FORMAT:
        problems.append(f"format: expected {PLAN_FORMAT!r}, got {top['format']!r}")
    if "version" in top and top["version"] != PLAN_VERSION:
        problems.append(f"version: this lt2convert reads version {PLAN_VERSION}, got {top['version']!r}")
    # An absent section is reported once, as missing, and not parsed.
    source = parse_source_record(top["source"], problems) if "source" in top else None
    num_layers = source.num_hidden_layers if source is not None else None
    layers = parse_layers(top["layers"], num_layers, problems) if "layers" in top else []
    sections = mapping(top.get("mixers", {}), "mixers", tuple(SETTINGS), problems, required=())
    mixers = {}
    for mixer, data in sections.items():
        values = settings_values(mixer, data, f"mixers.{mixer}", problems, complete=True)
        if values is not None:
            mixers[mixer] = make_settings(mixer, values, f"mixers.{mixer}", problems)
    used = {layer.mixer for layer in layers} - {FULL}
    problems += [
        f"mixers.{section}: missing (layers use {m})"
        for m in sorted(used)
        for section in sorted(settings_used([m]))
        if section not in sections
    ]
    strategy = parse_strategy(top["strategy"], num_layers, problems) if "strategy" in top else None
    if problems:
        raise PlanError(origin, problems)
    return Plan(source, tuple(layers), mixers, strategy)


def mapping(
    data: object, where: str, keys: tuple[str, ...], problems: list[str], required: tuple[str, ...] | None = None
) -> dict:
    """`data` as a dict after checking its keys (unknown: error; `required`, all by default: must be there)."""
    if not isinstance(data, dict):
        problems.append(f"{where or 'plan'}: expected a mapping, got {type_name(data)}")
        return {}
    prefix = f"{where}." if where else ""
    problems += [f"{prefix}{key}: unknown key (expected one of {', '.join(keys)})" for key in data if key not in keys]
    problems += [f"{prefix}{key}: missing" for key in (keys if required is None else required) if key not in data]
    return {key: value for key, value in data.items() if key in keys}


def type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


KINDS = {int: "int", float: "float", bool: "bool", str: "str", str | None: "str | None"}


def check_type(value: object, kind: type | object, where: str, problems: list[str]) -> bool:
    """kind: int, float, bool, str or str | None; a bool is not a number, an int is a float."""
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        str | None: value is None or isinstance(value, str),
    }[kind]
    if not ok:
        problems.append(f"{where}: expected {KINDS[kind]}, got {value!r}")
    return ok


def parse_source_record(data: object, problems: list[str]) -> PlanSource | None:
    hints = typing.get_type_hints(PlanSource)
    record = mapping(data, "source", tuple(hints), problems)
    before = len(problems)
    for name, value in record.items():
        check_type(value, hints[name], f"source.{name}", problems)
    if record.get("kind") not in (None, "preset", "hub", "path"):
        problems.append(f"source.kind: expected preset, hub or path, got {record['kind']!r}")
    for name in ("num_hidden_layers", "hidden_size"):
        if isinstance(record.get(name), int) and record[name] <= 0:
            problems.append(f"source.{name}: must be > 0, got {record[name]}")
    return PlanSource(**record) if len(problems) == before and len(record) == len(hints) else None


def parse_layers(data: object, num_layers: int | None, problems: list[str]) -> list[LayerPlan]:
    if not isinstance(data, list):
        problems.append(f"layers: expected a list of {{index, mixer}}, got {type_name(data)}")
        return []
    layers: dict[int, LayerPlan] = {}
    seen: set[int] = set()  # indices listed, valid or not: only the others are reported missing
    for k, item in enumerate(data):
        entry = mapping(item, f"layers[{k}]", ("index", "mixer"), problems)
        index, mixer = entry.get("index"), entry.get("mixer")
        if "index" in entry and check_type(index, int, f"layers[{k}].index", problems):
            if num_layers is not None and not 0 <= index < num_layers:
                problems.append(f"layers[{k}].index: layer {index} is out of range 0..{num_layers - 1}")
            elif index in seen:
                problems.append(f"layers[{k}].index: layer {index} is listed twice")
            seen.add(index)
        if "mixer" in entry and mixer not in MIXER_TYPES:
            problems.append(f"layers[{k}].mixer: unknown mixer {mixer!r} (expected one of {', '.join(MIXER_TYPES)})")
        if isinstance(index, int) and not isinstance(index, bool) and mixer in MIXER_TYPES:
            layers.setdefault(index, LayerPlan(index, mixer))
    if num_layers is not None:
        missing = [i for i in range(num_layers) if i not in seen]
        if missing:
            problems.append(f"layers: no entry for layer(s) {missing} (one entry per layer of the source)")
    return [layers[i] for i in sorted(layers)]


def settings_values(mixer: str, data: object, where: str, problems: list[str], complete: bool) -> dict | None:
    """One mixer's settings, checked: known keys, right types, numbers > 0. A plan must give every key (so the
    file alone says what convert builds); a recipe gives only those it overrides."""
    cls = SETTINGS[mixer]
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in fields(cls))
    optional = {f.name for f in fields(cls) if f.default is not MISSING}  # may be 0, and absent means the default
    before = len(problems)
    required = tuple(n for n in names if n not in optional) if complete else ()
    values = mapping(data, where, names, problems, required=required)
    for name, value in values.items():
        if not check_type(value, hints[name], f"{where}.{name}", problems) or hints[name] is bool:
            continue
        if value < (0 if name in optional else 1):
            problems.append(f"{where}.{name}: must be {'>= 0' if name in optional else '> 0'}, got {value}")
    return values if len(problems) == before else None


def make_settings(mixer: str, values: dict, where: str, problems: list[str]) -> MixerSettings | None:
    """Settings from a complete set of checked values."""
    if mixer == "gdn":
        if not float(values["head_k_dim"] * values["expand_v"]).is_integer():
            problems.append(f"{where}.expand_v: head_k_dim × expand_v must be a whole number of value dims")
            return None
        values = {**values, "expand_v": float(values["expand_v"])}
    return SETTINGS[mixer](**values)


def parse_strategy(data: object, num_layers: int | None, problems: list[str]) -> Strategy:
    record = mapping(data, "strategy", ("name", "recipe", "params", "scores"), problems)
    name, recipe = record.get("name"), record.get("recipe")
    if "name" in record and record["name"] not in STRATEGIES:
        problems.append(f"strategy.name: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    if "recipe" in record:
        check_type(recipe, str | None, "strategy.recipe", problems)
    params = record.get("params", {})
    if not isinstance(params, dict):
        problems.append(f"strategy.params: expected a mapping, got {type_name(params)}")
        params = {}
    scores = record.get("scores")
    if scores is not None:
        numeric = isinstance(scores, list) and all(check_type(s, float, "strategy.scores", []) for s in scores)
        if not numeric or (num_layers is not None and len(scores) != num_layers):
            problems.append(f"strategy.scores: expected null or one number per layer ({num_layers})")
            scores = None
    return Strategy(
        name=str(name), recipe=recipe if isinstance(recipe, str) else None, params=params,
        scores=tuple(float(s) for s in scores) if scores is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Strategies: a mix (mixer -> integer weight) placed over the layers


@dataclass(frozen=True)
class PlanSpec:
    """How to choose the layers: a recipe's `plan:` section, possibly overridden on the command line."""

    mix: dict[str, int]
    placement: str
    layers: dict[int, str] | None  # explicit placement: listed layer -> mixer; the others get the fill mixer
    mixers: dict[str, dict]  # per-mixer settings overriding the defaults derived from the source
    recipe: str | None


def parse_mix(value: object, where: str, problems: list[str]) -> dict[str, int]:
    """'full_attention:1,gdn:4', a named mix (all-gdn, all-dsa, all-swa, gdn-dsa) or a mapping."""
    if isinstance(value, str) and value in NAMED_MIXES:
        return dict(NAMED_MIXES[value])
    if isinstance(value, str):
        pairs: list[tuple[object, object]] = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            mixer, sep, weight = (part.strip() for part in item.partition(":"))
            pairs.append((mixer, (int(weight) if weight.isdigit() else weight) if sep else 1))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        problems.append(f"{where}: expected 'mixer:weight,...', a named mix or a mapping, got {type_name(value)}")
        return {}
    mix: dict[str, int] = {}
    for mixer, weight in pairs:
        if mixer not in MIXER_TYPES:
            known = ", ".join((*MIXER_TYPES, *NAMED_MIXES))
            problems.append(f"{where}: unknown mixer {mixer!r} (expected one of {known})")
        elif mixer in mix:
            problems.append(f"{where}: {mixer} is given twice")
        elif not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
            problems.append(f"{where}: the weight of {mixer} must be a positive integer, got {weight!r}")
        else:
            mix[mixer] = weight
    if not pairs:
        problems.append(f"{where}: empty")
    return mix


def parse_layer_assignments(value: object, where: str, problems: list[str]) -> dict[int, str]:
    """'4,9,14,19' (full-attention layers), '0:full_attention,5:dsa', a list of full layers or a mapping."""
    if isinstance(value, str):
        items = [part.strip().partition(":") for part in value.split(",") if part.strip()]
        pairs = [(index.strip(), mixer.strip() if sep else FULL) for index, sep, mixer in items]
        pairs = [(int(i) if i.lstrip("-").isdigit() else i, m) for i, m in pairs]
    elif isinstance(value, list):
        pairs = [(index, FULL) for index in value]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        problems.append(f"{where}: expected '4,9' / '0:gdn,5:dsa', a list or a mapping, got {type_name(value)}")
        return {}
    layers: dict[int, str] = {}
    for index, mixer in pairs:
        if not isinstance(index, int) or isinstance(index, bool):
            problems.append(f"{where}: layer index {index!r} is not an integer")
        elif mixer not in MIXER_TYPES:
            known = ", ".join(MIXER_TYPES)
            problems.append(f"{where}: layer {index}: unknown mixer {mixer!r} (expected one of {known})")
        elif index in layers:
            problems.append(f"{where}: layer {index} is listed twice")
        else:
            layers[index] = mixer
    if not pairs:
        problems.append(f"{where}: empty")
    return layers


def mix_text(mix: Mapping[str, int]) -> str:
    return ",".join(f"{mixer}:{weight}" for mixer, weight in mix.items())


def period(mix: Mapping[str, int]) -> list[str]:
    """The shortest repeating pattern of the mix. Rarer mixers go first, each at the end of its equal share of
    the period (so full:1,gdn:4 gives gdn,gdn,gdn,gdn,full: LT2's full layers at 4, 9, 14, 19); the most
    common mixer fills the rest."""
    divisor = math.gcd(*mix.values())
    counts = {mixer: weight // divisor for mixer, weight in mix.items()}
    size = sum(counts.values())
    slots: list[str | None] = [None] * size
    order = sorted(counts, key=lambda m: (counts[m], MIXER_TYPES.index(m)))
    for mixer in order[:-1]:
        for j in range(counts[mixer]):
            slots[nearest_free(slots, (j + 1) * size // counts[mixer] - 1)] = mixer
    return [slot or order[-1] for slot in slots]


def nearest_free(slots: list[str | None], ideal: int) -> int:
    for distance in range(len(slots)):
        for position in (ideal - distance, ideal + distance):
            if 0 <= position < len(slots) and slots[position] is None:
                return position
    raise AssertionError("no free slot: the counts exceed the period")


def interleave(mix: Mapping[str, int], num_layers: int) -> list[str]:
    """The mix's period repeated over the layers (a partial period at the end)."""
    pattern = period(mix)
    if len(pattern) > num_layers:
        raise PlanError("strategy", [
            f"the mix {mix_text(mix)} repeats every {len(pattern)} layers and cannot be placed on {num_layers}"
        ])
    return [pattern[i % len(pattern)] for i in range(num_layers)]


def ends(mix: Mapping[str, int], num_layers: int) -> list[str]:
    """Full attention in the first and last layers and evenly between (its share of the mix, rounded); the
    other mixers interleaved over the remaining layers."""
    if FULL not in mix:
        raise PlanError("strategy", [f"placement 'ends' keeps layers full_attention; the mix {mix_text(mix)} has none"])
    rest = {mixer: weight for mixer, weight in mix.items() if mixer != FULL}
    if not rest:
        return [FULL] * num_layers
    count = math.floor(num_layers * mix[FULL] / sum(mix.values()) + 0.5)
    if count < 2:
        raise PlanError("strategy", [
            f"the mix {mix_text(mix)} gives {count} full_attention layer(s) of {num_layers}; placement 'ends' "
            "needs at least 2 (the first and the last)"
        ])
    full = {math.floor(j * (num_layers - 1) / (count - 1) + 0.5) for j in range(count)}
    others = iter(interleave(rest, num_layers - len(full)))
    return [FULL if i in full else next(others) for i in range(num_layers)]


def explicit(assigned: Mapping[int, str], fill: str | None, num_layers: int) -> list[str]:
    """The listed layers get their mixer, every other layer `fill` (None: every layer must be listed)."""
    problems = [f"layer index {i} is out of range 0..{num_layers - 1}" for i in sorted(assigned)
                if not 0 <= i < num_layers]
    unlisted = [i for i in range(num_layers) if i not in assigned]
    if unlisted and fill is None:
        problems.append(f"layers {unlisted} are not listed and the mix has no single non-full mixer to fill them")
    if problems:
        raise PlanError("strategy", problems)
    return [assigned.get(i, fill) for i in range(num_layers)]


def choose_layers(spec: PlanSpec, num_layers: int) -> list[str]:
    if spec.placement == "interleave":
        return interleave(spec.mix, num_layers)
    if spec.placement == "ends":
        return ends(spec.mix, num_layers)
    # Unlisted layers get the mix's one non-full mixer (e.g. the gdn of full_attention:1,gdn:4).
    fill = [mixer for mixer in spec.mix if mixer != FULL]
    return explicit(spec.layers or {}, fill[0] if len(fill) == 1 else None, num_layers)


# ---------------------------------------------------------------------------------------------------------------
# Recipes: YAML files whose `plan:` section is a PlanSpec (other top-level keys belong to other commands)


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("lt2convert.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe_data(name: str) -> tuple[dict, str]:
    """(the parsed YAML mapping, a name for messages) of a shipped recipe by name, or a recipe file by path."""
    import yaml

    if Path(name).is_file():
        text, origin = Path(name).read_text(), name
    elif name in recipe_names():
        text, origin = (resources.files("lt2convert.recipes") / f"{name}.yaml").read_text(), f"recipe {name}"
    else:
        raise PlanError(f"recipe {name}", [f"no such recipe or file (shipped recipes: {', '.join(recipe_names())})"])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PlanError(origin, ["not valid YAML"]) from err
    if not isinstance(data, dict):
        raise PlanError(origin, ["expected a mapping with a plan: section"])
    return data, origin


def load_recipe(name: str) -> PlanSpec:
    """The `plan:` section of a shipped recipe by name, or of a recipe file by path."""
    data, origin = read_recipe_data(name)
    if "plan" not in data:
        raise PlanError(origin, ["expected a mapping with a plan: section"])
    problems: list[str] = []
    section = mapping(data["plan"], "plan", ("mix", "placement", "layers", "mixers"), problems, required=("mix",))
    spec = parse_spec(section, "plan", problems, recipe=name)
    if problems:
        raise PlanError(origin, problems)
    return spec


def parse_spec(section: dict, where: str, problems: list[str], recipe: str | None) -> PlanSpec:
    placement = section.get("placement", "interleave")
    if placement not in PLACEMENTS:
        problems.append(f"{where}.placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}")
    layers = parse_layer_assignments(section["layers"], f"{where}.layers", problems) if "layers" in section else None
    if (layers is not None) != (placement == "explicit"):
        problems.append(f"{where}.layers: given exactly when placement is 'explicit'")
    overrides = {}
    sections = mapping(section.get("mixers", {}), f"{where}.mixers", tuple(SETTINGS), problems, required=())
    for mixer, data in sections.items():
        values = settings_values(mixer, data, f"{where}.mixers.{mixer}", problems, complete=False)
        overrides[mixer] = values or {}
    return PlanSpec(
        mix=parse_mix(section.get("mix"), f"{where}.mix", problems) if "mix" in section else {},
        placement=placement, layers=layers, mixers=overrides, recipe=recipe,
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
    return make_settings(mixer, values, where, problems)


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
    from lt2convert.summary import parameter_breakdown

    params = parameter_breakdown(config)
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


def plan(
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
