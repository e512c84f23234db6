"""Prompts longer than the plan's workspace: generate prefills them in chunks of ``prefill_chunk`` tokens."""

import pytest
import torch
from tiny_models import VOCAB, placement_for
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.memory import kv_cache_bytes, workspace_bytes


def load_pair(directory, family, **options):
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    settings = dict(
        device="cpu",
        dtype=torch.float32,
        gpu_memory="256MiB",
        placement=placement_for(family),
        max_context=64,
        prefill_chunk=8,
        progress=False,
    )
    settings.update(options)
    return ref, HybridModelForCausalLM.from_pretrained(directory, **settings)


def prompt(length=21, seed=0):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


class StepSizes:
    """Tokens of every executor layer step, and the model's forward calls, while installed."""

    def __init__(self, model):
        self.tokens: list[int] = []
        self.forwards = 0
        executor = model.hybrid.executor
        original = executor.run_group

        def run_group(group, hidden, *args, **kwargs):
            self.tokens.append(hidden.shape[0])
            return original(group, hidden, *args, **kwargs)

        executor.run_group = run_group
        self.handle = model.register_forward_pre_hook(lambda *_: self._count())

    def _count(self):
        self.forwards += 1


def generate(model, ids, **kwargs):
    return model.generate(
        ids,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("family", ["mixtral", "llama", "qwen2_moe"])
@pytest.mark.parametrize("graphs", [True, False])
def test_long_prompts_are_prefilled_in_chunks_and_match_transformers(tiny_checkpoints, family, graphs):
    ref, hybrid = load_pair(tiny_checkpoints[family], family, decode_graphs=graphs)
    assert hybrid.hybrid_plan.prefill_chunk == 8
    ids = prompt()
    want = generate(ref, ids)
    sizes = StepSizes(hybrid)
    got = generate(hybrid, ids)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert max(sizes.tokens) == 8  # no layer step saw more than one chunk
    assert sizes.forwards == 3 + 4  # 21 prompt tokens in chunks of 8, then 4 decode steps
    measured = hybrid.hybrid_plan.measured
    assert measured["prompt_tokens"] == 21 and measured["decode_steps"] == 4


def test_a_callers_chunk_size_wins_and_short_prompts_run_whole(tiny_checkpoints):
    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral")
    ids = prompt(seed=1)
    sizes = StepSizes(hybrid)
    out = hybrid.generate(ids, max_new_tokens=3, do_sample=False, prefill_chunk_size=5)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=3, do_sample=False))
    assert max(sizes.tokens) == 5
    sizes.tokens.clear()
    short = prompt(length=8, seed=2)
    out = hybrid.generate(short, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref.generate(short, max_new_tokens=3, do_sample=False))
    assert sizes.tokens[0] == 8


def test_the_plan_sizes_the_workspace_for_one_chunk_and_prices_context(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    settings = dict(device="cpu", gpu_memory="256MiB", max_context=64, max_batch_size=2, progress=False)
    small = HybridModelForCausalLM.plan(directory, prefill_chunk=4, **settings)
    default = HybridModelForCausalLM.plan(directory, **settings)
    assert (
        small.prefill_chunk == 4 and default.prefill_chunk == 64
    )  # the workload's prompt, capped by context
    assert small.workspace_bytes < default.workspace_bytes
    config = AutoModelForCausalLM.from_pretrained(directory).config
    assert small.kv_cache_bytes_per_1k == kv_cache_bytes(config, 1024, 2, 4)
    assert small.to_dict()["budget"]["kv_cache_per_1k_context"] == small.kv_cache_bytes_per_1k
    text = str(small)
    assert "each 1k positions of max_context cost" in text and "chunks of that size" in text
    assert workspace_bytes(config, small.units, 64, 2, 4) == small.workspace_bytes
    # prefill steps that divide experts hold each token's routed rows again (top-2: two more rows a token)
    halves = HybridModelForCausalLM.plan(directory, prefill_chunk=4, prefill_splits=True, **settings)
    assert halves.prefill_splits and halves.workspace_bytes == workspace_bytes(
        config, small.units, 64, 2, 4, 2
    )
    assert halves.workspace_bytes - small.workspace_bytes == 2 * 4 * 2 * 10 * config.hidden_size
    with pytest.raises(ValueError, match="prefill_chunk"):
        HybridModelForCausalLM.plan(directory, prefill_chunk=0, **settings)


def test_the_copy_lane_starts_the_next_chunks_first_layer_during_a_chunks_last_layer(tiny_checkpoints):
    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", prefill_chunk=17)
    executor = hybrid.hybrid.executor
    ring, first, last = executor.expert_ring, min(executor.groups), max(executor.groups)
    ahead = []  # (layer, another chunk follows, tags staged by the step's prefetch)
    original = executor._prefetch_next

    def prefetch_next(group):
        before = set(ring.by_tag)
        original(group)
        ahead.append((group.layer, executor.prefill_follows, set(ring.by_tag) - before))

    executor._prefetch_next = prefetch_next
    ids = prompt(length=51)  # three chunks of 17 tokens, each a prefill-sized step
    got, want = generate(hybrid, ids), generate(ref, ids)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    at_last = [(follows, staged) for layer, follows, staged in ahead if layer == last]
    assert [follows for follows, _ in at_last] == [True, True, False]
    for follows, staged in at_last:
        # the first layer's stream-home units while a chunk follows; nothing past the prompt's last chunk
        assert (staged and {tag[0] for tag in staged} == {first}) if follows else not staged
    assert executor.prefill_follows is False  # not left set for the next call
