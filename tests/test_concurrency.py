"""One model, many threads: every entry point that runs the model (a plain forward, generate, calibrate,
trace) is serialised on ``model.hybrid.lock``, so callers from several threads get the single-threaded
results and the model stays exact afterwards.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny_models import VOCAB, load_every_lane

NEW_TOKENS = 4
THREADS = 6


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    m = load_every_lane(tiny_checkpoints["mixtral"])
    yield m
    m.hybrid.close()


def run_threads(work, count: int, timeout: float = 60) -> list[BaseException]:
    """Run ``work(k)`` in ``count`` threads started together; the exceptions they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def body(k: int) -> None:
        try:
            barrier.wait()
            work(k)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,), name=f"caller-{k}") for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a caller thread hung"
    return errors


def test_forward_and_generate_from_many_threads_match_single_threaded(model):
    check_many_threads(model)


def test_many_threads_on_the_decode_graph_path(tiny_checkpoints):
    # one static KV cache serves every generate call of the model: the calls take turns, each on a reset
    # cache, and forwards in between (on no cache of the model's) leave it alone
    model = load_every_lane(tiny_checkpoints["mixtral"], decode_graphs=True)
    try:
        check_many_threads(model)
        assert model.hybrid.decode_graphs.steps > 0
    finally:
        model.hybrid.close()


def check_many_threads(model) -> None:
    """Forwards and generate calls from several threads give what they give one at a time."""
    prompts = [prompt(length=5 + k, seed=100 + k) for k in range(THREADS)]
    want_logits = [logits(model, ids) for ids in prompts]
    want_tokens = [generate(model, ids) for ids in prompts]
    stats = model.hybrid.executor.stats
    assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0, stats
    got: dict[tuple[int, int, str], torch.Tensor] = {}

    def work(k: int) -> None:
        # each thread mixes plain forwards and generate calls over every prompt, in its own order
        for step in range(THREADS):
            i = (k + step) % THREADS
            if (k + step) % 3 == 0:
                got[(k, step, "generate")] = generate(model, prompts[i])
            else:
                got[(k, step, "forward")] = logits(model, prompts[i])

    started = time.perf_counter()
    assert run_threads(work, THREADS) == []
    assert len(got) == THREADS * THREADS
    for (k, step, kind), out in got.items():
        i = (k + step) % THREADS
        want = want_tokens[i] if kind == "generate" else want_logits[i]
        assert torch.equal(out, want), (k, step, kind)
    assert time.perf_counter() - started < 60
    for ids, want in zip(prompts, want_tokens, strict=True):
        assert torch.equal(generate(model, ids), want)


def blocked_while_locked(model, call) -> None:
    """``call()`` in another thread waits while this thread holds ``model.hybrid.lock``, then completes."""
    done = threading.Event()
    errors: list[BaseException] = []

    def body() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)
        finally:
            done.set()

    lanes = model.hybrid.executor.lanes
    with model.hybrid.lock:
        thread = threading.Thread(target=body)
        thread.start()
        assert not done.wait(0.3), "ran while another thread held the model's lock"
        assert lanes.tracer is None, "touched the model while another thread held its lock"
    assert done.wait(30)
    thread.join()
    assert errors == []


@pytest.mark.parametrize("entry", ["forward", "generate", "calibrate", "trace"])
def test_every_entry_point_waits_for_the_lock(model, entry, tmp_path):
    ids = prompt(length=6, seed=7)
    want = generate(model, ids)
    calls = {
        "forward": lambda: logits(model, ids),
        "generate": lambda: generate(model, ids),
        "calibrate": lambda: model.calibrate([ids], replan=False),
        "trace": lambda: model.trace(tmp_path / "trace.json", ids, max_new_tokens=2),
    }
    blocked_while_locked(model, calls[entry])
    assert torch.equal(generate(model, ids), want)


@pytest.mark.parametrize(
    "exc", [RuntimeError("injected fault"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_a_failed_forward_releases_the_lock(model, exc):
    ids = prompt(length=6, seed=8)
    want_logits, want_tokens = logits(model, ids), generate(model, ids)

    def inject(lane: str) -> None:
        if lane == "cpu":
            raise exc

    model.hybrid.executor.fault_injector = inject
    try:
        with pytest.raises(type(exc)):
            logits(model, ids)
    finally:
        model.hybrid.executor.fault_injector = None
    # another thread can take the lock (a leaked acquisition would make it wait for ever)
    taken: list[bool] = []

    def take() -> None:
        taken.append(model.hybrid.lock.acquire(timeout=5))
        if taken[-1]:
            model.hybrid.lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    assert taken == [True]
    assert torch.equal(logits(model, ids), want_logits)
    assert torch.equal(generate(model, ids), want_tokens)


def test_close_waits_for_a_running_call(tiny_checkpoints):
    other = load_every_lane(tiny_checkpoints["mixtral"])
    blocked_while_locked(other, other.hybrid.close)
    assert other.hybrid.executor.closed
