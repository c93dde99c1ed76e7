"""Placement: which mixer each layer gets, from a mix (mixer -> integer weight) and a placement (interleave,
ends, explicit), as a recipe's `plan:` section or `--mix` / `--placement` / `--layers` give them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lt2convert.errors import PlanError
from lt2convert.modeling import MIXER_TYPES

FULL = "full_attention"
PLACEMENTS = ("interleave", "ends", "explicit")
NAMED_MIXES = {
    "all-gdn": {"gdn": 1},  # LT2-linear
    "all-dsa": {"dsa": 1},  # LT2-sparse
    "all-swa": {"swa": 1},  # LT2-sparse with a sliding window
    "gdn-dsa": {"gdn": 1, "dsa": 1},  # LT2-hybrid, fully linear-time
}
# JSON Schema of the recipe fields that the parsers of --mix and --layers read (they accept more than one form)
MIX_SCHEMA = {
    "description": "'full_attention:1,gdn:4', a named mix (" + ", ".join(NAMED_MIXES) + ") or mixer: weight",
    "anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}}],
}
LAYERS_SCHEMA = {
    "description": "explicit placement: '4,9' (full-attention layers), '0:gdn,5:dsa', a list or index: mixer",
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"type": "null"},
    ],
}


def type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


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
