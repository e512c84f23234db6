"""``hf-hybrid serve``: one hybrid model behind transformers' own OpenAI-compatible server.

transformers' server (``transformers serve``) is assembled from parts that ``build_server`` takes as
arguments: a model manager and one handler per endpoint. This module swaps some of them for subclasses and
keeps every route, schema and streaming detail of transformers. How the model is loaded and run depends on
the release, so that part lives in one of two modules, chosen by what the installed transformers has:

- :mod:`hf_hybrid.serving_inprocess` (transformers 5.17 to 5.24): the model runs in the API server's
  process; requests are checked by the generation manager, which sees the tokenized prompt;
- :mod:`hf_hybrid.serving_engine` (transformers 5.25 and later): the model runs in a process of its own,
  which transformers spawns and sends requests to (its "engine"); requests are checked in the API server,
  once the handler has tokenized the prompt.

Either way the endpoint handlers below note which field set a request's token limit, and the check
(:func:`fit_to_context`) caps a default limit at ``max_context`` (transformers asks for 1,024 new tokens
when a request gives none) or refuses a request that cannot fit: HTTP 400 with OpenAI's
``context_length_exceeded`` error.
"""

from __future__ import annotations

import contextvars
import importlib.util
import inspect
from typing import Any

from .errors import ContextLengthError, ServingError

#: What transformers' server imports besides transformers itself (its ``serving`` extra, less rich).
REQUIRED = ("fastapi", "uvicorn", "pydantic", "openai")
INSTALL_HINT = 'pip install "hf_hybrid[serve]"'


def require_serving() -> None:
    """Raise :class:`ServingError` naming the install command when a package the server needs is missing."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise ServingError(f"serving needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}")


# transformers' serving modules define their classes only when these packages import: check them first,
# so a missing one is a clear error rather than a NameError from inside transformers
require_serving()

from fastapi.responses import JSONResponse  # noqa: E402
from transformers.cli.serving import server as _server  # noqa: E402
from transformers.cli.serving.chat_completion import ChatCompletionHandler  # noqa: E402
from transformers.cli.serving.completion import CompletionHandler  # noqa: E402
from transformers.cli.serving.response import ResponseHandler  # noqa: E402
from transformers.cli.serving.transcription import TranscriptionHandler  # noqa: E402

#: What the handler built for the request being handled: its generation settings (a ``GenerationConfig``
#: before transformers 5.25, a dict of ``generate`` arguments since) and the field that set its token
#: limit (``max_tokens``...), or ``None`` when it gave none. Set while the handler builds the settings and
#: read by the check in the same request: both run in the request's task, before any response is sent.
_REQUEST: contextvars.ContextVar[tuple[Any, str | None]] = contextvars.ContextVar("hf_hybrid_request")


def fit_to_context(
    max_context: int, prompt: int, new: int | None, max_length: int | None, limit_field: str | None
) -> int | None:
    """The ``max_new_tokens`` a request gets within ``max_context``, or :class:`ContextLengthError` (HTTP 400).

    ``new`` and ``max_length`` are what the request's settings ask for. A request that set its own limit
    (through ``limit_field``) is refused when its prompt plus that limit exceeds ``max_context``, and keeps
    ``new``; one that did not gets its new tokens capped at what the context leaves.
    """
    room = max_context - prompt
    if room < 1:
        raise ContextLengthError(
            f"the prompt is {prompt} tokens, but this server's model holds at most max_context={max_context} "
            "positions (prompt + new tokens): shorten the prompt"
        )
    if limit_field is None:
        return min(new or room, room)
    total = prompt + new if new is not None else max_length
    if total is not None and total > max_context:
        asked = f"{limit_field}={new}" if new is not None else f"max_length={total}"
        raise ContextLengthError(
            f"the prompt ({prompt} tokens) + {asked} needs {total} positions, but this server's model holds "
            f"at most max_context={max_context}: ask for at most {room} new tokens, or leave {limit_field} "
            f"out to get up to {room}"
        )
    return new


def prompt_tokens(inputs: dict) -> int:
    """The prompt's length in tokens: token ids as a list (continuous batching) or a tensor."""
    ids = inputs["input_ids"]
    return len(ids) if isinstance(ids, list) else int(ids.shape[-1])


class _FitsContext:
    """Mixed into a transformers endpoint handler: notes which of ``limit_fields`` set the request's token
    limit (or ``generation_config``, whose ``max_new_tokens``/``max_length`` then count), with the settings
    built for it, for the ``max_context`` check."""

    limit_fields: tuple[str, ...] = ()

    def _note(self, body: dict, settings: Any) -> None:
        given = [field for field in (*self.limit_fields, "generation_config") if body.get(field) is not None]
        _REQUEST.set((settings, given[0] if given else None))

    # transformers 5.17 to 5.24: a GenerationConfig, checked by serving_inprocess.ContextGuard
    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        self._note(body, config)
        return config

    # transformers 5.25 and later: ``generate``'s arguments, checked below once the prompt is tokenized
    def _build_generation_kwargs(self, body: dict, model_generation_config) -> dict:
        kwargs = super()._build_generation_kwargs(body, model_generation_config)
        self._note(body, kwargs)
        return kwargs

    def _check_prompt_length(self, engine, inputs: dict) -> None:
        # called by every handler between building the settings and generating; the dict is the one the
        # engine generates with and finish_reason reads back
        kwargs, limit_field = _REQUEST.get()
        max_context, new = self.model_manager.max_context, kwargs.get("max_new_tokens")
        kwargs["max_new_tokens"] = fit_to_context(
            max_context, prompt_tokens(inputs), new, kwargs.get("max_length"), limit_field
        )
        super()._check_prompt_length(engine, inputs)


