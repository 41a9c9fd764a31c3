"""`export`: checkpoint -> verified export directory (its re-check, `verify`: model_export.verify).

An export is built in a hidden temporary sibling of the target and renamed into place only when
every step passed, with the manifest written last: an interrupted or failed export never leaves a
directory that looks valid.

What ships (parity gates: model_export.parity). With `parity="gate"` (the default) the fp32 graph
must pass its gate or nothing is written; an optimised fp32 graph that fails falls back to the
plain one; a reduced-precision variant ships when it passed (gated), is dropped when it failed
(its figures stay in the manifest), and ships marked ungated when it could not be measured (the
service serves it only when told to allow ungated variants). With `parity="record"` every graph
ships, figures recorded, none gated: an export for benchmarks on stand-in weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cappy import export_format as fmt
from model_export import first_token, onnx_export, openvino_int8, parity, pooling, source
from model_export import manifest as mf
from model_export.errors import ExportError
from model_export.prober import Prober
from model_export.verify import VerifyReport, verify

# `verify` is part of this module's interface too: adapt.train imports it from here.
__all__ = ["ExportOptions", "ExportResult", "VerifyReport", "export", "verify"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    model: str = source.DEFAULT_MODEL
    out: Path = Path("exports/cappy-large")
    revision: str | None = None
    fp16: bool = True
    int8: bool = False
    max_length: int | None = None
    force: bool = False
    progress: bool = True
    # A JSONL file of candidate sets: also write the calibrated OpenVINO int8 model.
    int8_calibration: Path | None = None
    # "gate": ship only what passed its parity gate; "record": measure, record, gate nothing.
    parity: str = fmt.PARITY_GATE


@dataclass
class ExportResult:
    out: Path
    manifest: dict[str, Any]
    seconds: float


class _Steps:
    """A one-line progress display over named steps (stderr), silent when disabled."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        self._bar = tqdm(
            total=len(names),
            disable=not enabled,
            unit="step",
            bar_format="{desc:<34} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]",
            leave=True,
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._bar.set_description_str(name)
        yield
        self._bar.update(1)

    def close(self, done: bool) -> None:
        if done:
            self._bar.set_description_str("done")
        self._bar.close()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    dists = ("cappy-serve", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu")
    for dist in (*dists, "openvino", "nncf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _architecture(model: Any) -> dict[str, Any]:
    config = model.config
    return {
        "model_type": config.model_type,
        "architectures": list(config.architectures or []),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "pooling": pooling.pooling_of(config),
    }


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"--out {out}: already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise ExportError(f"--out {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"--out {out}: parent directory {parent} is not writable")


def _measure_openvino_int8(
    xml: Path,
    prober: Prober,
    heldout: list[parity.CandidateSet],
    model: Any,
    tokenizer: Any,
    max_length: int,
) -> dict[str, Any]:
    """The OpenVINO int8 parity record, on the probe sets plus the held-out calibration sets."""
    reference = prober.reference + parity.reference_scores(model, tokenizer, heldout, max_length)
    encoded = prober.encoded + [parity.encode_set(tokenizer, s, max_length) for s in heldout]
    result = openvino_int8.measure(xml, reference, encoded)
    return openvino_int8.parity_record(result, heldout_sets=len(heldout))


def _parity_record(result: parity.ParityResult, *, gated: bool) -> dict[str, Any]:
    """The manifest record: the figures, the thresholds applied, and whether a gate passed it
    for serving (`gated`; False for anything not measured and for a `--parity record` export)."""
    return {**result.as_dict(), "gated": gated}


def _ships(status: str, mode: str) -> tuple[bool, bool]:
    """(shipped, gated) for a reduced-precision ONNX variant of this parity status."""
    if mode == fmt.PARITY_RECORD:
        return True, False
    if status == "passed":
        return True, True
    # Not measured: shipped, marked ungated (the export machine may lack the provider it is
    # meant for); failed: dropped, its figures stay on record.
    return status == "not_measured", False


def _fp32_graph(
    prober: Prober, fp32_path: Path, plain: Path, entry: dict[str, Any], mode: str
) -> parity.ParityResult:
    """Measures the fp32 graph; an optimised graph that fails falls back to the plain one when
    that passes. In gate mode a graph that does not pass aborts the export."""
    result = prober.measure(fp32_path, "fp32")
    if result.status != "passed" and entry["optimized"]:
        plain_result = prober.measure(plain, "fp32")
        # Record mode, and the plain graph fails too: the model's numerics, not the optimiser,
        # miss the gate; the optimised graph stays (it is what a benchmark should run).
        if plain_result.status == "passed" or mode == fmt.PARITY_GATE:
            logger.warning(
                "optimised graph failed parity (%s); using the unoptimised graph", result.reason
            )
            shutil.copyfile(plain, fp32_path)
            entry.update(
                optimized=False,
                optimization_error=f"optimised graph failed parity: {result.reason}",
            )
            entry.pop("fused_operators", None)
            result = plain_result
    if result.status != "passed" and mode == fmt.PARITY_GATE:
        status = "failed" if result.status == "failed" else "not measured"
        raise ExportError(
            f"fp32 parity {status} against PyTorch ({result.reason}); nothing written "
            "(--parity record keeps the figures without gating)"
        )
    return result


def export(options: ExportOptions) -> ExportResult:
    """Runs the whole export; ExportError with a one-line reason on bad input or failure."""
    started = time.perf_counter()
    out = options.out
    mode = options.parity
    if mode not in fmt.PARITY_MODES:
        raise ExportError(f"--parity {mode}: not one of {', '.join(fmt.PARITY_MODES)}")
    _check_out(out, options.force)
    calibration = None
    if options.int8_calibration is not None:
        openvino_int8.require()
        calibration = openvino_int8.read_calibration(options.int8_calibration)
    ref = source.resolve(options.model, options.revision)
    names = ["load checkpoint", "export ONNX (fp32)", "optimise graph", "parity fp32"]
    if options.fp16:
        names += ["convert fp16", "parity fp16"]
    if options.int8:
        names += ["quantise int8", "parity int8"]
    if calibration is not None:
        names += ["quantise int8 (OpenVINO)", "parity int8 (OpenVINO)"]
    names += ["save tokenizer + manifest"]
    steps = _Steps(names, options.progress)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with steps.step("load checkpoint"):
            loaded = source.load(ref)
            model, tokenizer = loaded.model, loaded.tokenizer
            max_length = source.max_length_for(model.config, tokenizer, options.max_length)
        work = scratch / "work"
        work.mkdir()
        final = scratch / "export"
        final.mkdir()
        inputs = onnx_export.input_names_for(tokenizer)
        # CPU graphs (fp32, int8) compute the last layer for the first token only where the
        # architecture allows: exact (the fp32 parity below compares with the unmodified model)
        # and ~1/L fewer FLOPs. The GPU graph (fp16) comes from the plain export, whose attention
        # ONNX Runtime fuses (its fusions do not match the shortened last layer).
        shortcut = first_token.supports(model)
        raw = work / "model.raw.onnx"
        cpu_raw = work / "model.first_token.onnx" if shortcut else raw
        with steps.step("export ONNX (fp32)"):
            if shortcut:
                scorer = first_token.FirstTokenScorer(model).eval()
                onnx_export.export_fp32(scorer, tokenizer, inputs, cpu_raw)
            if options.fp16 or not shortcut:
                onnx_export.export_fp32(model, tokenizer, inputs, raw)
        prober = Prober(model, tokenizer, max_length)
        fp32_path = final / fmt.VARIANT_FILES["fp32"]
        fp32_entry: dict[str, Any] = {
            "file": fp32_path.name,
            "dtype": "float32",
            "last_layer_first_token_only": shortcut,
        }
        with steps.step("optimise graph"):
            try:
                fused = onnx_export.optimize(cpu_raw, fp32_path, model.config)
                fp32_entry.update(optimized=True, fused_operators=fused)
            except Exception as exc:  # keep the plain graph, and say why in the manifest
                logger.warning("graph optimisation failed, keeping the unoptimised graph: %s", exc)
                shutil.copyfile(cpu_raw, fp32_path)
                fp32_entry.update(optimized=False, optimization_error=str(exc).splitlines()[0])
        with steps.step("parity fp32"):
            fp32_parity = _fp32_graph(prober, fp32_path, cpu_raw, fp32_entry, mode)
        models = {"fp32": fp32_entry}
        parity_records = {"fp32": _parity_record(fp32_parity, gated=mode == fmt.PARITY_GATE)}
        variants: list[tuple[str, str, Callable[[Path], dict[str, Any]]]] = []
        if options.fp16:
            variants.append(
                ("fp16", "convert fp16", lambda p: onnx_export.convert_fp16(raw, p, model.config))
            )
        if options.int8:
            variants.append(
                ("int8", "quantise int8", lambda p: onnx_export.quantize_int8(fp32_path, p))
            )
        for variant, step_name, build in variants:
            path = final / fmt.VARIANT_FILES[variant]
            with steps.step(step_name):
                extra = build(path)
            with steps.step(f"parity {variant}"):
                result = prober.measure(path, variant)
            shipped, gated = _ships(result.status, mode)
            parity_records[variant] = _parity_record(result, gated=gated)
            if not shipped:
                # A variant that disagrees with PyTorch is not shipped; its figures stay on record.
                logger.warning("%s parity failed (%s): not shipped", variant, result.reason)
                path.unlink()
                continue
            if not gated and mode == fmt.PARITY_GATE:
                logger.warning(
                    "%s parity not measured (%s): shipped ungated; the service serves it only "
                    "when allowed to serve ungated variants",
                    variant,
                    result.reason,
                )
            models[variant] = {
                "file": path.name,
                "dtype": "float16" if variant == "fp16" else "int8-dynamic",
                "io_dtype": "float32",
                **extra,
            }
        if calibration is not None:
            xml = final / fmt.VARIANT_FILES[openvino_int8.VARIANT]
            with steps.step("quantise int8 (OpenVINO)"):
                items = openvino_int8.encode_items(
                    tokenizer, calibration.calibration, max_length, inputs
                )
                try:
                    extra = openvino_int8.quantize(cpu_raw, xml, items, progress=options.progress)
                except Exception as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    raise ExportError(f"int8 quantisation (OpenVINO) failed: {reason}") from exc
                del items
            with steps.step("parity int8 (OpenVINO)"):
                record = _measure_openvino_int8(
                    xml, prober, calibration.heldout, model, tokenizer, max_length
                )
            # Its own gate (an absolute bound: the service's re-scoring margin); in record mode
            # it ships whatever it measured, ungated.
            record["gated"] = mode == fmt.PARITY_GATE and record["status"] == "passed"
            parity_records[openvino_int8.VARIANT] = record
            if record["status"] != "passed" and mode == fmt.PARITY_GATE:
                # Failed, or not measured: either way the service would have no margin to trust.
                logger.warning(
                    "OpenVINO int8 parity %s (%s): not shipped", record["status"], record["reason"]
                )
                xml.unlink(missing_ok=True)
                xml.with_suffix(".bin").unlink(missing_ok=True)
            else:
                models[openvino_int8.VARIANT] = {
                    "file": xml.name,
                    "weights": xml.with_suffix(".bin").name,
                    "dtype": "int8-static",
                    "engine": "openvino",
                    "io_dtype": "float32",
                    **extra,
                    "calibration": calibration.record(),
                }
        with steps.step("save tokenizer + manifest"):
            tokenizer.save_pretrained(str(final))
            manifest = {
                "format": fmt.FORMAT,
                "format_version": fmt.FORMAT_VERSION,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": {
                    "model": ref.model if ref.kind == "hub" else str(ref.path),
                    "kind": ref.kind,
                    "revision": ref.revision,
                    "commit": loaded.commit,
                },
                "architecture": _architecture(model),
                "exporter": "torch.onnx (TorchScript)",
                "opset": onnx_export.OPSET,
                "max_length": max_length,
                "truncation": "longest_first",
                "pair_order": ["instruction", "response"],
                "inputs": inputs,
                "output": onnx_export.OUTPUT_NAME,
                "pad_token_id": int(tokenizer.pad_token_id),
                "score": fmt.SCORE_SEMANTICS,
                "models": models,
                "parity": {
                    "mode": mode,
                    "reference": "PyTorch fp32, same tokenization, one padded batch per set",
                    "pairs": prober.pairs,
                    "candidate_sets": len(prober.sets),
                    **parity_records,
                },
                "versions": _versions(),
                "files": fmt.hash_directory(final),
                "export_seconds": round(time.perf_counter() - started, 2),
            }
            mf.write(final, manifest)
        steps.close(done=True)
        if out.exists():  # --force: replace only now that the new directory is complete
            shutil.rmtree(out)
        final.rename(out)
        return ExportResult(out=out, manifest=manifest, seconds=time.perf_counter() - started)
    finally:
        steps.close(done=False)
        shutil.rmtree(scratch, ignore_errors=True)
