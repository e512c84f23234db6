"""Faults during generate: a failing lane, a simulated OOM, Ctrl-C, concurrent callers and a long soak.

After each fault the model must give the reference tokens on the next call, and no thread may be left
running except the executor's single CPU-lane worker.
"""

from __future__ import annotations

import gc
import signal
import threading
import time

import pytest
import torch
from tiny_models import VOCAB, placement_for
from transformers import AutoModelForCausalLM

from hf_hybrid import ExecutionError, HybridModelForCausalLM

FAMILY = "mixtral"
NEW_TOKENS = 12
OOM = getattr(torch, "OutOfMemoryError", RuntimeError)


def load(directory, **options):
    kwargs = dict(
        device="cpu",
        dtype=torch.float32,
        gpu_memory="256MiB",
        placement=placement_for(FAMILY),
        token_assignment="static",  # every step uses all three lanes
        max_context=128,
        progress=False,
    )
    kwargs.update(options)
    return HybridModelForCausalLM.from_pretrained(directory, **kwargs)


def prompt(length=8, seed=0):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, new=NEW_TOKENS):
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """Prompt and the tokens plain transformers generates for it from the same files."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[FAMILY], dtype=torch.float32)
    ids = prompt()
    return ids, generate(ref, ids)


@pytest.fixture
def model(tiny_checkpoints, reference):
    """A hybrid model that has run once (CPU worker started) and matches the reference."""
    m = load(tiny_checkpoints[FAMILY])
    ids, want = reference
    assert torch.equal(generate(m, ids), want)
    stats = m.hybrid.executor.stats
    assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0, stats
    # decode steps' native jobs are started by the feeding thread (where the native kernel is built)
    assert stats.direct_native_jobs > 0 or not m.hybrid.executor.cpu_kernels.native_lane, stats
    yield m
    m.hybrid.executor.fault_injector = None
    m.hybrid.close()


def stray_threads(model, before: set[threading.Thread]) -> list[str]:
    """Threads alive now that were not before (the model's CPU-lane worker was already running)."""
    stray = [t.name for t in threading.enumerate() if t.is_alive() and t not in before]
    worker = model.hybrid.executor.cpu_lane._pool
    lanes = [t for t in (worker._threads if worker is not None else ()) if t.is_alive()]
    if len(lanes) > 1:
        stray += [t.name for t in lanes]
    return stray


def assert_recovered(model, reference, before):
    model.hybrid.executor.fault_injector = None
    ids, want = reference
    assert torch.equal(generate(model, ids), want)
    assert torch.equal(generate(model, ids), want)
    assert stray_threads(model, before) == []


def injector(lane: str, exc: BaseException, after: int = 0):
    """A fault injector raising ``exc`` on the ``after``-th call (0-based) from ``lane``."""
    calls = {"n": 0}

    def inject(current: str) -> None:
        if current != lane:
            return
        calls["n"] += 1
        if calls["n"] > after:
            raise exc

    inject.calls = calls
    return inject


# ------------------------------------------------------------------------------------- lane faults
@pytest.mark.parametrize("after", [0, 9], ids=["prefill", "decode"])
def test_cpu_lane_exception_is_execution_error_naming_the_layer(model, reference, after):
    before = set(threading.enumerate())
    boom = RuntimeError("injected CPU-lane fault")
    model.hybrid.executor.fault_injector = injector("cpu", boom, after)
    with pytest.raises(
        ExecutionError, match=r"CPU lane failed in layer [01]: .*injected CPU-lane fault"
    ) as info:
        generate(model, reference[0])
    assert isinstance(info.value, RuntimeError)
    assert info.value.__cause__ is boom
    assert_recovered(model, reference, before)


@pytest.mark.parametrize("after", [0, 9], ids=["prefill", "decode"])
@pytest.mark.parametrize(
    "lane, exc, pattern",
    [
        ("stream", RuntimeError("injected stream-lane fault"), "injected stream-lane fault"),
        ("gpu", OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"), "CUDA out of memory"),
    ],
    ids=["stream-error", "gpu-oom"],
)
def test_device_lane_errors_propagate_and_model_recovers(model, reference, lane, exc, pattern, after):
    before = set(threading.enumerate())
    model.hybrid.executor.fault_injector = injector(lane, exc, after)
    with pytest.raises(type(exc), match=pattern) as info:
        generate(model, reference[0])
    assert info.value is exc
    assert_recovered(model, reference, before)


def test_repeated_faults_on_every_lane_then_clean_run(model, reference):
    before = set(threading.enumerate())
    for round_ in range(3):
        for lane in ("cpu", "stream", "gpu"):
            model.hybrid.executor.fault_injector = injector(lane, RuntimeError(f"fault {round_}"), round_ * 4)
            with pytest.raises(RuntimeError, match=f"fault {round_}"):
                generate(model, reference[0])
    assert_recovered(model, reference, before)


@pytest.mark.parametrize("lane", ["gpu", "stream", "cpu"], ids=str)
def test_keyboard_interrupt_mid_generate_propagates(model, reference, lane):
    before = set(threading.enumerate())
    inject = injector(lane, KeyboardInterrupt(), after=11)
    model.hybrid.executor.fault_injector = inject
    with pytest.raises(KeyboardInterrupt):
        generate(model, reference[0])
    assert inject.calls["n"] == 12  # mid-generate: after 11 clean calls on that lane
    assert_recovered(model, reference, before)


def test_ctrl_c_while_waiting_for_the_cpu_lane_is_keyboard_interrupt(model, reference):
    """A real SIGINT delivered to the main thread while it sleeps on the CPU lane's future (the lane's
    thread runs every job here; a decode step's native job started by the feeding thread is interrupted
    in its wait in test_native_kernel, and its failures are the other tests' here)."""
    model.hybrid.executor.direct_native_start = False
    generate(model, reference[0])  # the lane's thread starts now, not as a stray of the interrupted call
    before = set(threading.enumerate())
    main = threading.main_thread().ident
    calls = {"n": 0}

    def inject(lane: str) -> None:
        if lane == "cpu":
            calls["n"] += 1
            if calls["n"] == 6:
                time.sleep(0.3)  # the main thread has issued its device lanes and sleeps on this future
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.1)

    model.hybrid.executor.fault_injector = inject
    # Python turns SIGINT into KeyboardInterrupt only where it installed its handler: a process started in
    # the background by a shell without job control inherits SIGINT ignored, and Python leaves it ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(model, reference[0])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert_recovered(model, reference, before)


# ---------------------------------------------------------------------------------------- threads
def test_concurrent_generate_matches_serial(model):
    prompts = [prompt(length=6 + i, seed=10 + i) for i in range(4)]
    serial = [generate(model, ids, new=10) for ids in prompts]
    before = set(threading.enumerate())
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for ids in prompts[k::2] * 3:
                results[k].append(generate(model, ids, new=10))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"caller-{k}") for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for k in (0, 1):
        for got, want in zip(results[k], serial[k::2] * 3, strict=True):
            assert torch.equal(got, want)
    assert stray_threads(model, before) == []


