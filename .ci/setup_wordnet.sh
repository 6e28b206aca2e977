#!/usr/bin/env bash
# Install WordNet 3.0 from Debian/Ubuntu packages (wordnet-base: data.*, index.*, *.exc;
# wordnet-sense-index: index.sense) and pre-build nltk's corpus layout in zsbir's cache
# ($ZSBIR_CACHE or ~/.cache/zsbir)/nltk_data/corpora/wordnet, for SAKE's semantic matrix
# (zsbir.semantics). Idempotent; run as root (or with sudo available).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
packages=(wordnet-base wordnet-sense-index)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

if ((${#missing[@]})); then
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "setup_wordnet: run as root" >&2; exit 1; }
        sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    # install from the current lists; refresh them only when that fails
    if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}"; then
        $sudo apt-get update
        $sudo apt-get install -y --no-install-recommends "${missing[@]}"
    fi
else
    echo "setup_wordnet: ${packages[*]} already installed"
fi

# Pre-build nltk's layout (zsbir would do it on first use anyway). zsbir may not be
# installed yet: import it from this checkout; skip when its dependencies are not there yet.
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "import nltk, torch" \
        2>/dev/null; then
    PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
        "from zsbir.semantics import ensure_wordnet; print('WordNet for nltk:', ensure_wordnet())"
else
    echo "setup_wordnet: nltk/torch not importable by $PYTHON yet; zsbir builds the nltk" \
        "layout on first use"
fi
