"""``hf-hybrid serve``: the embedded SmolLM2 served on 127.0.0.1 through transformers' OpenAI-compatible
server, queried with the ``openai`` client.

The server is started once for the module through the command line (``main(["serve", ...])``), with
uvicorn run in a background thread on a free port instead of blocking; a small ``max_context`` keeps every
generation short.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import threading
import time

import pytest
from smollm2_markers import needs_smollm2

import hf_hybrid
from hf_hybrid.cli import main

pytestmark = needs_smollm2

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

NAME = "smol"
MAX_CONTEXT = 64
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(client, stderr of the command, the app)`` of a server running the hybrid SmolLM2 on the CPU."""
    from hf_hybrid import serving
    from hf_hybrid.default_model import default_model_dir

    started: dict = {}

    def serve_in_background(app, host, port, log_level="warning"):
        # the command's own serve() blocks until Ctrl-C: run the same app on a free port in a thread
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        started.update(app=app, server=server, thread=thread, port=sock.getsockname()[1], host=host)

    argv = ["serve", str(default_model_dir()), "--device", "cpu", "--dtype", "float32"]
    # a budget below the model's size puts units on the CPU and streaming lanes too
    argv += ["--gpu-memory", "200MiB", "--max-context", str(MAX_CONTEXT), "--model-name", NAME]
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(serving, "serve", serve_in_background)
        assert main(argv) == 0
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{started['port']}/v1", api_key="unused", max_retries=0, timeout=120
    )
    yield client, stderr.getvalue(), started["app"]
    started["server"].should_exit = True
    started["thread"].join(timeout=30)
    # the server's shutdown closed the model (in the engine's process with transformers 5.25 and later)
    assert started["app"].state.model_manager.wait_closed(timeout=30)


def chat(client, **kwargs):
    return client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, **kwargs)


def test_serves_the_hybrid_model_under_its_name(served):
    client, stderr, app = served
    assert f"serving '{NAME}' at http://127.0.0.1:8000/v1" in stderr
    assert f"max_context={MAX_CONTEXT}" in stderr
    manager = app.state.model_manager  # the model may run in a process of its own (transformers >= 5.25)
    assert manager.max_context == MAX_CONTEXT
    assert {"gpu", "cpu"} <= set(manager.plan.homes.values())
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_completion(served):
    client, _, _ = served
    reply = chat(client, max_tokens=8)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= MAX_CONTEXT


def test_streaming_chat_sends_the_same_text(served):
    client, _, _ = served
    whole = chat(client, max_tokens=8).choices[0].message.content
    chunks = list(chat(client, max_tokens=8, stream=True))
    assert len(chunks) > 2  # the role, the text in pieces, the finish reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions(served):
    client, _, _ = served
    reply = client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert "Paris" in reply.choices[0].text
    assert reply.usage.completion_tokens <= 6


def test_two_concurrent_requests_both_complete(served):
    client, _, _ = served
    expected = chat(client, max_tokens=6).choices[0].message.content
    answers: list = [None, None]

    def ask(slot: int) -> None:
        try:
            answers[slot] = chat(client, max_tokens=6).choices[0].message.content
        except Exception as exc:  # noqa: BLE001 (reported below)
            answers[slot] = exc

    threads = [threading.Thread(target=ask, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [expected, expected]


@pytest.mark.parametrize("stream", [False, True])
def test_over_long_request_is_a_400_that_says_why(served, stream):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, max_tokens=1000, stream=stream)
    error = caught.value
    assert error.status_code == 400 and error.code == "context_length_exceeded"
    assert "max_tokens=1000" in error.message and f"max_context={MAX_CONTEXT}" in error.message


def test_prompt_alone_too_long_is_a_400(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="one two three " * 40)
    error = caught.value
    assert error.status_code == 400 and error.code == "context_length_exceeded"
    assert "shorten the prompt" in error.message


def test_request_without_max_tokens_is_capped_at_max_context(served):
    client, _, app = served
    # a prompt that leaves a few positions, and that the model continues rather than ends
    tokenizer = app.state.model_manager.processor
    numbers = []
    while len(tokenizer(", ".join(numbers) + ",")["input_ids"]) < MAX_CONTEXT - 6:
        numbers.append(str(len(numbers) + 1))
    reply = client.completions.create(model=NAME, prompt=", ".join(numbers) + ",", temperature=0)
    usage = reply.usage
    assert usage.prompt_tokens + usage.completion_tokens == MAX_CONTEXT
    assert reply.choices[0].finish_reason == "length"
    # a chat without max_tokens works too (it stops at its end-of-turn token or at the cap)
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0)
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= MAX_CONTEXT
    assert answer.choices[0].message.content


def test_without_the_serving_extras_the_error_names_the_install_command(capsys, monkeypatch):
    # find_spec answers None for a name mapped to None in sys.modules: as if fastapi were not installed
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "hf_hybrid.serving", raising=False)
    monkeypatch.delattr(hf_hybrid, "serving", raising=False)  # else `from . import serving` reuses it
    code = main(["serve", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert 'pip install "hf_hybrid[serve]"' in err and "fastapi" in err
    assert len(err.strip().splitlines()) == 1
