"""Executor details that the end-to-end tests do not pin down."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import load_every_lane
from transformers import AutoModelForCausalLM

from hf_hybrid.errors import ExecutionError
from hf_hybrid.executor import Executor
from hf_hybrid.kernels.cpu import gated_mlp
from hf_hybrid.lanes import DeviceLanes
from hf_hybrid.planner import HostWork, assign_tokens
from hf_hybrid.profile import default_profile
from hf_hybrid.staging import StagingRing
from hf_hybrid.weights import HostArena, carve, layout_bytes

MIB = 1024**2


def test_cpu_rate_correction_converges_and_is_bounded():
    ex = Executor(torch.device("cpu"), default_profile("cuda"))
    for _ in range(60):
        ex._learn_cpu_rate(predicted_s=0.010, measured_s=0.030)  # the CPU lane is 3x slower than profiled
    assert abs(ex.cpu_scale - 3.0) < 0.01
    for _ in range(60):
        ex._learn_cpu_rate(predicted_s=0.010, measured_s=10.0)
    assert Executor.CPU_SCALE_RANGE[1] - 1e-3 < ex.cpu_scale <= Executor.CPU_SCALE_RANGE[1]
    before = ex.cpu_scale
    ex._learn_cpu_rate(predicted_s=1e-6, measured_s=1.0)  # overhead-dominated jobs are ignored
    assert ex.cpu_scale == before
    # a slow prefill-sized job teaches the prefill regime only
    for _ in range(60):
        ex._learn_cpu_rate(predicted_s=0.010, measured_s=0.005, regime="large")
    assert abs(ex.cpu_scales["large"] - 0.5) < 0.01 and ex.cpu_scale == before
    ex.close()


def test_cpu_rate_correction_drifts_back_when_the_cpu_lane_gets_no_work(tiny_checkpoints):
    from test_exactness import load_pair, prompt

    _, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, token_assignment="adaptive")
    ex = hybrid.hybrid.executor
    ex.cpu_scales["small"] = Executor.CPU_SCALE_RANGE[1]  # one bad measurement: the CPU looks 8x slower
    hybrid.generate(prompt(batch=1), max_new_tokens=6, do_sample=False)
    # every host expert was streamed at first; without new CPU measurements the factor drifts back to 1
    assert 1.0 <= ex.cpu_scales["small"] < Executor.CPU_SCALE_RANGE[1] - 0.5


def test_issue_time_is_learned_bounded_and_steers_decode_steps_to_the_cpu_lane(tiny_checkpoints):
    """The feeding thread's measured time to issue a streamed expert replaces the profile's, smoothed and
    capped; where it exceeds what the CPU lane needs, decode steps stream nothing (same tokens), and with no
    streaming to re-measure it the figure drifts back toward the profile's."""
    from test_exactness import load_pair, prompt

    ex = Executor(torch.device("cpu"), default_profile("cuda"))
    for _ in range(60):
        ex._learn_issue("streamed", 4e-4)
    assert abs(ex.issue_seconds["streamed"] - 4e-4) < 1e-6
    for _ in range(60):
        ex._learn_issue("streamed", 10.0)
    assert ex.issue_seconds["streamed"] <= Executor.ISSUE_MAX_S
    ex.close()

    _, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, token_assignment="adaptive")
    ex = hybrid.hybrid.executor
    ids = prompt(batch=1)
    want = hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    hybrid.generate(ids[:, :4], max_new_tokens=1, do_sample=False)  # warm: the staging ring settles
    ex.stats.reset()
    hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    streamed_before = ex.stats.streamed_units
    ex.issue_seconds["streamed"] = Executor.ISSUE_MAX_S
    ex.stats.reset()
    got = hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert ex.stats.streamed_units < streamed_before  # the decode steps stopped streaming
    assert ex.issue_seconds["streamed"] < Executor.ISSUE_MAX_S  # and the figure drifts back


def test_prefill_steps_learn_and_follow_their_own_issue_time(tiny_checkpoints):
    """Prefill-sized steps issue their experts kernel by kernel: their issue time is learned apart from
    decode steps' and steers only their assignment."""
    from test_exactness import load_pair, prompt

    ex = Executor(torch.device("cpu"), default_profile("cuda"))
    small = dict(ex.issue_seconds)
    for _ in range(60):
        ex._learn_issue("streamed", 9e-4, "large")
    assert abs(ex.prefill_issue_seconds["streamed"] - 9e-4) < 1e-6 and ex.issue_seconds == small
    ex.close()

    _, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, token_assignment="adaptive")
    ex = hybrid.hybrid.executor
    ids = prompt(batch=2, length=40)  # about 20 tokens an expert: prefill-sized steps

    def streamed_in_prefill() -> int:
        ex.stats.reset()
        with torch.no_grad():
            out = hybrid(ids).logits
        return ex.stats.streamed_units, out

    decode_figures = dict(ex.issue_seconds)
    before, want = streamed_in_prefill()
    assert before > 0
    ex.prefill_issue_seconds["streamed"] = Executor.ISSUE_MAX_S
    after, got = streamed_in_prefill()
    assert after < before  # the prefill steps moved experts from the copy lane to the CPU lane
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert ex.issue_seconds == decode_figures  # decode steps' figures untouched


