"""The calibrated OpenVINO int8 model: NNCF post-training static quantisation of the unfused fp32
graph, the calibration file it learns its activation ranges from, and an OpenVINO CPU runner used
to measure its parity with PyTorch.

The service uses this model as a screening stage: int8 scores every candidate, and candidates
within the recorded max |diff| of the best are re-scored in full precision. That margin is the
parity record's `max_abs_diff`, measured on the built-in probe sets plus calibration sets held
out from quantisation (real text the quantiser never saw).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_export import parity
from model_export.errors import ExportError

VARIANT = "openvino-int8"
XML_FILE = "model.int8.xml"
BIN_FILE = "model.int8.bin"
# Above this max |diff| against PyTorch fp32 (probe + held-out sets) the model is not shipped.
OPENVINO_INT8_MAX_ABS_DIFF = 0.05

MIN_SETS = 8  # usable candidate sets a calibration file must hold
MAX_CALIBRATION_SETS = 300
HELDOUT_FRACTION = 0.1
MIN_HELDOUT_SETS = 4
MAX_HELDOUT_SETS = 64
MAX_CANDIDATES = 16  # per set: one set is one padded batch, this bounds its memory
SHUFFLE_SEED = 20240607

EXTRA_HINT = "--int8-calibration needs the int8 extra: pip install 'cappy-serve[int8]'"


def missing_dependency() -> str | None:
    """The first of openvino / nncf that cannot be imported, or None when both can."""
    for module in ("openvino", "nncf"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def require() -> None:
    if missing_dependency() is not None:
        raise ExportError(EXTRA_HINT)


@dataclass(frozen=True)
class Calibration:
    """A calibration file, read and split: sets to quantise on, sets held out for parity."""

    path: Path
    sha256: str
    calibration: list[parity.CandidateSet]
    heldout: list[parity.CandidateSet]
    usable_lines: int
    skipped_lines: int

    def record(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "sets": len(self.calibration),
            "heldout_sets": len(self.heldout),
        }


def _candidates(row: dict[str, Any]) -> list[str] | None:
    """The candidate responses of one line, in whichever of the three shapes it uses."""
    for key in ("candidates", "targets"):
        value = row.get(key)
        if value is not None:
            if not isinstance(value, list) or not value:
                return None
            if not all(isinstance(item, str) for item in value):
                return None
            return value[:MAX_CANDIDATES]
    response = row.get("response")
    if isinstance(response, str):
        return [response]
    return None


def heldout_count(total: int) -> int:
    """About a tenth of the sets, at least MIN_HELDOUT_SETS, at most MAX_HELDOUT_SETS."""
    return max(MIN_HELDOUT_SETS, min(MAX_HELDOUT_SETS, math.ceil(total * HELDOUT_FRACTION)))


def read_calibration(path: Path) -> Calibration:
    """Reads a JSONL calibration file; ExportError with a one-line reason when it is unusable.

    Each line is one candidate set: {"instruction": str} plus "candidates": [str, ...] (the
    benchmark shape), "targets": [str, ...] (BIG-bench) or "response": str. A line that is not a
    JSON object fails the file; an object without a usable instruction and candidates is skipped.
    """
    where = f"--int8-calibration {path}"
    if not path.is_file():
        raise ExportError(f"{where}: no such file")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{where}: unreadable ({exc})") from exc
    sets: list[parity.CandidateSet] = []
    skipped = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportError(f"{where}: line {number} is not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ExportError(f"{where}: line {number} is not a JSON object")
        instruction = row.get("instruction")
        candidates = _candidates(row)
        if not isinstance(instruction, str) or candidates is None:
            skipped += 1
            continue
        sets.append(parity.CandidateSet(instruction, tuple(candidates)))
    if len(sets) < MIN_SETS:
        raise ExportError(
            f"{where}: {len(sets)} usable candidate sets, at least {MIN_SETS} needed (each line "
            '{"instruction": str, "candidates"|"targets": [str, ...] or "response": str}'
            + (f"; {skipped} lines without them" if skipped else "")
            + ")"
        )
    random.Random(SHUFFLE_SEED).shuffle(sets)
    held = heldout_count(len(sets))
    return Calibration(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        calibration=sets[held : held + MAX_CALIBRATION_SETS],
        heldout=sets[:held],
        usable_lines=len(sets),
        skipped_lines=skipped,
    )


@contextlib.contextmanager
def _stdout_clean(progress: bool) -> Iterator[None]:
    """NNCF logs to stdout and draws its progress there; the CLI's stdout is one JSON line.

    Its log goes to stderr at WARNING; its progress bar to stderr, or nowhere when quiet."""
    import nncf

    nncf_logger = logging.getLogger("nncf")
    saved = [(h, getattr(h, "stream", None), h.level) for h in nncf_logger.handlers]
    level = nncf_logger.level
    for handler in nncf_logger.handlers:
        if type(handler) is logging.StreamHandler:  # its own handler, bound to stdout at import
            handler.setStream(sys.stderr)
    nncf.set_log_level(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)
        for handler, stream, handler_level in saved:
            if isinstance(handler, logging.StreamHandler) and stream is not None:
                handler.setStream(stream)
            handler.setLevel(handler_level)


def quantize(
    raw: Path,
    xml: Path,
    items: Sequence[dict[str, np.ndarray]],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Static int8 quantisation of the ONNX graph `raw` into `xml` (+ its .bin weights).

    `items` are encoded candidate sets, one padded batch each, keyed by graph input name.
    """
    import nncf
    import openvino as ov

    with _stdout_clean(progress):
        model = ov.convert_model(str(raw))
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(items)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
        )
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return {
        "quantization": "static",
        "quantizer": "nncf",
        "model_type": "transformer",
        "calibration_items": len(items),
    }


