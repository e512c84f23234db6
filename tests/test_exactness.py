"""Every family, forced to use all three homes, matches plain transformers loading the same files."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, VOCAB, placement_for
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridModelForCausalLM

FAMILIES = sorted(CONFIGS)
#: bf16 logits where partial results from several homes are summed (in fp32, rounded once): measured 0-1 ulp
#: for the dense families (slices on three homes), up to 2 where MoE experts are divided between the lanes
#: (the expert's parts add in fp32, where transformers rounds the whole expert's output to bf16)
BF16_ULPS = 2.0


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between a and b in bf16 units of last place at the scale of each row of logits.

    (Per element, a logit near zero has a tiny ulp that rounding upstream of it says nothing about.)
    """
    mag = torch.maximum(a.abs(), b.abs()).amax(dim=-1, keepdim=True).clamp_min(2.0**-20)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    return ((a - b).abs() / ulp).max().item()


def load_pair(directory, family, dtype, device="cpu", **options):
    """Plain transformers and hf_hybrid (forced to use every home) on the same files, both on ``device``."""
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory,
        device=device,
        dtype=dtype,
        gpu_memory="256MiB",
        placement=placement_for(family),
        max_context=64,
        max_batch_size=2,
        progress=False,
        **options,
    )
    return ref, hybrid


def prompt(batch=2, length=16, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_tokens_and_logits_match(tiny_checkpoints, family):
    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.float32, token_assignment="static")
    assert isinstance(hybrid, type(ref).__mro__[0].__mro__[0]) or isinstance(hybrid, type(ref))
    homes = {h for h in hybrid.hybrid_plan.homes.values()}
    assert homes == {"gpu", "cpu", "stream"}
    ids = prompt()
    with torch.no_grad():
        expected = ref(ids).logits
        got = hybrid(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=5e-6)
    stats = hybrid.hybrid.executor.stats
    assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0, stats
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    out = hybrid.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_within_a_few_ulps(tiny_checkpoints, family):
    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.bfloat16, token_assignment="static")
    ids = prompt()
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = hybrid(ids).logits.float()
    assert hybrid.dtype == torch.bfloat16
    assert bf16_ulps(got, expected) <= BF16_ULPS
    stats = hybrid.hybrid.executor.stats
    assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0, stats


@pytest.mark.parametrize("mode", ["adaptive", "whole", "cpu", "stream"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama"])
def test_token_assignment_modes_are_exact(tiny_checkpoints, family, mode, divide_tiny_experts):
    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.float32, token_assignment=mode)
    ids = prompt(seed=1)
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    out = hybrid.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, want)
    stats = hybrid.hybrid.executor.stats
    if mode == "cpu":
        assert stats.streamed_units == 0 and stats.cpu_units > 0
    if mode == "stream":
        assert stats.cpu_units == 0 and stats.streamed_units > 0
    # every tiny expert may be divided (the fixture): "adaptive" divides in decode steps, "whole" never does
    assert (stats.split_units > 0) == (mode == "adaptive"), stats


def test_planner_placement_under_small_budget_is_exact(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.float32, gpu_memory="16.9MiB", max_context=64, progress=False
    )
    plan = hybrid.hybrid_plan
    assert plan.device_bytes <= plan.budget_bytes
    assert len(plan.units_in("gpu")) > 0 and len(plan.units_in("cpu")) + len(plan.units_in("stream")) > 0
    ids = prompt(batch=1)
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=8, do_sample=False),
        ref.generate(ids, max_new_tokens=8, do_sample=False),
    )


