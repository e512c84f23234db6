"""The ``hf-hybrid`` command line: generate, plan, profile, bench."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROMPT = "The capital of France is"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id or local directory of safetensors shards (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--gpu-memory", default=None, help="device budget, e.g. 6GiB (default: free memory minus 1.5 GiB)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1, or cpu to let the CPU stand in (default: cuda if present)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument("--max-context", type=int, default=4096, help="KV cache length reserved inside the budget")
    p.add_argument(
        "--max-batch-size", type=int, default=1, help="sequences per batch the KV cache is reserved for"
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow code from the checkpoint's repository to run"
    )


def _model_path(args) -> str:
    if args.model:
        return args.model
    from .default_model import default_model_dir

    return str(default_model_dir())


def _generate(args) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from .modeling import HybridModelForCausalLM

    path = _model_path(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = HybridModelForCausalLM.from_pretrained(
        path,
        gpu_memory=args.gpu_memory,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=dtype,
        max_context=args.max_context,
        max_batch_size=args.max_batch_size,
        trust_remote_code=args.trust_remote_code,
    )
    if args.show_plan:
        print(model.hybrid_plan, file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    sampling = {}
    if args.temperature and args.temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
        }
    else:
        sampling = {"do_sample": False}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    if args.json:
        print(
            json.dumps({"model": path, "prompt": prompt, "completion": text, "tokens": new_tokens.tolist()})
        )
    model.hybrid.close()
    return 0


def _plan(args) -> int:
    import torch

    from .modeling import HybridModelForCausalLM
    from .planner import Workload

    path = _model_path(args) if args.model is None else args.model
    plan = HybridModelForCausalLM.plan(
        path,
        gpu_memory=args.gpu_memory,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=getattr(torch, args.dtype) if args.dtype else torch.bfloat16,
        trust_remote_code=args.trust_remote_code,
        max_context=args.max_context,
        max_batch_size=args.max_batch_size,
        workload=Workload(args.prompt_tokens, args.new_tokens, args.max_batch_size),
        profile=args.profile,
    )
    print(plan.to_json() if args.json else plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``hf-hybrid``."""
    parser = argparse.ArgumentParser(
        prog="hf-hybrid",
        description="Run LLMs that do not fit on one GPU across GPU, CPU and PCIe at once.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (streams tokens to the terminal)")
    _add_model_options(gen)
    gen.add_argument("--prompt", default=None, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="top-k sampling (with --temperature)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--show-plan", action="store_true", help="print the placement table to stderr")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=_generate)

    pl = sub.add_parser("plan", help="print the placement for a model from its config alone (no weights)")
    _add_model_options(pl)
    pl.add_argument("--prompt-tokens", type=int, default=512, help="prompt length the plan optimises for")
    pl.add_argument("--new-tokens", type=int, default=128, help="new tokens the plan optimises for")
    pl.add_argument(
        "--profile",
        default="default",
        choices=["default", "auto", "measure"],
        help="hardware figures: built-in defaults, the cached measurement, or measure now",
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_plan)

    for module in ("hf_hybrid.profile", "hf_hybrid.bench"):
        try:
            add_cli = getattr(__import__(module, fromlist=["add_cli"]), "add_cli", None)
        except ImportError:
            add_cli = None
        if add_cli is not None:
            add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-hybrid`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, MemoryError, RuntimeError) as exc:
        from .errors import HybridError

        if not isinstance(exc, HybridError):
            raise
        print(f"hf-hybrid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
