"""Token counts as users write them: context lengths ("8K" is 8,192 tokens, "1k,8k,32k" a list of them) and
token budgets ("2M" is 2,000,000 tokens). The one parser of each, for options and config files alike."""

from __future__ import annotations

import re

from lt2convert.errors import ConfigError

SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*$")
MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_context(text: str | int) -> int:
    """8192, 8K or 8k -> 8192 (K means 1024 tokens); anything else, or zero, is a ConfigError."""
    text = str(text).strip()
    scale = 1024 if text[-1:] in ("k", "K") else 1
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ConfigError(f"unknown context spec {text!r}: expected a token count such as 8192 or 8k")
    return int(digits) * scale


def parse_contexts(spec: str | int | list | tuple) -> list[int]:
    """'1k,8k,32k' (or a list of counts / specs) -> sorted unique token counts."""
    items = spec.split(",") if isinstance(spec, str) else list(spec) if isinstance(spec, list | tuple) else [spec]
    contexts = sorted({parse_context(item) for item in items if str(item).strip()})
    if not contexts:
        raise ConfigError(f"no context given in {spec!r}")
    return contexts


def token_budget(value: object) -> int:
    """A token budget: an integer, or a number with a k/M/B suffix ("100M", "1.5B"); at least 1."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a token count such as 2000000 or 2M, got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = SIZE.match(str(value))
        if not match:
            raise ConfigError(f"expected a token count such as 2000000 or 2M, got {value!r}")
        count = int(float(match.group(1)) * MULTIPLIERS[match.group(2).lower()])
    if count < 1:
        raise ConfigError(f"must be at least 1 token, got {value!r}")
    return count


def parse_tokens(value: object, where: str = "tokens") -> int:
    """`token_budget`, with the option or field it came from named in the error."""
    try:
        return token_budget(value)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
