"""The hybrid path on a real CUDA device: streams, events, pinned memory. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from test_decode_graphs import _Delta, generate, static_reference
from test_exactness import BF16_ULPS, assert_prefill_splits_exact, bf16_ulps, load_pair, prompt
from tiny_models import CONFIGS, placement_for
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.decode_graphs import cache_argument

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pair(directory, family, dtype, mode="static"):
    return load_pair(directory, family, dtype, device="cuda", token_assignment=mode)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_float32_exact(tiny_checkpoints, family):
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.float32)
    ids = prompt().cuda()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, ref(ids).logits, rtol=1e-5, atol=2e-5)
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=10, do_sample=False),
        ref.generate(ids, max_new_tokens=10, do_sample=False),
    )
    stats = hybrid.hybrid.executor.stats
    assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0
    # weights that stay on the host are pinned, so copies are asynchronous DMA
    group = next(iter(hybrid.hybrid.loaded.groups.values()))
    assert all(region.is_pinned() for region in group.host_regions.values())
    if group.routed:  # decode steps time each streamed expert's issue, and its copy's within it
        assert stats.stream_issues > 0 and 0 < stats.stream_fetch_s <= stats.stream_issue_s


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_bfloat16_within_ulps(tiny_checkpoints, family):
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.bfloat16, mode="adaptive")
    ids = prompt().cuda()
    with torch.no_grad():
        assert bf16_ulps(hybrid(ids).logits.float(), ref(ids).logits.float()) <= BF16_ULPS


def test_cuda_trace_times_device_lanes(tiny_checkpoints, tmp_path):
    import json

    from hf_hybrid.trace import LANES

    _, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32)
    path = hybrid.trace(tmp_path / "trace.json", prompt(batch=1).cuda(), max_new_tokens=3)
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {LANES["CPU lane"], LANES["PCIe copy"], LANES["GPU"]} <= {e["tid"] for e in spans}
    assert all(e["dur"] >= 0 for e in spans)


def test_cuda_calibrate_moves_experts_and_stays_exact(tiny_checkpoints):
    directory = tiny_checkpoints["qwen3_moe"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to("cuda")
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cuda", dtype=torch.float32, gpu_memory="16.9MiB", max_context=64, progress=False
    )
    hybrid.calibrate([prompt(batch=1, length=48, seed=s)[0] for s in range(3)])
    for group in hybrid.hybrid.loaded.groups.values():
        for i, home in enumerate(group.homes):
            if home == "gpu":
                assert group.device_weights[i][0].is_cuda
            else:
                assert group.host_regions[i].is_pinned()
    ids = prompt(batch=1, seed=9).cuda()
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=8, do_sample=False),
        ref.generate(ids, max_new_tokens=8, do_sample=False),
    )


def test_cuda_cpu_lane_fault_leaves_model_usable(tiny_checkpoints):
    from hf_hybrid import ExecutionError

    ref, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32)
    ids = prompt(batch=1).cuda()
    want = ref.generate(ids, max_new_tokens=6, do_sample=False)

    def fail(lane):
        if lane == "cpu":
            raise RuntimeError("injected")

    hybrid.hybrid.executor.fault_injector = fail
    with pytest.raises(ExecutionError, match="CPU lane"):
        hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    hybrid.hybrid.executor.fault_injector = None
    assert torch.equal(hybrid.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_cuda_soak_memory_is_flat(tiny_checkpoints, capsys):
    """2,000 decode steps and 50 generate calls on the GPU path: device and pinned memory stay flat.

    Prints the figures (run with ``-s`` to see them) for the benchmark record.
    """
    import gc
    import threading

    _, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, mode="adaptive")
    executor = hybrid.hybrid.executor
    long_ids, short_ids = prompt(batch=1, length=4, seed=1).cuda(), prompt(batch=1, length=12, seed=2).cuda()

    def run(ids, new):
        return hybrid.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    first, short = run(long_ids, 55), run(short_ids, 3)
    gc.collect()
    torch.cuda.synchronize()
    allocated0 = torch.cuda.memory_allocated()
    pinned0 = executor.pinned_pool.nbytes()
    threads0 = threading.active_count()
    torch.cuda.reset_peak_memory_stats()
    steps = calls = 0
    for i in range(37):
        out = run(long_ids, 55)
        assert torch.equal(out, first)
        steps += 55
        calls += 1
        if i < 13:
            assert torch.equal(run(short_ids, 3), short)
            calls += 1
    gc.collect()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    pinned = executor.pinned_pool.nbytes()
    assert steps >= 2000 and calls == 50
    assert allocated - allocated0 < 1024**2, (allocated0, allocated)
    assert pinned == pinned0 and threading.active_count() <= threads0
    with capsys.disabled():
        print(
            f"\nsoak: {steps} decode steps, {calls} calls; device allocated {allocated0} -> {allocated} B "
            f"(peak {torch.cuda.max_memory_allocated()} B); pinned buffers {pinned0} -> {pinned} B"
        )


def test_cuda_attention_runs_without_cudnn_and_the_setting_is_restored(tiny_checkpoints):
    # cuDNN SDPA builds a graph per key length (tens of ms per decode step): the model's forward turns it off
    _, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.bfloat16, mode="adaptive")
    seen = []
    attention = hybrid.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        hybrid.generate(prompt(batch=1).cuda(), max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_cuda_column_block_crosses_pcie_in_one_copy():
    # the streamed part of a divided unit: down columns [r, I) of a pinned row-major matrix
    from hf_hybrid.lanes import DeviceLanes

    lanes = DeviceLanes(torch.device("cuda"))
    assert lanes.can_copy_column_blocks()
    host = torch.randn(64, 1000, dtype=torch.float32).to(torch.bfloat16).pin_memory()
    block = host[:, 384:]
    assert not block.is_contiguous()
    dst = torch.empty(block.shape, dtype=block.dtype, device="cuda")
    lanes.copy_into(dst, block).synchronize()
    assert torch.equal(dst.cpu(), block)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "llama"])
def test_cuda_divided_units_are_exact(tiny_checkpoints, family, divide_tiny_experts):
    # every step sums each divided expert's parts on the device after the join (their CPU parts come back in
    # rows past the step's own; a one-token step's copies of its row crossed before the routing)
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.float32, mode="adaptive")
    hybrid.hybrid.executor.balance_splits = True  # off by default; its moves must stay exact too
    ids = prompt(batch=1, length=6).cuda()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, ref(ids).logits, rtol=1e-5, atol=2e-5)
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=8, do_sample=False),
        ref.generate(ids, max_new_tokens=8, do_sample=False),
    )
    executor = hybrid.hybrid.executor
    assert executor.stats.split_units > 0
    # each divided step's finish order moved the split (the bias is what those moves summed to)
    assert executor.split_bias and executor.balance_splits


@pytest.mark.parametrize("family", ["mixtral", "phimoe"])
def test_cuda_divided_experts_of_multi_token_steps_bfloat16(tiny_checkpoints, family, divide_tiny_experts):
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.bfloat16, mode="adaptive")
    for seed in range(4):
        ids = prompt(batch=1, length=8, seed=seed).cuda()
        with torch.no_grad():
            assert bf16_ulps(hybrid(ids).logits.float(), ref(ids).logits.float()) <= 1.0
    assert hybrid.hybrid.executor.stats.split_units > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "llama"])
def test_cuda_prefill_splits_are_exact(tiny_checkpoints, family, dtype, divide_tiny_experts):
    # prefill-sized steps divide every host unit between the CPU lane and the copy lane (prefill_splits);
    # a divided expert's two parts are summed on the device after the join, rounded, then weighted
    ref, hybrid = load_pair(
        tiny_checkpoints[family],
        family,
        dtype,
        device="cuda",
        token_assignment="adaptive",
        prefill_splits=True,
    )
    assert_prefill_splits_exact(ref, hybrid, prompt(length=48, seed=3).cuda(), dtype, (1e-5, 2e-5))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_decode_graphs_match_transformers_static_cache(tiny_checkpoints, family):
    # decode steps replay each layer's attention half as a CUDA graph on a static KV cache: the tokens and
    # logits of transformers running with a static cache of the same length
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.float32, mode="adaptive")
    ids = prompt(batch=1, length=6).cuda()
    want = static_reference(ref, ids, 8)
    graphs = hybrid.hybrid.decode_graphs
    for _ in range(2):  # the second call reuses the cache and the graphs
        got = generate(hybrid, ids, 8)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert graphs.steps > 0
    # a sliding-window cache layer decides in Python where to write: it runs the same path uncaptured
    sliding = any(type(layer).__name__ != "StaticLayer" for layer in graphs.cache.layers)
    assert (graphs.replays > 0) == (not sliding), (graphs.replays, graphs.failed)
    assert not graphs.failed


@pytest.mark.parametrize("family", ["mixtral", "llama"])
def test_cuda_decode_graphs_bfloat16_bitwise_when_nothing_is_split(tiny_checkpoints, family):
    directory = tiny_checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda()
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cuda", dtype=torch.bfloat16, gpu_memory="2GiB", max_context=64, progress=False
    )
    ids = prompt(batch=1, length=6).cuda()
    want = static_reference(ref, ids, 8)
    got = generate(hybrid, ids, 8)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert hybrid.hybrid.decode_graphs.replays > 0


def test_cuda_decode_graphs_step_aside_for_beams_and_callers_caches(tiny_checkpoints):
    from transformers import DynamicCache

    ref, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, mode="adaptive")
    ids = prompt(batch=1, length=6).cuda()
    graphs = hybrid.hybrid.decode_graphs
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=2)
    assert torch.equal(hybrid.generate(ids, **beams), ref.generate(ids, **beams))
    assert graphs.steps == 0
    out = hybrid.generate(
        ids,
        max_new_tokens=5,
        do_sample=False,
        **{cache_argument(type(ref)): DynamicCache(config=hybrid.config)},
    )
    assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert graphs.steps == 0


def test_cuda_decode_graphs_recapture_after_inference_mode(tiny_checkpoints):
    # a cache made under torch.inference_mode is replaced outside it, and its graphs are captured anew
    ref, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, mode="adaptive")
    ids = prompt(batch=1, length=6).cuda()
    want = static_reference(ref, ids, 8)
    graphs = hybrid.hybrid.decode_graphs
    with torch.inference_mode():
        assert torch.equal(generate(hybrid, ids, 8).sequences, want.sequences)
    replays = graphs.replays
    assert torch.equal(generate(hybrid, ids, 8).sequences, want.sequences)
    assert graphs.replays > replays and not graphs.failed
    assert graphs.router_hits > 0


def test_cuda_decode_graphs_follow_a_wrapped_projection(tiny_checkpoints):
    # a LoRA-like wrapper on an attention projection, then switched off: the graphs are recorded anew each
    # time, so decode computes the model as it is now
    ref, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, mode="adaptive")
    ids = prompt(batch=1, length=6).cuda()
    graphs = hybrid.hybrid.decode_graphs
    generate(hybrid, ids, 8)
    for model in (ref, hybrid):
        attention = model.model.layers[0].self_attn
        attention.v_proj = _Delta(attention.v_proj).cuda()
    got = generate(hybrid, ids, 8)
    assert torch.equal(got.sequences, static_reference(ref, ids, 8).sequences)
    for model in (ref, hybrid):
        model.model.layers[0].self_attn.v_proj._disable_adapters = True
    replays = graphs.replays
    got = generate(hybrid, ids, 8)
    assert torch.equal(got.sequences, static_reference(ref, ids, 8).sequences)
    assert graphs.replays > replays and not graphs.failed


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_cuda_decode_lookahead_is_bitwise_invisible(tiny_checkpoints, family):
    # layer 0 of the next greedy step replayed and started at the end of a decode forward: the same bits
    # as without the lookahead, on captured graphs, with the lookahead's steps claimed
    from test_decode_lookahead import assert_bitwise, load

    directory = tiny_checkpoints[family]
    ids = prompt(batch=1, length=6).cuda()
    results = []
    for on in (False, True):
        hybrid = load(directory, family, device="cuda", dtype=torch.bfloat16, decode_lookahead=on)
        results.append(generate(hybrid, ids, 10))
        graphs = hybrid.hybrid.decode_graphs
        assert graphs.replays > 0 and not graphs.failed
    assert_bitwise(results[1], results[0])
    lookahead = graphs.lookahead
    assert lookahead.starts == 8 and lookahead.hits >= 1
    assert lookahead.hits + lookahead.misses == 8
    assert hybrid.hybrid.executor.ahead is None


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_one_token_steps_match_the_gathered_path(
    tiny_checkpoints, family, dtype, monkeypatch, divide_tiny_experts
):
    # batch-1 decode steps take the step's row and a host-known routing-weight position on the GPU lane:
    # bitwise the gathered path on the device too (same shapes, so the same kernels), and transformers'
    from test_executor import one_token_and_gathered_runs

    ref, hybrid = _pair(tiny_checkpoints[family], family, dtype, mode="adaptive")
    ids = prompt(batch=1, length=6).cuda()
    fast, slow = one_token_and_gathered_runs(hybrid, ids, monkeypatch)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    want = ref.generate(
        ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    if dtype == torch.float32:
        assert torch.equal(fast[0], want.sequences)
        torch.testing.assert_close(fast[1], torch.stack(want.logits), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_expert_graphs_replay_the_eager_bits(tiny_checkpoints, family, dtype, divide_tiny_experts):
    # one-token steps' GPU-lane experts replayed as CUDA graphs: bitwise the kernel-by-kernel path, graphs
    # recorded and replayed, none failed; fp32 tokens those of transformers
    from test_executor import graphed_and_eager_expert_runs

    ref, hybrid = _pair(tiny_checkpoints[family], family, dtype, mode="adaptive")
    ids = prompt(batch=1, length=6).cuda()
    graphed, eager, on_graphs = graphed_and_eager_expert_runs(hybrid, ids)
    graphs = hybrid.hybrid.executor.expert_graphs
    assert on_graphs > 0 and graphs.captures > 0 and not graphs.failed
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[1], eager[1])
    # a second call replays what the first recorded (a key is recorded on its second use, so a tiny model's
    # first call may record without replaying), with the same bits
    again, _, _ = graphed_and_eager_expert_runs(hybrid, ids)
    assert graphs.replays > 0 and not graphs.failed
    assert torch.equal(again[1], graphed[1])
    if dtype == torch.float32:
        want = ref.generate(
            ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert torch.equal(graphed[0], want.sequences)


def test_cuda_profile_times_issuing_on_the_expert_graphs():
    # the profile's issue time per expert replays recorded graphs (the path one-token steps take): a replay
    # and a copy cost the host far less than the 6-7 launches of the kernel-by-kernel path (~130 us alone)
    import hf_hybrid.measure as measure_mod
    from hf_hybrid.expert_graphs import ExpertGraphs
    from hf_hybrid.lanes import DeviceLanes

    made = []
    original = ExpertGraphs.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    ExpertGraphs.__init__ = keep
    try:
        dev = torch.device("cuda")
        times = measure_mod._measure_device_issue(DeviceLanes(dev), dev, torch.bfloat16)
    finally:
        ExpertGraphs.__init__ = original
    graphs = made[0]
    assert graphs.captures == 2 and not graphs.failed
    assert graphs.replays >= 2 * measure_mod._ISSUE_BLOCKS * measure_mod._ISSUE_REPS
    resident, streamed, graph_resident, graph_streamed = times
    print(
        f"issue per expert, kernel by kernel: resident {resident * 1e6:.1f} us, streamed {streamed * 1e6:.1f}"
        f" us; replayed: resident {graph_resident * 1e6:.1f} us, streamed {graph_streamed * 1e6:.1f} us"
    )
    assert 0 < resident < streamed < 1e-3
    assert 0 < graph_resident < graph_streamed < 1e-3
    assert graph_resident < resident  # one copy and one replay against six or seven launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_embeddings_on_the_cpu(tiny_checkpoints, dtype):
    # the looked-up rows cross from pinned memory; decode steps run on the kept static cache and its graphs
    directory = tiny_checkpoints["qwen3_moe"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).cuda()
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory,
        device="cuda",
        dtype=dtype,
        gpu_memory="256MiB",
        placement={"embed_tokens": "cpu", **placement_for("qwen3_moe")},
        max_context=64,
        max_batch_size=2,
        progress=False,
    )
    assert hybrid.hybrid.loaded.cpu_embedding
    ids = prompt().cuda()
    with torch.no_grad():
        got, want = hybrid(ids).logits, ref(ids).logits
    if dtype == torch.bfloat16:
        assert bf16_ulps(got.float(), want.float()) <= BF16_ULPS
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    first = ids[:1]
    assert torch.equal(
        hybrid.generate(first, max_new_tokens=8, do_sample=False),
        ref.generate(first, max_new_tokens=8, do_sample=False),
    )
