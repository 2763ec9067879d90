"""Shared fixtures of the GPU tests."""

import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled memory: a kernel that skips a store shows up."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    def empty_like(*args, **kwargs):
        out = real_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
