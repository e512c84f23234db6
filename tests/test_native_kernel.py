"""The native CPU expert lane: agreement with torch for every variant that runs here, pool behaviour, and the
fallback when the library cannot be built."""

from __future__ import annotations

import logging
import platform
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from hf_hybrid.kernels import native
from hf_hybrid.kernels.native import ExpertJob, NativeExpertLane, torch_reference

HAS_GCC = shutil.which("gcc") is not None
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX512_RUN = X86 and native.cpu_has("avx512f", "avx512bw", "avx512vl")
AVX512_BF16_RUN = AVX512_RUN and native.cpu_has("avx512_bf16")
AMX_RUN = AVX512_BF16_RUN and native.cpu_has("amx_bf16", "amx_tile")


def _kernel_version() -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return (0,)


#: Linux grants AMX's tile state to a process that asks (ARCH_REQ_XCOMP_PERM) from 5.16 on
AMX_PERMITTED = AMX_RUN and platform.system() == "Linux" and _kernel_version() >= (5, 16)

#: variant -> (extra compile flags, whether it runs here and differs from the native build, its isa).
#: The native build is the AVX-512 one where the CPU has AVX-512 (with VDPBF16PS where it has AVX512_BF16),
#: else the AVX2 one; the others cover the remaining code paths where this CPU can run them.
VARIANTS = {
    "native": (None, True, None),
    "scalar": (native.SCALAR_FLAGS, True, "scalar"),
    "avx2": (native.AVX2_FLAGS, AVX512_RUN and native.cpu_has("avx2", "fma"), "avx2"),
    "avx512f": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mno-avx512bf16"), AVX512_BF16_RUN, "avx512f"),
    # the native AVX-512 BF16 build with its VDPBF16PS path switched on (off by default)
    "native_dpbf16": (None, AVX512_BF16_RUN, "avx512_bf16"),
    # the AMX path, every bf16 job on tiles (amx_min_tokens=1): emulated tiles (everywhere; the native
    # instruction set packs the weights, and plain C packs them in the scalar build), and the hardware
    "amx_emulated": (native.AMX_EMULATE_FLAGS, True, None),
    "amx_emulated_scalar": ((*native.SCALAR_FLAGS, *native.AMX_EMULATE_FLAGS), True, "scalar"),
    "amx": (None, AMX_PERMITTED, None),
}
#: the variants whose pools run bf16 jobs on AMX tiles, and the libraries they use
AMX_VARIANTS = {"amx_emulated": "amx_emulated", "amx_emulated_scalar": "amx_emulated_scalar", "amx": "native"}
#: variants that share another's library (with other settings)
SHARED_LIBRARY = {"native_dpbf16": "native", "amx": "native"}

needs_gcc = pytest.mark.skipif(not HAS_GCC, reason="gcc is not installed")


