"""Mixtral-8x7B (87 GiB of bf16 weights) on one 24 GB card.

``--plan-only`` prints the placement hf_hybrid would use, from the config alone: no weights are read
or downloaded, no GPU is needed. Without ``--plan-only`` the model is loaded (a hub id is downloaded
first; a local directory of safetensors shards is read in place) and generates with streamed output.

    python examples/mixtral_24gb.py --plan-only                      # needs the hub config (or a cache)
    python examples/mixtral_24gb.py ./mixtral-config --plan-only     # a directory holding config.json
    python examples/mixtral_24gb.py --prompt "Explain PCIe in one paragraph"

A directory with Mixtral's config can be made offline::

    python -c "from transformers import MixtralConfig; MixtralConfig().save_pretrained('mixtral-config')"

22 GiB leaves about 2 GiB of a 24 GB card to the CUDA context, the allocator and the display. The KV cache
for ``--max-context``, the workspace and the staging slots are counted inside the budget.
"""

from __future__ import annotations

import argparse

# hf_hybrid before torch: then it can set OMP_WAIT_POLICY=PASSIVE, which keeps the CPU lane fast
import hf_hybrid  # noqa: F401

# isort: split
import os
import sys
import threading

import torch

from hf_hybrid import HybridError, HybridModelForCausalLM, Workload
from hf_hybrid.hub import fetch_config

MODEL = "mistralai/Mixtral-8x7B-v0.1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", nargs="?", default=MODEL, help="hub id or local directory (default: %(default)s)"
    )
    parser.add_argument("--gpu-memory", default="22GiB", help="device budget (default: %(default)s)")
    parser.add_argument(
        "--max-context", type=int, default=4096, help="KV cache positions (default: %(default)s)"
    )
    parser.add_argument("--plan-only", action="store_true", help="print the plan from the config and stop")
    parser.add_argument("--json", action="store_true", help="with --plan-only: print the plan as JSON")
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N or cpu (default: cuda; --plan-only without a GPU plans for a CUDA machine)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        choices=["auto", "default", "measure"],
        help="hardware figures to plan with: the cached measurement of this machine ('auto'), built-in "
        "figures of a PCIe GPU server ('default', used for --plan-only without a GPU), or measure now",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length the plan optimises for")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens the plan optimises for")
    parser.add_argument(
        "--prompt", default="The three lanes of a hybrid LLM runtime are", help="text to continue"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    return parser.parse_args(argv)


def show_plan(args: argparse.Namespace) -> int:
    """Plan from the config alone and print it."""
    has_cuda = torch.cuda.is_available()
    device = args.device or "cuda"
    # planning for a CUDA device on a machine without one: use the built-in figures, nothing to measure
    profile = args.profile or ("auto" if has_cuda or device == "cpu" else "default")
    # a hub id: its config from the cache, else the hub (failing at once, saying how, without a network)
    source = args.model if os.path.isdir(args.model) else fetch_config(args.model)
    plan = HybridModelForCausalLM.plan(
        source,
        gpu_memory=args.gpu_memory,
        device=device,
        dtype=torch.bfloat16,
        max_context=args.max_context,
        workload=Workload(args.prompt_tokens, args.new_tokens, 1),
        profile=profile,
    )
    if args.json:
        print(plan.to_json())
        return 0
    print(plan)
    origin = "measured on this machine" if plan.profile.measured else "built-in default figures, not measured"
    print(f"\nhardware figures: {origin} (profile={profile!r}, device={device})")
    host = sum(u.nbytes for u in plan.units if plan.homes[u.name] != "gpu")
    print(f"host memory the weights need: {host / 1024**3:.1f} GiB (pinned)")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Load across GPU, CPU and PCIe and stream a completion."""
    from transformers import AutoTokenizer, TextIteratorStreamer

    model = HybridModelForCausalLM.from_pretrained(
        args.model,
        gpu_memory=args.gpu_memory,
        device=args.device,
        dtype=torch.bfloat16,
        max_context=args.max_context,
        workload=Workload(args.prompt_tokens, args.new_tokens, 1),
        profile=args.profile or "auto",
    )
    print(model.hybrid_plan)
    tokenizer = AutoTokenizer.from_pretrained(model.hybrid.source)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
        except BaseException as exc:  # surface it in the main thread, and unblock the streamer
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=run)
    worker.start()
    print(args.prompt, end="", flush=True)
    for text in streamer:
        print(text, end="", flush=True)
    print()
    worker.join()
    model.hybrid.close()
    if errors:
        raise errors[0]
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--plan-only`` prints the plan; otherwise load and generate."""
    args = parse_args(argv)
    try:
        return show_plan(args) if args.plan_only else generate(args)
    except HybridError as exc:  # a missing checkpoint or an unreachable hub: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
