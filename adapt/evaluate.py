"""`cappy eval`: selection quality on test examples — how good is the answer each method picks
among the LLM's samples, in Rouge-L against the references.

For every example: the paper's 17 samples (the proxy's recipe, adapt.sampling), with the sampled
tokens' log-probabilities, through the sample cache (adapt.cache); with `--samples CACHE` and no
`--upstream` the cache alone is read and the LLM is never called, to evaluate another scorer on
the same samples. Methods, each picking one sample per example:
- `nucleus`: the first nucleus (top-p 0.95) sample — one plain sample of the LLM;
- `greedy`: the greedy sample (the proxy's stand-in for beam search);
- `self_scoring`: the best mean token log-probability (the LLM's own preference);
- `self_scoring_sum`: the best sum of token log-probabilities (the sequence's likelihood, which
  favours short samples);
- `random`: a uniformly random sample (seeded per example);
- `oracle`: the sample with the best Rouge-L (the ceiling of any selection);
- `cappy`: the best Cappy score (`--scorer`, an export directory), ties to the first.
Cappy and both self-scorings are also reported on 1, 4 and 17 samples (the paper's Table 5): the
nucleus samples come first, then the rest in recipe order, and k samples are the first k of that
order (1: the first nucleus sample, so both equal `nucleus`; 4: the four nucleus samples; 17:
all).

Scores are Rouge-L F x 100 (rouge_score, stemmed, best over references), averaged over each
task's examples; "overall" is the mean over tasks (as the paper averages BIG-bench tasks), and
`overall_examples` the mean over examples. An example missing samples (failed calls) is left out
of every method and listed, so that all methods are compared on the same examples.

Cappy is compared with self-scoring (mean and sum) and greedy (selection.COMPARISONS): the overall
difference with a paired bootstrap interval stratified by task (adapt.bootstrap, seeded with
`--seed`), on all samples and on 1, 4 and 17; and per task, wins, losses and ties
(selection.TIE_WITHIN) with each task's difference.

Outputs in `--out`: `report.md` (tables), `report.json` (everything, with the configuration),
`report.png` (bar charts), `per_example.jsonl` (each example's samples' Rouge-L, Cappy scores,
mean and summed log-probabilities and each method's pick).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from adapt import bootstrap, planning, sampling
from adapt.cache import SampleRecord, read_cache
from adapt.data import write_atomic, write_jsonl_atomic
from adapt.errors import AdaptError
from adapt.examples import Example
from adapt.labels import RougeL
from adapt.options import EvalOptions
from adapt.selection import (
    COMPARISONS,
    METHOD_NAMES,
    METHODS,
    OVERALL,
    SUBSET_METHODS,
    SUBSET_SIZES,
    TIE_WITHIN,
    aggregate,
    paired_differences,
    picks,
    sum_logprob,
    task_outcomes,
)


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
                "sum_logprob": [sum_logprob(r) for r in records],
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
        for m in ("cappy", "self_scoring", "self_scoring_sum", "oracle")
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
        "bootstrap": _bootstrap(rows, options.seed),
        "per_task_wins": {
            "tie_within": TIE_WITHIN,
            "rule": (
                f"per task, A's mean minus B's in Rouge-L points: a win at +{TIE_WITHIN} or "
                f"more, a loss at -{TIE_WITHIN} or less, a tie in between (0.00 in report.md)"
            ),
            "comparisons": {
                _name(a, b): task_outcomes(results[a]["per_task"], results[b]["per_task"])
                for a, b in COMPARISONS
            },
        },
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


def _name(a: str, b: str) -> str:
    """A comparison's key in report.json: A - B."""
    return f"{a} - {b}"


def _interval(rows: list[dict[str, Any]], a: str, b: str, seed: int) -> dict[str, Any] | None:
    differences = paired_differences(rows, a, b)
    if differences is None:
        return None
    return bootstrap.paired_bootstrap(differences, seed=seed).to_dict()


def _bootstrap(rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Each comparison's bootstrap interval, on all samples and by number of samples (where both
    methods have subsets); None where a method could not choose for some example."""
    return {
        "method": bootstrap.METHOD,
        "statistic": "overall(A) - overall(B) in Rouge-L points (mean over tasks of task means)",
        "paired": True,
        "stratified_by": "task",
        "resamples": bootstrap.RESAMPLES,
        "seed": seed,
        "level": bootstrap.LEVEL,
        "comparisons": {_name(a, b): _interval(rows, a, b, seed) for a, b in COMPARISONS},
        "by_samples": {
            _name(a, b): {
                str(k): _interval(rows, f"{a}@{k}", f"{b}@{k}", seed) for k in SUBSET_SIZES
            }
            for a, b in COMPARISONS
            if a in SUBSET_METHODS and b in SUBSET_METHODS
        },
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "0.00" if abs(value) < TIE_WITHIN else f"{value:+.2f}"


def _parameters(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}={json.dumps(v)}" for k, v in value.items()) or "(none)"
    else:
        text = json.dumps(value)
    return text.replace("|", "\\|")


def _decodings(sampling: Mapping[str, Any]) -> list[str]:
    """The decodings table: what each decoding's calls sent upstream when the header records it
    (`sent`, decoding name -> parameters), else the recipe's own parameters."""
    recipe = [d for d in sampling.get("recipe") or [] if isinstance(d, Mapping)]
    counts = {str(d.get("name")): d.get("count") for d in recipe}
    sent = sampling.get("sent")
    if isinstance(sent, Mapping):
        names = [*counts, *(str(n) for n in sent if str(n) not in counts)]
        parameters = {n: sent.get(n) for n in names}
        column = "parameters sent"
        note = "the request parameters each decoding's calls sent upstream"
    else:
        names = list(counts)
        parameters = {
            str(d.get("name")): {k: v for k, v in d.items() if k not in ("name", "count")}
            for d in recipe
        }
        column = "parameters (recipe)"
        note = "the recipe's parameters (the sampling header does not record what was sent)"
        if sampling.get("send_top_k") is False:
            note += "; top_k was not sent"
    lines = ["## Decodings", "", f"Per example; {note}.", "", f"| decoding | count | {column} |"]
    lines.append("|---|---:|---|")
    for name in names:
        count = counts.get(name)
        lines.append(
            f"| {name} | {'' if count is None else count} | {_parameters(parameters[name])} |"
        )
    return [*lines, ""]


