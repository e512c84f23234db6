"""The ``hf-hybrid`` command line: generate, plan, serve, profile, bench.

``main(argv)`` never raises for bad input: it returns the exit code (0 ok, 1 failure, 2 bad input or an
hf_hybrid error, printed as one ``hf-hybrid: error: ...`` line on stderr, 130 interrupted), so it can be
called in-process. Logging follows transformers' conventions (``transformers.utils.logging`` loggers named
after the module); ``-v`` shows hf_hybrid's INFO messages, such as the load summary, and ``-vv`` adds
transformers' own.

Longer than most modules (about 770 lines) because most of it is argparse and user-facing notes: every
option's help text is documentation users read with ``--help``; the command bodies themselves are short.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging as std_logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"
PROG = "hf-hybrid"
#: Files one of which a local checkpoint needs for ``generate`` to tokenize the prompt.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
)
#: What ``generate`` fetches from the hub besides config.json to tokenize the prompt.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tiktoken*",
    "chat_template*",
)
#: Exit status after stdout was closed early (``hf-hybrid plan | head -1``): 128 + SIGPIPE, as the shell
#: reports for tools the signal ends.
BROKEN_PIPE_STATUS = 141


class UsageError(Exception):
    """Bad command-line input found after parsing (a missing directory, a model dir without config)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: message (see prog --help)``)."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message) -> str:
    return " ".join(str(message).split())


# ------------------------------------------------------------------------------------- argument types
def _size(value: str) -> str:
    """``--gpu-memory``: validated here so a typo is a usage error, passed on as written."""
    from .units import parse_bytes

    try:
        size = parse_bytes(value, "--gpu-memory")
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"cannot read {value!r}: use a number of bytes or a size like 512MiB, 6GiB or 1.5GB"
        ) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {value!r})")
    return value


def _device(value: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (whether that GPU exists is checked when it is used)."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", value.strip().lower()) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value.strip().lower()


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _port(value: str) -> int:
    number = _positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _probability(value: str) -> float:
    number = _non_negative_float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return number


# ------------------------------------------------------------------------------------------ options
def _add_verbose(p: argparse.ArgumentParser, default=0) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="show hf_hybrid's INFO messages, e.g. the load summary (-vv: also transformers' INFO)",
    )


def _add_model_options(p: argparse.ArgumentParser, *, plan: bool = False) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help=(
            "hub id or local directory"
            + (" (config.json is enough: no weights are read)" if plan else " of safetensors shards")
            + " (default: the embedded SmolLM2-135M-Instruct, converted once into $HF_HYBRID_CACHE, "
            "else ~/.cache/hf_hybrid)"
        ),
    )
    p.add_argument(
        "--gpu-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help=(
            "device memory budget such as 6GiB, 512MiB or 1.5GB; weights, KV cache, workspace and staging "
            "buffers all count inside it and what does not fit runs on the CPU or streams over PCIe "
            "(default: free GPU memory minus 1.5 GiB; on the CPU standing in for a GPU: unlimited, so the "
            "whole model is resident: pass a budget there to exercise the hybrid path)"
        ),
    )
    p.add_argument(
        "--device",
        type=_device,
        default=None,
        help=(
            "cuda, cuda:N, or cpu to let the CPU stand in for the GPU (default: cuda if available, else cpu)"
            + ("; planning for cuda without one needs --gpu-memory" if plan else "")
        ),
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--max-context",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="positions (prompt + new tokens) the KV cache is reserved for inside the budget (default: 4096)",
    )
    p.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help=(
            "sequences per generate call the KV cache is reserved for inside the budget (default: 1)"
            + (
                "; the plan optimises decode for batches of this size"
                if plan
                else "; this command generates one sequence, so a larger value only shrinks what stays "
                "on the GPU, as it would for a server that batches"
            )
        ),
    )
    p.add_argument(
        "--prefill-chunk",
        type=_positive_int,
        default=None,
        metavar="N",
        help=(
            "tokens per prefill forward the device workspace is sized for; longer prompts are prefilled in "
            "chunks of N (default: the planned prompt length, at most 512)"
        ),
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow code from the checkpoint's repository to run"
    )
    _add_verbose(p, default=argparse.SUPPRESS)


