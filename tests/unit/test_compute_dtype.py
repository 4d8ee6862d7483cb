"""ns_dtype="auto": the compute dtype follows what the device does (teonspeed.ortho.compute_dtype)."""

import pytest
import torch

import teonspeed
from teonspeed.ortho import compute_dtype as cd
from teonspeed.ortho import default_compute_dtype


@pytest.fixture
def fresh_probe(monkeypatch):
    """No override, and a probe cache that starts (and ends) empty."""
    monkeypatch.delenv(cd.CPU_BF16_ENV, raising=False)
    cd._cached_cpu_probe.cache_clear()
    yield
    cd._cached_cpu_probe.cache_clear()


@pytest.mark.parametrize(
    "fp32_s, bf16_s, expected",
    [
        (68e-3, 26e-3, True),  # an AVX512-BF16 machine: 2.6x faster in bf16
        (1e-3, 60e-3, False),  # emulated bf16, 60x slower
        (10e-3, 9e-3, False),  # faster, but within the noise margin: keep fp32's precision
        (10e-3, 8e-3, True),  # 1.25x, beyond the 1.2x margin
    ],
)
def test_decision_from_injected_timings(fp32_s, bf16_s, expected):
    times = {torch.float32: fp32_s, torch.bfloat16: bf16_s}
    chosen, f, b = cd.probe_cpu_bf16(timer=lambda dtype: times[dtype])
    assert (chosen, f, b) == (expected, fp32_s, bf16_s)


def test_probe_alternates_and_keeps_the_best_of_each():
    """A load spike during one timing must not decide: the best of alternating rounds is compared."""
    seq = iter([0.050, 0.004, 0.010, 0.030, 0.011, 0.004])  # fp32, bf16, fp32, bf16, fp32, bf16
    calls = []

    def timer(dtype):
        calls.append(dtype)
        return next(seq)

    chosen, fp32, bf16 = cd.probe_cpu_bf16(timer=timer, rounds=3)
    assert calls == [torch.float32, torch.bfloat16] * 3
    assert (fp32, bf16) == (0.010, 0.004) and chosen


def test_cpu_follows_the_probe_and_caches_it(fresh_probe, monkeypatch):
    calls = []

    def fake_probe(timer=None, rounds=None):
        calls.append(1)
        return True, 0.068, 0.026

    monkeypatch.setattr(cd, "probe_cpu_bf16", fake_probe)
    x = torch.zeros(4, 8)
    assert default_compute_dtype(x) == torch.bfloat16
    assert default_compute_dtype(x) == torch.bfloat16
    assert len(calls) == 1, "the probe must run once per process"
    info = cd.cpu_bf16_decision()
    assert info["source"] == "probe" and info["bf16_speedup"] == pytest.approx(0.068 / 0.026)


def test_slow_bf16_cpu_keeps_fp32(fresh_probe, monkeypatch):
    monkeypatch.setattr(cd, "probe_cpu_bf16", lambda timer=None, rounds=None: (False, 0.001, 0.06))
    assert default_compute_dtype(torch.zeros(4, 8)) == torch.float32


@pytest.mark.parametrize(
    "value, dtype",
    [("1", torch.bfloat16), ("0", torch.float32), ("true", torch.bfloat16), ("off", torch.float32)],
)
def test_env_override_skips_the_probe(fresh_probe, monkeypatch, value, dtype):
    monkeypatch.setattr(
        cd, "probe_cpu_bf16", lambda timer=None, rounds=None: pytest.fail("probe ran despite the override")
    )
    monkeypatch.setenv(cd.CPU_BF16_ENV, value)
    assert default_compute_dtype(torch.zeros(2, 3)) == dtype
    assert cd.cpu_bf16_decision()["source"] == f"{cd.CPU_BF16_ENV}={value}"


def test_device_and_dtype_rules(monkeypatch):
    monkeypatch.setenv(cd.CPU_BF16_ENV, "1")
    assert default_compute_dtype(torch.zeros(2, 3, dtype=torch.float64)) == torch.float64
    assert default_compute_dtype(torch.zeros(2, 3, device="meta")) == torch.float32
    if torch.cuda.is_available():
        assert default_compute_dtype(torch.zeros(2, 3, device="cuda")) == torch.bfloat16


def test_bad_override_is_refused_before_any_state_changes(monkeypatch):
    monkeypatch.setenv(cd.CPU_BF16_ENV, "maybe")
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=f"{cd.CPU_BF16_ENV} must be 1 or 0"):
        teonspeed.Muon([("w", p)])


def test_auto_step_uses_the_chosen_dtype(monkeypatch):
    """End to end: the optimizer's auto step equals its explicit bf16/fp32 step, as the override says."""
    torch.manual_seed(0)
    w0, g = torch.randn(16, 32), torch.randn(16, 32)

    def step(**kw):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        teonspeed.Muon([("w", p)], **kw).step()
        return p.detach()

    for flag, explicit in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv(cd.CPU_BF16_ENV, flag)
        assert torch.equal(step(ns_dtype="auto"), step(ns_dtype=explicit))
    assert not torch.equal(step(ns_dtype="bf16"), step(ns_dtype="fp32"))


def test_real_probe_returns_times():
    chosen, fp32, bf16 = cd.probe_cpu_bf16(timer=lambda dt: cd.time_cpu_matmul(dt, n=64, repeats=1))
    assert isinstance(chosen, bool) and fp32 > 0 and bf16 > 0
