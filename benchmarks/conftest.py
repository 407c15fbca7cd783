"""Shared benchmark helpers: device description and a measured reference bandwidth."""
import time

import pytest
import torch

# Vendor peak memory bandwidth (bytes/s) of the GPUs this project is lent; CPU peaks are not
# published for these machines, so CPU rows report a fraction of a measured copy bandwidth.
GPU_PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reference_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, what it is): the vendor peak on a known GPU, else a measured large-copy rate."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BANDWIDTH.items():
            if key in name:
                return peak, f"vendor peak of {key}"
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device)  # 256 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best, "measured torch copy (read+write) bandwidth"


@pytest.fixture(scope="session")
def bandwidth_reference():
    cache = {}

    def get(device):
        if device not in cache:
            cache[device] = reference_bandwidth(device)
        return cache[device]

    return get