def _model_path(args, *, need_weights: bool = True) -> str:
    """The checkpoint the command runs on: ``args.model`` checked, or the embedded default model.

    A local directory must exist and hold ``config.json``; that is all ``plan`` needs (``need_weights``
    false). Hub ids pass through (``plan`` then fetches only the config).
    """
    if args.model:
        path = Path(args.model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"{path} has no config.json: pass a transformers checkpoint directory")
            if need_weights and not any(next(path.glob(p), None) for p in ("*.safetensors", "*.bin", "*.pt")):
                raise UsageError(
                    f"{path} holds no weights (*.safetensors); 'hf-hybrid plan' works from config.json alone"
                )
            return str(path)
        if path.exists():
            raise UsageError(f"{path} is a file; pass the directory that holds config.json")
        from .hub import looks_like_path

        if looks_like_path(args.model):
            raise UsageError(
                f"no such directory: {path} (pass a checkpoint directory or a hub id like 'owner/name')"
            )
        return args.model
    from .default_model import NAME, cache_root, default_model_dir

    target = cache_root() / NAME
    if not (target / "config.json").exists() or (
        need_weights and not (target / "model.safetensors").exists()
    ):
        print(
            f"{PROG}: converting the embedded SmolLM2-135M-Instruct into {target} (once, ~20 s)",
            file=sys.stderr,
        )
    return str(default_model_dir())


def _resolve_device(args) -> str:
    from .devices import default_device_name

    return args.device if args.device is not None else default_device_name()


def _is_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def _suggested_budget(plan) -> str:
    """A budget that keeps about half of ``plan``'s (all-resident) weights on the device."""
    return readable_size(plan.device_bytes - plan.resident_bytes // 2)


def readable_size(nbytes: int) -> str:
    """``nbytes`` as a ``--gpu-memory`` value people read at a glance: whole MiB below 1 GiB, else GiB
    with one decimal (``253730KiB`` -> ``248MiB``; one decimal below 100 MiB)."""
    if nbytes >= 1024**3:
        return f"{nbytes / 1024**3:.1f}GiB"
    mib = nbytes / 1024**2
    # a small model's budget sits within a MiB of its minimum: one decimal keeps the suggestion above it
    return f"{mib:.0f}MiB" if mib >= 100 else f"{max(mib, 0.1):.1f}MiB"


def _cpu_note(plan, what: str) -> None:
    print(
        f"{PROG}: note: no --gpu-memory on the CPU standing in for a GPU, so the whole model {what} "
        f"resident; pass e.g. --gpu-memory {_suggested_budget(plan)} to exercise the CPU and "
        "PCIe-streaming paths",
        file=sys.stderr,
    )


@contextlib.contextmanager
def _quiet_fit_warning(noted: bool):
    """Turn hf_hybrid's own UserWarnings into one-line notes (dropping the 'fits' one the CPU note covers)."""
    with warnings.catch_warnings(record=True) as caught:  # the filters in force still apply
        yield
    for w in caught:
        text = str(w.message)
        if text.startswith("hf_hybrid:"):
            if not (noted and "nothing is offloaded" in text):
                print(f"{PROG}: note: {_one_line(text.removeprefix('hf_hybrid:'))}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _options(args, device: str, **extra) -> dict:
    """The :class:`~hf_hybrid.options.HybridOptions` the model options of ``args`` stand for."""
    import torch

    from .options import HybridOptions

    options = HybridOptions(
        gpu_memory=args.gpu_memory,
        device=device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_context=args.max_context,
        max_batch_size=args.max_batch_size,
        prefill_chunk=args.prefill_chunk,
        trust_remote_code=args.trust_remote_code,
    ).with_(**extra)
    return {name: getattr(options, name) for name in HybridOptions.names()}


# ----------------------------------------------------------------------------------------- commands
def _generate(args) -> int:
    from transformers import AutoTokenizer

    from .modeling import HybridModelForCausalLM

    path = _model_path(args)
    # the tokenizer first: a checkpoint without one fails before the (slower) weight load
    local = _tokenizer_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot load a tokenizer from {path}: {_one_line(exc)}") from exc
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--chat: the tokenizer of {path} has no chat template")
    device = _resolve_device(args)
    noted = _is_cpu(device) and args.gpu_memory is None
    with _quiet_fit_warning(noted):
        model = HybridModelForCausalLM.from_pretrained(
            path, **_options(args, device, progress=sys.stderr.isatty())
        )
    if noted:
        _cpu_note(model.hybrid_plan, "is")
    try:
        if args.show_plan:
            print(model.hybrid_plan, file=sys.stderr)
        code = _run_generate(args, model, tokenizer, path)
        if args.trace:
            # a separate short run: one prefill of the prompt and a few decode steps on the lanes' timeline
            ids = tokenizer(args.prompt if args.prompt is not None else DEFAULT_PROMPT, return_tensors="pt")
            written = model.trace(args.trace, ids["input_ids"], max_new_tokens=min(8, args.max_new_tokens))
            print(f"{PROG}: trace written to {written} (open it at https://ui.perfetto.dev)", file=sys.stderr)
        return code
    finally:
        model.hybrid.close()


def _tokenizer_dir(path: str) -> Path:
    """The local directory of ``path``'s tokenizer files (fetched for a hub id); a usage error when a local
    checkpoint has none (checked before the slower weight load)."""
    local = Path(path) if Path(path).is_dir() else _hub_files(path, TOKENIZER_PATTERNS)
    if local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
        raise UsageError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...) to encode the prompt"
        )
    return local


