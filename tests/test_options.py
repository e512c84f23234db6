"""Every option is checked before any work starts, with an error that names the option and the fix."""

from __future__ import annotations

import os

import pytest

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.options import TOKEN_ASSIGNMENTS, HybridOptions


@pytest.mark.parametrize(
    "options, match",
    [
        ({"cpu_threads": 4096}, r"cpu_threads must be in 1\.\."),
        ({"cpu_threads": -1}, r"cpu_threads must be in 1\.\."),
        ({"cpu_threads": 0}, r"cpu_threads must be in 1\.\."),
        ({"cpu_threads": 2.5}, "cpu_threads must be an int"),
        ({"gpu_memory": float("inf")}, "gpu_memory must be a finite size"),
        ({"gpu_memory": float("nan")}, "gpu_memory must be a finite size"),
        ({"max_context": 0}, "max_context must be a positive int"),
        ({"max_batch_size": True}, "max_batch_size must be a positive int"),
        ({"mlp_slices": -3}, "mlp_slices must be a positive int"),
        ({"token_assignment": "fastest"}, "token_assignment must be one of"),
        ({"profile": "guess"}, "profile must be"),
        ({"cpu_kernels": "avx"}, "cpu_kernels must be one of"),
        ({"cpu_backend": "gpu"}, "cpu_backend must be one of"),
        ({"placement": ["layers.0"]}, "placement must be a dict"),
        ({"expert_graphs": "yes"}, "expert_graphs must be True or False"),
        ({"prefill_splits": 1}, "prefill_splits must be True or False"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, options, match):
    # the path does not even exist: the options are checked first, so their error is the one raised
    with pytest.raises((ValueError, TypeError), match=match):
        HybridModelForCausalLM.from_pretrained(str(tmp_path / "missing"), device="cpu", **options)


def test_every_cpu_count_in_range_is_accepted():
    cores = os.cpu_count() or 1
    for threads in (1, cores):
        options, rest = HybridOptions.from_kwargs({"cpu_threads": threads, "output_router_logits": True})
        assert options.cpu_threads == threads
        assert rest == {"output_router_logits": True}  # config overrides pass through


def test_torch_dtype_is_an_alias_of_dtype():
    options, _ = HybridOptions.from_kwargs({"torch_dtype": "bfloat16"})
    assert options.dtype == "bfloat16"


def test_the_planner_and_the_options_agree_on_token_assignments():
    from hf_hybrid import planner

    assert planner.TOKEN_ASSIGNMENTS == TOKEN_ASSIGNMENTS