def test_hybrid_model_is_the_transformers_class(tiny_checkpoints):
    from transformers import MixtralForCausalLM, pipeline

    _, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32)
    assert isinstance(hybrid, MixtralForCausalLM)
    assert type(hybrid).__name__ == "MixtralForCausalLM"
    assert hybrid.config.model_type == "mixtral"
    assert hybrid.device.type == "cpu"
    units = hybrid.hybrid_plan.to_dict()["units"]
    assert {u["home"] for u in units} == {"gpu", "cpu", "stream"}
    assert all({"name", "home", "bytes"} <= set(u) for u in units)
    assert "experts" in str(hybrid.hybrid_plan)
    del pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_divided_units_bfloat16_within_a_few_ulps(tiny_checkpoints, family, divide_tiny_experts):
    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.bfloat16, token_assignment="adaptive")
    ids = prompt(seed=2)
    # decode-sized steps are the ones split between lanes: compare one step after a short prefix
    with torch.no_grad():
        expected = ref(ids[:, :3]).logits.float()
        got = hybrid(ids[:, :3]).logits.float()
    assert bf16_ulps(got, expected) <= BF16_ULPS
    assert hybrid.hybrid.executor.stats.split_units > 0


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_splits_are_exact(tiny_checkpoints, family, dtype, backend, divide_tiny_experts):
    # prefill-sized steps (more than 16 tokens per unit: a 48-token prompt, two sequences) divide every host
    # unit between the CPU lane and the copy lane; an expert's two parts add in fp32 and are then rounded and
    # weighted as transformers does a whole expert's output (bf16: the same bits but for the order of the
    # down projection's sum; without that rounding a tiny Mixtral's logits were 96 ulps off here)
    from hf_hybrid.kernels import native

    if backend == "native" and not native.available():
        pytest.skip(f"native CPU kernel unavailable here: {native.unavailable_reason()}")
    ref, hybrid = load_pair(
        tiny_checkpoints[family],
        family,
        dtype,
        token_assignment="adaptive",
        prefill_splits=True,
        cpu_backend=backend,
    )

    def prefill_ran_on(stats) -> None:
        # the native lane takes prefill-sized jobs where it computes them on AMX tiles (bf16), torch ops else
        lane = hybrid.hybrid.executor.cpu_kernels.native_lane
        on_tiles = lane is not None and lane.amx and dtype == torch.bfloat16
        assert (stats.native_units > 0) == on_tiles, stats

    assert_prefill_splits_exact(ref, hybrid, prompt(length=48, seed=3), dtype, (1e-6, 5e-6), prefill_ran_on)


def assert_prefill_splits_exact(
    ref, hybrid, ids, dtype, tolerance: tuple[float, float], check_stats=None
) -> None:
    """A prompt long enough for prefill-sized steps: fp32 logits within ``tolerance`` (rtol, atol) and the
    same greedy tokens, bf16 logits within BF16_ULPS; some units were divided. ``check_stats`` sees the
    executor's counters of the prefill forward alone."""
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = hybrid(ids).logits.float()
    assert hybrid.hybrid.executor.stats.split_units > 0
    if check_stats is not None:
        check_stats(hybrid.hybrid.executor.stats)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=tolerance[0], atol=tolerance[1])
        assert torch.equal(
            hybrid.generate(ids, max_new_tokens=4, do_sample=False),
            ref.generate(ids, max_new_tokens=4, do_sample=False),
        )
    else:
        assert bf16_ulps(got, expected) <= BF16_ULPS


@pytest.mark.parametrize("family", ["mixtral", "phimoe", "qwen2_moe"])
def test_divided_experts_of_multi_token_steps_round_as_whole_experts(
    tiny_checkpoints, family, divide_tiny_experts
):
    # decode-sized steps of several tokens (short prompts, batched decode) divide their host experts; each
    # expert's two parts are summed, then rounded and weighted as transformers does a whole expert's output.
    # Weighting each part on its own instead leaves a difference in an expert's output that a near-tied
    # routing choice of the next layer can turn into another expert: on a tiny Mixtral one 8-token prompt
    # of eight drew 61 ulps that way
    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.bfloat16, token_assignment="adaptive")
    executor = hybrid.hybrid.executor

    def worst(seeds) -> float:
        ulps = []
        for seed in seeds:
            ids = prompt(batch=1, length=8, seed=seed)
            with torch.no_grad():
                ulps.append(bf16_ulps(hybrid(ids).logits.float(), ref(ids).logits.float()))
        return max(ulps)

    combined = worst(range(8))
    assert combined <= 1.0 and executor.stats.split_units > 0
    executor.combine_divided = False
    assert worst(range(8)) >= combined  # each part weighted on its own: never closer


def test_greedy_bfloat16_generations_with_divided_experts_are_transformers(
    tiny_checkpoints, divide_tiny_experts
):
    # every decode step divides its host experts; each expert's two parts are summed before its output is
    # rounded and weighted, so 24 greedy bf16 tokens are transformers' own. Weighting each part on its own
    # (separate_parts) left 2 of these 6 prompts on other tokens after 8 new ones
    ref, hybrid = load_pair(
        tiny_checkpoints["mixtral"], "mixtral", torch.bfloat16, token_assignment="adaptive"
    )
    executor = hybrid.hybrid.executor

    def same(seed: int) -> bool:
        ids = prompt(batch=1, length=6, seed=seed)
        want = ref.generate(ids, max_new_tokens=24, do_sample=False)
        return torch.equal(hybrid.generate(ids, max_new_tokens=24, do_sample=False), want)

    assert all(same(seed) for seed in range(6))
    assert executor.stats.split_units > 0
    executor.combine_divided = False
    assert not all(same(seed) for seed in range(6))  # the test can tell the two apart


