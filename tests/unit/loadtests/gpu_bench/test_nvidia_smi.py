"""loadtests/gpu_bench/nvidia_smi.py: sample parsing and the per-phase window."""

from __future__ import annotations

from loadtests.gpu_bench.nvidia_smi import GpuSampler, parse_gpu_sample


def test_gpu_samples_are_parsed_and_windowed() -> None:
    sample = parse_gpu_sample("2026/11/29 20:27:01.250, 87, 40213\n")
    assert sample is not None and sample[1:] == (87.0, 40213.0)
    assert parse_gpu_sample("[N/A], 3, 4") is None
    assert parse_gpu_sample("garbage") is None
    sampler = GpuSampler(0)
    assert sampler.summary(0, 1)["util_mean"] is None  # never started: no figures
    sampler.samples = [(10.0, 50.0, 100.0), (10.2, 100.0, 300.0), (11.0, 0.0, 50.0)]
    assert sampler.summary(9.9, 10.5) == {"util_mean": 75.0, "mem_max_mib": 300.0, "samples": 2}
