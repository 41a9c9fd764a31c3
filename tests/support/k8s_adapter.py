"""What prometheus-adapter makes of one of its rules (deploy/k8s/prometheus-adapter/config.yaml),
reproduced in Python so that tests can check the rules without running the adapter: the metric a
rule serves to the HPA (`name.matches` / `name.as` applied to the series name) and the PromQL it
sends to Prometheus for it (`metricsQuery`, a Go template with `<<` `>>` delimiters).

Only what the cappy rules use: a `seriesQuery` that names one metric (`name{...}`, or
`{__name__="name",...}`), and the template fields `.Series`, `.LabelMatchers` and `.GroupBy`.
Anything else raises ValueError rather than render something the adapter would not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG = Path(__file__).resolve().parents[2] / "deploy/k8s/prometheus-adapter/config.yaml"

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_TEMPLATE_ACTION = re.compile(r"<<\s*(.*?)\s*>>")
_GO_GROUP = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def load_rules(path: Path = CONFIG) -> list[dict[str, Any]]:
    """The `rules` of an adapter config file (custom metrics rules)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    rules = config["rules"]
    assert isinstance(rules, list)
    return rules


def series_name(rule: Mapping[str, Any]) -> str:
    """The one metric name a rule's `seriesQuery` selects: what `<<.Series>>` stands for."""
    query = str(rule["seriesQuery"]).strip()
    bare = re.fullmatch(rf"({_NAME})\s*(\{{.*\}})?", query, re.DOTALL)
    if bare:
        return bare.group(1)
    quoted = re.fullmatch(rf"\{{.*\b__name__\s*=\s*\"({_NAME})\".*\}}", query, re.DOTALL)
    if quoted:
        return quoted.group(1)
    raise ValueError(f"the seriesQuery names no single metric: {query!r}")


def metric_name(rule: Mapping[str, Any]) -> str:
    """The custom metric name the adapter serves for the rule's series, as Go's
    `Regexp.ExpandString(nil, as, series, FindStringSubmatchIndex(series))` gives it; an empty
    `as` is `$0` without capture groups and `$1` with one, as in the adapter."""
    name = rule.get("name") or {}
    pattern = re.compile(name.get("matches") or "(.*)")
    series = series_name(rule)
    found = pattern.search(series)
    if found is None:
        raise ValueError(f"name.matches {pattern.pattern!r} does not match {series!r}")
    template = name.get("as") or ""
    if not template:
        if pattern.groups > 1:
            raise ValueError("name.as is required with more than one capture group")
        template = "$1" if pattern.groups == 1 else "$0"

    def group(ref: re.Match[str]) -> str:
        key = ref.group(1) or ref.group(2)
        if key.isdigit():
            index = int(key)
            return (found.group(index) or "") if index <= pattern.groups else ""
        return (found.groupdict().get(key) or "") if key in pattern.groupindex else ""

    return _GO_GROUP.sub(group, template.replace("$$", "\0")).replace("\0", "$")


def render_metrics_query(rule: Mapping[str, Any], label_matchers: str, group_by: str) -> str:
    """A rule's `metricsQuery` as prometheus-adapter renders it for one request.

    Args:
        rule: one entry of the adapter's `rules`.
        label_matchers: what the adapter puts for `<<.LabelMatchers>>`: PromQL matchers for the
            objects asked about, e.g. `namespace="default",pod=~"cappy-serve-a|cappy-serve-b"`.
        group_by: what it puts for `<<.GroupBy>>`: the label of the asked-for resource, e.g. `pod`.

    Returns:
        The PromQL query, ready for Prometheus's /api/v1/query.

    Raises:
        ValueError: the template uses a field or action other than `.Series`, `.LabelMatchers`
            and `.GroupBy`, or the seriesQuery names no single metric.
    """
    fields = {
        ".Series": series_name(rule),
        ".LabelMatchers": label_matchers,
        ".GroupBy": group_by,
    }

    def action(found: re.Match[str]) -> str:
        if found.group(1) not in fields:
            raise ValueError(f"unsupported template action <<{found.group(1)}>>")
        return fields[found.group(1)]

    return _TEMPLATE_ACTION.sub(action, str(rule["metricsQuery"]))
