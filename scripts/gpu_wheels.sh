#!/usr/bin/env bash
# Run HERE (a machine with PyPI): gather into the git-ignored .gpu-wheels/ what `scripts/gpu_check.sh` installs on
# a GPU machine that has torch + CUDA, transformers, accelerate and pytest but no network and none of the rest.
#
#   bash scripts/gpu_wheels.sh        # -> .gpu-wheels/  (carry it: run(carry=[".gpu-wheels"]))
#
# .gpu-wheels/wheels/     wheels for Python 3.12 / manylinux x86_64, installed with `pip install --no-deps --no-index`
#                         (gpu_check.sh installs only those whose module the machine lacks)
# .gpu-wheels/tokenizer.tar.gz  tokenizer/: the embedded model's tokenizer and config files (no weights): the text of the benchmark and
#                         the tokenizer of the tiny random model the GPU tests build
# bitsandbytes' wheel (43 MB) is repacked keeping only its CUDA 13 library, so that all stays well under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.gpu-wheels
CUDA_LIBS=${BNB_CUDA_LIBS:-cuda130,cuda132}   # bitsandbytes' libbitsandbytes_<these>.so kept (torch 2.11 + CUDA 13.x)
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
)
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp/wheels" "$OUT.tmp/tokenizer"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$OUT.tmp/wheels" "${PACKAGES[@]}"
# Slim the two big wheels (pip installs what a wheel holds; RECORD still lists the dropped files, pip does not check):
# bitsandbytes keeps only its CUDA 13 libraries (it carries one per CUDA/ROCm/XPU version);
# pyarrow (52 MiB, for `datasets`, which TRL imports) drops Arrow Flight, S3, its C++ headers, tests and the
# duplicate copies of libarrow_python* (zip has no symlinks; the extensions link the .so.2600 names).
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
PYEOF
TOK=$("$PY" -c "from workbench.models import EMBEDDED_DIR; print(EMBEDDED_DIR)")
cp "$TOK"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$OUT.tmp/tokenizer/"
tar -C "$OUT.tmp" -czf "$OUT.tmp/tokenizer.tar.gz" tokenizer && rm -r "$OUT.tmp/tokenizer"   # 3.4 MiB -> ~1 MiB
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
du -b "$OUT"/wheels/* "$OUT"/tokenizer.tar.gz | sort -n | awk '{printf "%8.1f MiB  %s\n", $1/2^20, $2}'
du -sb "$OUT" | awk '{printf "total %.1f MiB (limit 64 MiB)\n", $1/2^20}'
