"""Hooks that change process-wide torch settings must restore them, even when the forward fails."""

from __future__ import annotations

import pytest
import torch

from hf_hybrid.hooks import _NoCudnnAttention


class _Failing(torch.nn.Module):
    def forward(self, x):
        self.seen = torch.backends.cuda.cudnn_sdp_enabled()
        raise RuntimeError("boom")


class _Plain(torch.nn.Module):
    def forward(self, x):
        self.seen = torch.backends.cuda.cudnn_sdp_enabled()
        return x


@pytest.mark.parametrize("module_cls", [_Plain, _Failing])
def test_cudnn_attention_is_off_inside_the_forward_and_restored_after(module_cls):
    module = module_cls()
    guard = _NoCudnnAttention()
    module.register_forward_pre_hook(guard.pre, with_kwargs=True)
    module.register_forward_hook(guard.post, with_kwargs=True, always_call=True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for setting in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(setting)
            try:
                module(torch.ones(1))
            except RuntimeError:
                assert module_cls is _Failing
            assert module.seen is False
            assert torch.backends.cuda.cudnn_sdp_enabled() is setting
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
