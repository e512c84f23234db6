"""The decode-graph path (static KV cache, decoder layers split into attention half + MLP) on the CPU
standing in for the accelerator: the same split forward and cache handling as on CUDA, without capture."""

import pytest
import torch
from tiny_models import CONFIGS, VOCAB, placement_for
from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, StaticCache

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.decode_graphs import cache_argument

FAMILIES = sorted(CONFIGS)


def load_pair(directory, family, **options):
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    settings = dict(
        device="cpu",
        dtype=torch.float32,
        gpu_memory="256MiB",
        placement=placement_for(family),
        max_context=64,
        max_batch_size=2,
        decode_graphs=True,
        progress=False,
    )
    settings.update(options)
    return ref, HybridModelForCausalLM.from_pretrained(directory, **settings)


def prompt(batch=1, length=6, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, new_tokens=6, **kwargs):
    return model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def static_reference(ref, ids, new_tokens=6):
    """Plain transformers on a static cache, run eagerly: on CUDA, transformers compiles a static-cache
    generate by default, and compiled kernels need not give eager PyTorch's bits (whether it compiled used
    to depend on how many compiles earlier tests in the process had made)."""
    cache = StaticCache(config=ref.config, max_cache_len=64)
    return generate(ref, ids, new_tokens, disable_compile=True, **{cache_argument(type(ref)): cache})


def assert_same(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_decode_steps_match_transformers_with_a_static_cache(tiny_checkpoints, family):
    ref, hybrid = load_pair(tiny_checkpoints[family], family)
    graphs = hybrid.hybrid.decode_graphs
    ids = prompt()
    want = static_reference(ref, ids)
    first = generate(hybrid, ids)
    cache = graphs.cache
    assert_same(first, want)
    # one split step per decode step for every layer whose attention stays on the device (the forced
    # placements stream some attention blocks: those layers run the stock forward)
    assert graphs.graphable
    decode_steps = first.sequences.shape[1] - ids.shape[1] - 1
    assert graphs.steps == len(graphs.graphable) * decode_steps
    # the router of every such MoE layer ran with the attention half, and its block used that routing
    fused = graphs.routers.keys() & graphs.graphable
    # (a decode lookahead calls layer 0's router once more for each step it starts ahead)
    ahead = graphs.lookahead.starts if 0 in fused else 0
    assert graphs.router_hits == len(fused) * decode_steps + ahead
    assert bool(fused) == any(hybrid.hybrid.executor.groups[i].routed for i in graphs.graphable)
    second = generate(hybrid, ids)  # the same cache, reset, serves the next call
    assert graphs.cache is cache
    assert_same(second, want)
    # and transformers' own dynamic cache gives the same text
    dynamic = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(first.sequences, dynamic)


def test_a_new_batch_size_gets_a_new_cache(tiny_checkpoints):
    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral")
    graphs = hybrid.hybrid.decode_graphs
    generate(hybrid, prompt())
    single = graphs.cache
    ids = prompt(batch=2, seed=3)
    assert_same(generate(hybrid, ids), static_reference(ref, ids))
    assert graphs.cache is not single and graphs.batch == 2


def test_beams_and_callers_caches_take_the_stock_path(tiny_checkpoints):
    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral")
    graphs = hybrid.hybrid.decode_graphs
    ids = prompt()
    generate(hybrid, ids)
    steps = graphs.steps
    assert graphs.cache is not None
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=2)
    assert torch.equal(hybrid.generate(ids, **beams), ref.generate(ids, **beams))
    # a call with a KV cache of its own first frees the kept one: the reserved memory is never held twice
    assert graphs.cache is None and graphs.steps == steps
    name = cache_argument(type(ref))
    out = hybrid.generate(
        ids, max_new_tokens=5, do_sample=False, **{name: DynamicCache(config=hybrid.config)}
    )
    assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert graphs.steps == steps
    # use_cache=False and an explicit cache_implementation are the caller's choice too
    out = hybrid.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False))
    assert graphs.steps == steps


