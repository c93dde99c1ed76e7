"""Test-wide settings: everything runs offline, on tiny checkpoints the tests write themselves."""

import os

# Must be set before any Hugging Face library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