_NOT_COMPARED = (
    "Not compared: Cappy has no scores (no --scorer), or the other methods could not pick for "
    "every example."
)


def _bootstrap_section(report: dict[str, Any]) -> list[str]:
    boot = report["bootstrap"]
    heading = "## Cappy against the other methods: paired bootstrap"
    if all(v is None for v in boot["comparisons"].values()):
        return [heading, "", _NOT_COMPARED, ""]
    level = f"{100 * boot['level']:g}%"
    lines = [
        heading,
        "",
        f"Overall difference, Cappy minus the method, in Rouge-L points, with its {level} "
        f"percentile interval over {boot['resamples']:,} paired resamples stratified by task "
        "(each task's examples drawn with replacement, the same draws for both methods, tasks "
        f"weighted equally as in the overall; seed {boot['seed']}), and the share of resamples "
        "above 0.",
        "",
        f"| comparison | samples | difference | {level} interval | resamples > 0 |",
        "|---|---:|---:|---|---:|",
    ]
    entries = [
        (a, b, f"all {report['samples_per_example']}", boot["comparisons"][_name(a, b)])
        for a, b in COMPARISONS
    ]
    for a, b in COMPARISONS:
        for k, value in boot["by_samples"].get(_name(a, b), {}).items():
            entries.append((a, b, k, value))
    for a, b, samples, value in entries:
        label = f"{METHOD_NAMES[a]} - {METHOD_NAMES[b]}"
        if value is None:
            lines.append(f"| {label} | {samples} | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {label} | {samples} | {_signed(value['difference'])} | "
            f"{_signed(value['low'])} to {_signed(value['high'])} | "
            f"{100 * value['share_above_zero']:.1f}% |"
        )
    return [*lines, ""]


def _per_task_section(report: dict[str, Any]) -> list[str]:
    wins = report["per_task_wins"]
    heading = "## Cappy against the other methods, per task"
    if all(v is None for v in wins["comparisons"].values()):
        return [heading, "", _NOT_COMPARED, ""]
    lines = [
        heading,
        "",
        f"Per task, Cappy's mean minus the method's: a win at +{wins['tie_within']} Rouge-L "
        f"points or more, a loss at -{wins['tie_within']} or less, otherwise a tie (a "
        "difference shown as 0.00).",
        "",
        "| comparison | wins | losses | ties |",
        "|---|---:|---:|---:|",
    ]
    for a, b in COMPARISONS:
        outcome = wins["comparisons"][_name(a, b)]
        counts = (
            ["n/a"] * 3
            if outcome is None
            else [str(outcome[k]) for k in ("wins", "losses", "ties")]
        )
        lines.append(f"| {METHOD_NAMES[a]} vs {METHOD_NAMES[b]} | " + " | ".join(counts) + " |")
    methods = report["methods"]
    for a, b in COMPARISONS:
        outcome = wins["comparisons"][_name(a, b)]
        if outcome is None:
            continue
        ordered = sorted(outcome["differences"].items(), key=lambda item: (-item[1], item[0]))
        lines += [
            "",
            f"### {METHOD_NAMES[a]} vs {METHOD_NAMES[b]} by task (by difference)",
            "",
            f"| task | n | {METHOD_NAMES[a]} | {METHOD_NAMES[b]} | difference |",
            "|---|---:|---:|---:|---:|",
        ]
        for task, difference in ordered:
            lines.append(
                f"| {task} | {report['examples_by_task'][task]} | "
                f"{_cell(methods[a]['per_task'][task])} | {_cell(methods[b]['per_task'][task])} "
                f"| {_signed(difference)} |"
            )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: the decodings, methods by task, Cappy vs self-scoring by number of
    samples, the bootstrap intervals and Cappy's per-task wins and losses."""
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
        *_decodings(report["sampling"]),
        "## Methods",
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
    lines += ["", *_bootstrap_section(report), *_per_task_section(report)]
    return "\n".join(lines).rstrip("\n") + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Two bar charts: each method overall; Cappy and the self-scorings by number of samples."""
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
    colours = {"cappy": "#C44E52", "self_scoring": "#55A868", "self_scoring_sum": "#8172B2"}
    width = 0.8 / len(SUBSET_METHODS)
    for position, method in enumerate(SUBSET_METHODS):
        offset = (position - (len(SUBSET_METHODS) - 1) / 2) * width
        colour = colours.get(method, "#8C8C8C")
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
