"""Throughput windows: speed between logged steps, from the work recorded at dispatch."""

import pytest

from alignjax.train.metrics import Throughput


def test_throughput_window_between_logged_steps():
    speed = Throughput(local_devices=4, processes=2, peak_flops=1e12)
    for step, tokens, flops in [(1, 100, 8e12), (2, 120, 9e12), (3, 80, 7e12), (4, 100, 8e12)]:
        speed.add(step, tokens, flops)
    assert speed.finished(2, now=10.0) == {}  # the first window would include compilation
    got = speed.finished(4, now=14.0)  # steps 3 and 4, 4 seconds
    assert got["perf/step_s"] == pytest.approx(2.0)
    assert got["perf/tokens_per_s"] == pytest.approx((80 + 100) * 2 / 4.0)
    assert got["perf/model_tflop_per_s_per_device"] == pytest.approx((7e12 + 8e12) / 4.0 / 4 / 1e12)
    assert got["perf/mfu"] == pytest.approx((7e12 + 8e12) / 4.0 / 4 / 1e12)
    no_peak = Throughput(local_devices=1)
    no_peak.add(1, 10, 1e9)
    no_peak.add(2, 10, 1e9)
    no_peak.finished(1, now=0.0)
    keys = {"perf/step_s", "perf/tokens_per_s", "perf/model_tflop_per_s_per_device"}
    assert set(no_peak.finished(2, now=1.0)) == keys  # no MFU without a known peak
