"""lm-evaluation-harness scores a hybrid model as it scores plain transformers loading the same files.

``HFLM`` wraps each model as docs/evaluation.md shows; the requests are built as ``Instance`` objects
directly, so no task or data set is downloaded. In float32, log-likelihoods agree as the logits do in the
other exactness tests (1e-5 absolute or relative), greedy flags and generated text are equal. The
embedded SmolLM2 covers real text; a tiny random Mixtral with a character tokenizer covers experts on
every lane, several rolling windows and the error past ``max_context``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from smollm2_markers import load_smollm2_pair, needs_smollm2
from tiny_models import char_tokenizer, load_every_lane
from transformers import AutoModelForCausalLM

from hf_hybrid import ContextLengthError

HFLM = pytest.importorskip("lm_eval.models.huggingface", reason="needs lm-eval (the test extra)").HFLM
Instance = pytest.importorskip("lm_eval.api.instance").Instance

#: float32: the hybrid path sums a dense MLP's row slices apart, so each token's log-probability differs by
#: rounding (up to ~2e-5 on SmolLM2), and a continuation's sum adds these up: 1e-5 relative allows for it
ABS_TOL, REL_TOL = 1e-5, 1e-5

SMOL_LOGLIKELIHOOD = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " London"),
    ("Question: what is 2 + 2?\nAnswer:", " 4"),
    ("", "Water boils at 100 degrees Celsius."),  # empty context: scored after the prefix token
    ("The quick brown fox", " jumps over the lazy dog"),
]
SMOL_ROLLING = [
    "The quick brown fox jumps over the lazy dog. " * 6,  # longer than max_length: two windows
    "Paris is the capital and largest city of France.",
]
SMOL_GENERATE = [
    ("The capital of France is", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
    ("Question: what is 2 + 2?\nAnswer:", {"until": ["."], "max_gen_toks": 8, "do_sample": False}),
]


def requests(kind: str, arguments: list) -> list[Any]:
    """``Instance`` requests of one kind, as a task would build them (no document needed)."""
    return [
        Instance(request_type=kind, doc={}, arguments=a if isinstance(a, tuple) else (a,), idx=i)
        for i, a in enumerate(arguments)
    ]


def wrap(model: Any, tokenizer: Any, **options: Any) -> Any:
    """The model as lm-evaluation-harness sees it: ``HFLM`` on the already loaded model."""
    return HFLM(pretrained=model, tokenizer=tokenizer, **options)


def run_all(lm: Any, loglikelihood: list, rolling: list, generate: list) -> tuple[list, list, list]:
    """(loglikelihood, loglikelihood_rolling, generate_until) results of ``lm`` on these requests."""
    return (
        lm.loglikelihood(requests("loglikelihood", loglikelihood), disable_tqdm=True),
        lm.loglikelihood_rolling(requests("loglikelihood_rolling", rolling), disable_tqdm=True),
        lm.generate_until(requests("generate_until", generate), disable_tqdm=True),
    )


def assert_same_scores(got: tuple[list, list, list], want: tuple[list, list, list]) -> None:
    """Log-likelihoods close, greedy flags and generated text equal."""
    (got_ll, got_roll, got_gen), (want_ll, want_roll, want_gen) = got, want
    assert len(got_ll) == len(want_ll) and len(got_roll) == len(want_roll)
    for (g, g_greedy), (w, w_greedy) in zip(got_ll, want_ll):
        assert math.isclose(g, w, rel_tol=REL_TOL, abs_tol=ABS_TOL), (g, w)
        assert g_greedy == w_greedy
    for g, w in zip(got_roll, want_roll):
        assert math.isclose(g, w, rel_tol=REL_TOL, abs_tol=ABS_TOL), (g, w)
    assert got_gen == want_gen


# ------------------------------------------------------------------------------------- SmolLM2 + tokenizer
@pytest.fixture(scope="module")
def smol_scores():
    """(hybrid's results, plain transformers' results, hybrid model) for the SmolLM2 requests."""
    tokenizer, ref, hybrid = load_smollm2_pair(max_batch_size=4)
    # max_length 64 (within max_context 256) splits the long rolling text into several windows
    options = dict(batch_size=4, max_length=64)
    want = run_all(wrap(ref, tokenizer, **options), SMOL_LOGLIKELIHOOD, SMOL_ROLLING, SMOL_GENERATE)
    got = run_all(wrap(hybrid, tokenizer, **options), SMOL_LOGLIKELIHOOD, SMOL_ROLLING, SMOL_GENERATE)
    yield got, want, hybrid
    hybrid.hybrid.close()


@needs_smollm2
def test_smollm2_scores_match_transformers(smol_scores):
    got, want, hybrid = smol_scores
    assert_same_scores(got, want)
    stats = hybrid.hybrid.executor.stats
    assert stats.gpu_units and stats.cpu_units + stats.streamed_units  # the slices ran in several homes


@needs_smollm2
def test_smollm2_scores_are_meaningful(smol_scores):
    """The comparison is of real answers, not of two equally broken ones."""
    (loglikelihood, rolling, generated), _, _ = smol_scores
    (paris, paris_greedy), (london, _) = loglikelihood[:2]
    assert paris_greedy and paris > london
    assert all(score < 0 for score in rolling)
    assert "Paris" in generated[0] and "\n" not in generated[0]  # the stop sequence is cut off
    assert generated[1].strip().startswith("4") and "." not in generated[1]


# ----------------------------------------------------------------------------------------- tiny Mixtral
TINY_LOGLIKELIHOOD = [("abc", "def"), ("Hello, ", "world!"), ("", "xyz"), ("0123456789", " 0123456789")]
TINY_ROLLING = ["The quick brown fox jumps over the lazy dog. " * 2]  # 90 characters: 3 windows of 32
TINY_GENERATE = [
    ("Once upon", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
    ("A", {"until": ["z"], "max_gen_toks": 6, "do_sample": False}),
]


def test_tiny_mixtral_scores_match_transformers(tiny_checkpoints):
    """Experts on the GPU, on the CPU and streamed, padded batches of different lengths."""
    directory = tiny_checkpoints["mixtral"]
    tokenizer = char_tokenizer()
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = load_every_lane(directory, max_batch_size=2)
    try:
        options = dict(batch_size=2, max_length=32)
        want = run_all(wrap(ref, tokenizer, **options), TINY_LOGLIKELIHOOD, TINY_ROLLING, TINY_GENERATE)
        got = run_all(wrap(hybrid, tokenizer, **options), TINY_LOGLIKELIHOOD, TINY_ROLLING, TINY_GENERATE)
        assert_same_scores(got, want)
        assert all(text for text in got[2])  # something was generated to compare
        stats = hybrid.hybrid.executor.stats
        assert stats.gpu_units and stats.cpu_units and stats.streamed_units
    finally:
        hybrid.hybrid.close()


def test_max_length_past_max_context_raises(tiny_checkpoints):
    """``max_length`` above the model's ``max_context``: a long request fails with a clear error."""
    hybrid = load_every_lane(tiny_checkpoints["mixtral"], max_context=16)
    try:
        lm = wrap(hybrid, char_tokenizer(), batch_size=1, max_length=64)
        with pytest.raises(ContextLengthError, match="max_context=16"):
            lm.loglikelihood(requests("loglikelihood", [("a" * 20, "b")]), disable_tqdm=True)
        # the model stays usable for requests that fit
        (score, _), *_ = lm.loglikelihood(requests("loglikelihood", [("a" * 8, "b")]), disable_tqdm=True)
        assert math.isfinite(score)
    finally:
        hybrid.hybrid.close()