@pytest.mark.parametrize("family", ["mixtral", "llama"])
def test_embeddings_on_cpu_and_streamed_lm_head_are_exact(tiny_checkpoints, family):
    directory = tiny_checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    placement = dict(placement_for(family), embed_tokens="cpu", lm_head="stream")
    placement["layers.*.attention"] = "stream"
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory,
        device="cpu",
        dtype=torch.float32,
        gpu_memory="256MiB",
        placement=placement,
        max_context=64,
        max_batch_size=2,
        progress=False,
        token_assignment="static",
    )
    homes = hybrid.hybrid_plan.homes
    assert homes["embed_tokens"] == "cpu" and homes["lm_head"] == "stream"
    assert hybrid.hybrid.loaded.cpu_embedding
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, ref(ids).logits, rtol=1e-6, atol=5e-6)
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=6, do_sample=False),
        ref.generate(ids, max_new_tokens=6, do_sample=False),
    )


def assert_matches_transformers(ref, hybrid, ids, dtype, new_tokens):
    """fp32: logits within 1e-5 and the same greedy tokens; bf16: logits within BF16_ULPS ulps."""
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = hybrid(ids).logits.float()
    if dtype == torch.float32:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()
        want = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(hybrid.generate(ids, max_new_tokens=new_tokens, do_sample=False), want)
    else:
        assert bf16_ulps(got, expected) <= BF16_ULPS


@pytest.mark.parametrize("assignment", ["static", "adaptive"])
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_lane_backends_are_exact(tiny_checkpoints, family, dtype, backend, assignment, request):
    # the CPU lane's two implementations (the native kernel and torch ops) each against plain transformers:
    # "static" computes whole host units on the CPU; "adaptive" divides each host unit between the lanes (the CPU
    # computes gate/up rows and down columns [0, r), the copy lane brings the rest to the device, down columns
    # as a 2-D block) and adds the two fp32 parts
    from hf_hybrid.kernels import native

    if backend == "native" and not native.available():
        pytest.skip(f"native CPU kernel unavailable here: {native.unavailable_reason()}")
    if assignment == "adaptive":
        request.getfixturevalue("divide_tiny_experts")
    ref, hybrid = load_pair(
        tiny_checkpoints[family], family, dtype, token_assignment=assignment, cpu_backend=backend
    )
    # 12 and 6 tokens: decode-sized jobs, so the native kernel takes them when asked
    ids = prompt(batch=1, length=12 if assignment == "static" else 6)
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = hybrid(ids).logits.float()
    if dtype == torch.float32:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()
        want = ref.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(hybrid.generate(ids, max_new_tokens=6, do_sample=False), want)
    else:
        assert bf16_ulps(got, expected) <= BF16_ULPS
    stats = hybrid.hybrid.executor.stats
    assert (stats.cpu_units if assignment == "static" else stats.split_units) > 0, stats
    # the backend asked for is the one that ran
    assert (stats.native_units > 0) == (backend == "native"), stats


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_every_unit_resident_is_bitwise_equal(tiny_checkpoints, family):
    # nothing split across homes: the same roundings as transformers, so the same bits (a dense MLP held
    # whole on the device runs in one piece, not as a sum of slices)
    directory = tiny_checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.bfloat16, max_context=64, max_batch_size=2, progress=False
    )
    assert set(hybrid.hybrid_plan.homes.values()) == {"gpu"}
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(hybrid(ids).logits, ref(ids).logits)


def test_a_merged_dense_mlp_splits_back_when_a_slice_leaves_the_device(tiny_checkpoints):
    directory = tiny_checkpoints["llama"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.float32, max_context=64, max_batch_size=2, progress=False
    )
    ids = prompt()
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(hybrid(ids).logits, want)
        rt = hybrid.hybrid
        layer, group = next(iter(rt.loaded.groups.items()))
        assert group.merged is not None
        rt.executor.rehome(group, 0, "cpu")  # one slice to the CPU lane: the MLP is a sum of homes again
        assert group.merged is None and group.homes[0] == "cpu"
        assert torch.allclose(hybrid(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_num_parameters_counts_the_weights_the_executor_holds(tiny_checkpoints, family):
    # the experts / MLP slices live outside the module tree (device, host memory, streamed): still counted
    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.float32)
    for exclude in (False, True):
        expected = ref.num_parameters(exclude_embeddings=exclude)
        assert hybrid.num_parameters(exclude_embeddings=exclude) == expected