class HybridChatCompletionHandler(_FitsContext, ChatCompletionHandler):
    """``/v1/chat/completions``: transformers' handler, its token limit checked against ``max_context``."""

    limit_fields = ("max_completion_tokens", "max_tokens")


class HybridCompletionHandler(_FitsContext, CompletionHandler):
    """``/v1/completions``: transformers' handler, its token limit checked against ``max_context``."""

    limit_fields = ("max_tokens",)


class HybridResponseHandler(_FitsContext, ResponseHandler):
    """``/v1/responses``: transformers' handler, its token limit checked against ``max_context``."""

    limit_fields = ("max_output_tokens",)


def _backend():
    """The module that loads and runs the model the way the installed transformers' server does."""
    from transformers.cli.serving import model_manager, utils

    if hasattr(model_manager, "EngineClient"):  # 5.25 and later: each model in a process of its own
        from . import serving_engine

        return serving_engine
    if hasattr(utils, "GenerateManager"):  # 5.17 to 5.24: the model in the API server's process
        from . import serving_inprocess

        return serving_inprocess
    raise ServingError(
        "this transformers release's server has neither an EngineClient nor a GenerateManager, which "
        "hf_hybrid adapts: install a transformers release hf_hybrid supports (see docs/serving.md)"
    )


def build_app(
    checkpoint: str,
    *,
    name: str | None = None,
    tokenizer: str | None = None,
    options: dict | None = None,
    enable_cors: bool = False,
) -> Any:
    """The FastAPI app of transformers' server, serving ``checkpoint`` through hf_hybrid.

    Loads the model first (with ``options``, as for ``HybridModelForCausalLM.from_pretrained``). Requests
    name it ``name`` (default: ``checkpoint`` as given). Endpoints are transformers' own:
    ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/health``...
    ``app.state.model_manager`` is the :class:`HybridModelManager` of the installed release, which gives
    the model's ``max_context``, ``plan`` and ``processor`` either way.
    """
    backend = _backend()
    manager = backend.HybridModelManager(name or checkpoint, checkpoint, tokenizer=tokenizer, options=options)
    handler_args = {"model_manager": manager, "generation_state": manager.generation_state}
    parts = {
        "model_manager": lambda: manager,
        "generation_state": lambda: manager.generation_state,
        "chat_handler": lambda: HybridChatCompletionHandler(**handler_args),
        "completion_handler": lambda: HybridCompletionHandler(**handler_args),
        "response_handler": lambda: HybridResponseHandler(**handler_args),
        "transcription_handler": lambda: _make(TranscriptionHandler, handler_args),
        "systemone_handler": lambda: _make(_systemone_handler_class(), handler_args),
        "enable_cors": lambda: enable_cors,
    }
    # build_server's parts differ between transformers releases (systemone_handler came in 5.21, 5.25 has
    # no generation_state): pass the ones this release asks for
    arguments = {}
    for parameter in inspect.signature(_server.build_server).parameters.values():
        if parameter.name in parts:
            arguments[parameter.name] = parts[parameter.name]()
        elif parameter.default is inspect.Parameter.empty:
            manager.shutdown()
            raise ServingError(
                f"this transformers release's server needs a {parameter.name!r} that hf_hybrid does not "
                "provide: install a transformers release hf_hybrid supports (see docs/serving.md)"
            )
    app = _server.build_server(**arguments)
    app.state.model_manager = manager

    @app.exception_handler(ContextLengthError)
    async def _context_length(_request, exc: ContextLengthError):
        # OpenAI's shape for this error, which its clients read (``BadRequestError.code``, ``.message``);
        # raised by fit_to_context, or (in-process) by the model's own guard for what that let through
        error = {"message": str(exc), "type": "invalid_request_error", "code": "context_length_exceeded"}
        return JSONResponse({"error": error}, status_code=400)

    return app


def _make(handler_class, arguments: dict):
    """``handler_class`` made with those of ``arguments`` its constructor takes (they vary by release)."""
    accepted = inspect.signature(handler_class.__init__).parameters
    return handler_class(**{key: value for key, value in arguments.items() if key in accepted})


def _systemone_handler_class():
    from transformers.cli.serving.systemone import SystemOneHandler

    return SystemOneHandler


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run ``app`` with uvicorn until interrupted (Ctrl-C); the model is closed on the way out."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
