"""``hf-hybrid serve``: one hybrid model behind transformers' own OpenAI-compatible server.

transformers' server (``transformers serve``) is assembled from parts that ``build_server`` takes as
arguments: a model manager that loads models, a generation state that hands out per-model generation
managers, and one handler per endpoint. This module swaps three of them for subclasses and keeps every
route, schema and streaming detail of transformers:

- :class:`HybridModelManager` loads the one served checkpoint with :class:`HybridModelForCausalLM`, whatever
  model name a request uses for it, and closes the model's lanes on shutdown;
- the endpoint handlers note whether a request set its own token limit (``max_tokens``...);
- :class:`ContextGuard`, the generation manager, sees the tokenized prompt and the generation config of
  every request before generating, caps a default limit at ``max_context`` (transformers asks for 1,024 new
  tokens when a request gives none) and refuses a request that cannot fit: HTTP 400 with OpenAI's
  ``context_length_exceeded`` error.

Generation keeps transformers' scheduling: one ``generate`` at a time per model, in the model's own
inference thread, so concurrent requests queue.
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
from transformers.cli.serving.model_manager import ModelManager  # noqa: E402
from transformers.cli.serving.response import ResponseHandler  # noqa: E402
from transformers.cli.serving.transcription import TranscriptionHandler  # noqa: E402
from transformers.cli.serving.utils import GenerateManager, GenerationState  # noqa: E402

#: The field that set the request's token limit (``max_tokens``...), or ``None`` when it gave none. Set
#: by the handler while it builds the generation config and read by :class:`ContextGuard` in the same
#: request: both run in the request's task, before any other request can interleave.
_LIMIT_FIELD: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hf_hybrid_limit_field", default=None
)


class HybridModelManager(ModelManager):
    """transformers' model manager pinned to one checkpoint, loaded with :class:`HybridModelForCausalLM`.

    ``name`` is what requests call the model (``"model": name``) and what ``/v1/models`` lists;
    ``checkpoint`` is where its weights are, ``tokenizer`` where its tokenizer files are (default: the
    checkpoint), and ``options`` are :class:`~hf_hybrid.options.HybridOptions` keyword arguments.
    """

    def __init__(
        self, name: str, checkpoint: str, *, tokenizer: str | None = None, options: dict | None = None
    ) -> None:
        self.checkpoint = checkpoint
        self.tokenizer_source = tokenizer or checkpoint
        self.options = dict(options or {})
        device = str(self.options.get("device") or "auto")
        # the parent loads the pinned model right away, through the two methods below
        super().__init__(
            device=device,
            trust_remote_code=bool(self.options.get("trust_remote_code", False)),
            force_model=name,
        )

    @property
    def model(self):
        """The served hybrid model (loaded when the manager was made)."""
        return next(iter(self.loaded_models.values())).model

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            self.tokenizer_source, trust_remote_code=bool(self.options.get("trust_remote_code", False))
        )

    def _load_model(self, model_id_and_revision: str, **kwargs):
        from .modeling import HybridModelForCausalLM

        return HybridModelForCausalLM.from_pretrained(self.checkpoint, **self.options)

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        """``/v1/models``: the served model alone, under the name requests give it (not the hub cache)."""
        owner = self.force_model.split("/")[0] if "/" in self.force_model else ""
        status = {"value": "loaded" if self.loaded_models else "unloaded"}
        return [
            {"id": self.force_model, "object": "model", "created": 0, "owned_by": owner, "status": status}
        ]

    # transformers before 5.24 answers /v1/models with this (a scan of the hub cache, which may not exist)
    get_gen_models = list_models

    def shutdown(self) -> None:
        """Stop the served model's CPU workers and release its buffers, then let transformers drop it."""
        for timed in list(self.loaded_models.values()):
            model = getattr(timed, "model", None)
            if model is not None and hasattr(model, "hybrid"):
                model.hybrid.close()
        super().shutdown()


class ContextGuard(GenerateManager):
    """transformers' sequential generation manager, checking each request against ``max_context`` first.

    Both entry points run in the request handler before any response is sent (streaming starts after
    them), so the :class:`ContextLengthError` raised here becomes the response (HTTP 400, see
    :func:`build_app`).
    """

    def generate_streaming(self, model, processor, inputs, gen_config, *args, **kwargs):  # noqa: D102
        fit_to_context(model, inputs, gen_config, _LIMIT_FIELD.get())
        return super().generate_streaming(model, processor, inputs, gen_config, *args, **kwargs)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, *args, **kwargs):  # noqa: D102
        fit_to_context(model, inputs, gen_config, _LIMIT_FIELD.get())
        return await super().generate_non_streaming(model, processor, inputs, gen_config, *args, **kwargs)


