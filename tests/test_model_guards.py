"""What a placed model refuses: casts that would move weights out of their homes, and calls longer than the
``max_context`` its KV cache was reserved for. A refusal is clear, comes before any work, and leaves the
model exact.
"""

from __future__ import annotations

import stat

import pytest
import torch
from tiny_models import VOCAB, load_every_lane

from hf_hybrid import ContextLengthError

MAX_CONTEXT = 32
NEW_TOKENS = 6


def prompt(length: int = 8, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    m = load_every_lane(tiny_checkpoints["mixtral"], max_context=MAX_CONTEXT)
    yield m
    m.hybrid.close()


@pytest.fixture(scope="module")
def reference(model):
    """A prompt, its greedy tokens and its logits from the untouched model."""
    ids = prompt()
    with torch.no_grad():
        return ids, generate(model, ids), model(ids).logits


def assert_exact(model, reference) -> None:
    ids, tokens, logits = reference
    assert torch.equal(generate(model, ids), tokens)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


# ------------------------------------------------------------------------------------------- casts
CASTS = {
    "half": lambda m: m.half(),
    "float": lambda m: m.float(),
    "bfloat16": lambda m: m.bfloat16(),
    "double": lambda m: m.double(),
    "type": lambda m: m.type(torch.float16),
    "to": lambda m: m.to(torch.float16),
    "cuda": lambda m: m.cuda(),
    "cpu": lambda m: m.cpu(),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_casts_are_refused_and_the_model_stays_exact(model, reference, cast):
    params = {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"from_pretrained\(.*dtype=") as info:
        CASTS[cast](model)
    assert f".{cast}()" in str(info.value)
    assert {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()} == params
    assert_exact(model, reference)


# ------------------------------------------------------------------------------------------ length
def test_forward_longer_than_max_context_is_refused(model, reference):
    groups = model.hybrid.executor.stats.groups
    with pytest.raises(
        ContextLengthError, match=rf"needs {MAX_CONTEXT + 1} positions.*max_context={MAX_CONTEXT}"
    ):
        model(prompt(length=MAX_CONTEXT + 1))
    with pytest.raises(ContextLengthError, match=f"max_context={MAX_CONTEXT}"):
        model(input_ids=prompt(length=MAX_CONTEXT + 5), use_cache=False)
    embeds = model.get_input_embeddings()(prompt(length=MAX_CONTEXT + 1))
    with pytest.raises(ContextLengthError, match=f"max_context={MAX_CONTEXT}"):
        model(inputs_embeds=embeds)
    with pytest.raises(ContextLengthError, match="max_batch_size=1"):
        model(prompt(batch=2))
    assert model.hybrid.executor.stats.groups == groups, "work was done before the check"
    with torch.no_grad():
        model(prompt(length=MAX_CONTEXT))  # exactly max_context fits
    assert_exact(model, reference)


def test_forward_past_the_cache_is_refused(model, reference):
    with torch.no_grad():
        first = model(prompt(length=MAX_CONTEXT - 2), use_cache=True)
        cache = first.cache
        assert cache.get_seq_length() == MAX_CONTEXT - 2
        model(prompt(length=2, seed=1), cache=cache)  # fills the context exactly
        groups = model.hybrid.executor.stats.groups
        with pytest.raises(ContextLengthError, match=rf"needs {MAX_CONTEXT + 1} positions"):
            model(prompt(length=1, seed=2), cache=cache)
        with pytest.raises(ContextLengthError, match=rf"needs {MAX_CONTEXT + 1} positions"):
            model(prompt(length=1, seed=2), past_key_values=cache)  # the name before transformers 5
        with pytest.raises(ContextLengthError, match=rf"needs {MAX_CONTEXT + 3} positions"):
            model(prompt(length=3, seed=2), None, None, cache)  # the cache passed positionally
    assert model.hybrid.executor.stats.groups == groups
    assert_exact(model, reference)


def test_generate_from_embeddings_longer_than_max_context_is_refused(model, reference):
    embed = model.get_input_embeddings()
    with torch.no_grad():
        fits = embed(prompt(length=MAX_CONTEXT - NEW_TOKENS))
        too_long = embed(prompt(length=MAX_CONTEXT - NEW_TOKENS + 1))
    groups = model.hybrid.executor.stats.groups
    with pytest.raises(ContextLengthError, match=rf"needs {MAX_CONTEXT + 1} positions"):
        model.generate(inputs_embeds=too_long, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert model.hybrid.executor.stats.groups == groups
    out = model.generate(
        inputs_embeds=fits, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert out.shape[-1] == NEW_TOKENS
    assert_exact(model, reference)


# ------------------------------------------------------------------------------------------- trace
def test_trace_is_saved_privately_and_never_through_a_symlink(model, reference, tmp_path):
    ids = reference[0]
    saved = model.trace(tmp_path / "trace.json", ids, max_new_tokens=2)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temporary file left
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="symbolic link"):
        model.trace(link, ids, max_new_tokens=2)
    assert link.is_symlink() and target.read_text() == "not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "link.json", "trace.json"]
    assert_exact(model, reference)
