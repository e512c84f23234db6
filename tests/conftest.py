import pytest
from tiny_models import CONFIGS, build


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> directory of a tiny random checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build(family, root / family) for family in CONFIGS}


@pytest.fixture
def divide_tiny_experts(monkeypatch):
    """Token assignment "adaptive" divides only experts of at least SPLIT_MIN_BYTES (16 MiB): let it divide
    the tiny models' experts too."""
    import hf_hybrid.costs

    monkeypatch.setattr(hf_hybrid.costs, "SPLIT_MIN_BYTES", 0)
