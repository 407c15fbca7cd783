import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)


def pytest_collection_modifyitems(config, items):
    """Every test case that runs on CUDA carries the ``cuda`` marker (tests/devices.py), so that
    ``pytest -m cuda`` on a GPU machine selects them all; a case that does not is a usage error."""
    unmarked = [item.nodeid for item in items
                if hasattr(item, "callspec") and "cuda" in (str(v) for v in item.callspec.params.values())
                and item.get_closest_marker("cuda") is None]
    if unmarked:
        raise pytest.UsageError("CUDA cases without the cuda marker (parametrize with tests/devices.py's DEVICES): "
                                + ", ".join(unmarked))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture()
def no_network(monkeypatch):
    """Any network connection fails the test (the loaders must work offline)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
