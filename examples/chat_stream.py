"""A terminal chat that streams tokens as the hybrid model produces them.

``generate`` runs in a background thread and a ``transformers.TextIteratorStreamer`` hands the text to
the main thread piece by piece: the same pattern a web UI uses. The model is the embedded default
(SmolLM2-135M-Instruct, offline) unless a checkpoint with a chat template is given.

    python examples/chat_stream.py                                   # interactive; empty line or Ctrl-D quits
    python examples/chat_stream.py --once "What is the capital of France?"
    python examples/chat_stream.py mistralai/Mixtral-8x7B-Instruct-v0.1 --gpu-memory 22GiB
"""

from __future__ import annotations

import argparse

# hf_hybrid before torch: then it can set OMP_WAIT_POLICY=PASSIVE, which keeps the CPU lane fast
import hf_hybrid  # noqa: F401

# isort: split
import sys
import threading

import torch
from transformers import AutoTokenizer, TextIteratorStreamer

from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.devices import default_device_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--gpu-memory", default="160MiB", help="device budget (default: %(default)s)")
    parser.add_argument(
        "--max-context", type=int, default=1024, help="KV cache positions (default: %(default)s)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's"
    )
    parser.add_argument("--once", metavar="QUESTION", default=None, help="answer one question and exit")
    return parser.parse_args(argv)


class Chat:
    """A conversation with a hybrid model: history, context budget, streamed answers."""

    def __init__(self, model, tokenizer, args: argparse.Namespace):
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.messages: list[dict[str, str]] = []
        if args.system:
            self.messages.append({"role": "system", "content": args.system})

    def _inputs(self) -> dict:
        """The chat-templated history, oldest turns dropped until it fits ``max_context``."""
        room = self.args.max_context - self.args.max_new_tokens
        while True:
            inputs = self.tokenizer.apply_chat_template(
                self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            first_turn = 1 if self.messages[0]["role"] == "system" else 0
            if inputs["input_ids"].shape[1] <= room or len(self.messages) - first_turn <= 1:
                break
            del self.messages[first_turn : first_turn + 2]  # the oldest user/assistant pair
        if inputs["input_ids"].shape[1] > room:
            raise ValueError(
                f"the question is {inputs['input_ids'].shape[1]} tokens; with --max-new-tokens "
                f"{self.args.max_new_tokens} it does not fit --max-context {self.args.max_context}"
            )
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def ask(self, question: str, out=sys.stdout) -> str:
        """Stream the answer to ``question`` into ``out`` and return it."""
        self.messages.append({"role": "user", "content": question})
        inputs = self._inputs()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = (
            {"do_sample": True, "temperature": self.args.temperature}
            if self.args.temperature > 0
            else {"do_sample": False}
        )
        errors: list[BaseException] = []
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id

        def run() -> None:
            try:
                self.model.generate(
                    **inputs,
                    max_new_tokens=self.args.max_new_tokens,
                    streamer=streamer,
                    pad_token_id=pad_id,
                    **sampling,
                )
            except BaseException as exc:  # hand it to the main thread; end() unblocks the iterator
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="generate")
        thread.start()
        pieces = []
        for text in streamer:  # blocks until the next piece of text is decoded
            pieces.append(text)
            print(text, end="", flush=True, file=out)
        print(file=out)
        thread.join()
        if errors:
            self.messages.pop()
            raise errors[0]
        answer = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def main(argv: list[str] | None = None) -> int:
    """Load the model, then answer ``--once`` or chat until an empty line / EOF."""
    args = parse_args(argv)
    if args.model is None:
        from hf_hybrid.default_model import default_model_dir

        args.model = str(default_model_dir())
    model = HybridModelForCausalLM.from_pretrained(
        args.model,
        gpu_memory=args.gpu_memory,
        device=args.device or default_device_name(),
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_context=args.max_context,
        progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model.hybrid.source)
    if tokenizer.chat_template is None:
        print(f"{args.model} has no chat template; use a chat/instruct checkpoint", file=sys.stderr)
        return 2
    chat = Chat(model, tokenizer, args)
    try:
        if args.once is not None:
            chat.ask(args.once)
            return 0
        homes = model.hybrid_plan.to_dict()["homes"]
        print(f"units per home: {homes}. Empty line or Ctrl-D to quit.")
        while True:
            try:
                question = input("> ").strip()
            except EOFError:
                print()
                break
            if not question:
                break
            chat.ask(question)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        model.hybrid.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