def _serve(args) -> int:
    # first: without the serving extras this fails at once, naming the install command
    from . import serving
    from .default_model import NAME

    path = _model_path(args)
    tokenizer = _tokenizer_dir(path)
    name = args.model_name or args.model or NAME
    device = _resolve_device(args)
    noted = _is_cpu(device) and args.gpu_memory is None
    with _quiet_fit_warning(noted):
        app = serving.build_app(
            path,
            name=name,
            tokenizer=str(tokenizer),
            options=_options(args, device, progress=sys.stderr.isatty()),
        )
    if noted:
        _cpu_note(app.state.model_manager.plan, "is")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"{PROG}: serving {name!r} at http://{host}:{args.port}/v1 (OpenAI API; prompt + new tokens up to "
        f"max_context={args.max_context}); Ctrl-C stops",
        file=sys.stderr,
    )
    verbose = getattr(args, "verbose", 0)
    serving.serve(app, args.host, args.port, log_level="info" if verbose else "warning")
    return 0


def _run_generate(args, model, tokenizer, path: str) -> int:
    import torch
    from transformers import TextStreamer

    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    # stream the completion as it is made; a chat template's markup is not shown
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    sampling: dict = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature}
        if args.top_k is not None:
            sampling["top_k"] = args.top_k
        if args.top_p is not None:
            sampling["top_p"] = args.top_p
    elif args.top_k is not None or args.top_p is not None:
        print(
            f"{PROG}: note: --top-k/--top-p apply only with --temperature > 0; decoding greedily",
            file=sys.stderr,
        )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        streamer=streamer,
        pad_token_id=pad,
        **sampling,
    )
    seconds = time.perf_counter() - start
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    if args.json:
        plan = model.hybrid_plan
        record = {
            "model": path,
            "prompt": prompt,
            "chat": args.chat,
            "completion": tokenizer.decode(new_tokens, skip_special_tokens=True),
            "tokens": new_tokens.tolist(),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "seconds": round(seconds, 4),
            "device": str(model.device),
            "homes": {home: len(plan.units_in(home)) for home in ("gpu", "cpu", "stream")},
        }
        print(json.dumps(record))
    return 0


def _hub_files(repo_id: str, also: tuple[str, ...] = ()) -> Path:
    """The cached (else downloaded) config.json of hub id ``repo_id``, plus the files matching ``also``.

    transformers' own per-file downloads retry for half a minute without a network; this fails at once,
    saying how to work offline.
    """
    from .hub import fetch_config

    return fetch_config(repo_id, also=also)