def test_reusable_buffers_made_under_inference_mode_stay_writable_under_no_grad():
    # generate under inference_mode (as the benchmark does), then calibrate under no_grad: the buffers the
    # first call made are written again by the second
    ex = Executor(torch.device("cpu"), default_profile("cuda"))
    with torch.inference_mode():
        buf = ex.pinned("x", (4, 8), torch.float32)
    with torch.no_grad():
        ex.pinned("x", (4, 8), torch.float32).copy_(torch.ones(4, 8))
    assert not buf.is_inference()
    ex.close()


def test_slow_cpu_lane_moves_work_to_the_copy_lane():
    profile = default_profile("cuda")
    work = [HostWork(f"e{i}", 1, 336 * MIB, 336 * MIB) for i in range(2)]
    assert len(assign_tokens(work, profile)) == 1  # balanced: one expert on each side
    assert len(assign_tokens(work, profile, cpu_scale=8.0)) == 2  # CPU measured 8x slower: stream both


def test_assignment_memo_keeps_costs_not_decisions():
    # the executor's memo holds each unit's costs per token count between steps; the decision still follows
    # what changes from step to step (staged units, the learned CPU factor)
    profile = default_profile("cuda")
    work = [HostWork(f"e{i}", 1 + i % 2, 9 * MIB * (1 + i), 9 * MIB) for i in range(6)]
    memo: dict = {}
    for scale in (0.5, 1.0, 3.0, 8.0):
        assert assign_tokens(work, profile, cpu_scale=scale, memo=memo) == assign_tokens(
            work, profile, cpu_scale=scale
        )
    assert len(memo) == 6 + 1  # one entry per unit and token count, one per step size
    staged = [HostWork(w.name, w.tokens, w.nbytes, w.flops_per_token, staged=True) for w in work]
    assert assign_tokens(staged, profile, cpu_scale=8.0, memo=memo) == assign_tokens(
        staged, profile, cpu_scale=8.0
    )
    assert assign_tokens(work, profile, memo=memo) != assign_tokens(work, profile, cpu_scale=8.0, memo=memo)


