"""Turning a loaded PyTorch scorer into ONNX graphs: the fp32 export, ONNX Runtime's transformer
optimisation (attention, LayerNorm and GELU fusion), the fp16 conversion and int8 quantisation,
and an ONNX Runtime runner used to measure parity."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

OPSET = 17
OUTPUT_NAME = "logits"
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def input_names_for(tokenizer: Any) -> list[str]:
    """The graph inputs: what the tokenizer produces, in a fixed order."""
    produced = set(tokenizer.model_input_names)
    return [name for name in _KNOWN_INPUTS if name in produced]


def export_fp32(model: Any, tokenizer: Any, input_names: Sequence[str], path: Path) -> None:
    """Exports `model` with dynamic batch and sequence axes and a single `logits` output.

    The inputs are passed by name, so the graph does not depend on the order of `forward`'s
    parameters; the model's output object flattens to `logits` alone (no labels, no loss).
    """
    import torch

    sample = tokenizer(
        ["What is the capital of France?", "Write a haiku about autumn leaves in the rain."],
        ["Paris.", "Red leaves drift and fall"],
        padding=True,
        return_tensors="pt",
    )
    kwargs = {name: sample[name] for name in input_names}
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (),
            str(path),
            kwargs=kwargs,
            input_names=list(input_names),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter's graphs are what ORT's fusions recognise
        )


def optimize(src: Path, dst: Path, config: Any, *, use_gpu: bool = False) -> dict[str, int]:
    """Fuses the transformer subgraphs with ONNX Runtime's offline optimizer.

    Only the provider-independent Python fusions run here (opt_level 0); ONNX Runtime applies its
    own graph optimisations when a session loads the file. Returns the fused-operator counts.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    previous = logging.getLogger("onnxruntime").level
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        optimized = optimize_model(
            str(src),
            model_type="bert",  # BERT-family fusions cover RoBERTa, BERT, XLM-R, ELECTRA...
            num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
            opt_level=0,
            use_gpu=use_gpu,
        )
    finally:
        logging.getLogger("onnxruntime").setLevel(previous)
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(dst))
    return stats


def convert_fp16(src: Path, dst: Path, config: Any) -> dict[str, Any]:
    """fp16 weights and compute for GPU serving, float32 inputs and outputs kept.

    Re-optimises `src` (the plain fp32 export) with the GPU fusion options first.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(src),
        model_type="bert",
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        opt_level=0,
        use_gpu=True,
    )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    return {"fused_operators": stats}


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 quantisation of the MatMul weights, for CPU serving."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process is logged on the root logger
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            # Fused contrib ops defeat shape inference; their outputs are float tensors.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(previous)
    return {"quantization": "dynamic", "weight_type": "QInt8"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_runner(
    path: Path, provider: str = "CPUExecutionProvider"
) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """An ONNX Runtime session on `provider` as a function feeds -> scores (logits[:, 0])."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    used = session.get_providers()
    if not used or used[0] != provider:  # ORT falls back to CPU when a provider cannot start
        raise RuntimeError(f"{provider} is not usable here (ONNX Runtime chose {used})")
    names = [i.name for i in session.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = session.run([OUTPUT_NAME], {name: feeds[name] for name in names})
        return np.asarray(logits)[:, 0]

    return run
