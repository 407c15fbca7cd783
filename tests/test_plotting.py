"""The public plotting helpers (rllc_fast.plotting) leave matplotlib's global state alone."""
import matplotlib
import pandas as pd
import pytest

from rllc_fast.plotting import head_key, log_step_axis, save_figure, sort_key, subplots
from rllc_fast.report import plot_head_curves


def test_figures_neither_switch_the_backend_nor_open_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # a caller's own choice, which drawing a figure must keep
    try:
        open_before = plt.get_fignums()
        fig, axes = subplots(1, 2, figsize=(4, 2), squeeze=False)
        axes[0][0].plot([0, 1, 10], [1, 2, 3])
        log_step_axis(axes[0][0], [0, 1, 10])
        path = save_figure(fig, tmp_path / "f.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert axes[0][0].get_xscale() == "symlog" and axes[0][0].get_xlabel() == "training step"
        rows = pd.DataFrame({"component": ["0:0", "0:1"] * 2, "step": [1, 1, 10, 10], "llc_mean": [1.0, 2, 3, 4],
                             "llc_sem": [0.1] * 4})
        assert plot_head_curves(rows, tmp_path / "h.png", "t").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_before
    finally:
        plt.switch_backend(before)


def test_components_sort_by_layer_then_head_then_name():
    names = ["whole", "10:0", "1:10", "1:2", "L0"]
    assert sorted(names, key=sort_key) == ["1:2", "1:10", "10:0", "L0", "whole"]
    assert head_key("3:4") == (3, 4)
    with pytest.raises(ValueError):
        head_key("whole")