@pytest.fixture(scope="module")
def libraries():
    """Every variant this CPU runs, compiled concurrently (compiles are single-threaded and take seconds)."""
    if not HAS_GCC:
        pytest.skip("gcc is not installed")
    wanted = {
        name: flags for name, (flags, runs, _) in VARIANTS.items() if runs and name not in SHARED_LIBRARY
    }
    with ThreadPoolExecutor(len(wanted)) as pool:
        futures = {name: pool.submit(native.load, flags) for name, flags in wanted.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def lane(request, libraries):
    """A 3-thread pool of one variant (more threads than this machine's cores is fine: workers sleep)."""
    name = request.param
    _, runs, isa = VARIANTS[name]
    if not runs:
        pytest.skip(f"the {name} variant does not run here or is the native build")
    library = libraries[SHARED_LIBRARY.get(name, name)]
    if isa is not None:
        assert library.isa == isa
    if name in VARIANTS_OF_ISA and library.isa == libraries["native"].isa:
        pytest.skip(f"the {name} variant is the native build on this CPU")
    lane = _amx_lane(library) if name in AMX_VARIANTS else NativeExpertLane(3, library=library)
    if name == "native_dpbf16":
        lane.configure(dpbf16=True)
    yield lane
    lane.close()


#: variants that differ from the native build only by instruction set (skipped where they are the same)
VARIANTS_OF_ISA = ("scalar", "avx2", "avx512f")


def _amx_lane(library: native.Library, threads: int = 3) -> NativeExpertLane:
    """A pool of ``library`` that runs every bf16 job on AMX tiles (and must be able to)."""
    assert library.amx, "the AMX path is not usable in this build"
    lane = NativeExpertLane(threads, library=library)
    lane.configure(amx_min_tokens=1)
    assert lane.amx and lane.amx_min_tokens == 1
    return lane


@pytest.fixture(scope="module", params=list(AMX_VARIANTS))
def amx_lane(request, libraries):
    """A 3-thread pool of an AMX variant with the default AMX threshold (16 tokens)."""
    name = request.param
    if not VARIANTS[name][1]:
        pytest.skip(f"the {name} variant does not run here (no AMX-BF16, or a Linux without its permission)")
    library = libraries[AMX_VARIANTS[name]]
    assert library.amx
    lane = NativeExpertLane(3, library=library)
    assert lane.amx and lane.amx_min_tokens == native.DEFAULT_AMX_MIN_TOKENS
    yield lane
    lane.close()


# ------------------------------------------------------------------------------------------------------
# test data and comparisons


def _grid(shape, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Random multiples of ``scale`` in [-8, 8] * scale: the gate and up dot products of such values are
    exact in fp32, so torch and the kernel round the same numbers to bf16 whatever their summation order."""
    return torch.randint(-8, 9, shape, generator=gen).float() * scale


def _expert(hidden: int, inter: int, dtype: torch.dtype, gen: torch.Generator, pad: int = 0):
    """(gate_up [2I, H], down [H, I]); with ``pad``, row-strided views into wider matrices."""
    gate_up = _grid((2 * inter, hidden + pad), 1 / 64, gen).to(dtype)[:, :hidden]
    down = _grid((hidden, inter + pad), 1 / 64, gen).to(dtype)[:, :inter]
    return gate_up, down


def _jobs(hidden: int, ntokens: int, dtype: torch.dtype, seed: int = 0) -> list[ExpertJob]:
    """Jobs of several kinds and sizes: routed experts (token subsets, a repeated token, bf16 and fp32
    routing weights), a dense slice (every token, weight 1), the CPU part of a split expert (rows and
    partial, strided weights) and an expert with no tokens."""
    gen = torch.Generator().manual_seed(seed)
    w_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    def subset(k: int) -> torch.Tensor:
        return torch.randint(0, ntokens, (k,), generator=gen)

    jobs = []
    gu, dn = _expert(hidden, 48, dtype, gen)
    tok = subset(max(1, ntokens // 2))
    jobs.append(ExpertJob(gu, dn, tokens=tok, weights=torch.rand(tok.numel(), generator=gen).to(w_dtype)))
    gu, dn = _expert(hidden, 100, dtype, gen)
    tok = torch.cat([subset(max(1, ntokens - 1)), torch.zeros(1, dtype=torch.int64)])  # token 0 may repeat
    jobs.append(ExpertJob(gu, dn, tokens=tok, weights=torch.rand(tok.numel(), generator=gen)))
    gu, dn = _expert(hidden, 64, dtype, gen)
    jobs.append(ExpertJob(gu, dn))
    gu, dn = _expert(hidden, 80, dtype, gen, pad=5)
    tok = subset(ntokens)
    jobs.append(
        ExpertJob(gu, dn, rows=37, tokens=tok, weights=torch.rand(ntokens, generator=gen), partial=True)
    )
    gu, dn = _expert(hidden, 16, dtype, gen)
    jobs.append(ExpertJob(gu, dn, tokens=torch.zeros(0, dtype=torch.int64), weights=torch.zeros(0)))
    return jobs


def _plain_torch(x: torch.Tensor, jobs: list[ExpertJob], out: torch.Tensor) -> torch.Tensor:
    """The expert formula as transformers and the GPU lane compute it: fused gate_up matmul in the dtype,
    ``F.linear(act(g) * u, down)``, times the routing weight, accumulated in fp32."""
    act = ACT2FN["silu"]
    for job in jobs:
        inter = job.gate_up.shape[0] // 2
        r = inter if job.rows is None else job.rows
        gate_up = torch.cat([job.gate_up[:r], job.gate_up[inter : inter + r]])
        xs = x if job.tokens is None else x[job.tokens]
        gate, up = F.linear(xs, gate_up).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, job.down[:, :r])
        if job.weights is not None:
            y = y * job.weights[:, None]
        if job.tokens is None:
            out += y.float()
        else:
            out.index_add_(0, job.tokens, y.float())
    return out


def _ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |v| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-60))) - 7)


def _scale(x: torch.Tensor, jobs: list[ExpertJob]) -> torch.Tensor:
    """Per element of out: the sum over jobs of |that job's term| (the size the rounding errors scale with)."""
    total = torch.zeros(x.shape, dtype=torch.float32)
    for job in jobs:
        total += torch_reference(x, [job], torch.zeros(x.shape, dtype=torch.float32)).abs()
    return total


def _check(
    got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, ulps: float
) -> None:
    """fp32: within 1e-5 of the terms' size; bf16: within ``ulps`` bf16 ulps of it."""
    err = (got - want).abs()
    if dtype == torch.float32:
        bound = 1e-5 * scale + 1e-6 * scale.max()
    else:
        bound = ulps * _ulp_bf16(scale) + 2.0**-20 * scale.max()
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {err.numel()} elements off, worst {float((err / bound).max()):.2f}x the bound"
    )


def _abs_terms(x: torch.Tensor, jobs: list[ExpertJob]) -> torch.Tensor:
    """Per element of out: sum over jobs and intermediate rows of |w * h_i * down_ci| (fp32). Rounding g or
    u to a neighbouring bf16 value moves h_i by at most 2^-7 |h_i|, so out moves by at most 2^-7 times
    this, however much the terms cancel."""
    total = torch.zeros(x.shape, dtype=torch.float32)
    for job in jobs:
        inter = job.gate_up.shape[0] // 2
        r = inter if job.rows is None else job.rows
        xs = (x if job.tokens is None else x[job.tokens]).float()
        gu = job.gate_up.float()
        h = F.silu(F.linear(xs, gu[:r])) * F.linear(xs, gu[inter : inter + r])
        y = F.linear(h.abs(), job.down[:, :r].float().abs())
        if job.weights is not None:
            y = y * job.weights.float().abs()[:, None]
        if job.tokens is None:
            total += y
        else:
            total.index_add_(0, job.tokens, y)
    return total


def _amx_jobs(lane: NativeExpertLane, x: torch.Tensor, jobs: list[ExpertJob]) -> int:
    """The jobs of a call that the lane must compute on AMX tiles: bf16, rows and at least
    ``amx_min_tokens`` tokens."""
    if not lane.amx or x.dtype != torch.bfloat16:
        return 0
    count = 0
    for job in jobs:
        ntok = x.shape[0] if job.tokens is None else job.tokens.numel()
        rows = job.gate_up.shape[0] // 2 if job.rows is None else job.rows
        count += rows > 0 and ntok >= lane.amx_min_tokens
    return count


def _run(lane: NativeExpertLane, x: torch.Tensor, jobs: list[ExpertJob]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out before, out after) for a random nonzero starting out: the kernel must add, not overwrite."""
    before = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    out = before.clone()
    assert lane.run(x, jobs, out) is out
    return before, out


# ------------------------------------------------------------------------------------------------------
# agreement with torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("hidden", [40, 72, 64, 128])
@pytest.mark.parametrize("ntokens", [1, 3, 8, 33])
def test_matches_torch(lane, dtype, hidden, ntokens):
    x = _grid((ntokens, hidden), 1 / 8, torch.Generator().manual_seed(hidden * 100 + ntokens)).to(dtype)
    jobs = _jobs(hidden, ntokens, dtype, seed=hidden + ntokens)
    before, out = _run(lane, x, jobs)
    assert lane.last_stats()["amx_jobs"] == _amx_jobs(lane, x, jobs)
    ref = torch_reference(x, jobs, before.clone())
    scale = _scale(x, jobs)
    assert (ref - before).abs().gt(0).float().mean() > 0.9  # the jobs do contribute
    # (a) the reference with the same semantics
    _check(out, ref, scale, dtype, ulps=2)
    if dtype == torch.bfloat16:
        assert torch.equal(out, ref) or (out == ref).float().mean() > 0.95
    # (b) the plain expert formula (the split job's part is rounded to bf16 there, not in the kernel)
    _check(out, _plain_torch(x, jobs, before.clone()), scale, dtype, ulps=2)


def test_random_data_k_blocks_and_token_groups(lane):
    """Continuous random data, rows split into k blocks (forced small here; 1024+ elements by default) in
    both phases, and more tokens than one token group (64)."""
    gen = torch.Generator().manual_seed(3)
    hidden, inter, ntokens = 200, 300, 70
    lane.configure(k_block=64)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(ntokens, hidden, generator=gen).to(dtype)
            gu = (torch.randn(2 * inter, hidden, generator=gen) * 0.05).to(dtype)
            dn = (torch.randn(hidden, inter, generator=gen) * 0.05).to(dtype)
            tok = torch.randint(0, ntokens, (40,), generator=gen)
            jobs = [
                ExpertJob(gu, dn),
                ExpertJob(gu, dn, tokens=tok, weights=torch.rand(40, generator=gen).to(dtype)),
                ExpertJob(
                    gu, dn, rows=201, partial=True, tokens=tok[:3], weights=torch.rand(3, generator=gen)
                ),
            ]
            before, out = _run(lane, x, jobs)
            ref = torch_reference(x, jobs, before.clone())
            assert (out != before).float().mean() > 0.99
            if dtype == torch.float32:
                _check(out, ref, _scale(x, jobs), dtype, ulps=0)
                continue
            # the summation order differs from torch's, so g and u may round to neighbouring bf16 values:
            # where the terms of out cancel, that is more than a few ulps of the result, never more than
            # the bound
            err = (out - ref).abs()
            close = err <= 2 * _ulp_bf16(_scale(x, jobs))
            assert close.float().mean() > 0.995
            assert (err <= 2.0**-7 * _abs_terms(x, jobs) + 2 * _ulp_bf16(_scale(x, jobs))).all()
    finally:
        lane.configure(k_block=0)


# ------------------------------------------------------------------------------------------------------
# the AMX path


def _amx_case(hidden: int, token_counts: list[int], ntokens: int, seed: int) -> tuple[torch.Tensor, list]:
    """bf16 grid data and one job per entry of ``token_counts`` (routed subsets with repeats, bf16 and fp32
    routing weights, rows not a multiple of 16, a partial job, a dense job when the count is ``ntokens``)."""
    gen = torch.Generator().manual_seed(seed)
    x = _grid((ntokens, hidden), 1 / 8, gen).bfloat16()
    jobs = []
    for n, count in enumerate(token_counts):
        inter = (48, 100, 37, 64)[n % 4]
        gate_up, down = _expert(hidden, inter, torch.bfloat16, gen, pad=3 * (n % 2))
        if count == ntokens and n % 4 == 3:
            jobs.append(ExpertJob(gate_up, down))  # every token, weight 1
            continue
        tokens = torch.randint(0, ntokens, (count,), generator=gen)
        tokens[count // 2] = tokens[0]  # a repeated token
        w_dtype = torch.bfloat16 if n % 2 == 0 else torch.float32
        weights = torch.rand(count, generator=gen).to(w_dtype)
        rows = 29 if n % 3 == 2 else None
        jobs.append(ExpertJob(gate_up, down, rows=rows, tokens=tokens, weights=weights, partial=n % 3 == 2))
    return x, jobs


@pytest.mark.parametrize(
    ("hidden", "token_counts", "ntokens"),
    [
        (72, [17, 33, 9], 40),
        (40, [64, 100, 128, 100], 128),
        (200, [300, 33, 64, 300], 300),
        (136, [128, 17, 4, 15], 150),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v),
)
def test_amx_matches_torch(amx_lane, hidden, token_counts, ntokens):
    """Jobs of 17-300 tokens on tiles (hidden and rows not multiples of a tile, repeated tokens, bf16 and
    fp32 routing weights, partial jobs, jobs of several sizes in one call) agree with torch as closely as the
    vector path does; jobs under the threshold (16 tokens) take the vector path in the same call."""
    x, jobs = _amx_case(hidden, token_counts, ntokens, seed=hidden + ntokens)
    before, out = _run(amx_lane, x, jobs)
    expected = sum(c >= native.DEFAULT_AMX_MIN_TOKENS for c in token_counts)
    assert amx_lane.last_stats()["amx_jobs"] == expected == _amx_jobs(amx_lane, x, jobs) > 0
    ref = torch_reference(x, jobs, before.clone())
    assert (ref - before).abs().gt(0).float().mean() > 0.5  # (random routing leaves some tokens out)
    _check(out, ref, _scale(x, jobs), torch.bfloat16, ulps=2)
    assert torch.equal(out, ref) or (out == ref).float().mean() > 0.95


def test_amx_threshold_and_switch(amx_lane):
    """amx_min_tokens decides which jobs take the tiles (0: none); both paths give the same result here
    (grid data: every dot product is exact, so only the down sums' order differs)."""
    x, jobs = _amx_case(72, [40, 20], 48, seed=1)
    results = {}
    try:
        for threshold, expected in ((32, 1), (20, 2), (41, 0), (0, 0)):
            amx_lane.configure(amx_min_tokens=threshold)
            assert amx_lane.amx == (threshold > 0)
            out = torch.zeros(x.shape)
            amx_lane.run(x, jobs, out)
            assert amx_lane.last_stats()["amx_jobs"] == expected
            results[threshold] = out
    finally:
        amx_lane.configure(amx_min_tokens=native.DEFAULT_AMX_MIN_TOKENS)
    scale = _scale(x, jobs)
    for threshold in (32, 20, 41):
        _check(results[threshold], results[0], scale, torch.bfloat16, ulps=2)
    # fp32 jobs never take the tiles
    x32 = x.float()
    jobs32 = [
        ExpertJob(j.gate_up.float(), j.down.float(), j.rows, j.tokens, j.weights, j.partial) for j in jobs
    ]
    out = torch.zeros(x.shape)
    amx_lane.run(x32, jobs32, out)
    assert amx_lane.last_stats()["amx_jobs"] == 0


def test_amx_same_result_for_any_thread_count(libraries):
    """On tiles too each element gets its jobs' terms in job order, whatever the threads."""
    x, jobs = _amx_case(136, [64, 40, 33], 80, seed=4)
    results = []
    for threads in (1, 2, 4):
        with _amx_lane(libraries["amx_emulated"], threads) as lane:
            lane.configure(min_bytes_per_thread=0)
            out = torch.zeros(x.shape)
            lane.run(x, jobs, out)
            assert lane.last_stats()["amx_jobs"] == 3
            results.append(out)
    assert results[0].abs().max() > 0
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_split_parts_add_up_to_the_whole(lane):
    """Two partial jobs over rows [0, r) and [r, I) sum, in fp32, to the whole expert's unrounded output."""
    gen = torch.Generator().manual_seed(5)
    hidden, inter, r = 72, 90, 31
    x = torch.randn(4, hidden, generator=gen).bfloat16()
    gu, dn = _expert(hidden, inter, torch.bfloat16, gen)
    w = torch.rand(4, generator=gen)
    tail_gu = torch.cat([gu[r:inter], gu[inter + r :]])
    parts = [
        ExpertJob(gu, dn, rows=r, weights=w, partial=True),
        ExpertJob(tail_gu, dn[:, r:], weights=w, partial=True),  # columns r.. of down: row stride I
    ]
    out = torch.zeros(4, hidden)
    lane.run(x, parts, out)
    whole = torch_reference(x, [ExpertJob(gu, dn, weights=w, partial=True)], torch.zeros(4, hidden))
    assert whole.abs().max() > 0
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_unweighted_part_on_repeated_tokens_matches_the_reference(lane):
    """A divided unit's CPU part as a prefill-sized step runs it (the executor's combined parts): rows
    [0, r), its tokens picked by index (repeats of the step's rows placed after them), no routing weight,
    partial (fp32 out); beside a whole weighted job on the step's own rows."""
    gen = torch.Generator().manual_seed(9)
    hidden, inter, r, steps = 64, 96, 40, 20
    extra = torch.tensor([3, 7, 7, 11, 19, 0, 5, 2, 13, 17, 1, 4, 6, 8, 9, 10, 12, 14, 15, 16])
    x = torch.randn(steps, hidden, generator=gen).bfloat16()
    x = torch.cat([x, x[extra]])
    gu, dn = _expert(hidden, inter, torch.bfloat16, gen)
    gu2, dn2 = _expert(hidden, inter, torch.bfloat16, gen)
    mine = torch.arange(steps, steps + extra.numel())
    jobs = [
        ExpertJob(gu2, dn2, tokens=torch.arange(0, steps, 2), weights=torch.rand(steps // 2, generator=gen)),
        ExpertJob(gu, dn, rows=r, tokens=mine, partial=True),
    ]
    out = torch.zeros(x.shape)
    lane.run(x, jobs, out)
    want = torch_reference(x, jobs, torch.zeros(x.shape))
    assert want[steps:].abs().max() > 0 and want[1:steps:2].abs().max() == 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_same_result_for_any_thread_count(libraries):
    """Each element gets its jobs' terms in job order, so the thread count does not change a bit."""
    x = torch.randn(5, 128).bfloat16()
    jobs = _jobs(128, 5, torch.bfloat16, seed=11)
    results = []
    for threads in (1, 2, 4):
        with NativeExpertLane(threads, library=libraries["native"]) as lane:
            lane.configure(min_bytes_per_thread=0)  # every thread takes part, however small the work
            out = torch.zeros(5, 128)
            lane.run(x, jobs, out)
            results.append(out)
    assert results[0].abs().max() > 0
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_rows_zero_and_no_jobs_are_no_ops(libraries):
    lane = NativeExpertLane(2, library=libraries["native"])
    x = torch.randn(3, 40)
    gu, dn = _expert(40, 16, torch.float32, torch.Generator().manual_seed(0))
    out = torch.ones(3, 40)
    lane.run(x, [], out)
    lane.run(x, [ExpertJob(gu, dn, rows=0)], out)
    assert torch.equal(out, torch.ones(3, 40))
    lane.close()


# ------------------------------------------------------------------------------------------------------
# the pool


def test_concurrent_calls_on_one_pool(libraries):
    """Python threads calling run on one pool at once are serialised inside and each gets its own result."""
    lane = NativeExpertLane(3, library=libraries["native"])
    cases = []
    for i in range(6):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
        jobs = _jobs(64, 4, torch.bfloat16, seed=100 + i)
        expected = torch.zeros(4, 64)
        lane.run(x, jobs, expected)
        assert expected.abs().max() > 0
        cases.append((x, jobs, expected))

    failures = []
    start = threading.Barrier(len(cases))

    def worker(case):
        x, jobs, expected = case
        start.wait()
        for _ in range(25):
            out = torch.zeros(4, 64)
            lane.run(x, jobs, out)
            if not torch.equal(out, expected):
                failures.append(float((out - expected).abs().max()))

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lane.close()
    assert not failures


def test_close_is_idempotent_and_final(libraries):
    lane = NativeExpertLane(2, library=libraries["native"])
    assert lane.threads == 2 and "open" in repr(lane)
    lane.close()
    lane.close()
    with pytest.raises(RuntimeError, match="closed"):
        lane.run(torch.zeros(1, 8), [], torch.zeros(1, 8))
    del lane  # __del__ after close is harmless


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefetching_short_rows_a_pass_ahead_changes_no_bit(lane, dtype):
    # rows of 48-100 elements (short: the default prefetches them a pass ahead), then every row along itself
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(5)).to(dtype)
    jobs = _jobs(256, 6, dtype, seed=4)
    before, ahead = _run(lane, x, jobs)
    lane.configure(short_row_bytes=0)
    try:
        _, along = _run(lane, x, jobs)
    finally:
        lane.configure(short_row_bytes=16384)
    assert torch.equal(ahead, along)
    _check(ahead, torch_reference(x, jobs, before.clone()), _scale(x, jobs), dtype, ulps=2)


def test_configure_rejects_bad_values(libraries):
    with NativeExpertLane(1, library=libraries["native"]) as lane:
        lane.configure(barrier_spin_us=0, prefetch_bytes=512, dpbf16=False, idle_spin_us=0)
        with pytest.raises(ValueError):
            lane.configure(prefetch_bytes=-1)
        with pytest.raises(ValueError):
            lane.configure(k_block=48)  # not a multiple of 32
        with pytest.raises(ValueError):
            lane.configure(amx_min_tokens=-1)
        with pytest.raises(ValueError):
            lane.configure(wait_spin_us=-1)
        with pytest.raises(ValueError):
            lane.configure(short_row_bytes=-1)
        assert lane.amx_min_tokens == native.DEFAULT_AMX_MIN_TOKENS


def _bad_calls():
    gen = torch.Generator().manual_seed(0)
    gu, dn = _expert(16, 8, torch.float32, gen)
    x = torch.randn(3, 16)
    out = torch.zeros(3, 16)
    yield "bf16 weights, fp32 x", x, [ExpertJob(gu.bfloat16(), dn.bfloat16())], out
    yield "fp16 x", x.half(), [ExpertJob(gu.half(), dn.half())], out
    yield "x not contiguous", torch.randn(16, 3).t(), [ExpertJob(gu, dn)], out
    yield "out not fp32", x, [ExpertJob(gu, dn)], out.double()
    yield "out of another shape", x, [ExpertJob(gu, dn)], torch.zeros(2, 16)
    yield "x on another device", x.to("meta"), [ExpertJob(gu, dn)], out
    yield "gate_up of another width", x, [ExpertJob(gu[:, :8], dn)], out
    yield "odd gate_up rows", x, [ExpertJob(gu[:15], dn)], out
    yield "down transposed", x, [ExpertJob(gu, dn.t().contiguous())], out
    yield "columns not contiguous", x, [ExpertJob(gu, torch.randn(8, 16).t())], out
    yield "rows > I", x, [ExpertJob(gu, dn, rows=9)], out
    yield "rows negative", x, [ExpertJob(gu, dn, rows=-1)], out
    yield "int32 tokens", x, [ExpertJob(gu, dn, tokens=torch.tensor([0, 1], dtype=torch.int32))], out
    yield "token out of range", x, [ExpertJob(gu, dn, tokens=torch.tensor([0, 3]))], out
    yield "negative token", x, [ExpertJob(gu, dn, tokens=torch.tensor([-1]))], out
    yield (
        "weights of another length",
        x,
        [ExpertJob(gu, dn, tokens=torch.tensor([0]), weights=torch.ones(2))],
        out,
    )
    yield "integer weights", x, [ExpertJob(gu, dn, weights=torch.ones(3, dtype=torch.int64))], out


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda c: c[0])
def test_bad_inputs_raise_value_error(libraries, case):
    _, x, jobs, out = case
    with NativeExpertLane(1, library=libraries["native"]) as lane:
        before = out.clone()
        with pytest.raises(ValueError):
            lane.run(x, jobs, out)
        assert torch.equal(out, before)


def test_threads_must_be_positive(libraries):
    with pytest.raises(ValueError):
        NativeExpertLane(0, library=libraries["native"])


# ------------------------------------------------------------------------------------------------------
# build, load, fallback


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A private build cache and no cached library or warning, before and after the test."""
    monkeypatch.setenv("HF_HYBRID_CACHE", str(tmp_path / "cache"))
    native._reset_for_tests()
    yield tmp_path / "cache"
    native._reset_for_tests()


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == native.__name__ and r.levelno == logging.WARNING
    ]


def test_disabled_by_environment(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("HF_HYBRID_NATIVE", "0")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.available() is False
        assert native.available() is False
        assert native.isa() == "unavailable"
        assert native.supports(torch.bfloat16, ACT2FN["silu"]) is False
    messages = _warnings(caplog)
    assert len(messages) == 1 and "HF_HYBRID_NATIVE" in messages[0] and "torch path" in messages[0]
    with pytest.raises(native.NativeBuildError):
        NativeExpertLane(1)
    assert not (fresh_state / "native").exists()  # nothing was built


def test_failing_compiler_falls_back(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("HF_HYBRID_CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.available() is False
        assert native.available() is False
    messages = _warnings(caplog)
    assert len(messages) == 1 and "/bin/false" in messages[0] and "torch path" in messages[0]
    assert "/bin/false" in (native.unavailable_reason() or "")


def test_missing_compiler_falls_back(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("HF_HYBRID_CC", str(fresh_state / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.available() is False
    assert len(_warnings(caplog)) == 1


@needs_gcc
def test_available_builds_once_into_the_cache(fresh_state, caplog):
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.available() is True
    assert not _warnings(caplog)
    assert native.isa() in ("avx512_bf16", "avx512f", "avx2", "scalar")
    if X86 and native.cpu_has("avx2", "fma"):
        assert native.isa() != "scalar"
    built = sorted((fresh_state / "native").glob("libhf_hybrid_expert_lane-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native.compile_library() == built[0] and built[0].stat().st_mtime_ns == stamp  # cached
    assert native.supports(torch.bfloat16, ACT2FN["silu"])
    assert native.supports(torch.float32, torch.nn.SiLU())
    assert native.supports(torch.float32, F.silu)
    assert not native.supports(torch.float16, ACT2FN["silu"])
    assert not native.supports(torch.bfloat16, ACT2FN["gelu"])
    assert not list((fresh_state / "native").glob("*.tmp"))


@needs_gcc
@pytest.mark.skipif(not X86, reason="AVX-512 is an x86 instruction set")
def test_avx512_code_compiles_here():
    """The AVX-512 paths must compile on any x86 machine with gcc (they run only where the CPU has them)."""
    path = native.compile_library(native.AVX512_FLAGS)
    assert path.exists() and path.stat().st_size > 0
    assert path != native.compile_library(native.SCALAR_FLAGS)  # other flags, other library
    if AVX512_BF16_RUN:
        assert native.load(native.AVX512_FLAGS).isa == "avx512_bf16"


@needs_gcc
@pytest.mark.skipif(not X86, reason="AMX is an x86 instruction set")
def test_amx_code_compiles_here():
    """The AMX tile path must compile on any x86 machine with gcc (it runs only where the CPU has AMX-BF16
    and Linux grants the tile state); elsewhere the native build reports it unusable."""
    path = native.compile_library(native.AMX_FLAGS)
    assert path.exists() and path.stat().st_size > 0
    if AMX_PERMITTED:
        assert native.load(native.AMX_FLAGS).amx
    if not AMX_RUN:
        assert not native.load().amx


def test_native_lane_takes_big_bf16_jobs_only_with_amx(monkeypatch):
    """Jobs over NATIVE_MAX_TOKENS go to the native lane only where it has AMX tiles, and only bf16 ones."""
    from types import SimpleNamespace

    from hf_hybrid.cpu_kernels import NATIVE_MAX_TOKENS, CpuKernels

    monkeypatch.setattr(native, "supports", lambda dtype, act_fn: True)
    kernels = CpuKernels.__new__(CpuKernels)
    bf16 = SimpleNamespace(dtype=torch.bfloat16, act_fn=F.silu)
    fp32 = SimpleNamespace(dtype=torch.float32, act_fn=F.silu)
    kernels.native_lane = SimpleNamespace(amx=False)
    assert kernels.native_applies(bf16, [1, NATIVE_MAX_TOKENS])
    assert not kernels.native_applies(bf16, [1, NATIVE_MAX_TOKENS + 1])
    kernels.native_lane = SimpleNamespace(amx=True)
    assert kernels.native_applies(bf16, [3, 512])
    assert kernels.native_applies(fp32, [NATIVE_MAX_TOKENS])
    assert not kernels.native_applies(fp32, [NATIVE_MAX_TOKENS + 1])
    kernels.native_lane = None
    assert not kernels.native_applies(bf16, [1])


@needs_gcc
def test_amx_can_be_switched_off_by_environment(monkeypatch):
    library = native.load(("-DHF_AMX_EMULATE",))
    assert library.amx
    with NativeExpertLane(2, library=library) as lane:
        assert lane.amx and lane.amx_min_tokens > 0
    monkeypatch.setenv("HF_HYBRID_AMX", "0")
    with NativeExpertLane(2, library=library) as lane:
        assert not lane.amx and lane.amx_min_tokens == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_weights_picked_by_position_packed_before_they_arrive(lane, dtype):
    """Jobs whose routing weights are picked by ``weight_index`` from one shared array: packed first, the
    weights written afterwards (as the executor's device copy fills them), then run. Bitwise the same as
    gathering each job's weights beforehand; an index outside the array is refused."""
    hidden, ntokens = 72, 5
    gen = torch.Generator().manual_seed(3)
    x = _grid((ntokens, hidden), 1 / 8, gen).to(dtype)
    w_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    flat = torch.rand(ntokens * 2, generator=gen).to(w_dtype)  # top-2 routing weights of 5 tokens
    shared = torch.zeros_like(flat)  # "still arriving": filled after packing
    jobs, gathered = [], []
    for inter, (tok, pos) in zip(
        (48, 100, 16), (([0, 3, 4], [1, 6, 9]), ([1, 2, 3, 0], [2, 4, 7, 0]), ([], []))
    ):
        gu, dn = _expert(hidden, inter, dtype, gen)
        tok, pos = torch.tensor(tok, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)
        jobs.append(ExpertJob(gu, dn, tokens=tok, weights=shared, weight_index=pos))
        gathered.append(ExpertJob(gu, dn, tokens=tok, weights=flat[pos]))
    out = torch.zeros(ntokens, hidden)
    packed = lane.pack(x, jobs, out)
    shared.copy_(flat)
    lane.run_packed(packed)
    want = lane.run(x, gathered, torch.zeros(ntokens, hidden))
    assert torch.equal(out, want) and out.abs().sum() > 0
    assert torch.equal(
        torch_reference(x, jobs, torch.zeros(ntokens, hidden)),
        torch_reference(x, gathered, torch.zeros(ntokens, hidden)),
    )
    bad = [
        ExpertJob(
            jobs[0].gate_up,
            jobs[0].down,
            tokens=jobs[0].tokens,
            weights=shared,
            weight_index=torch.tensor([0, 1, 10]),
        )
    ]
    with pytest.raises(ValueError, match="out of range"):
        lane.run(x, bad, torch.zeros(ntokens, hidden))
    with pytest.raises(ValueError, match="weight_index"):
        lane.run(
            x,
            [
                ExpertJob(
                    jobs[0].gate_up,
                    jobs[0].down,
                    tokens=jobs[0].tokens,
                    weights=shared,
                    weight_index=torch.tensor([0, 1]),
                )
            ],
            torch.zeros(ntokens, hidden),
        )


# ------------------------------------------------------------------------------------------------------
# calls started by the caller and waited for later (the executor's decode steps)


def test_started_call_gives_the_run_result_and_zeroes_out(lane):
    """start + wait computes what run computes, bitwise; with zero_out the leader clears ``out`` first;
    the times are on perf_counter's clock, around the call."""
    import time

    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).bfloat16()
    jobs = _jobs(96, 3, torch.bfloat16, seed=21)
    want = lane.run(x, jobs, torch.zeros(3, 96))
    assert want.abs().max() > 0
    out = torch.full((3, 96), 5.0)
    before = time.perf_counter()
    lane.start(lane.pack(x, jobs, out), zero_out=True)
    got, started, ended = lane.wait()
    assert got is out and torch.equal(out, want)
    assert before <= started <= ended <= time.perf_counter()
    kept = torch.ones(3, 96)  # without zero_out the jobs add into out, as run does
    lane.start(lane.pack(x, jobs, kept))
    lane.wait()
    torch.testing.assert_close(kept, want + 1)  # each job's terms added into 1 in turn: rounding differs


def test_started_calls_with_spinning_threads(libraries):
    """With the leader and workers spinning after a call and the caller spinning in wait, back-to-back
    started calls give run's results (the spin paths hand over the same state as the sleeping ones)."""
    lane = NativeExpertLane(3, library=libraries["native"])
    lane.configure(idle_spin_us=2000, wait_spin_us=5000, min_bytes_per_thread=0)
    for i in range(20):
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
        jobs = _jobs(64, 2, torch.bfloat16, seed=40 + i % 3)
        want = lane.run(x, jobs, torch.zeros(2, 64))
        lane.start(lane.pack(x, jobs, torch.full((2, 64), 3.0)), zero_out=True)
        assert torch.equal(lane.wait()[0], want) and want.abs().max() > 0
    lane.close()


def test_start_and_wait_misuse_and_close(libraries):
    """wait without a started call raises; a second start first collects the call not waited for; close
    collects a call in flight; a refused call raises ValueError at the wait and the pool stays usable."""
    lane = NativeExpertLane(2, library=libraries["native"])
    with pytest.raises(RuntimeError, match="no call was started"):
        lane.wait()
    x = torch.randn(2, 64).bfloat16()
    jobs = _jobs(64, 2, torch.bfloat16, seed=3)
    want = lane.run(x, jobs, torch.zeros(2, 64))
    first, second = torch.zeros(2, 64), torch.zeros(2, 64)
    lane.start(lane.pack(x, jobs, first), zero_out=True)
    lane.start(lane.pack(x, jobs, second), zero_out=True)
    assert torch.equal(lane.wait()[0], want) and torch.equal(first, want)
    with pytest.raises(RuntimeError, match="no call was started"):
        lane.wait()
    bad = [ExpertJob(jobs[0].gate_up, jobs[0].down, tokens=torch.tensor([0, 1]))]
    packed = lane.pack(x, bad, torch.zeros(2, 64))
    packed.keep[-1][1] = 7  # a token index past x's rows, written after validation: the library refuses it
    lane.start(packed)
    with pytest.raises(ValueError, match="out of range"):
        lane.wait()
    assert torch.equal(lane.run(x, jobs, torch.zeros(2, 64)), want)
    lane.start(lane.pack(x, jobs, torch.zeros(2, 64)))
    lane.close()  # collects the call in flight, then stops the threads
    with pytest.raises(RuntimeError, match="closed"):
        lane.start(lane.pack(x, jobs, torch.zeros(2, 64)))


def test_ctrl_c_while_waiting_for_a_started_call(libraries):
    """A real SIGINT while the caller sleeps in wait: KeyboardInterrupt within a wait slice, the call keeps
    running and is collected by the next wait, whose result is right."""
    import signal
    import time

    lane = NativeExpertLane(1, library=libraries["native"])
    lane.configure(min_bytes_per_thread=0)
    hidden, inter = 1024, 2048
    gen = torch.Generator().manual_seed(8)
    gu, dn = _expert(hidden, inter, torch.bfloat16, gen)
    x = torch.randn(8, hidden, generator=gen).bfloat16()
    jobs = [ExpertJob(gu, dn)] * 400  # ~5 GB of weight reads: long enough to interrupt
    one = lane.run(x, jobs[:1], torch.zeros(8, hidden))
    main = threading.main_thread().ident
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.05, lambda: signal.pthread_kill(main, signal.SIGINT))
    out = torch.zeros(8, hidden)
    try:
        lane.start(lane.pack(x, jobs, out), zero_out=True)
        began = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            lane.wait()
        interrupted = time.perf_counter()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    got, started, ended = lane.wait()
    assert ended > interrupted - 0.03 > began  # the call was still running when the interrupt came
    torch.testing.assert_close(got, one * 400, rtol=1e-4, atol=1e-3 * float(one.abs().max()) * 400)
    lane.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_neither_waits_for_the_parents_call_nor_hangs(libraries):
    """A child forked while the parent's call is in flight: its wait says nothing was started (the call
    is the parent's, in the parent's pool), and its own start/wait run on a pool of its own."""
    import os

    lane = NativeExpertLane(2, library=libraries["native"])
    x = torch.randn(2, 64).bfloat16()
    jobs = _jobs(64, 2, torch.bfloat16, seed=9)
    want = lane.run(x, jobs, torch.zeros(2, 64))
    lane.start(lane.pack(x, jobs, torch.zeros(2, 64)), zero_out=True)
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if both checks hold
        code = 1
        try:
            try:
                lane.wait()
            except RuntimeError:
                out = torch.zeros(2, 64)
                lane.start(lane.pack(x, jobs, out), zero_out=True)
                code = 0 if torch.equal(lane.wait()[0], want) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(lane.wait()[0], want)
    lane.close()
