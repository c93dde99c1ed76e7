"""The adaptive-exit sweep (lt2convert.exit_sweep) on a tiny random looped checkpoint: finite figures, the
baseline threshold 1.0 runs every loop step, lower thresholds never run more, and bad settings fail by name."""

from __future__ import annotations

import math
import random

import pytest

from lt2convert.errors import ConfigError
from lt2convert.exit_sweep import SweepSettings, format_table, parse_thresholds, sweep_model
from lt2convert.testing import ouro_config, write_checkpoint

STEPS = 4


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """A 2-layer, 4-step random Ouro (no tokenizer: held-out text is read as UTF-8 bytes) and a held-out text."""
    folder = tmp_path_factory.mktemp("looped")
    model = write_checkpoint(folder / "model", ouro_config(num_hidden_layers=2, total_ut_steps=STEPS))
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "hacker", "loop", "byte"]
    text = folder / "heldout.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(400)) + "\n")
    return model, text


def test_sweep_rows_are_finite_and_threshold_one_is_every_step(looped):
    model, text = looped
    settings = SweepSettings(
        texts=(str(text),),
        thresholds=(0.3, 0.6),
        windows=2,
        window_tokens=32,
        prompt_tokens=8,
        decode_tokens=8,
        rounds=1,
        device="cpu",
    )
    result = sweep_model(model, settings)
    rows = {row["threshold"]: row for row in result["rows"]}
    assert sorted(rows) == [0.3, 0.6, 1.0]  # the baseline is always measured
    assert result["loop_steps"] == STEPS
    for row in rows.values():
        assert all(math.isfinite(v) for v in row.values()), row
        assert 1 <= row["steps_per_token"] <= STEPS and 1 <= row["decode_steps"] <= STEPS
    base = rows[1.0]
    assert base["steps_per_token"] == STEPS and base["decode_steps"] == STEPS
    assert base["perplexity_vs_every_step"] == 1.0 and base["speed_vs_every_step"] == 1.0
    assert rows[0.3]["steps_per_token"] <= rows[0.6]["steps_per_token"] <= STEPS
    assert rows[0.3]["steps_per_token"] < STEPS  # the random gate lets tokens out early at a low threshold
    lines = format_table(result)
    assert len(lines) == 2 + len(rows) and "4 loop steps" in lines[0]


def test_sweep_refuses_bad_settings_by_name(looped, tmp_path):
    assert parse_thresholds("0.5, 0.3") == (0.3, 0.5, 1.0)
    with pytest.raises(ConfigError, match="--thresholds"):
        parse_thresholds("0.5,1.5")
    with pytest.raises(ConfigError, match="--thresholds"):
        parse_thresholds("half")
    with pytest.raises(ConfigError, match="rounds"):
        SweepSettings(rounds=0)
    with pytest.raises(ConfigError, match="prompt_tokens"):
        SweepSettings(window_tokens=16, prompt_tokens=8, decode_tokens=16)
    one_step = write_checkpoint(tmp_path / "flat", ouro_config(num_hidden_layers=1, total_ut_steps=1))
    with pytest.raises(ConfigError, match="not a looped model"):
        sweep_model(
            one_step,
            SweepSettings(texts=(str(looped[1]),), window_tokens=32, prompt_tokens=8, decode_tokens=8, device="cpu"),
        )