def test_calls_inside_and_outside_inference_mode_alternate(tiny_checkpoints):
    # a cache made under torch.inference_mode cannot be reset outside it: the next call gets a fresh one
    ref, hybrid = load_pair(tiny_checkpoints["olmoe"], "olmoe")
    ids = prompt(seed=1)
    want = static_reference(ref, ids)
    with torch.inference_mode():
        assert_same(generate(hybrid, ids), want)
        assert_same(generate(hybrid, ids), want)
    assert_same(generate(hybrid, ids), want)
    with torch.inference_mode():
        assert_same(generate(hybrid, ids), want)


class _FailOnStep(LogitsProcessor):
    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError("stopped by the test")
        return scores


def test_an_interrupted_call_leaves_the_cache_usable(tiny_checkpoints):
    from transformers import LogitsProcessorList

    ref, hybrid = load_pair(tiny_checkpoints["qwen3_moe"], "qwen3_moe")
    ids = prompt(seed=2)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        generate(hybrid, ids, logits_processor=LogitsProcessorList([_FailOnStep(3)]))
    assert_same(generate(hybrid, ids), static_reference(ref, ids))


def test_decode_graphs_option(tiny_checkpoints):
    directory = tiny_checkpoints["llama"]
    with pytest.raises(ValueError, match="decode_graphs"):
        HybridModelForCausalLM.from_pretrained(directory, device="cpu", decode_graphs="yes")
    # "auto" turns them on for CUDA only; False keeps transformers' dynamic cache
    for choice in ("auto", False):
        model = HybridModelForCausalLM.from_pretrained(
            directory, device="cpu", gpu_memory="256MiB", decode_graphs=choice, progress=False
        )
        assert model.hybrid.decode_graphs is None


def test_unfused_routers_give_the_same_tokens(tiny_checkpoints):
    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral")
    graphs = hybrid.hybrid.decode_graphs
    ids = prompt(seed=5)
    want = static_reference(ref, ids)
    assert_same(generate(hybrid, ids), want)
    assert graphs.router_hits > 0
    graphs.fuse_routers = False
    hits = graphs.router_hits
    assert_same(generate(hybrid, ids), want)
    assert graphs.router_hits == hits


