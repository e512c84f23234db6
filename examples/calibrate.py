"""Measure which experts your traffic routes to, and plan with it.

The planner assumes uniform routing unless told otherwise (each expert sees ``top_k / num_experts`` of
the tokens). Real traffic is skewed: a few experts per layer take most tokens, and those are the ones
worth keeping resident. This example loads a MoE checkpoint through hf_hybrid, runs sample texts through
it, and reports the routing frequency of every expert (the probability that one token routes to it).

If the model has ``calibrate(texts)`` (routing frequencies and a re-plan in one call), it is used;
otherwise the frequencies are counted here with a forward pre-hook on each layer's ``mlp.experts`` (whose
inputs are the router's ``top_k_index``), and the plan is recomputed from the config with
``routing_stats=``. Either way the hot experts are printed with their home before and after, and
``--save`` writes the frequencies as JSON for later loads::

    python examples/calibrate.py ./my-moe-checkpoint --gpu-memory 6GiB --texts-file prompts.txt --save routing.json

    # later
    model = HybridModelForCausalLM.from_pretrained(path, gpu_memory="6GiB",
                                                   routing_stats=json.load(open("routing.json")))

The checkpoint needs a tokenizer; ``--tokenizer`` points at another directory when it has none.
"""

from __future__ import annotations

import argparse

# hf_hybrid before torch: then it can set OMP_WAIT_POLICY=PASSIVE, which keeps the CPU lane fast
import hf_hybrid  # noqa: F401

# isort: split
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.devices import default_device_name

TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
    "To be, or not to be, that is the question.",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="MoE checkpoint directory or hub id (Mixtral, Qwen-MoE, OLMoE, PhiMoE)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument(
        "--texts-file", default=None, help="calibration texts, one per line (default: built-in)"
    )
    parser.add_argument("--gpu-memory", default="6GiB", help="device budget (default: %(default)s)")
    parser.add_argument(
        "--max-context", type=int, default=2048, help="KV cache positions (default: %(default)s)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's"
    )
    parser.add_argument(
        "--top", type=int, default=2, help="hot experts to print per layer (default: %(default)s)"
    )
    parser.add_argument("--save", default=None, metavar="JSON", help="write the routing frequencies here")
    return parser.parse_args(argv)


def load_texts(path: str | None) -> list[str]:
    """Non-empty lines of ``path``, or the built-in sample."""
    if path is None:
        return list(TEXTS)
    texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise SystemExit(f"{path} has no text")
    return texts


def count_routing(
    model, tokenizer, texts: list[str], per_layer: dict[int, int], max_tokens: int
) -> dict[str, float]:
    """Per expert ``layers.L.experts.E``: the fraction of tokens routed to it (a layer sums to top_k)."""
    counts = {i: torch.zeros(n, dtype=torch.long) for i, n in per_layer.items()}
    tokens = 0
    handles = []
    for i in per_layer:
        experts = model.model.layers[i].mlp.experts

        def hook(module, args, i=i):
            # experts(hidden_states, top_k_index, top_k_weights): count the router's choices
            counts[i] += torch.bincount(args[1].reshape(-1).to("cpu"), minlength=counts[i].numel())

        handles.append(experts.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(model.device)
                model(input_ids=ids)
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {
        f"layers.{i}.experts.{e}": int(c[e]) / tokens
        for i, c in sorted(counts.items())
        for e in range(c.numel())
    }


def expert_counts(plan) -> dict[int, int]:
    """Experts per MoE layer in ``plan``."""
    per_layer: dict[int, int] = {}
    for u in plan.units:
        if u.kind == "expert":
            per_layer[u.layer] = per_layer.get(u.layer, 0) + 1
    return per_layer


def main(argv: list[str] | None = None) -> int:
    """Load, measure routing on the texts, print hot experts and their homes before/after."""
    args = parse_args(argv)
    texts = load_texts(args.texts_file)
    model = HybridModelForCausalLM.from_pretrained(
        args.model,
        gpu_memory=args.gpu_memory,
        device=args.device or default_device_name(),
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_context=args.max_context,
        progress=False,
    )
    try:
        before = model.hybrid_plan
        per_layer = expert_counts(before)
        if not per_layer:
            print(f"{args.model} has no MoE layers: nothing to calibrate", file=sys.stderr)
            return 2
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model.hybrid.source)
        if callable(getattr(model, "calibrate", None)):
            # measures routing on the texts and moves the experts to the homes a plan with it gives
            frequencies = model.calibrate(texts, tokenizer=tokenizer, max_length=args.max_context)
            after = model.hybrid_plan
            how = "model.calibrate(texts)"
        else:
            frequencies = count_routing(model, tokenizer, texts, per_layer, args.max_context)
            after = HybridModelForCausalLM.plan(
                model.hybrid.source,
                gpu_memory=before.budget_bytes,
                device=model.device,
                dtype=model.dtype,
                max_context=model.hybrid.max_context,
                max_batch_size=model.hybrid.max_batch_size,
                workload=before.workload,
                profile=before.profile,
                routing_stats=frequencies,
            )
            how = "counted with hooks on mlp.experts; re-planned with routing_stats="
    finally:
        model.hybrid.close()

    print(f"routing frequencies of {len(frequencies)} experts over {len(texts)} texts ({how})")
    print(f"{'expert':<24} {'share of tokens':>15} {'uniform':>8}  home before -> after")
    for layer, n in sorted(per_layer.items()):
        layer_freqs = {k: v for k, v in frequencies.items() if k.startswith(f"layers.{layer}.experts.")}
        uniform = sum(layer_freqs.values()) / n if layer_freqs else 0.0
        hot = sorted(layer_freqs.items(), key=lambda kv: -kv[1])[: args.top]
        for name, freq in hot:
            print(f"{name:<24} {freq:>15.3f} {uniform:>8.3f}  {before.homes[name]} -> {after.homes[name]}")
    resident = sum(frequencies.get(u.name, 0.0) for u in after.units if after.homes[u.name] == "gpu")
    resident_before = sum(frequencies.get(u.name, 0.0) for u in before.units if before.homes[u.name] == "gpu")
    total = sum(frequencies.values()) or 1.0
    print(
        f"expert work on resident experts: {100 * resident_before / total:.0f}% before, "
        f"{100 * resident / total:.0f}% after"
    )
    if args.save:
        Path(args.save).write_text(json.dumps(frequencies, indent=1, sort_keys=True))
        print(f"wrote {args.save}: pass it as routing_stats=json.load(open({args.save!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
