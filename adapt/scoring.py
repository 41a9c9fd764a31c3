"""Scoring (instruction, response) pairs with an export directory, offline and in-process, with
the service's own engine: `ExportDir.load` (manifest, hashes, parity gate), `PairTokenizer`
(instruction first, longest_first truncation at the export's max length) and `load_scorer`
(ONNX Runtime fp32 on CPU by default: the exact scores, as PyTorch computes them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adapt.errors import AdaptError
from service import defaults
from service.defaults import DEVICE_BATCH_LIMITS
from service.engine.cascade import budgeted_chunks
from service.engine.export_dir import ExportDir, ExportDirError
from service.engine.scorer import load_scorer
from service.engine.tokenize import PairTokenizer
from service.engine.types import pad_batch, padded_width


class ExportScorer:
    """Scores pairs with one export directory on the CPU."""

    def __init__(
        self,
        directory: Path,
        *,
        engine: str = "onnxruntime",
        precision: str = "fp32",
        threads: int | None = None,
        allow_ungated: bool = False,
    ):
        """Raises AdaptError when the directory cannot be served (the service's own checks)."""
        try:
            self.export = ExportDir.load(directory, allow_ungated=allow_ungated)
        except ExportDirError as exc:
            raise AdaptError(f"--scorer: {exc}") from None
        self.tokenizer = PairTokenizer.from_dir(
            self.export.path,
            max_length=self.export.max_length,
            with_token_type_ids="token_type_ids" in self.export.input_names,
        )
        self.scorer = load_scorer(
            self.export,
            device="cpu",
            engine=engine,  # type: ignore[arg-type]
            precision=precision,  # type: ignore[arg-type]
            threads=threads,
        )

    @property
    def source(self) -> str:
        """Where the export came from (its manifest's source model)."""
        return str(self.export.manifest.source.get("model", self.export.path))

    def score(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        batch_tokens: int = DEVICE_BATCH_LIMITS["cpu"][0],
        progress: bool = False,
    ) -> np.ndarray:
        """One raw Cappy score per pair, in order.

        Pairs are sorted by length and cut into batches as the service's engine cuts them (its
        budgeted chunks: `batch_tokens` padded tokens, the CPU's row limit, widths in the
        service's steps), so that short pairs do not pay for long ones' padding.
        """
        encoded = self.tokenizer.encode(list(pairs))
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)
        chunks = budgeted_chunks(
            [encoded[i] for i in order],
            batch_tokens,
            DEVICE_BATCH_LIMITS["cpu"][1],
            defaults.PAD_TO_MULTIPLE,
            self.export.max_length,
        )
        scores = np.zeros(len(encoded), dtype=np.float64)
        bar = tqdm(total=len(encoded), unit="pair", desc="Cappy scores", disable=not progress)
        start = 0
        for chunk in chunks:
            rows = order[start : start + len(chunk)]
            width = padded_width(chunk[-1].length, defaults.PAD_TO_MULTIPLE, self.export.max_length)
            feeds = pad_batch(chunk, self.scorer.pad_token_id, self.export.input_names, width)
            scores[rows] = np.asarray(self.scorer.infer(feeds), dtype=np.float64).reshape(-1)
            bar.update(len(rows))
            start += len(chunk)
        bar.close()
        return scores
