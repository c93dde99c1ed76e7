"""Test-wide settings: everything runs offline, on tiny checkpoints the tests write themselves."""

import os
import tempfile

# Must be set before any Hugging Face library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenised training data of test runs stays out of the user's cache (each pytest run gets its own folder).
os.environ["LT2CONVERT_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="lt2-test-tokens-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fetched_asset():
    """Path of a fetched real-model asset. Skips when absent, unless LT2CONVERT_REQUIRE_ASSETS=1 (as CI sets,
    after fetching them), where a missing asset is a failure rather than a silent skip."""
    from lt2convert.io.assets import cache_dir

    def get(name: str) -> Path:
        path = cache_dir() / name
        if not (path / "asset.json").is_file():
            message = f"asset {name!r} not in {cache_dir()}; run `lt2convert fetch-asset {name}`"
            if os.environ.get("LT2CONVERT_REQUIRE_ASSETS") == "1":
                pytest.fail(message)
            pytest.skip(message)
        return path

    return get
