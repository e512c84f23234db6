"""transformers ``generate`` features through the hybrid path give the same tokens as plain transformers.

Tiny random checkpoints (forced to use the GPU, CPU and streaming homes at once, float32) cover the
logits processors and decoding strategies; the embedded SmolLM2-135M-Instruct, with its tokenizer, covers
what needs real text: stop strings, the chat template, streamers, ``pipeline`` and left-padded batches.
Every comparison is token for token against ``AutoModelForCausalLM.from_pretrained(dir)`` on the same files.
"""

from __future__ import annotations

import threading

import pytest
import torch
from smollm2_markers import load_smollm2_pair, needs_smollm2
from tiny_models import VOCAB, placement_for
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from hf_hybrid import ContextLengthError, HybridModelForCausalLM

TINY_FAMILIES = ["mixtral", "qwen2_moe", "llama"]  # routed experts, shared expert + dense layer, dense
SAMPLING = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8)


def _uses_every_home(model, lanes=True) -> None:
    assert set(model.hybrid_plan.homes.values()) == {"gpu", "cpu", "stream"}
    stats = model.hybrid.executor.stats
    assert stats.gpu_units > 0 and stats.cpu_units + stats.streamed_units > 0, stats
    if lanes:
        assert stats.cpu_units > 0 and stats.streamed_units > 0, stats


def _prompt(batch=2, length=12, seed=0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _both(ref, hybrid, seed=None, **kwargs):
    """``generate`` on the reference then the hybrid model, each after ``torch.manual_seed(seed)``."""
    outs = []
    for model in (ref, hybrid):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(**kwargs))
    return outs


# ----------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request, tiny_checkpoints):
    family = request.param
    directory = tiny_checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory,
        device="cpu",
        dtype=torch.float32,
        gpu_memory="256MiB",
        placement=placement_for(family),
        max_context=64,
        max_batch_size=2,
        token_assignment="static",  # every lane runs (adaptive may stream a CPU-home unit instead)
        progress=False,
    )
    yield ref, hybrid
    hybrid.hybrid.close()


def test_greedy(tiny):
    ref, hybrid = tiny
    want, got = _both(ref, hybrid, input_ids=_prompt(), max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    _uses_every_home(hybrid)


def test_plan_shows_what_the_last_generate_measured(tiny):
    _, hybrid = tiny
    ids = _prompt()
    hybrid.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    m = hybrid.hybrid_plan.measured
    assert (m["batch"], m["prompt_tokens"], m["decode_steps"]) == (ids.shape[0], ids.shape[1], 5)
    assert m["prefill_tok_s"] > 0 and m["decode_tok_s"] > 0
    assert "measured by the last generate" in str(hybrid.hybrid_plan)
    assert hybrid.hybrid_plan.to_dict()["measured"] == m


def test_sampling_with_fixed_seed(tiny):
    ref, hybrid = tiny
    ids = _prompt(seed=1)
    greedy = ref.generate(ids, max_new_tokens=12, do_sample=False)
    sampled_differently = False
    for seed in (0, 1):
        want, got = _both(ref, hybrid, seed=seed, input_ids=ids, max_new_tokens=12, **SAMPLING)
        assert torch.equal(got, want), seed
        sampled_differently |= not torch.equal(want, greedy)
    assert sampled_differently, "sampling gave the greedy tokens: the test would not see a seed mismatch"


@pytest.mark.parametrize(
    "options",
    [
        dict(repetition_penalty=1.5),
        dict(no_repeat_ngram_size=2),
        dict(min_new_tokens=6, eos_token_id=[5, 6, 7]),
        dict(bad_words_ids=[[9], [10, 11]]),
        dict(sequence_bias={(5,): 10.0}),
        dict(cache_implementation="static"),
        dict(prompt_lookup_num_tokens=3),
    ],
    ids=[
        "repetition_penalty",
        "no_repeat_ngram",
        "min_new_tokens",
        "bad_words",
        "sequence_bias",
        "static_cache",
        "prompt_lookup",
    ],
)
def test_generation_options(tiny, options):
    ref, hybrid = tiny
    batch = 1 if "prompt_lookup_num_tokens" in options else 2  # assisted decoding takes one sequence
    ids = _prompt(batch=batch, seed=2)
    want, got = _both(ref, hybrid, input_ids=ids, max_new_tokens=10, do_sample=False, **options)
    assert torch.equal(got, want)


def test_beam_search(tiny):
    ref, hybrid = tiny  # one prompt x 2 beams: the KV cache holds max_batch_size=2 sequences
    want, got = _both(ref, hybrid, input_ids=_prompt(batch=1, seed=3), max_new_tokens=8, num_beams=2)
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_default_length(tiny):
    """Neither max_new_tokens nor max_length: transformers' default length, within max_context."""
    ref, hybrid = tiny
    want, got = _both(ref, hybrid, input_ids=_prompt(batch=1, seed=5))
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_default_length_counts_20_new_tokens(tiny):
    _, hybrid = tiny  # 50 prompt + 20 default new tokens = 70 positions > max_context=64
    with pytest.raises(ContextLengthError, match="max_context"):
        hybrid.generate(_prompt(batch=1, length=50))


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)])
def test_expanded_batch_counts_against_max_batch_size(tiny, options):
    """Beams and returned sequences each hold KV cache rows: they count against max_batch_size."""
    _, hybrid = tiny  # 2 prompts x 2 = 4 sequences > max_batch_size=2
    with pytest.raises(ContextLengthError, match="max_batch_size"):
        hybrid.generate(_prompt(), max_new_tokens=2, **options)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_continue_from_returned_cache(tiny):
    """A second turn reuses the first call's KV cache (as a chat loop does)."""
    ref, hybrid = tiny
    ids = _prompt(batch=1, seed=6)
    outs = []
    for model in (ref, hybrid):
        first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        turn = torch.cat([first.sequences, torch.tensor([[7, 8]])], dim=1)
        outs.append(model.generate(turn, past_key_values=cache, max_new_tokens=4, do_sample=False))
    assert torch.equal(outs[1], outs[0])


