"""llama-cpp-python's OpenAI server with a faster token-log-probability path, for measurements.

`python -m loadtests.llama_upstream [llama_cpp.server flags]` runs `python -m llama_cpp.server`
after one change to `Llama._create_completion`: the answer is the same, it is computed with less
work. When a request asks for logprobs, llama-cpp-python turns the logits of every prompt
position into log-probabilities before it drops the prompt's rows, and for every generated token
it sorts the whole vocabulary (49,152 numpy scalars for SmolLM2) in Python to find the
`top_logprobs` best. On this 2-core machine that doubled the time of a 32-token sample. Here
the prompt's rows are dropped first (a log-softmax is per row, so the kept rows are identical)
and the top entries come from `numpy.argpartition`. The patch is applied to the source of the
installed version and refuses to start if that source no longer has the expected lines.
"""

from __future__ import annotations

import inspect
import re
import textwrap

import numpy as np

_SORT = re.compile(
    r"list\(\s*sorted\(\s*zip\(logprobs_token, range\(len\(logprobs_token\)\)\),"
    r"\s*reverse=True\s*\)\s*\)"
)
_ALL_ROWS = "Llama.logits_to_logprobs(self._scores)[token_offset:]"
_KEPT_ROWS = "Llama.logits_to_logprobs(self._scores[token_offset:])"


def top_pairs(row: np.ndarray, k: int | None) -> list[tuple[float, int]]:
    """The `k` largest `(log-probability, token id)` pairs of one row, best first.

    The same list as `sorted(zip(row, range(len(row))), reverse=True)[:k]` except for the order of
    exact ties; `k=None` gives the whole row.
    """
    n = len(row)
    k = n if k is None else max(0, min(int(k), n))
    if k == 0:
        return []
    idx = np.argpartition(-row, k - 1)[:k] if k < n else np.arange(n)
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return [(row[i], int(i)) for i in idx]


def patch() -> None:
    import llama_cpp.llama as module

    source = textwrap.dedent(inspect.getsource(module.Llama._create_completion))
    patched, sorts = _SORT.subn("_cappy_top_pairs(logprobs_token, logprobs)", source)
    if sorts != 1 or source.count(_ALL_ROWS) != 1:
        raise RuntimeError(
            "llama_cpp.Llama._create_completion no longer has the lines this patch replaces; "
            "run `python -m llama_cpp.server` instead"
        )
    patched = patched.replace(_ALL_ROWS, _KEPT_ROWS)
    namespace = dict(vars(module), _cappy_top_pairs=top_pairs)
    exec(compile(patched, module.__file__ or "llama.py", "exec"), namespace)  # noqa: S102
    module.Llama._create_completion = namespace["_create_completion"]


def main() -> None:
    patch()
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()
