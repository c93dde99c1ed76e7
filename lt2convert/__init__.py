"""lt2convert: turn looped transformers (Ouro) into linear-time LT2 hybrids.

Importing the package is cheap: it does not import torch or transformers. It registers the runtime with
transformers' Auto classes as soon as transformers imports them (see `lt2convert.registration`), so
`AutoModelForCausalLM.from_pretrained(ouro_dir)` works without `trust_remote_code` after `import lt2convert`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lt2convert.registration import install as _install_registration

if TYPE_CHECKING:
    from lt2convert.loading import load_config, load_model

__version__ = "0.1.0"
__all__ = ["load_model", "load_config", "__version__"]

_LAZY_FUNCTIONS = {"load_model": "lt2convert.loading", "load_config": "lt2convert.loading"}

_install_registration()


def __getattr__(name: str):
    """`lt2convert.load_model` and friends import their (heavy) modules on first use."""
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name == "modeling":
        return importlib.import_module("lt2convert.modeling")
    raise AttributeError(f"module 'lt2convert' has no attribute {name!r}")
