#!/usr/bin/env bash
# Run HERE (a machine with PyPI): gather into the git-ignored .gpu-wheels/ what `scripts/gpu_check.sh` installs on
# a GPU machine that has torch + CUDA, transformers, accelerate and pytest but no network and none of the rest.
#
#   bash scripts/gpu_wheels.sh        # -> .gpu-wheels/  (carry it: run(carry=[".gpu-wheels"]))
#
# .gpu-wheels/wheels/     wheels for Python 3.12 / manylinux x86_64, installed with `pip install --no-deps --no-index`
#                         (deepspeed's is built here from its source: a pure-Python wheel)
#                         (gpu_check.sh installs only those whose module the machine lacks)
# .gpu-wheels/tokenizer.tar.gz  tokenizer/: the embedded model's tokenizer and config files (no weights): the text of the benchmark and
#                         the tokenizer of the tiny random model the GPU tests build
# bitsandbytes' wheel (43 MB) is repacked keeping only its CUDA 13 library, so that all stays well under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.gpu-wheels
CUDA_LIBS=${BNB_CUDA_LIBS:-cuda130}   # bitsandbytes' libbitsandbytes_<these>.so kept (torch 2.11+cu130: torch.version.cuda 13.0)
# Our pins (requirements.txt, benchmarks/requirements.txt, requirements-gpu.txt) and what `datasets` (which TRL imports)
# needs beyond transformers' own dependencies. Pure-Python wheels unless noted.
PACKAGES=(
  peft==0.21.2 trl==1.16.0 liger-kernel==0.8.5 bitsandbytes==0.50.2 gguf==0.19.0
  sentencepiece==0.2.3                                  # cp312 (gguf export of SentencePiece tokenizers)
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
  xxhash==4.1.0 pyarrow==26.0.1 pandas==3.1.1           # cp312
  python-dateutil==4.0.0 tzdata==2026.6 six==1.17.0
  huggingface-hub==1.33.0                               # datasets 5.2 needs >= 1.31; transformers 5.17 < 2.0
  requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3   # cp312
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0   # deepspeed's (msgpack cp312, ninja manylinux)
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5   # deepspeed's config (core cp312)
)
DEEPSPEED=deepspeed==0.19.8   # source only on PyPI: built here into a pure wheel (no ops compiled; ZeRO-2/3 need none)
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp/wheels" "$OUT.tmp/tokenizer"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$OUT.tmp/wheels" "${PACKAGES[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT.tmp/wheels" "$DEEPSPEED"
# Slim the two big wheels (pip installs what a wheel holds; RECORD still lists the dropped files, pip does not check):
# bitsandbytes keeps only its CUDA 13 libraries (it carries one per CUDA/ROCm/XPU version);
# pyarrow (52 MiB, for `datasets`, which TRL imports) drops Arrow Flight, S3, its C++ headers, tests and
# the duplicate copies of libarrow_python* (zip has no symlinks; the extensions link the .so.2600 names); pandas
# drops its own test suite (3 MiB).
"$PY" - "$OUT.tmp/wheels" "$CUDA_LIBS" <<'PYEOF'
import re
import sys
from pathlib import Path
from zipfile import ZIP_DEFLATED, ZipFile

folder, keep = Path(sys.argv[1]), [f"libbitsandbytes_{k}.so" for k in sys.argv[2].split(",")]


def drop_bitsandbytes(name: str) -> bool:
    return "libbitsandbytes_" in name and name.rsplit("/", 1)[-1] not in keep


def drop_pyarrow(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return (name.startswith(("pyarrow/include/", "pyarrow/tests/", "pyarrow/src/")) or "flight" in base
            or base.startswith(("libarrow_s3", "_pyarrow_cpp_tests")) or re.fullmatch(r"libarrow_python.*\.so(\.\d+\.\d+\.\d+)?", base) is not None)


def drop_pandas(name: str) -> bool:
    return name.startswith("pandas/tests/")


def slim(whl: Path, drop) -> None:
    out = whl.with_suffix(".slim")
    with ZipFile(whl) as src, ZipFile(out, "w", ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not drop(info.filename):
                dst.writestr(info, src.read(info), compress_type=ZIP_DEFLATED, compresslevel=9)
    before = whl.stat().st_size
    out.replace(whl)
    print(f"{whl.name}: {before / 2**20:.1f} MiB -> {whl.stat().st_size / 2**20:.1f} MiB")


for whl in folder.glob("bitsandbytes-*.whl"):
    with ZipFile(whl) as z:
        assert any(n.rsplit("/", 1)[-1] in keep for n in z.namelist()), f"{whl.name}: none of {keep}"
    slim(whl, drop_bitsandbytes)
for whl in folder.glob("pyarrow-*.whl"):
    slim(whl, drop_pyarrow)
for whl in folder.glob("pandas-*.whl"):
    slim(whl, drop_pandas)
PYEOF
TOK=$("$PY" -c "from workbench.models import EMBEDDED_DIR; print(EMBEDDED_DIR)")
cp "$TOK"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$OUT.tmp/tokenizer/"
tar -C "$OUT.tmp" -czf "$OUT.tmp/tokenizer.tar.gz" tokenizer && rm -r "$OUT.tmp/tokenizer"   # 3.4 MiB -> ~1 MiB
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
du -b "$OUT"/wheels/* "$OUT"/tokenizer.tar.gz | sort -n | awk '{printf "%8.1f MiB  %s\n", $1/2^20, $2}'
du -sb "$OUT" | awk '{printf "total %.1f MiB (limit 64 MiB)\n", $1/2^20}'
# The slimmed wheels still import (they are for Python 3.12: checked in a throw-away 3.12 venv where there is one;
# torch and what the GPU machine already has come from PyPI there, CPU-only where it matters: no torch at all).
if [ -z "${PY312:-}" ]; then
  for candidate in python3.12 $(command -v pyenv > /dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2> /dev/null); do
    if "$candidate" -c "" 2> /dev/null; then PY312=$candidate; break; fi
  done
fi
if [ -n "${PY312:-}" ]; then
  CHECK=$(mktemp -d)
  "$PY312" -m venv "$CHECK/venv"
  "$CHECK/venv/bin/pip" install --quiet --disable-pip-version-check numpy pyyaml tqdm packaging filelock httpx click \
    typing_extensions 2>&1 | grep -v "WARNING: Location" || true
  "$CHECK/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    $(ls "$OUT"/wheels/*.whl | grep -vE '/(bitsandbytes|liger_kernel|trl|peft|deepspeed|ninja)-') 2>&1 | grep -v "WARNING: Location" || true
  "$CHECK/venv/bin/python" -c "
import datasets, gguf, hjson, msgpack, pandas, pyarrow.parquet, pydantic, sentencepiece
rows = datasets.Dataset.from_dict({'a': [1, 2, 3]}).map(lambda r: {'b': r['a'] * 2})
assert rows['b'] == [2, 4, 6] and rows.to_pandas().shape == (3, 2)
print('the slimmed wheels import under', __import__('sys').version.split()[0])" || { echo "FAILED: a carried wheel does not import"; exit 1; }
  rm -rf "$CHECK"
else
  echo "no python3.12 here: the carried wheels were not imported (PY312=... to check them)"
fi
