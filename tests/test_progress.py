"""Progress reports and logs (rllc_fast.progress): plain lines at a bounded rate when stderr is a file, bars on
a terminal, progress inside a sweep's unit, and transformers' bars silenced for a scope and restored."""
import io
import warnings

import torch

from rllc_fast import SGLDConfig, progress
from rllc_fast.models import attn_only, save_checkpoint
from rllc_fast.progress import Progress, format_seconds, progress_iter, quiet_libraries
from rllc_fast.sweep import run_sweep


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_at_a_bounded_rate_when_not_a_terminal():
    out, clock = io.StringIO(), _Clock()
    bar = Progress(1200, True, desc="SGLD steps", stream=out, clock=clock)
    for _ in range(1100):  # 1100 of 1200 steps in 275 simulated seconds, then closed
        clock.now += 0.25
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [  # one a minute, then the closing line
        "SGLD steps: 240/1200 steps (20%), 1m00s elapsed, ETA 4m00s",
        "SGLD steps: 480/1200 steps (40%), 2m00s elapsed, ETA 3m00s",
        "SGLD steps: 720/1200 steps (60%), 3m00s elapsed, ETA 2m00s",
        "SGLD steps: 960/1200 steps (80%), 4m00s elapsed, ETA 1m00s",
        "SGLD steps: 1100/1200 steps (92%), 4m35s elapsed, ETA 25s",
    ]


def test_every_zero_is_a_line_per_update_with_the_current_label_and_disabled_is_silent():
    out, clock = io.StringIO(), _Clock()
    bar = Progress(3, True, desc="sweep", unit="unit", every=0, stream=out, clock=clock)
    for step in (1, 10, 100):
        bar.set_description(f"step {step} mix heads")
        clock.now += 10
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == [
        "sweep: 1/3 units (33%), 10s elapsed, ETA 20s [step 1 mix heads]",
        "sweep: 2/3 units (67%), 20s elapsed, ETA 10s [step 10 mix heads]",
        "sweep: 3/3 units (100%), 30s elapsed, ETA 0s [step 100 mix heads]",
    ]
    quiet = io.StringIO()
    off = Progress(3, False, stream=quiet, every=0)
    off.update(3)
    off.close()
    assert quiet.getvalue() == "" and not off.enabled
    assert list(progress_iter([1, 2], "x", False)) == [1, 2]


def test_a_short_task_prints_nothing_and_a_terminal_gets_a_bar():
    out, clock = io.StringIO(), _Clock()
    bar = Progress(10, True, stream=out, clock=clock)
    clock.now += 5
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""  # under a minute: no line at all, not even a closing one
    term = _Terminal()
    bar = Progress(10, True, stream=term)
    bar.update(10)
    bar.close()
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3599, 7620, float("nan"), float("inf"))] == [
        "0s", "59s", "1m01s", "59m59s", "2h07m", "?", "?"]


def test_a_sweep_reports_progress_inside_each_unit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line per SGLD update instead of one a minute
    cfg = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=30)
    for step in (1, 2):
        save_checkpoint(attn_only(seed=step, **cfg), tmp_path / f"step{step}.pt", step)
    data = {"mix": torch.randint(0, 30, (16, 8), generator=torch.Generator().manual_seed(0))}
    run_sweep(tmp_path, data, SGLDConfig(num_chains=1, num_draws=3, batch_size=8), tmp_path / "s.sqlite", ["whole"],
              progress=True, log=lambda m: None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [l.split(",")[0] for l in lines if l.startswith("sweep:")] == ["sweep: 1/2 units (50%)",
                                                                         "sweep: 2/2 units (100%)"]
    inner = [l for l in lines if l.startswith("SGLD steps:")]
    assert inner and all("elapsed, ETA" in l for l in inner)
    assert lines.index(inner[0]) < lines.index(next(l for l in lines if l.startswith("sweep: 1/2")))


def _tiny_hf_dir(path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GPTNeoXForCausalLM(cfg).save_pretrained(path)
    return path


def test_quiet_libraries_silences_transformers_bars_and_restores_every_setting(tmp_path, capsys):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from rllc_fast.models import load_gpt_neox

    path = _tiny_hf_dir(tmp_path / "step5")
    capsys.readouterr()
    load_gpt_neox(path)
    assert "Loading weights" in capsys.readouterr().err  # what the scope must silence
    before = (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity())
    with quiet_libraries(bars=True, warnings=True):
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        load_gpt_neox(path)
    assert "Loading weights" not in capsys.readouterr().err
    assert (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity()) == before
    # a setting the caller had turned off stays off
    disable_progress_bars()
    try:
        with quiet_libraries():
            pass
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()
        hf_logging.enable_progress_bar()
