"""``hf-hybrid serve`` on transformers 5.25 and later, whose server runs each model in a process of its own.

From 5.25 the API server keeps only a model's configs and tokenizer (its ``EngineClient``); the model is
loaded and run by an engine process the server starts with the ``spawn`` method (a fresh interpreter, so
CUDA starts anew there rather than being inherited from a forked parent) and a pickled copy of the
server's ``ModelLoader``; requests and tokens travel through multiprocessing queues. Here:

- :class:`HybridModelLoader`, transformers' loader pinned to one checkpoint. In the engine process it loads
  the model with :class:`HybridModelForCausalLM` and the user's options, sends the API server what the
  checks and the command need (the model's ``max_context``, its plan, the warnings of the load), and
  closes the model when transformers stops the engine (SIGTERM). In the API server it reads the
  checkpoint's configs and tokenizer, whatever model name requests use.
- :class:`HybridModelManager`, transformers' manager pinned to that model: it starts the engine at once
  and waits for the load, so ``max_context`` is known before the first request, and the handlers of
  :mod:`hf_hybrid.serving` check every request against it once they have tokenized its prompt.

Generation is transformers' ``GenerateRunner``: one ``generate`` at a time in the engine, in arrival order.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import warnings

from transformers.cli.serving.model_manager import ModelLoader, ModelManager

#: The options that say where the checkpoint's files are, which the API server's reads of them need too
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")

#: Seconds the API server waits for what the engine sends once the model loaded (it is sent before).
REPORT_TIMEOUT = 60


class HybridModelLoader(ModelLoader):
    """transformers' model loader, loading ``checkpoint`` with :class:`HybridModelForCausalLM` whatever the
    model id (the name requests use), its tokenizer from ``tokenizer`` (default: the checkpoint).

    Pickled into the engine process, with ``reports``, the queue through which the engine sends the API
    server ``("loaded", max_context, plan, warnings)``, ``("failed", error, warnings)`` and ``("closed",)``.
    On a failed load that message replaces transformers' own (the error's text, after a logged traceback).
    """

    def __init__(self, checkpoint: str, tokenizer: str | None = None, options: dict | None = None) -> None:
        self.checkpoint = checkpoint
        self.tokenizer_source = tokenizer or checkpoint
        self.options = dict(options or {})
        super().__init__(trust_remote_code=bool(self.options.get("trust_remote_code", False)))
        self.reports = multiprocessing.get_context("spawn").Queue()

    def load_config(self, model_id: str):
        """The checkpoint's config and generation config, as the hybrid model reads them."""
        from transformers import AutoConfig, GenerationConfig

        hub = {key: self.options[key] for key in HUB_OPTIONS if key in self.options}
        config = AutoConfig.from_pretrained(self.checkpoint, trust_remote_code=self.trust_remote_code, **hub)
        try:
            generation_config = GenerationConfig.from_pretrained(self.checkpoint, **hub)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        return config, generation_config

    def load_processor(self, model_id: str):
        """The checkpoint's tokenizer (a tokenizer directory of its own if given)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_source, trust_remote_code=self.trust_remote_code)

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        """In the engine process: the hybrid model, reported to the API server, closed on SIGTERM."""
        from .modeling import HybridModelForCausalLM

        with warnings.catch_warnings(record=True) as caught:
            try:
                model = HybridModelForCausalLM.from_pretrained(self.checkpoint, **self.options)
            except Exception as error:
                if not _picklable(error):
                    raise  # transformers logs it and sends the API server its text
                # the error itself, so that the API server raises it as loading in-process would (a
                # BudgetError stays one, said once); the engine then ends without logging it again
                self.reports.put(("failed", error, _portable(caught)))
                self.reports.close()
                self.reports.join_thread()
                os._exit(1)
        self.reports.put(("loaded", model.hybrid.max_context, model.hybrid_plan, _portable(caught)))
        _close_on_sigterm(model, self.reports)
        return model

    def next_report(self, kind: str, timeout: float) -> tuple | None:
        """In the API server: the next report of ``kind`` the engine sent (skipping others), or ``None``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                report = self.reports.get(timeout=left)
            except queue.Empty:
                break
            if report[0] == kind or report[0] == "failed":
                return report
        return None


class HybridModelManager(ModelManager):
    """transformers' model manager pinned to one checkpoint, run in an engine process with
    :class:`HybridModelLoader`; arguments and attributes as in :mod:`hf_hybrid.serving_inprocess`
    (``max_context``, ``plan`` and ``processor``; ``/v1/models`` lists ``name``, as transformers does).
    """

    def __init__(
        self, name: str, checkpoint: str, *, tokenizer: str | None = None, options: dict | None = None
    ) -> None:
        loader = HybridModelLoader(checkpoint, tokenizer, options)
        try:
            # the parent starts the pinned model's engine right away and waits for it to load
            super().__init__(loader=loader, force_model=name)
            report = loader.next_report("loaded", REPORT_TIMEOUT)
        except RuntimeError as error:
            report = loader.next_report("failed", 5)
            if report is None:
                raise
            _warn(report[2])
            raise report[1] from error
        if report is None or report[0] != "loaded":
            self.shutdown()
            raise RuntimeError("the model's process loaded the model but did not say its max_context")
        _, self.max_context, self.plan, caught = report
        _warn(caught)  # where the caller sees them, as if the model had loaded here

    @property
    def processor(self):
        """The served model's tokenizer (the API server's copy)."""
        return next(iter(self.engines.values())).processor

    def wait_closed(self, timeout: float = 10) -> bool:
        """Whether the engine closed the model after :meth:`shutdown` (which only signals it), waiting up to
        ``timeout`` seconds."""
        return self.loader.next_report("closed", timeout) is not None


def _close_on_sigterm(model, reports) -> None:
    """Close ``model`` when the engine process is stopped: transformers' shutdown sends SIGTERM, then
    SIGKILL 5 s later. The close waits for a running ``generate``; the process then ends as SIGTERM would."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread, where transformers' engine loads the model

    def close_then_stop(signum, _frame) -> None:
        model.hybrid.close()
        reports.put(("closed",))
        reports.close()
        reports.join_thread()  # the report is out before the process ends
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, close_then_stop)


def _portable(caught: list) -> list[tuple]:
    """Warnings as ``(text, category, file, line)``, their category plain ``UserWarning`` if it cannot travel."""
    return [
        (str(w.message), w.category if _picklable(w.category) else UserWarning, w.filename, w.lineno)
        for w in caught
    ]


def _warn(caught: list[tuple]) -> None:
    for text, category, filename, lineno in caught:
        warnings.warn_explicit(text, category, filename, lineno)


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 (anything that fails to pickle)
        return False
    return True