def _plan(args) -> int:
    import torch

    from .modeling import HybridModelForCausalLM
    from .planner import Workload

    path = _model_path(args, need_weights=False)
    if not Path(path).is_dir():
        path = str(_hub_files(path))
    device = _resolve_device(args)
    if args.device is None and _is_cpu(device):
        print(
            f"{PROG}: note: no GPU here, so this plans for the CPU standing in for one; to plan for a GPU "
            "pass --device cuda --gpu-memory SIZE",
            file=sys.stderr,
        )
    if device.startswith("cuda") and torch.cuda.is_available():
        from .devices import resolve_device

        resolve_device(device)  # a cuda:N this machine lacks is an error, as for generate
    elif device.startswith("cuda"):
        if args.gpu_memory is None:
            raise UsageError(
                f"--device {device}: no CUDA device here, so no free memory to plan for; pass --gpu-memory "
                "SIZE to plan for a GPU this machine does not have"
            )
        if args.profile != "default":
            raise UsageError(f"--profile {args.profile} measures this machine's GPU, and it has none")
    plan = HybridModelForCausalLM.plan(
        path,
        **_options(
            args,
            device,
            workload=Workload(
                min(args.prompt_tokens, args.max_context), args.new_tokens, args.max_batch_size
            ),
            profile=args.profile,
        ),
    )
    if _is_cpu(device) and args.gpu_memory is None:
        _cpu_note(plan, "would be")
    _host_memory_note(plan)
    print(json.dumps(_strict_json(plan.to_dict()), indent=2) if args.json else plan)
    return 0


def _host_memory_note(plan) -> None:
    """A note when the weights ``plan`` keeps off the device need more host RAM than this machine has."""
    from .system import meminfo
    from .units import GPU, format_bytes

    host = sum(u.nbytes for u in plan.units if plan.homes[u.name] != GPU)
    total = meminfo("MemTotal")
    if total is not None and host > total:
        print(
            f"{PROG}: note: this plan keeps {format_bytes(host)} of weights in host memory, but this machine "
            f"has {format_bytes(total)} of RAM in all",
            file=sys.stderr,
        )


def _strict_json(value):
    """``value`` with infinite/NaN floats (an all-resident plan's unbounded rates) as ``null``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``hf-hybrid``."""
    parser = _Parser(
        prog=PROG,
        description="Run LLMs that do not fit on one GPU across GPU, CPU and PCIe at once.",
    )
    _add_verbose(parser)
    parser.register("action", "lazy_parsers", _LazySubcommands)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action="lazy_parsers")

    gen = sub.add_parser(
        "generate",
        help="generate text (streams tokens to the terminal)",
        description=(
            "Load a model across GPU, CPU and PCIe streaming and generate from one prompt, streaming the "
            "text to stdout (or printing one JSON object with --json)."
        ),
    )
    _add_model_options(gen)
    gen.add_argument("--prompt", default=None, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=32,
        metavar="N",
        help="tokens to generate (default: 32)",
    )
    gen.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 = greedy (default: 0)",
    )
    gen.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help="top-k sampling, with --temperature > 0 (default: transformers' 50)",
    )
    gen.add_argument(
        "--top-p",
        type=_probability,
        default=None,
        metavar="P",
        help="nucleus sampling, with --temperature > 0 (default: 1.0, off)",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=_non_negative_float,
        default=1.0,
        metavar="R",
        help="transformers' repetition penalty; 1 = off (default: 1)",
    )
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: unseeded)")
    gen.add_argument("--show-plan", action="store_true", help="print the placement table to stderr")
    gen.add_argument(
        "--trace",
        default=None,
        metavar="PATH",
        help="after generating, record one prefill and up to 8 decode steps as a Chrome/Perfetto trace "
        "(CPU, PCIe and GPU lanes) at PATH",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=_generate)

    pl = sub.add_parser(
        "plan",
        help="print the placement for a model from its config alone (no weights)",
        description=(
            "Print the placement hf_hybrid would make -- which units live on the GPU, run on the CPU or "
            "stream over PCIe -- and its predicted speed, from the model's config alone."
        ),
    )
    _add_model_options(pl, plan=True)
    pl.add_argument(
        "--prompt-tokens",
        type=_positive_int,
        default=512,
        metavar="N",
        help="prompt length the plan optimises for",
    )
    pl.add_argument(
        "--new-tokens", type=_positive_int, default=128, metavar="N", help="new tokens the plan optimises for"
    )
    pl.add_argument(
        "--profile",
        default="default",
        choices=["default", "auto", "measure"],
        help="hardware figures: built-in defaults, the cached measurement, or measure now (default: default)",
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_plan)

    srv = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (transformers' server)",
        description=(
            "Load a model across GPU, CPU and PCIe streaming and serve it with transformers' own "
            "OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/responses, /v1/models). "
            "New tokens are capped so that prompt + new tokens fit --max-context; a request asking for "
            'more is answered with HTTP 400. Needs the serving extras: pip install "hf_hybrid[serve]".'
        ),
    )
    _add_model_options(srv)
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
    )
    srv.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    srv.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help='the name requests give as "model" and /v1/models lists (default: MODEL as given, or '
        "smollm2-135m-instruct for the embedded model)",
    )
    srv.set_defaults(func=_serve)

    # both modules import torch (seconds): their parsers are built only when their command is chosen
    for name, (module, help_text) in LAZY_COMMANDS.items():
        sub.add_lazy(name, module, help_text)
    return parser