def test_scores_and_attention_mask(tiny):
    ref, hybrid = tiny
    ids = _prompt(seed=4)
    mask = torch.ones_like(ids)
    ids[0, :3] = 0  # left padding (pad_token_id=0) on the first row
    mask[0, :3] = 0
    want, got = _both(
        ref,
        hybrid,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- SmolLM2 + tokenizer
@pytest.fixture(scope="module")
def smol():
    """(tokenizer, plain transformers model, hybrid model) of the embedded SmolLM2, loaded once."""
    tokenizer, ref, hybrid = load_smollm2_pair(max_batch_size=2)
    yield tokenizer, ref, hybrid
    hybrid.hybrid.close()


def _new(out, inputs) -> torch.Tensor:
    return out[0, inputs["input_ids"].shape[1] :]


@needs_smollm2
def test_smollm2_greedy_text(smol):
    tok, ref, hybrid = smol
    inputs = tok("The capital of France is", return_tensors="pt")
    want, got = _both(ref, hybrid, **inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert "Paris" in tok.decode(_new(got, inputs))
    _uses_every_home(hybrid, lanes=False)  # the default adaptive assignment picks CPU or stream per step


@needs_smollm2
def test_stop_strings(smol):
    tok, ref, hybrid = smol
    inputs = tok("The capital of France is", return_tensors="pt")
    want, got = _both(
        ref, hybrid, **inputs, max_new_tokens=24, do_sample=False, stop_strings=["."], tokenizer=tok
    )
    assert torch.equal(got, want)
    assert len(_new(got, inputs)) < 24
    assert tok.decode(_new(got, inputs)).rstrip().endswith(".")


@needs_smollm2
def test_chat_template(smol):
    tok, ref, hybrid = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    want, got = _both(ref, hybrid, **inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    assert "Paris" in tok.decode(_new(got, inputs), skip_special_tokens=True)


@needs_smollm2
def test_sampling_with_fixed_seed_on_text(smol):
    tok, ref, hybrid = smol
    inputs = tok("Once upon a time", return_tensors="pt")
    want, got = _both(ref, hybrid, seed=0, **inputs, max_new_tokens=8, **SAMPLING, repetition_penalty=1.2)
    assert torch.equal(got, want)


@needs_smollm2
def test_text_streamer(smol, capsys):
    tok, ref, hybrid = smol
    inputs = tok("The capital of France is", return_tensors="pt")
    printed = []
    outs = []
    for model in (ref, hybrid):
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        outs.append(model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer))
        printed.append(capsys.readouterr().out)
    assert torch.equal(outs[1], outs[0])
    assert printed[1] == printed[0]
    assert printed[1].rstrip("\n") == tok.decode(_new(outs[0], inputs), skip_special_tokens=True)


@needs_smollm2
def test_text_iterator_streamer(smol):
    tok, ref, hybrid = smol
    inputs = tok("The capital of France is", return_tensors="pt")
    want = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}

    def run():
        result["out"] = hybrid.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join(timeout=60)
    assert len(pieces) > 1  # streamed, not handed over at the end
    assert torch.equal(result["out"], want)
    assert "".join(pieces) == tok.decode(_new(want, inputs), skip_special_tokens=True)


@needs_smollm2
def test_pipeline(smol):
    tok, ref, hybrid = smol
    hybrid_pipe = pipeline("text-generation", model=hybrid, tokenizer=tok)
    ref_pipe = pipeline("text-generation", model=ref, tokenizer=tok)
    options = dict(max_new_tokens=8, do_sample=False)
    got = hybrid_pipe("The capital of France is", **options)
    assert got == ref_pipe("The capital of France is", **options)
    assert "Paris" in got[0]["generated_text"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    got = hybrid_pipe(chat, **options)
    assert got == ref_pipe(chat, **options)
    assert got[0]["generated_text"][-1]["role"] == "assistant"


@needs_smollm2
def test_left_padded_batch(smol):
    _, ref, hybrid = smol
    tok = AutoTokenizer.from_pretrained(hybrid.hybrid.source)  # its own copy: padding side changes
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = ["The capital of France is", "Here is a short list of three colours: red,"]
    inputs = tok(prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # really padded
    options = dict(max_new_tokens=8, pad_token_id=tok.pad_token_id)
    want, got = _both(ref, hybrid, **inputs, do_sample=False, **options)
    assert torch.equal(got, want)
    # each row as in a batch of one: padding changes nothing the model sees
    single = tok(prompts[0], return_tensors="pt")
    alone = ref.generate(**single, do_sample=False, **options)
    assert torch.equal(got[0, -8:], alone[0, -8:])
    want, got = _both(ref, hybrid, seed=3, **inputs, **SAMPLING, **options)
    assert torch.equal(got, want)
    with pytest.raises(ContextLengthError, match="max_batch_size"):
        hybrid.generate(**tok(prompts + prompts[:1], return_tensors="pt", padding=True), **options)
