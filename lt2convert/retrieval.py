"""Which layers hold the heads that copy from context (`plan --strategy sensitivity --keep-retrieval N`).

In-context recall (passkey, associative recall) rests on a few retrieval heads that attend from the position
predicting an answer token to where that token sits in the context, and those heads live in a few layers. A
layer's score is how much attention mass its best head puts on the copy source, teacher-forced on synthetic
passkey and key-value prompts. The prompts come from the recall suite's generators with their own seed, so
planning never sees the evaluation's documents.
"""

from __future__ import annotations

import torch

from lt2convert.calibrate import attention_probabilities, capture_mixer_calls
from lt2convert.errors import ConfigError

PROMPT_SEED = 7  # the recall suite evaluates seed 1234


def recall_prompts(count: int, seed: int = PROMPT_SEED) -> list[tuple[str, str]]:
    """`count` (context, answer) pairs, half passkey (~256 tokens) and half 16-pair associative recall."""
    from lt2convert.evals.tasks.loaders import mqar_rows, passkey_rows

    rows = passkey_rows(256, num_docs=(count + 1) // 2, seed=seed) + mqar_rows(16, num_docs=count // 2, seed=seed)
    return [(row["context"], row["target"]) for row in rows]


def copy_sources(context: list[int], answer: list[int]) -> list[list[int]]:
    """For each answer token, the context positions an induction-style copy reads it from: where the same
    token follows the same previous token (the last context token for the first answer token)."""
    sources = []
    for j, token in enumerate(answer):
        previous = answer[j - 1] if j else context[-1]
        sources.append([s for s in range(1, len(context) - 1) if context[s] == token and context[s - 1] == previous])
    return sources


def layer_copy_scores(model, prompts: list[tuple[list[int], list[int]]]) -> list[float]:
    """Per layer, the attention mass its best head puts on the copy sources of the answer tokens, averaged over
    answer tokens with a source, loop steps and prompts. Every layer of `model` must be full attention."""
    layers = model.config.num_hidden_layers
    totals = torch.zeros(layers, model.config.num_attention_heads, dtype=torch.float64)
    counts = torch.zeros(layers, dtype=torch.float64)
    device = next(model.parameters()).device
    for context, answer in prompts:
        sources = copy_sources(context, answer)
        queries = [(len(context) + j - 1, where) for j, where in enumerate(sources) if where]
        if not queries:
            continue

        def on_call(layer, _step, module, x, ctx, _output, queries=queries):
            probs = attention_probabilities(module, x, ctx)[0]  # [heads, S, S]
            for query, where in queries:
                totals[layer] += probs[:, query, where].sum(-1).double().cpu()
            counts[layer] += len(queries)

        capture_mixer_calls(model, torch.tensor([context + answer], device=device), on_call)
    if not counts.any():
        raise ConfigError("no recall prompt has an answer token that occurs in its context; cannot score layers")
    return (totals / counts.clamp(min=1)[:, None]).max(dim=1).values.tolist()


def retrieval_scores(model, encode, count: int = 16) -> list[float]:
    """Copy scores of every layer of `model` on `count` synthetic recall prompts tokenised by `encode`."""
    prompts = [(encode(context), encode(answer)) for context, answer in recall_prompts(count)]
    return layer_copy_scores(model, prompts)