def test_router_logits_are_still_recorded(tiny_checkpoints):
    # the router module is still called in a split step, so transformers' output recording sees it
    ref, hybrid = load_pair(tiny_checkpoints["olmoe"], "olmoe")
    ids = prompt(seed=6)
    graphs = hybrid.hybrid.decode_graphs
    cache = graphs.cache_for(1)
    name = cache_argument(type(ref))
    ref_cache = StaticCache(config=ref.config, max_cache_len=64)
    with torch.no_grad():
        hybrid(ids, **{name: cache}, use_cache=True)
        ref(ids, **{name: ref_cache}, use_cache=True)
        step = ids[:, -1:]
        got = hybrid(step, **{name: cache}, output_router_logits=True)
        want = ref(step, **{name: ref_cache}, output_router_logits=True)
    assert graphs.router_hits > 0
    assert len(got.router_logits) == len(want.router_logits)
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Delta(torch.nn.Module):
    """A LoRA-like wrapper: the base projection plus a small delta, which can be switched off."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.delta = torch.nn.Linear(base.in_features, base.out_features, bias=False)
        torch.nn.init.normal_(self.delta.weight, std=0.05, generator=torch.Generator().manual_seed(0))
        self._disable_adapters = False

    def forward(self, x):
        out = self.base(x)
        return out if self._disable_adapters else out + self.delta(x)


def test_graphs_follow_changed_modules(tiny_checkpoints):
    # a graph replays what it recorded: replacing a weight, wrapping a projection (as peft's LoRA does) or
    # switching an adapter off must drop the graphs, or decode would silently compute the old model
    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral")
    graphs = hybrid.hybrid.decode_graphs
    ids = prompt(seed=7)
    generate(hybrid, ids)
    cache = graphs.cache
    generate(hybrid, ids)
    assert graphs.cache is cache  # nothing changed: the cache and graphs are kept
    for model in (ref, hybrid):
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.weight = torch.nn.Parameter(q_proj.weight * 0.5, requires_grad=False)
    assert_same(generate(hybrid, ids), static_reference(ref, ids))
    assert graphs.cache is not cache
    for model in (ref, hybrid):
        attention = model.model.layers[0].self_attn
        attention.v_proj = _Delta(attention.v_proj)
    cache = graphs.cache
    assert_same(generate(hybrid, ids), static_reference(ref, ids))
    assert graphs.cache is not cache
    for model in (ref, hybrid):
        model.model.layers[0].self_attn.v_proj._disable_adapters = True
    cache = graphs.cache
    assert_same(generate(hybrid, ids), static_reference(ref, ids))
    assert graphs.cache is not cache


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_masks_are_updated_and_equal_what_transformers_builds(tiny_checkpoints, family, monkeypatch):
    """Each decode step's attention mask is the last one with the new position made visible: the same as
    transformers' own mask of that step (compared at every step here, padding included)."""
    from hf_hybrid.decode_masks import DecodeMasks

    compared = []
    update = DecodeMasks.next

    def checked(self, build, kwargs):
        got = update(self, build, kwargs)
        want = build(**kwargs)
        got, want = (got, want) if isinstance(want, dict) else ({None: got}, {None: want})
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        compared.append(len(want))
        return got[None] if None in got else got

    monkeypatch.setattr(DecodeMasks, "next", checked)
    ref, hybrid = load_pair(tiny_checkpoints[family], family)
    ids = prompt(batch=2, length=7, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    got = generate(hybrid, ids, new_tokens=8, attention_mask=mask)
    cache = StaticCache(config=ref.config, max_cache_len=64)
    want = generate(ref, ids, 8, attention_mask=mask, **{cache_argument(type(ref)): cache})
    assert_same(got, want)
    masks = hybrid.hybrid.decode_graphs.masks
    assert len(compared) == 8 and masks.enabled and masks.updates == 6  # prefill and first step: built


def test_decode_masks_of_a_sliding_window_model_stay_transformers_own(tmp_path):
    """A sliding window hides old positions as well as showing the new one: such masks are not updated."""
    from tiny_models import CONFIGS

    config = CONFIGS["mistral"]()
    config.sliding_window = 4
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    ref, hybrid = load_pair(tmp_path, "mistral")
    ids = prompt(length=6)
    cache = StaticCache(config=ref.config, max_cache_len=64)
    want = generate(ref, ids, 8, **{cache_argument(type(ref)): cache})
    assert_same(generate(hybrid, ids, new_tokens=8), want)
    masks = hybrid.hybrid.decode_graphs.masks
    assert not masks.enabled and masks.updates == 0


def test_a_decode_mask_that_differs_from_transformers_turns_the_updates_off():
    """The first update of a call is checked against transformers' mask: a model whose masks follow
    another rule keeps transformers' masks from then on."""
    from hf_hybrid.decode_masks import DecodeMasks

    def build(attention_mask, inputs_embeds, **_):
        columns = torch.arange(8)
        visible = columns < attention_mask.shape[1]
        if attention_mask.shape[1] > 3:
            visible &= columns > 0  # another rule from the third column on: the first position is hidden
        return visible.expand(1, 1, 1, 8).clone()

    masks = DecodeMasks()
    embeds = torch.empty(1, 1, 0)
    for length, updated in ((3, False), (4, False), (5, False)):
        kwargs = {"attention_mask": torch.ones(1, length, dtype=torch.long), "inputs_embeds": embeds}
        assert torch.equal(masks.next(build, kwargs), build(**kwargs))
        assert (masks.updates > 0) == updated
    assert not masks.enabled
