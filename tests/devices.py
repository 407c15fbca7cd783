"""The devices of device-parametrized tests: the CPU always, and CUDA as a ``cuda``-marked case that is
skipped (not left out) where no GPU is visible, so ``pytest -m cuda`` selects every test that needs one
(what ``benchmarks/gpu_session.sh`` runs on a GPU machine)."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = pytest.param("cuda", marks=(pytest.mark.cuda, requires_cuda), id="cuda")
DEVICES = ("cpu", CUDA)


def cuda_only(test):
    """Marks a test whose subject exists only on CUDA (kernel output against a reference): ``cuda`` and
    skipped without a GPU. Prefer a ``DEVICES`` parametrization wherever the CPU has a counterpart."""
    return pytest.mark.cuda(requires_cuda(test))
