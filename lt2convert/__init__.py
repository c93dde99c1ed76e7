"""lt2convert: turn looped transformers (Ouro) into linear-time LT2 hybrids.

Importing the package registers the runtime with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(ouro_dir)` works without `trust_remote_code`.
"""

from lt2convert import modeling as _modeling  # noqa: F401  (registers model_type "ouro" and "lt2")
from lt2convert.loading import load_config, load_model

__version__ = "0.1.0"
__all__ = ["load_model", "load_config", "__version__"]
