"""The probe sets' encodings and PyTorch reference scores, computed once per model, and each
graph's parity measured against them (model_export.parity), on the providers that can run it:
what an export gates on and what `cappy verify` re-measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cappy.probe_sets import probe_sets
from model_export import onnx_export, openvino_int8, parity


class Prober:
    """Encoded probe sets and PyTorch reference scores, computed once and shared by all variants."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int) -> None:
        self.sets = probe_sets()
        self.encoded = [parity.encode_set(tokenizer, s, max_length) for s in self.sets]
        self.reference = parity.reference_scores(model, tokenizer, self.sets, max_length)
        self.pairs = sum(len(s.candidates) for s in self.sets)

    def measure(self, path: Path, variant: str) -> parity.ParityResult:
        if variant == openvino_int8.VARIANT:  # probe sets only: see pipeline._measure_openvino_int8
            return openvino_int8.measure(path, self.reference, self.encoded)
        failures = []
        for provider in providers_for(variant):
            try:
                run = onnx_export.ort_runner(path, provider)
            except Exception as exc:  # this provider cannot run the graph: the next one may
                failures.append(f"{provider} cannot run it: {str(exc).splitlines()[0]}")
                continue
            gate = parity.GATES[variant]
            return parity.compare(self.reference, run, self.encoded, provider=provider, **gate)
        # No provider could run it: say so, never guess.
        return parity.not_measured("; ".join(failures), len(self.sets), self.pairs)


def providers_for(variant: str) -> list[str]:
    """Where to measure a variant, in order: fp16 on the CUDA provider first when ONNX Runtime
    has one (onnxruntime-gpu lists it even on a machine without a GPU, where it then fails and
    the CPU provider measures), everything on the CPU provider."""
    providers = onnx_export.available_providers()
    if variant == "fp16" and "CUDAExecutionProvider" in providers:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
