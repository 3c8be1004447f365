#!/usr/bin/env bash
# Issue 21's GPU check, in one time-boxed run (<= 575 s) on a CUDA machine with no network:
#   install the carried wheels the machine lacks (deepspeed among them) -> versions, nvidia-smi -> `make bench-gpu` (<= 400 s)
#   -> `pytest -m gpu` (<= 150 s) -> logs and results in $OUT (at most 8 files).
#
# Before it, here (with PyPI):   bash scripts/gpu_wheels.sh          # -> .gpu-wheels/ (58 MiB), git-ignored
# On the GPU machine:            bash scripts/gpu_check.sh           # carry: .gpu-wheels ; $OUT: where results go
# Rehearsal on this CPU:         GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh
#   (the venv's python, nothing installed: the wheels are listed and checked; the bench with --dry-run on the
#    tiny shapes; the GPU tests run on the CPU)
#
# Knobs (environment): GPU_CHECK_BENCH_ARGS (more bench_gpu.py options, e.g. "--shapes qwen2.5-1.5b"),
# GPU_CHECK_PYTEST_ARGS (default -x; "--maxfail=20" runs every GPU test), GPU_CHECK_LIMIT_S/_BENCH_S/_TESTS_S.
# $OUT gets: log.txt (this script's steps, versions, nvidia-smi), bench.log, pytest.log, gpu.md, gpu.json
# (benchmarks/results/ on a real run too), runs.tar.gz (every side's command, log and result JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
LIMIT=${GPU_CHECK_LIMIT_S:-575}       # the whole script ends by then
BENCH_MAX=${GPU_CHECK_BENCH_S:-400}
TESTS_MAX=${GPU_CHECK_TESTS_S:-150}
DRY=${GPU_CHECK_DRY_RUN:-0}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
OUT=${OUT:-outputs/gpu-check}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/workbench-gpu-check}
if [ "$DRY" = 1 ]; then PY=${PY:-.venv/bin/python}; fi
for candidate in ${PY:-} python3 python; do  # the interpreter that has torch
  if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then PY=$candidate; break; fi
done
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
: > "$LOG"
log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((LIMIT - (SECONDS - T0))); }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  HF_DATASETS_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1

log "gpu_check: dry_run=$DRY python=$(command -v "$PY") out=$OUT work=$WORK git=$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -d "$WHEELS/wheels" ] || { log "FATAL: $WHEELS/wheels missing: run scripts/gpu_wheels.sh and carry .gpu-wheels"; exit 2; }

# --- 1. the wheels the machine lacks or has older (ours, exactly, where we pin: peft, trl, liger, bitsandbytes,
#        datasets, gguf; a newer huggingface-hub, pandas, pyarrow ... of the machine stays)
"$PY" - "$WHEELS/wheels" > "$WORK/to_install.txt" 2>> "$LOG" <<'PYEOF'
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import InvalidVersion, Version

PINNED = {"peft", "trl", "liger-kernel", "bitsandbytes", "datasets", "gguf", "deepspeed"}
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist, want = whl.name.split("-")[:2]
    dist = dist.lower().replace("_", "-")
    try:
        have = version(dist)
    except PackageNotFoundError:
        have = None
    zipfile.ZipFile(whl).testzip()  # a damaged wheel fails here, not halfway through pip
    try:
        older = have is not None and Version(have) < Version(want)
    except InvalidVersion:
        older = False
    if have is None or (dist in PINNED and have != want) or older:
        print(whl)
    print(f"  {dist}: have {have}, carried {want}", file=sys.stderr)
PYEOF
log "wheels to install: $(xargs -n1 basename < "$WORK/to_install.txt" | tr '\n' ' ')"
if [ "$DRY" = 1 ]; then
  log "dry run: nothing installed"
elif [ -s "$WORK/to_install.txt" ]; then
  PIP=("$PY" -m pip install --no-deps --no-index --no-warn-script-location --disable-pip-version-check --quiet)
  if "${PIP[@]}" $(cat "$WORK/to_install.txt") >> "$LOG" 2>&1 \
     || "${PIP[@]}" --break-system-packages $(cat "$WORK/to_install.txt") >> "$LOG" 2>&1 \
     || "${PIP[@]}" --user --break-system-packages $(cat "$WORK/to_install.txt") >> "$LOG" 2>&1; then
    log "installed with pip"
  else  # no usable pip: wheels are zip files; unpacked on the path they import the same
    log "pip failed: unpacking the wheels into $WORK/site"
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$WORK/site" \
      $(cat "$WORK/to_install.txt") >> "$LOG" 2>&1
    export PYTHONPATH=$PYTHONPATH:$WORK/site
  fi
fi