#: Subcommands defined by other modules' ``add_cli``: their ``hf-hybrid --help`` line, shown without
#: importing them.
LAZY_COMMANDS = {
    "profile": (
        "hf_hybrid.measure",
        "measure (or show the cached) CPU, memory, PCIe and GPU rates of this machine",
    ),
    "bench": (
        "hf_hybrid.bench",
        "benchmark hf_hybrid against accelerate offload, all-CPU and all-GPU on a synthetic checkpoint",
    ),
}


class _LazySubcommands(argparse._SubParsersAction):
    """Subcommands whose parsers come from a module's ``add_cli(subparsers)``, imported on first use.

    ``--help`` lists them from a placeholder; choosing one (or :meth:`load`) imports the module and swaps
    in its parser.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, str] = {}

    def add_lazy(self, name: str, module: str, help: str) -> None:
        """List ``name`` (with ``help``) now; build its parser from ``module``'s ``add_cli`` when needed."""
        self.add_parser(name, help=help, add_help=False)
        self._lazy[name] = module

    def load(self, name: str) -> argparse.ArgumentParser:
        """The parser of subcommand ``name``, its module imported first if still pending."""
        module = self._lazy.pop(name, None)
        if module is not None:
            import importlib

            del self._name_parser_map[name]
            self._choices_actions = [a for a in self._choices_actions if a.dest != name]
            importlib.import_module(module).add_cli(self)
            subparser = self._name_parser_map[name]
            if "--verbose" not in subparser._option_string_actions:
                _add_verbose(subparser, default=argparse.SUPPRESS)
        return self._name_parser_map[name]

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: D102 (argparse API)
        if values:
            self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


@contextlib.contextmanager
def _verbosity(level: int):
    """``-v``: hf_hybrid's loggers at INFO on stderr; ``-vv``: DEBUG, and transformers' at INFO."""
    if level <= 0:
        yield
        return
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("hf_hybrid")
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(message)s"))
    old_level, old_tf = logger.level, hf_logging.get_verbosity()
    logger.addHandler(handler)
    logger.setLevel(std_logging.INFO if level == 1 else std_logging.DEBUG)
    if level > 1:
        hf_logging.set_verbosity_info()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        hf_logging.set_verbosity(old_tf)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-hybrid`` console script; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    from .errors import HybridError

    try:
        with _verbosity(getattr(args, "verbose", 0)):
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
            return code
    except BrokenPipeError:
        # the reader went away (`| head`): nothing left to say. Python's docs recommend pointing stdout
        # at devnull so the interpreter's final flush does not fail again on exit
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, HybridError, OSError) as exc:
        # OSError: transformers cannot find a config/tokenizer, a hub id does not exist, the network is down
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point file descriptor 1 at devnull (when stdout is a real file; in-process callers may swap it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