def fit_to_context(model, inputs: dict, gen_config, limit_field: str | None) -> None:
    """Make ``gen_config`` fit the model's ``max_context``, or raise :class:`ContextLengthError` (HTTP 400).

    A request that set its own limit (through ``limit_field``) is refused when its prompt plus that limit
    exceeds ``max_context``; one that did not gets its new tokens capped at what the context leaves.
    ``gen_config`` is changed in place: transformers reads ``max_new_tokens`` back for ``finish_reason``.
    """
    max_context = model.hybrid.max_context
    ids = inputs["input_ids"]
    prompt = len(ids) if isinstance(ids, list) else int(ids.shape[-1])
    room = max_context - prompt
    if room < 1:
        raise ContextLengthError(
            f"the prompt is {prompt} tokens, but this server's model holds at most max_context={max_context} "
            "positions (prompt + new tokens): shorten the prompt"
        )
    if limit_field is None:
        gen_config.max_new_tokens = min(gen_config.max_new_tokens or room, room)
        return
    new = gen_config.max_new_tokens
    total = prompt + new if new is not None else gen_config.max_length
    if total > max_context:
        asked = f"{limit_field}={new}" if new is not None else f"max_length={total}"
        raise ContextLengthError(
            f"the prompt ({prompt} tokens) + {asked} needs {total} positions, but this server's model holds "
            f"at most max_context={max_context}: ask for at most {room} new tokens, or leave {limit_field} "
            f"out to get up to {room}"
        )


class HybridGenerationState(GenerationState):
    """transformers' generation state, handing out :class:`ContextGuard` managers."""

    def get_manager(self, model_id: str, use_cb: bool = False):  # noqa: D102
        if not use_cb and model_id not in self._generate_managers:
            self._generate_managers[model_id] = ContextGuard()
        return super().get_manager(model_id, use_cb=use_cb)


class _NotesLimit:
    """Mixed into a transformers endpoint handler: notes which of ``limit_fields`` set the request's token
    limit (or ``generation_config``, whose ``max_new_tokens``/``max_length`` then count), for
    :class:`ContextGuard`."""

    limit_fields: tuple[str, ...] = ()

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        given = [field for field in (*self.limit_fields, "generation_config") if body.get(field) is not None]
        _LIMIT_FIELD.set(given[0] if given else None)
        return config


class HybridChatCompletionHandler(_NotesLimit, ChatCompletionHandler):
    """``/v1/chat/completions``: transformers' handler, its token limit checked against ``max_context``."""

    limit_fields = ("max_completion_tokens", "max_tokens")


class HybridCompletionHandler(_NotesLimit, CompletionHandler):
    """``/v1/completions``: transformers' handler, its token limit checked against ``max_context``."""

    limit_fields = ("max_tokens",)


class HybridResponseHandler(_NotesLimit, ResponseHandler):
    """``/v1/responses``: transformers' handler, its token limit checked against ``max_context``."""

    limit_fields = ("max_output_tokens",)


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
    """
    manager = HybridModelManager(name or checkpoint, checkpoint, tokenizer=tokenizer, options=options)
    state = HybridGenerationState()
    parts = {
        "model_manager": lambda: manager,
        "generation_state": lambda: state,
        "chat_handler": lambda: HybridChatCompletionHandler(model_manager=manager, generation_state=state),
        "completion_handler": lambda: HybridCompletionHandler(model_manager=manager, generation_state=state),
        "response_handler": lambda: HybridResponseHandler(model_manager=manager, generation_state=state),
        "transcription_handler": lambda: TranscriptionHandler(manager, state),
        "systemone_handler": lambda: _systemone_handler(manager, state),
        "enable_cors": lambda: enable_cors,
    }
    # build_server's parts differ between transformers releases (systemone_handler came in 5.21): pass
    # the ones this release asks for
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
        # raised by fit_to_context, or by the model's own guard for what that let through
        error = {"message": str(exc), "type": "invalid_request_error", "code": "context_length_exceeded"}
        return JSONResponse({"error": error}, status_code=400)

    return app


def _systemone_handler(manager, state):
    from transformers.cli.serving.systemone import SystemOneHandler

    return SystemOneHandler(model_manager=manager, generation_state=state)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run ``app`` with uvicorn until interrupted (Ctrl-C); the model is closed on the way out."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