def inference_precision() -> str:
    """The precision the OpenVINO CPU plugin runs the non-quantised parts in: bf16 where the CPU
    has it (what the service will use), f32 otherwise."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


def provider_name(precision: str) -> str:
    return f"openvino-cpu-{precision}"


def runner(xml: Path, precision: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """An OpenVINO CPU compiled model as a function feeds -> scores (logits[:, 0])."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    names = [port.get_any_name() for port in compiled.inputs]
    output = compiled.output(0)
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = request.infer({name: feeds[name] for name in names})
        return np.asarray(result[output])[:, 0]

    return run


def measure(
    xml: Path, reference: Sequence[np.ndarray], encoded: Sequence[dict[str, np.ndarray]]
) -> parity.ParityResult:
    """OpenVINO CPU against the PyTorch `reference`, gated on max |diff|.

    Not measured (never shipped: it gives the service no margin) when OpenVINO is missing or
    cannot run the model."""
    try:
        precision = inference_precision()
        run = runner(xml, precision)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ImportError):
            reason = "openvino is not installed (the int8 extra)"
        pairs = sum(len(ref) for ref in reference)
        return parity.not_measured(f"OpenVINO cannot run it: {reason}", len(reference), pairs)
    return parity.compare(
        reference,
        run,
        encoded,
        provider=provider_name(precision),
        max_abs_diff=OPENVINO_INT8_MAX_ABS_DIFF,
    )


def parity_record(result: parity.ParityResult, heldout_sets: int) -> dict[str, Any]:
    """The manifest's record of `measure`: its result plus the held-out sets it included, the
    precision OpenVINO ran in, and the gate."""
    precision = None
    if result.provider is not None:
        precision = result.provider.removeprefix(provider_name(""))
    return {
        **result.as_dict(),
        "heldout_sets": heldout_sets,
        "inference_precision": precision,
        "threshold_max_abs_diff": OPENVINO_INT8_MAX_ABS_DIFF,
    }


def encode_items(
    tokenizer: Any, sets: Sequence[parity.CandidateSet], max_length: int, inputs: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """Each set as one padded batch, keyed by the graph's input names only."""
    out = []
    for cset in sets:
        feeds = parity.encode_set(tokenizer, cset, max_length)
        out.append({name: feeds[name] for name in inputs})
    return out
