import pytest
from tiny_models import CONFIGS, build


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> directory of a tiny random checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build(family, root / family) for family in CONFIGS}