# --- 2. versions and the GPU
{ "$PY" - <<'PYEOF'
import importlib
from importlib.metadata import PackageNotFoundError, version

import torch

print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for dist in ("transformers", "accelerate", "peft", "trl", "liger-kernel", "bitsandbytes", "datasets", "pyarrow", "pandas",
             "gguf", "sentencepiece", "safetensors", "tokenizers", "huggingface-hub", "numpy", "triton", "deepspeed",
             "unsloth", "pytest", "PyYAML", "tqdm"):
    try:
        print(f"  {dist} {version(dist)}")
    except PackageNotFoundError:
        print(f"  {dist} -")
for module in ("peft", "trl", "datasets", "gguf", "bitsandbytes", "liger_kernel.transformers"):
    try:
        importlib.import_module(module)
        print(f"  import {module}: ok")
    except Exception as exc:  # noqa: BLE001 - reported, the check goes on
        print(f"  import {module}: {type(exc).__name__}: {str(exc)[:300]}")
if hasattr(torch.nn.attention, "varlen") or importlib.util.find_spec("torch.nn.attention.varlen"):
    print("  torch.nn.attention.varlen: present")
    try:  # grouped key/value heads: the flag (torch 2.13), the kernel taking them as they are, or repeated
        from workbench.fastpath import varlen_kernel
        print(f"  varlen_attn: enable_gqa {'yes' if varlen_kernel.signature()[1] else 'no'}; "
              f"grouped heads as they are: {varlen_kernel.kernel_takes_gqa('cuda')}")
    except Exception as exc:  # noqa: BLE001 - reported, the check goes on
        print(f"  varlen_attn grouped heads: {type(exc).__name__}: {str(exc)[:300]}")
PYEOF
} >> "$LOG" 2>&1
{ nvidia-smi || echo "(no nvidia-smi)"; } >> "$LOG" 2>&1
log "versions and nvidia-smi written"

# --- 3. the tokenizer files and the tiny random model the GPU tests use (built here: its weights are not carried)
mkdir -p "$WORK/cache/models"
tar -xzf "$WHEELS/tokenizer.tar.gz" -C "$WORK" && log "tokenizer files: $WORK/tokenizer"
export WORKBENCH_CACHE=$WORK/cache
"$PY" - "$WORK/tokenizer" >> "$LOG" 2>&1 <<'PYEOF'
import sys
from unittest import mock

import workbench.models as models

# prepare_tiny_model takes the embedded model's tokenizer; here only its files are carried, not the weights.
with mock.patch.object(models, "resolve_model_path", return_value=sys.argv[1]):
    print("tiny random model:", models.prepare_tiny_model())
PYEOF
log "tiny model: $(ls "$WORK/cache/models/tiny-random" 2>/dev/null | tr '\n' ' ')"

# --- 4. make bench-gpu, time-boxed (its own box a little shorter, so that it writes its report itself)
BENCH_T=$(( $(left) - TESTS_MAX - 15 )); [ "$BENCH_T" -gt "$BENCH_MAX" ] && BENCH_T=$BENCH_MAX
BENCH_ARGS=(--tokenizer "$WORK/tokenizer" --work-dir "$WORK/bench" --out-dir "$OUT" --budget-s $((BENCH_T - 15)))
[ "$DRY" = 1 ] && BENCH_ARGS+=(--dry-run ${GPU_CHECK_BENCH_ARGS:-})
[ "$DRY" = 1 ] || BENCH_ARGS+=(${GPU_CHECK_BENCH_ARGS:-})
if [ "$BENCH_T" -gt 60 ]; then
  log "bench: timeout $BENCH_T s: benchmarks/bench_gpu.py ${BENCH_ARGS[*]}"
  timeout -k 10 "$BENCH_T" "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" > "$OUT/bench.log" 2>&1
  log "bench: exit $? ($(grep -c '    ok in' "$OUT/bench.log") sides ok, $(grep -cE '    (failed|timeout)' "$OUT/bench.log") failed or timed out)"
  [ "$DRY" = 1 ] || cp "$OUT/gpu.md" "$OUT/gpu.json" benchmarks/results/ 2>/dev/null
else
  log "bench: skipped, $BENCH_T s left for it"
fi
tar -czf "$OUT/runs.tar.gz" -C "$WORK/bench" runs 2>/dev/null && log "side logs: runs.tar.gz"

# --- 5. the GPU tests, time-boxed
TESTS_T=$(( $(left) - 10 )); [ "$TESTS_T" -gt "$TESTS_MAX" ] && TESTS_T=$TESTS_MAX
# dry run: the GPU tests' code rehearsed on the CPU (WORKBENCH_GPU_TESTS_DEVICE=cpu, about a minute), not skipped
[ "$DRY" = 1 ] && export WORKBENCH_GPU_TESTS_DEVICE=cpu
if [ "$TESTS_T" -gt 20 ]; then
  log "pytest: timeout $TESTS_T s: -m gpu tests/test_fastpath_gpu.py tests/test_gpu.py tests/test_compile_gpu.py"
  # -v: one line a test, so that a run cut by `timeout` still shows where it was; a test stuck for 100 s dumps its stack
  timeout -k 10 "$TESTS_T" "$PY" -m pytest -m gpu ${GPU_CHECK_PYTEST_ARGS:-} -v -rs -p no:randomly --durations=10 \
    -o faulthandler_timeout=100 tests/test_fastpath_gpu.py tests/test_gpu.py tests/test_compile_gpu.py \
    > "$OUT/pytest.log" 2>&1
  log "pytest: exit $? - $(tail -n 1 "$OUT/pytest.log")"
else
  log "pytest: skipped, $TESTS_T s left for it"
fi
log "gpu_check done in $((SECONDS - T0)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