# ------------------------------------------------------------------------------------------ soak
def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def pinned_state(executor) -> tuple[int, int]:
    return len(executor.pinned_pool), executor.pinned_pool.nbytes()


def test_soak_2000_decode_steps_no_growth(tiny_checkpoints):
    """20 x 100 decode steps plus 30 short calls (50 generate calls) with every lane in use: no growth."""
    model = load(tiny_checkpoints[FAMILY])
    executor = model.hybrid.executor
    long_ids, short_ids = prompt(length=4, seed=1), prompt(length=12, seed=2)
    try:
        # warm-up: the largest prefill and decode shapes, allocator and worker settled
        first = generate(model, long_ids, new=100)
        short = generate(model, short_ids, new=3)
        for _ in range(2):
            generate(model, long_ids, new=100)
        gc.collect()
        pinned0, rss0, threads0 = pinned_state(executor), rss_bytes(), threading.active_count()
        executor.stats.reset()

        steps = calls = 0
        rss_max = rss0
        for i in range(20):
            out = generate(model, long_ids, new=100)
            assert torch.equal(out, first), f"long call {i} diverged"
            steps += out.shape[1] - long_ids.shape[1]
            calls += 1
            if i % 2 == 0:
                for _ in range(3):
                    assert torch.equal(generate(model, short_ids, new=3), short)
                    calls += 1
            assert pinned_state(executor) == pinned0, "pinned buffers grew after warm-up"
            assert threading.active_count() <= threads0, "threads started during the soak"
            rss_max = max(rss_max, rss_bytes())
        gc.collect()
        assert steps >= 2000 and calls == 50
        stats = executor.stats
        assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0, stats
        grew = max(rss_max, rss_bytes()) - rss0
        assert grew < 4 * 1024**2, f"RSS grew by {grew / 1024**2:.1f} MiB after warm-up"
    finally:
        model.hybrid.close()
