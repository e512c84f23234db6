"""``hf-hybrid serve`` on transformers 5.17 to 5.24, whose server runs the model in its own process.

Those releases build the server from a model manager that loads models, a generation state that hands out
per-model generation managers, and the endpoint handlers (see :mod:`hf_hybrid.serving`). Here:

- :class:`HybridModelManager` loads the one served checkpoint with :class:`HybridModelForCausalLM`, whatever
  model name a request uses for it, and closes the model's lanes on shutdown;
- :class:`ContextGuard`, the generation manager, sees the tokenized prompt and the generation config of
  every request before generating, and fits them to ``max_context`` (:func:`~hf_hybrid.serving.fit_to_context`).

Generation keeps transformers' scheduling: one ``generate`` at a time per model, in the model's own
inference thread, so concurrent requests queue.
"""

from __future__ import annotations

from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import GenerateManager, GenerationState

from .serving import _REQUEST, fit_to_context, prompt_tokens


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
        self.generation_state = HybridGenerationState()
        self.closed = False
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

    @property
    def max_context(self) -> int:
        """Positions (prompt + new tokens) the served model holds."""
        return self.model.hybrid.max_context

    @property
    def plan(self):
        """The served model's :class:`~hf_hybrid.placement.HybridPlan`."""
        return self.model.hybrid_plan

    @property
    def processor(self):
        """The served model's tokenizer."""
        return next(iter(self.loaded_models.values())).processor

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
                self.closed = True
        super().shutdown()

    def wait_closed(self, timeout: float = 0) -> bool:
        """Whether :meth:`shutdown` closed the model (at once here: it runs in this process)."""
        return self.closed


class ContextGuard(GenerateManager):
    """transformers' sequential generation manager, checking each request against ``max_context`` first.

    Both entry points run in the request handler before any response is sent (streaming starts after
    them), so the :class:`~hf_hybrid.errors.ContextLengthError` raised here becomes the response (HTTP 400,
    see :func:`~hf_hybrid.serving.build_app`).
    """

    def generate_streaming(self, model, processor, inputs, gen_config, *args, **kwargs):  # noqa: D102
        _fit(model, inputs, gen_config)
        return super().generate_streaming(model, processor, inputs, gen_config, *args, **kwargs)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, *args, **kwargs):  # noqa: D102
        _fit(model, inputs, gen_config)
        return await super().generate_non_streaming(model, processor, inputs, gen_config, *args, **kwargs)


def _fit(model, inputs: dict, gen_config) -> None:
    """Fit ``gen_config`` in place to the model's ``max_context`` (transformers reads ``max_new_tokens``
    back for ``finish_reason``)."""
    _, limit_field = _REQUEST.get((None, None))
    new, max_length = gen_config.max_new_tokens, gen_config.max_length
    gen_config.max_new_tokens = fit_to_context(
        model.hybrid.max_context, prompt_tokens(inputs), new, max_length, limit_field
    )


class HybridGenerationState(GenerationState):
    """transformers' generation state, handing out :class:`ContextGuard` managers."""

    def get_manager(self, model_id: str, use_cb: bool = False):  # noqa: D102
        if not use_cb and model_id not in self._generate_managers:
            self._generate_managers[model_id] = ContextGuard()
        return super().get_manager(model_id, use_cb=use_cb)
