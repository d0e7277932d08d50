#!/usr/bin/env bash
# Decode speed of the default model under each candidate build of llama-cpp-python (README, "Set-up").
#
#   bash evaluators/llama_builds.sh [ROUNDS]      # after `make`; builds missing wheels (~5 min each)
#
# Each candidate's wheel is built once with pip's cache off, into ~/.cache/windq/wheels/candidates/,
# and installed in a bare venv under ${TMPDIR:-/tmp}; evaluators/decode_speed.py then measures a
# 256-token prompt and 64 generated tokens (2 threads, median of 5), with llama.cpp's extra buffer
# types (repacked weights; AMX where compiled) on and off. Rounds alternate between candidates so a
# noisy machine slows all of them alike; the table gives the median over rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
VERSION=$(sed -n 's/^LLAMA_VERSION := //p' Makefile)
NOAMX=$(sed -n 's/^LLAMA_CFLAGS  := //p' Makefile)
MODEL=$(.venv/bin/python -c 'from windq.models.sources import default_model_path; print(default_model_path())')
CACHE=$HOME/.cache/windq/wheels/candidates
declare -A CMAKE=(
  [native-no-amx]="-DGGML_NATIVE=ON"
  [portable-avx2]="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)
declare -A CFLAGS_OF=([native-no-amx]="$NOAMX" [portable-avx2]="")
for name in "${!CMAKE[@]}"; do
  dir=$CACHE/$name-$VERSION
  if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building $name ..." >&2
    CMAKE_ARGS="${CMAKE[$name]}" CFLAGS="${CFLAGS_OF[$name]}" CXXFLAGS="${CFLAGS_OF[$name]}" \
      .venv/bin/pip wheel -q --no-cache-dir --no-deps -w "$dir.partial" "llama-cpp-python==$VERSION"
    rm -rf "$dir" && mv "$dir.partial" "$dir"
  fi
  venv=${TMPDIR:-/tmp}/windq-llama-$name
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --constraint constraints.txt "$dir"/llama_cpp_python-*.whl
  fi
done
out=$(mktemp)
for round in $(seq "$ROUNDS"); do
  for name in "${!CMAKE[@]}"; do
    for bufts in "" "--no-extra-bufts"; do
      r=$("${TMPDIR:-/tmp}/windq-llama-$name/bin/python" evaluators/decode_speed.py "$MODEL" $bufts)
      echo "$name ${bufts:-extra-bufts} $r" >> "$out"
    done
  done
done
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, bufts, js = line.split(" ", 2)
    rows.setdefault((name, bufts), []).append(json.loads(js))
print("| build | weights | prompt (tok/s) | generation (tok/s) | compiled with |")
print("|---|---|---:|---:|---|")
for (name, bufts), rs in sorted(rows.items()):
    feats = " ".join(p.split("=")[0].strip() for p in rs[0]["system_info"].replace("CPU :", "|").split("|") if p.strip().endswith("= 1"))
    pp = statistics.median(r["pp_tok_s"] for r in rs)
    tg = statistics.median(r["tg_tok_s"] for r in rs)
    print(f"| {name} | {'extra buffers (repack)' if bufts == 'extra-bufts' else 'plain (use_extra_bufts off)'} | {pp:.0f} | {tg:.0f} | {feats} |")
EOF
rm -f "$out"