def test_cpu_job_prediction_from_kept_costs_is_the_cost_models(tiny_checkpoints):
    # the learned CPU factor divides a job's measured time by this prediction: it must stay the cost
    # model's cpu_lane_time (whole units; each divided unit's rows pro rata), however the costs are kept
    from hf_hybrid.costs import cpu_lane_time
    from hf_hybrid.executor import Assignment

    model = load_every_lane(tiny_checkpoints["mixtral"])
    executor = model.hybrid.executor
    group = next(iter(executor.groups.values()))
    inter = group.shapes[0][0][0] // 2
    for counts, on_cpu, split in (([3, 1, 0, 2], [0, 1], {3: inter // 3}), ([40, 0, 25, 9], [2, 3], {})):
        lanes = Assignment(on_cpu=on_cpu, split=split)
        want = cpu_lane_time([(group.units[i], counts[i]) for i in on_cpu], executor.profile)
        for i, r in split.items():
            want += cpu_lane_time([(group.units[i], counts[i])], executor.profile) * r / inter
        for _ in range(2):  # computed, then from the kept costs
            assert executor._predicted_cpu_s(group, lanes, counts) == pytest.approx(want, rel=1e-12)
    model.hybrid.close()


def test_layers_that_may_divide_follow_sizes_and_the_assignment_mode(tiny_checkpoints, monkeypatch):
    # multi-token decode steps of a layer that may divide a host unit skip the early copy of the CPU lane's
    # inputs (its divided units need their rows again after routing): known per layer, per mode
    import hf_hybrid.costs

    model = load_every_lane(tiny_checkpoints["mixtral"], token_assignment="adaptive")
    executor = model.hybrid.executor
    group = next(iter(executor.groups.values()))
    assert not executor._may_divide(group)  # tiny experts are below SPLIT_MIN_BYTES
    executor._divisible.clear()
    monkeypatch.setattr(hf_hybrid.costs, "SPLIT_MIN_BYTES", 0)
    assert executor._may_divide(group)
    model.set_token_assignment("whole")
    assert not executor._may_divide(group)
    model.set_token_assignment("adaptive")
    assert executor._may_divide(group)
    model.hybrid.close()


def test_a_staged_part_moves_the_other_divided_units_rows_to_the_copy_lane(tiny_checkpoints):
    # unit 0's GPU part is staged: the copy lane has only unit 1's part to copy, so unit 1 gives it rows
    # until both lanes take as long (at the rates while both run)
    from hf_hybrid.costs import split_rates

    model = load_every_lane(tiny_checkpoints["mixtral"])
    executor = model.hybrid.executor
    group = next(iter(executor.groups.values()))
    inter = group.shapes[0][0][0] // 2
    cpu_rate, pcie_rate = split_rates(executor.profile, executor.cpu_scale)
    moved = executor._rebalanced(group, {0: inter // 2, 1: inter // 2}, staged=[0])
    assert set(moved) == {1} and 0 < moved[1] < inter // 2
    nbytes = [group.units[i].nbytes for i in (0, 1)]
    cpu_s = (nbytes[0] * (inter // 2) + nbytes[1] * moved[1]) / inter / cpu_rate
    copy_s = nbytes[1] * (inter - moved[1]) / inter / pcie_rate
    row_s = (
        nbytes[1] / inter * (1 / cpu_rate + 1 / pcie_rate)
    )  # one row moved changes the difference this much
    assert abs(cpu_s - copy_s) <= row_s
    model.hybrid.close()


def test_staging_ring_reuses_cached_weights_and_evicts_least_recent():
    lanes = DeviceLanes(torch.device("cpu"))
    ring = StagingRing(lanes, slot_bytes=1024, slots=2)
    regions = {name: torch.full((1000,), i, dtype=torch.uint8) for i, name in enumerate("abc")}
    view, _, cached = ring.fetch("a", regions["a"])
    assert not cached and torch.equal(view, regions["a"])
    ring.fetch("b", regions["b"])
    _, _, cached = ring.fetch("a", regions["a"])
    assert cached and ring.hits == 1
    ring.fetch("c", regions["c"])  # evicts b, the least recently used
    assert "b" not in ring.by_tag and "a" in ring.by_tag
    assert ring.bytes_copied == 3000


def test_staging_ring_keeps_each_slots_layouts_and_typed_tensors():
    # a unit that comes back to a slot reuses the views made the first time (no view ops on the feeding
    # thread), and views made inside inference mode still take copies outside it (a later plain call)
    lanes = DeviceLanes(torch.device("cpu"))
    ring = StagingRing(lanes, slot_bytes=4096, slots=1)
    shapes = ((4, 8), (8, 2))
    first = torch.arange(48, dtype=torch.float32)
    second = torch.arange(48, dtype=torch.float32) * -1
    parts = lambda t: [t[:32].view(4, 8), t[32:].view(8, 2)]  # noqa: E731
    with torch.inference_mode():
        (a, b), _, cached = ring.fetch_carved("x", parts(first), shapes, torch.float32)
    assert not cached and torch.equal(a, first[:32].view(4, 8)) and torch.equal(b, first[32:].view(8, 2))
    assert not a.is_inference()
    (a2, b2), _, cached = ring.fetch_carved("y", parts(second), shapes, torch.float32)  # same slot, evicts x
    assert not cached and a2 is a and b2 is b  # the same tensor objects: the slot's layout was kept
    assert torch.equal(a, second[:32].view(4, 8)) and torch.equal(b, second[32:].view(8, 2))
    assert ring.bytes_copied == 2 * 48 * 4
    (a3, _), _, cached = ring.fetch_carved("y", parts(second), shapes, torch.float32)
    assert cached and a3 is a
    with pytest.raises(ExecutionError, match="too small"):
        ring.fetch("z", torch.zeros(8192, dtype=torch.uint8))
    assert "y" in ring.by_tag  # a refused fetch leaves the slot's unit in place


def test_host_arena_carves_aligned_typed_views():
    shapes = [(3, 5), (7,)]
    arena = HostArena(layout_bytes(shapes, torch.float32), pin=False)
    region = arena.take(layout_bytes(shapes, torch.float32))
    a, b = carve(region, shapes, torch.float32)
    assert a.shape == (3, 5) and b.shape == (7,)
    assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.sum() == 15 and b.sum() == 14


@pytest.mark.parametrize("prefill_splits", [False, True])
def test_split_mode_fault_in_cpu_lane_surfaces_and_model_recovers(
    tiny_checkpoints, divide_tiny_experts, prefill_splits
):
    # decode-sized steps divide units; with prefill_splits the 40-token prompt's steps do too (and keep each
    # unit's GPU part until the join): a CPU lane failing in either leaves nothing behind
    from test_exactness import load_pair, prompt

    from hf_hybrid import ExecutionError

    ref, hybrid = load_pair(
        tiny_checkpoints["mixtral"],
        "mixtral",
        torch.float32,
        token_assignment="adaptive",
        prefill_splits=prefill_splits,
    )
    ids = prompt(batch=1, length=40 if prefill_splits else 16, seed=4)
    want = ref.generate(ids, max_new_tokens=6, do_sample=False)
    calls = {"n": 0}
    failing = 2 if prefill_splits else 3  # the prompt's second layer step, or a decode step

    def fail_once(lane):
        if lane == "cpu":
            calls["n"] += 1
            if calls["n"] == failing:
                calls["divided so far"] = hybrid.hybrid.executor.stats.split_units
                raise RuntimeError("injected")

    hybrid.hybrid.executor.fault_injector = fail_once
    with pytest.raises(ExecutionError, match="CPU lane"):
        hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    assert calls["divided so far"] > 0  # the steps before the failing one divided units
    hybrid.hybrid.executor.fault_injector = None
    assert torch.equal(hybrid.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert hybrid.hybrid.executor.stats.split_units > 0


def test_prefill_prefetches_next_layer_streamed_experts(tiny_checkpoints):
    from test_exactness import load_pair, prompt

    ref, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, token_assignment="static")
    ex = hybrid.hybrid.executor
    ids = prompt(batch=2, length=16)  # 32 tokens: a prefill-sized step
    ex.stats.reset()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, ref(ids).logits, rtol=1e-6, atol=5e-6)
    # layer 0's step copied layer 1's first streamed experts ahead; layer 1 found them staged
    assert ex.stats.prefetched_units == len(ex.expert_ring.slots) - 1
    assert ex.stats.cached_units >= ex.stats.prefetched_units
    ex.stats.reset()
    with torch.no_grad():
        hybrid(ids[:1, :4])  # 4 tokens: decode-sized, nothing is guessed ahead
    assert ex.stats.prefetched_units == 0


def test_a_closed_model_refuses_to_run_with_a_clear_error(tiny_checkpoints):
    from tiny_models import load_every_lane

    from hf_hybrid import ExecutionError

    model = load_every_lane(tiny_checkpoints["mixtral"])
    ids = torch.tensor([[1, 2, 3]])
    model.generate(ids, max_new_tokens=2)
    threads_before = {t.name for t in threading.enumerate()}
    model.hybrid.close()
    with pytest.raises(ExecutionError, match="closed"):
        model(ids)
    with pytest.raises(ExecutionError, match="closed"):
        model.generate(ids, max_new_tokens=2)
    # no new CPU-lane thread was started by the refused calls
    started = {t.name for t in threading.enumerate()} - threads_before
    assert not [name for name in started if "cpu-lane" in name]


def test_host_time_between_layer_steps_is_measured(tiny_checkpoints):
    from tiny_models import load_every_lane

    model = load_every_lane(tiny_checkpoints["mixtral"])
    stats = model.hybrid.executor.stats
    stats.reset()
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    layers = model.config.num_hidden_layers
    # every layer step but the first of each forward follows another one within the same forward
    assert stats.groups == 3 * layers
    assert stats.host_gaps >= 3 * (layers - 1)
    assert stats.host_gap_s > 0 and stats.issue_s > 0
    model.hybrid.close()


@pytest.mark.parametrize("mode", ["stream", "adaptive"])
def test_next_layer_prediction_stages_experts_and_changes_no_result(tiny_checkpoints, mode, request):
    # "stream": a predicted expert is staged whole, and only what is staged changes (the same bits);
    # "adaptive" (every tiny expert divided, the fixture): the GPU part of a predicted expert is staged with
    # the rows the next step then chooses, and that step's other divided experts give the copy lane more
    # rows (another order of the same fp32 sums)
    from tiny_models import load_every_lane

    if mode == "adaptive":
        request.getfixturevalue("divide_tiny_experts")
    ids = torch.tensor([[5, 9, 2, 7]])

    def run(predict: bool):
        model = load_every_lane(
            tiny_checkpoints["mixtral"], token_assignment=mode, predict_next_layer=predict
        )
        executor = model.hybrid.executor
        executor.stats.reset()
        rebalanced = executor._rebalanced
        executor._rebalanced = lambda *args: calls.append(args) or rebalanced(*args)
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        stats = model.hybrid.executor.stats
        model.hybrid.close()
        return out, stats

    calls: list = []
    with_guess, stats = run(True)
    assert (len(calls) > 0) == (mode == "adaptive")
    without, plain = run(False)
    assert stats.predicted_units > 0 and plain.predicted_units == 0
    # each guess is scored against the routing the next layer's step then had
    assert 0 < stats.guessed_right <= stats.guessed_experts and plain.guessed_experts == 0
    # right guesses were found staged by the next layer's step (whole, or the divided part it asked for)
    assert stats.cached_units > plain.cached_units
    if mode == "adaptive":
        assert stats.split_units > 0 and stats.split_units == plain.split_units
    assert torch.equal(with_guess.sequences, without.sequences)
    for a, b in zip(with_guess.logits, without.logits):
        if mode == "stream":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=5e-6)


def test_set_token_assignment_changes_what_runs_and_the_plan_follows(tiny_checkpoints):
    from tiny_models import load_every_lane

    model = load_every_lane(tiny_checkpoints["mixtral"], token_assignment="static")
    ids = torch.tensor([[4, 8, 15, 16]])
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.set_token_assignment("stream")
    assert model.hybrid_plan.token_assignment == "stream"
    assert model.hybrid.executor.token_assignment == "stream"
    assert model.hybrid_plan.predicted["decode_tok_s"] > 0
    stats = model.hybrid.executor.stats
    stats.reset()
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)
    assert stats.cpu_units == 0 and stats.streamed_units > 0  # every host unit was streamed
    with pytest.raises(ValueError, match="token_assignment"):
        model.set_token_assignment("fastest")
    assert model.hybrid_plan.token_assignment == "stream"
    model.hybrid.close()


def test_divided_unit_is_read_once_by_the_two_lanes_together(tiny_checkpoints, divide_tiny_experts):
    # a divided unit: the CPU lane reads gate/up rows and down columns [0, r), the copy lane the rest,
    # so together they touch each weight byte once, in the lanes' rate ratio
    from test_exactness import load_pair, prompt

    from hf_hybrid.costs import split_fraction

    _, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, token_assignment="adaptive")
    executor = hybrid.hybrid.executor
    ring = executor.expert_ring
    divided = []
    real = executor._choose_splits

    def record(group, host, counts, work):
        split = real(group, host, counts, work)
        divided.extend((group, i, r) for i, r in split.items())
        return split

    executor._choose_splits = record
    with torch.no_grad():
        hybrid(prompt(batch=1, length=2))
    stats = executor.stats
    assert (
        divided and stats.split_units == len(divided) and stats.streamed_units == 0 and stats.cpu_units == 0
    )
    whole = sum(g.host_weights[i][0].nbytes + g.host_weights[i][1].nbytes for g, i, _ in divided)
    assert stats.cpu_bytes + ring.bytes_copied == whole
    fraction = split_fraction(executor.profile, executor.cpu_scale)
    for group, i, r in divided:
        inter = group.shapes[i][0][0] // 2
        assert abs(r - fraction * inter) <= 0.5


def _one_token_step(tiny_checkpoints):
    """(reference, hybrid, its executor, the arguments of ``_choose_splits`` for a one-token step of the
    tiny Mixtral's first MoE layer with every host expert routed once)."""
    from test_exactness import load_pair

    from hf_hybrid.assignment import HostWork
    from hf_hybrid.units import GPU

    ref, hybrid = load_pair(
        tiny_checkpoints["mixtral"], "mixtral", torch.float32, token_assignment="adaptive"
    )
    executor = hybrid.hybrid.executor
    group = next(g for g in executor.groups.values() if g.routed)
    host = [i for i, home in enumerate(group.homes) if home != GPU]
    work = [
        HostWork(group.units[i].name, 1, group.units[i].nbytes, group.units[i].flops_per_token) for i in host
    ]
    return ref, hybrid, executor, (group, host, [1] * len(group.units), work)


def test_divided_rows_hold_still_while_the_rate_factor_wobbles(tiny_checkpoints, divide_tiny_experts):
    # every new split is a new GEMM shape for the GPU lane (a BLAS heuristic query on the feeding thread):
    # a small drift of the learned CPU factor keeps the split, a real change of rate moves it
    _, hybrid, executor, split_args = _one_token_step(tiny_checkpoints)
    first = executor._choose_splits(*split_args)
    assert first
    executor.cpu_scales["small"] *= 1.03
    assert executor._choose_splits(*split_args) == first
    executor.cpu_scales["small"] *= 3
    moved = executor._choose_splits(*split_args)
    assert moved.keys() == first.keys() and all(moved[i] < first[i] for i in first)


def test_divided_split_moves_toward_the_lane_that_finished_later(tiny_checkpoints, divide_tiny_experts):
    """Each divided step's finish order moves the split by a block: GPU-lane parts still running when the
    CPU lane is joined give the CPU lane one more block of rows next time, parts already done one block
    fewer; bounded, and off with ``balance_splits``. At any split the results stay transformers' (fp32)."""
    from types import SimpleNamespace

    from test_exactness import prompt

    ref, hybrid, executor, split_args = _one_token_step(tiny_checkpoints)
    assert not executor.balance_splits  # off by default (it lost decode speed on the GPU machine)
    executor.balance_splits = True
    group = split_args[0]
    base = executor._choose_splits(*split_args)
    inter = group.shapes[next(iter(base))][0][0] // 2  # tiny experts: blocks of one row

    def finished(gpu_done: bool):
        step = SimpleNamespace(group=group, lanes=SimpleNamespace(split=base), divided_done=object())
        executor.lanes.is_done = lambda event: gpu_done
        executor._balance_splits(step)

    finished(False)
    finished(False)
    assert executor._choose_splits(*split_args) == {i: r + 2 for i, r in base.items()}
    finished(True)
    assert executor._choose_splits(*split_args) == {i: r + 1 for i, r in base.items()}
    for _ in range(3 * Executor.SPLIT_BIAS_MAX_BLOCKS):
        finished(False)
    assert executor.split_bias[inter] == Executor.SPLIT_BIAS_MAX_BLOCKS
    assert all(0 < r < inter for r in executor._choose_splits(*split_args).values())
    executor.balance_splits = False
    assert executor._choose_splits(*split_args) == base
    executor.balance_splits = True
    del executor.lanes.is_done
    ids = prompt(batch=1, length=6)
    with torch.no_grad():
        want = ref(ids).logits
        for bias in (-3, 3):
            executor.split_bias[inter] = bias
            executor.stats.reset()
            got = hybrid(ids).logits
            assert executor.stats.split_units > 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_the_cpu_lane_reads_its_inputs_only_after_they_arrive(tiny_checkpoints, backend):
    """On a GPU the activations and routing weights reach the CPU lane through a device copy that may still
    run when the job is submitted: a job must read them only after their arrival event. Here the "copy"
    fills zeroed buffers when the job waits on the event; a lane that read early would compute with zeros."""
    from hf_hybrid.cpu_work import HostInputs
    from hf_hybrid.kernels import native

    if backend == "native" and not native.available():
        pytest.skip(f"native CPU kernel unavailable here: {native.unavailable_reason()}")
    directory = tiny_checkpoints["mixtral"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = load_every_lane(directory, cpu_backend=backend)
    executor = hybrid.hybrid.executor

    class LateCopy:
        def __init__(self, pairs):
            self.pairs = pairs

        def synchronize(self):
            for buffer, value in self.pairs:
                buffer.copy_(value)

    def late_inputs(hidden, flat_weights):
        x = torch.zeros_like(hidden)
        w = None if flat_weights is None else torch.zeros_like(flat_weights)
        pairs = [(x, hidden)] + ([] if w is None else [(w, flat_weights)])
        return HostInputs(x, w, LateCopy(pairs))

    executor._host_inputs = late_inputs
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = ref(ids).logits, hybrid(ids).logits
    assert executor.stats.cpu_units > 0 and (executor.stats.native_units > 0) == (backend == "native")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "llama"])
def test_decode_native_jobs_started_by_the_feeding_thread_match_the_lane_thread(tiny_checkpoints, family):
    """A decode step's native CPU job is started by the feeding thread on the native pool's leader
    (``direct_native_start``, the default) instead of the CPU lane's Python thread: the same kernel on the
    same inputs, so bf16 logits and tokens are bitwise those of the thread path, and both are transformers'."""
    from test_exactness import load_pair, prompt

    ref, hybrid = load_pair(tiny_checkpoints[family], family, torch.bfloat16, token_assignment="static")
    executor = hybrid.hybrid.executor
    if executor.cpu_kernels.native_lane is None:
        pytest.skip("the native kernel is not built here")
    ids = prompt(batch=1, length=6)
    runs = {}
    for direct in (True, False):
        executor.direct_native_start = direct
        executor.stats.reset()
        with torch.no_grad():
            logits = hybrid(ids).logits
        tokens = hybrid.generate(ids, max_new_tokens=6, do_sample=False)
        runs[direct] = (logits, tokens, executor.stats.direct_native_jobs, executor.stats.native_units)
    assert runs[True][2] > 0 and runs[False][2] == 0
    assert runs[True][3] > 0 and runs[False][3] > 0
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    assert torch.equal(runs[True][1], ref.generate(ids, max_new_tokens=6, do_sample=False))


def six_tokens_every_home(hybrid, ids):
    """Greedy sequences and per-token logits of six new tokens, checking every home took part (GPU units
    and divided ones)."""
    executor = hybrid.hybrid.executor
    executor.stats.reset()
    out = hybrid.generate(
        ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    stats = executor.stats
    assert stats.gpu_units > 0 and stats.split_units > 0, stats
    return out.sequences, torch.stack(out.logits)


def one_token_and_gathered_runs(hybrid, ids, monkeypatch):
    """Greedy sequences and per-token logits of ``hybrid`` on the one-token batch ``ids`` with its one-token
    decode steps as they run (DeviceBatch.positions), then with them forced onto the gathered path."""
    seen = {"one_token": 0}
    original = Executor._device_batch

    def counting(self, hidden, routing, lanes, flat_weights):
        batch = original(self, hidden, routing, lanes, flat_weights)
        seen["one_token"] += batch.positions is not None
        return batch

    def gathered(self, hidden, routing, lanes, flat_weights):
        batch = original(self, hidden, routing, lanes, flat_weights)
        if batch.positions is not None:
            batch.positions = None
            batch.graphs = False  # the static accumulator stays: the gathered path adds into it
            batch.gather_routing()
        return batch

    def run():
        return six_tokens_every_home(hybrid, ids)

    monkeypatch.setattr(Executor, "_device_batch", counting)
    fast = run()
    assert seen["one_token"] > 0
    monkeypatch.setattr(Executor, "_device_batch", gathered)
    return fast, run()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_one_token_steps_skip_the_gathers_with_the_same_bits(
    tiny_checkpoints, family, dtype, monkeypatch, divide_tiny_experts
):
    """A one-token decode step gives the GPU lane each unit's input as the step's row and its routing
    weight as a host-known position (DeviceBatch.positions) instead of gathering both on the device:
    logits of every generated token bitwise those of the gathered path, every home in use and experts
    divided between the lanes."""
    from test_exactness import load_pair, prompt

    _, hybrid = load_pair(tiny_checkpoints[family], family, dtype, token_assignment="adaptive")
    fast, slow = one_token_and_gathered_runs(hybrid, prompt(batch=1, length=6), monkeypatch)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def graphed_and_eager_expert_runs(hybrid, ids):
    """Greedy sequences and per-token logits of ``hybrid`` on the one-token batch ``ids`` with its one-token
    steps' GPU-lane experts on the expert graphs' static buffers (captured on an accelerator), then issued
    kernel by kernel (``Executor.graph_experts`` off); and how many experts took the graphs' path."""
    executor = hybrid.hybrid.executor
    graphs = executor.expert_graphs
    taken = {"n": 0}
    whole = graphs.whole

    def counted(*args):
        taken["n"] += 1
        return whole(*args)

    graphs.whole = counted

    def run():
        return six_tokens_every_home(hybrid, ids)

    try:
        graphed = run()
        on_graphs = taken["n"]
        executor.graph_experts = False
        eager = run()
    finally:
        del graphs.whole  # back to the method
        executor.graph_experts = True
    assert taken["n"] == on_graphs, "the eager run went through the expert graphs"
    return graphed, eager, on_graphs


def test_expert_graphs_option_switches_the_executor(tiny_checkpoints):
    # from_pretrained(expert_graphs=False) issues one-token steps' experts kernel by kernel: no step takes
    # the graphs' static buffers
    from test_exactness import load_pair, prompt

    _, hybrid = load_pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32, expert_graphs=False)
    executor = hybrid.hybrid.executor
    assert not executor.graph_experts
    begun = []
    executor.expert_graphs.begin = lambda *args: begun.append(args)
    hybrid.generate(prompt(batch=1, length=6), max_new_tokens=3, do_sample=False)
    assert not begun and executor.stats.gpu_units > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_expert_graphs_static_path_has_the_same_bits(tiny_checkpoints, family, dtype, divide_tiny_experts):
    """One-token steps' GPU-lane experts (resident and streamed whole; the GPU's rows of divided ones add into
    the same static accumulator) computed on the expert graphs' static buffers: logits of every generated token bitwise those of the kernel-by-kernel
    path, with every home in use."""
    from test_exactness import load_pair, prompt

    _, hybrid = load_pair(tiny_checkpoints[family], family, dtype, token_assignment="adaptive")
    graphed, eager, on_graphs = graphed_and_eager_expert_runs(hybrid, prompt(batch=1, length=6))
    assert on_graphs > 0
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[1], eager[1])


class _FakeGraph:
    def __init__(self, fn):
        self.fn = fn
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.fn()


def test_expert_graphs_capture_counts_the_first_run_once_and_falls_back_on_failure():
    """A key runs eagerly on its first use and is recorded on its second (that run is the step's result, no
    replay on top), later uses replay; a key whose capture failed runs eagerly from then on, with the result
    added exactly once either way."""
    from hf_hybrid.expert_graphs import ExpertGraphs

    torch.manual_seed(0)
    hidden, inter = 8, 4
    gate_up, down = torch.randn(2 * inter, hidden), torch.randn(hidden, inter)
    x, w = torch.randn(1, hidden), torch.tensor([[0.5]])
    act = torch.nn.functional.silu
    want = gated_mlp(x, gate_up, down, act) * w
    captured = []

    class Lanes:
        fail = False

        def capture_in_step(self, fn, pool):
            fn()  # the real run, as DeviceLanes.capture_in_step does
            if self.fail:
                raise RuntimeError("capture not supported")
            captured.append(_FakeGraph(fn))
            return captured[-1]

    lanes = Lanes()
    graphs = ExpertGraphs(lanes, capture=True)
    graphs.pool = object()  # no CUDA here: the fake lanes ignore the pool
    for step in range(4):  # eager, recorded, then replayed twice
        acc = graphs.begin(x, w.dtype)
        graphs.whole(gate_up, down, act, w)
        assert torch.equal(acc, want.float()), step
    assert graphs.captures == 1 and graphs.replays == 2 and captured[0].replays == 2
    lanes.fail = True
    other = torch.randn(hidden, inter)
    want_other = gated_mlp(x, gate_up, other, act) * w
    for step in range(3):
        acc = graphs.begin(x, w.dtype)
        graphs.whole(gate_up, other, act, w)  # a new key: its capture (second use) fails after the real run
        assert torch.equal(acc, want_other.float()), step
    assert graphs.captures == 1 and len(graphs.failed) == 1
    graphs.clear()
    assert not graphs.graphs and not graphs.failed


@pytest.mark.parametrize("tokens, k, experts", [(1, 2, 8), (1, 8, 128), (3, 4, 16), (16, 2, 4), (40, 8, 64)])
def test_routing_sorted_in_python_equals_the_torch_sort(tokens, k, experts):
    """Small routings are sorted and counted in Python: the same stable order, token of each position,
    counts and starts as argsort/bincount (repeated experts included), for decode and larger steps."""
    from types import SimpleNamespace

    ex = Executor(torch.device("cpu"), default_profile("cuda"))
    try:
        group = SimpleNamespace(routed=True, units=[None] * experts, layer=0)
        gen = torch.Generator().manual_seed(tokens * 1000 + k)
        # drawn with replacement across tokens: many positions share an expert
        top_k = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        hidden = torch.zeros(tokens, 4)
        results = []
        for limit in (10**6, 0):
            ex.PYTHON_ROUTING_MAX = limit
            routing, _ = ex._route(group, hidden, top_k, None)
            results.append(routing)
        fast, slow = results
        assert fast.order_list is not None and slow.order_list is None
        assert torch.equal(fast.order, slow.order) and fast.order.dtype == slow.order.dtype
        assert torch.equal(fast.token_of, slow.token_of)
        assert fast.counts == slow.counts and fast.starts == slow.starts
        assert fast.order_list == slow.order.tolist()
    finally:
        ex.close()


def test_one_token_native_jobs_kept_packed_match_a_fresh_pack(tiny_checkpoints, monkeypatch):
    """A one-token step's native jobs come from bytes kept per unit, position and buffer: on every step
    (cache hits included) they are byte for byte what packing the step's jobs afresh gives, and re-homing a
    unit drops them (they hold its old weights' addresses)."""
    from hf_hybrid.kernels import native

    if not native.available():
        pytest.skip("the native CPU lane is not built here")
    from test_exactness import load_pair, prompt

    _, hybrid = load_pair(
        tiny_checkpoints["mixtral"],
        "mixtral",
        torch.bfloat16,
        cpu_backend="native",
        token_assignment="static",
    )
    executor = hybrid.hybrid.executor
    original = Executor._one_token_packed
    compared = []

    def checked(self, group, lanes, units, positions, rows, inputs, out):
        packed = original(self, group, lanes, units, positions, rows, inputs, out)
        weights = inputs.weights
        if not self.lanes.is_cuda:  # the buffer the kept bytes point to (see _one_token_packed)
            weights = self.pinned("w", tuple(weights.shape), weights.dtype)
        jobs = Executor._native_jobs(group, lanes, units, rows, weights)
        fresh = self.cpu_kernels.native_lane.pack(inputs.x, jobs, out)
        assert bytes(packed.buffer) == bytes(fresh.buffer) and packed.count == fresh.count
        compared.append(len(units))
        return packed

    monkeypatch.setattr(Executor, "_one_token_packed", checked)
    ids = prompt(batch=1, length=6)
    first = hybrid.generate(ids, max_new_tokens=8, do_sample=False)
    # kept entries were used again: fewer entries than jobs packed
    assert 0 < len(executor._packed_jobs) < sum(compared)
    layer, group = next((layer, g) for layer, g in executor.groups.items() if "cpu" in g.homes)
    # a full cache starts afresh: same results, never more entries than the cap
    executor._packed_jobs.clear()
    executor.PACKED_JOBS_MAX = 2
    assert torch.equal(hybrid.generate(ids, max_new_tokens=8, do_sample=False), first)
    assert 0 < len(executor._packed_jobs) <= 2
    executor.rehome(group, group.homes.index("cpu"), "gpu")
    assert not executor._packed_jobs
    assert torch.equal(hybrid.generate(ids, max_new_tokens=8, do_sample=False), first)
