"""`cappy eval`: selection quality on test examples — how good is the answer each method picks
among the LLM's samples, in Rouge-L against the references.

For every example: the paper's 17 samples (the proxy's recipe, adapt.sampling), with the sampled
tokens' log-probabilities, through the sample cache (adapt.cache); with `--samples CACHE` and no
`--upstream` the cache alone is read and the LLM is never called, to evaluate another scorer on
the same samples. Methods, each picking one sample per example:
- `nucleus`: the first nucleus (top-p 0.95) sample — one plain sample of the LLM;
- `greedy`: the greedy sample (the proxy's stand-in for beam search);
- `self_scoring`: the best mean token log-probability (the LLM's own preference);
- `random`: a uniformly random sample (seeded per example);
- `oracle`: the sample with the best Rouge-L (the ceiling of any selection);
- `cappy`: the best Cappy score (`--scorer`, an export directory), ties to the first.
Cappy and self-scoring are also reported on 1, 4 and 17 samples (the paper's Table 5): the
nucleus samples come first, then the rest in recipe order, and k samples are the first k of that
order (1: the first nucleus sample, so both equal `nucleus`; 4: the four nucleus samples; 17:
all).

Scores are Rouge-L F x 100 (rouge_score, stemmed, best over references), averaged over each
task's examples; "overall" is the mean over tasks (as the paper averages BIG-bench tasks), and
`overall_examples` the mean over examples. An example missing samples (failed calls) is left out
of every method and listed, so that all methods are compared on the same examples.

Outputs in `--out`: `report.md` (tables), `report.json` (everything, with the configuration),
`report.png` (bar charts), `per_example.jsonl` (each example's samples' Rouge-L, Cappy scores,
mean log-probabilities and each method's pick).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from adapt import planning, sampling
from adapt.cache import SampleRecord, read_cache
from adapt.data import write_atomic, write_jsonl_atomic
from adapt.errors import AdaptError
from adapt.examples import Example
from adapt.labels import RougeL
from adapt.selection import (
    METHOD_NAMES,
    METHODS,
    OVERALL,
    SUBSET_METHODS,
    SUBSET_SIZES,
    aggregate,
    picks,
)


@dataclass(kw_only=True)
class EvalOptions(sampling.SamplingOptions):
    """`cappy eval` options (see adapt.cli for each flag)."""

    data: Path
    out: Path
    scorer: Path | None = None
    samples: Path | None = None  # the cache; default OUT/samples.jsonl
    engine: str = "onnxruntime"
    precision: str = "fp32"
    threads: int | None = None
    allow_ungated: bool = False


@dataclass
class EvalResult:
    report: dict[str, Any]
    markdown: Path
    json: Path
    chart: Path
    per_example: Path


def _from_cache(
    examples: list[Example], cache_path: Path
) -> tuple[planning.SamplingConfig, dict[str, list[SampleRecord]], sampling.CollectStats]:
    header, records = read_cache(cache_path)
    config = planning.SamplingConfig.from_header(header)
    planned = planning.plan(examples, config)
    missing = sum(1 for s in planned if s.key not in records)
    if missing:
        raise AdaptError(
            f"{cache_path}: {missing} of the {len(planned)} samples of the selected examples are "
            "not in the cache (other examples, or calls that failed); pass --upstream to collect "
            "them, or select the examples the cache was made for"
        )
    stats = sampling.CollectStats(planned=len(planned), cached=len(planned))
    return config, sampling.samples_by_example(planned, records), stats


def run(options: EvalOptions, *, transport: httpx.AsyncBaseTransport | None = None) -> EvalResult:
    """Collects (or reads) the samples, scores them, and writes the report; see the module doc.

    Raises:
        AdaptError: bad input, an unservable scorer, or samples missing with no upstream.
    """
    examples = options.select_examples(options.data)
    options.out.mkdir(parents=True, exist_ok=True)
    cache_path = options.samples or options.out / "samples.jsonl"
    scorer = None
    if options.scorer is not None:  # fail on a bad scorer before any LLM call
        from adapt.scoring import ExportScorer

        scorer = ExportScorer(
            options.scorer,
            engine=options.engine,
            precision=options.precision,
            threads=options.threads,
            allow_ungated=options.allow_ungated,
        )
    if options.upstream:
        gathering = sampling.gather(options, examples, cache_path, transport, logprobs=True)
        config, samples, stats = asyncio.run(gathering)
    else:
        config, samples, stats = _from_cache(examples, cache_path)
    planned_per_example = planning.plan_decodings(config.recipe, config.samples_per_example)
    complete = [e for e in examples if len(samples.get(e.id, [])) == len(planned_per_example)]
    complete_ids = {e.id for e in complete}
    incomplete = [e.id for e in examples if e.id not in complete_ids]
    if not complete:
        raise AdaptError("no example has all its samples; re-run to collect the failed ones")

    nucleus = {
        d.name
        for d in config.recipe.decodings
        if d.top_p is not None and d.top_p < 1 and not d.is_greedy
    }
    greedy = {d.name for d in config.recipe.decodings if d.is_greedy}
    rouge = RougeL()
    instructions = {e.id: planning.instruction_for(e, config.endpoint) for e in complete}
    cappy_scores: dict[str, list[float]] = {}
    if scorer is not None:
        flat = [(instructions[e.id], r.text) for e in complete for r in samples[e.id]]
        values = scorer.score(flat, progress=options.progress).tolist()
        position = 0
        for e in complete:
            count = len(samples[e.id])
            cappy_scores[e.id] = values[position : position + count]
            position += count

    rows: list[dict[str, Any]] = []
    for example in tqdm(complete, desc="Rouge-L", unit="example", disable=not options.progress):
        records = samples[example.id]
        rouge_values = [rouge(r.text, example.targets) for r in records]
        chosen = picks(
            records,
            rouge_values,
            cappy_scores.get(example.id),
            nucleus=nucleus,
            greedy=greedy,
            rng=random.Random(f"{options.seed}:{example.id}"),
        )
        rows.append(
            {
                "id": example.id,
                "task": example.task,
                "decodings": [r.decoding for r in records],
                "rouge": rouge_values,
                "cappy": cappy_scores.get(example.id),
                "mean_logprob": [r.mean_logprob for r in records],
                "picks": chosen,
                "picked_rouge": {
                    k: (rouge_values[i] if i is not None else None) for k, i in chosen.items()
                },
            }
        )

    keys = [*METHODS, *(f"{m}@{k}" for m in SUBSET_METHODS for k in SUBSET_SIZES)]
    results = aggregate(rows, keys)
    winning = {
        m: dict(Counter(r["decodings"][r["picks"][m]] for r in rows if r["picks"][m] is not None))
        for m in ("cappy", "self_scoring", "oracle")
    }
    tasks = sorted({r["task"] for r in rows})
    report = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(options.data),
        "split": options.split,
        "examples_per_task": options.examples_per_task,
        "examples": len(rows),
        "examples_by_task": dict(Counter(r["task"] for r in rows)),
        "tasks": tasks,
        "incomplete_examples": incomplete,
        "samples_per_example": len(planned_per_example),
        "sampling": config.header(),
        "cache": str(cache_path),
        "samples": {
            "planned": stats.planned,
            "from_cache": stats.cached,
            "fetched": stats.fetched,
            "failed": len(stats.failed),
        },
        "samples_without_logprobs": sum(
            1 for e in complete for r in samples[e.id] if r.mean_logprob is None
        ),
        "scorer": str(options.scorer) if options.scorer is not None else None,
        "scorer_source": scorer.source if scorer is not None else None,
        "metric": "Rouge-L F x 100 (rouge_score, use_stemmer=True, max over references)",
        "overall": "mean over tasks of the mean over each task's examples",
        "methods": {m: results[m] for m in METHODS},
        "by_samples": {
            m: {str(k): results[f"{m}@{k}"] for k in SUBSET_SIZES} for m in SUBSET_METHODS
        },
        "winning_decodings": winning,
    }
    out = options.out
    paths = EvalResult(
        report=report,
        markdown=out / "report.md",
        json=out / "report.json",
        chart=out / "report.png",
        per_example=out / "per_example.jsonl",
    )
    write_atomic(paths.json, [json.dumps(report, indent=2) + "\n"])
    write_atomic(paths.markdown, [markdown(report)])
    write_jsonl_atomic(paths.per_example, rows)
    chart(report, paths.chart)
    return paths


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: methods by task, and Cappy vs self-scoring by number of samples."""
    methods = report["methods"]
    lines = [
        "# Selection quality (Rouge-L)",
        "",
        f"- data: `{report['data']}`"
        + (f", split `{report['split']}`" if report["split"] else "")
        + (
            f", first {report['examples_per_task']} examples per task"
            if report["examples_per_task"]
            else ""
        ),
        f"- examples: {report['examples']} in {len(report['tasks'])} tasks"
        + (
            f" ({len(report['incomplete_examples'])} left out: samples missing)"
            if report["incomplete_examples"]
            else ""
        ),
        f"- LLM: `{report['sampling']['model']}` ({report['sampling']['endpoint']}), "
        f"{report['samples_per_example']} samples per example, "
        f"max {report['sampling']['max_tokens']} new tokens",
        f"- scorer: `{report['scorer']}`" if report["scorer"] else "- scorer: none",
        f"- metric: {report['metric']}; overall: {report['overall']}",
        "",
        "| task | n | " + " | ".join(METHOD_NAMES[m] for m in METHODS) + " |",
        "|---|---:|" + "---:|" * len(METHODS),
    ]
    overall = [_cell(methods[m][OVERALL]) for m in METHODS]
    lines.append(f"| **overall** | {report['examples']} | " + " | ".join(overall) + " |")
    for task in report["tasks"]:
        cells = [_cell(methods[m]["per_task"].get(task)) for m in METHODS]
        lines.append(f"| {task} | {report['examples_by_task'][task]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "By number of samples (overall; 1 = the first nucleus sample, 4 = the four nucleus "
        "samples, 17 = all):",
        "",
        "| method | " + " | ".join(str(k) for k in SUBSET_SIZES) + " |",
        "|---|" + "---:|" * len(SUBSET_SIZES),
    ]
    for m in SUBSET_METHODS:
        cells = [_cell(report["by_samples"][m][str(k)][OVERALL]) for k in SUBSET_SIZES]
        lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Two bar charts: each method overall; Cappy and self-scoring by number of samples."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    names = [METHOD_NAMES[m] for m in METHODS]
    values = [report["methods"][m][OVERALL] for m in METHODS]
    bars = left.bar(names, [v or 0.0 for v in values], color="#4C72B0")
    for bar, value in zip(bars, values, strict=True):
        left.annotate(
            _cell(value),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set_ylabel("Rouge-L (mean over tasks)")
    left.set_title(f"Selection among {report['samples_per_example']} samples")
    left.tick_params(axis="x", labelrotation=20, labelsize=8)
    width = 0.38
    for offset, method, colour in (
        (-width / 2, "cappy", "#C44E52"),
        (width / 2, "self_scoring", "#55A868"),
    ):
        series = [report["by_samples"][method][str(k)][OVERALL] for k in SUBSET_SIZES]
        right.bar(
            [i + offset for i in range(len(SUBSET_SIZES))],
            [v or 0.0 for v in series],
            width,
            label=METHOD_NAMES[method],
            color=colour,
        )
    right.set_xticks(range(len(SUBSET_SIZES)), [str(k) for k in SUBSET_SIZES])
    right.set_xlabel("samples")
    right.set_title("By number of samples")
    right.legend(fontsize=8)
    figure.savefig(path, dpi=120)
