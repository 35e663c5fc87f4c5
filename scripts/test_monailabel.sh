#!/usr/bin/env bash
# Real-MONAI-Label check (issue 6): builds a separate environment with monailabel 0.8.5 and runs
# tests/real_monailabel/ in it. Kept out of `make test` / .ci/run: it downloads the CUDA builds of torch and
# torchvision (~5 GB installed; there is no CPU build of torchvision in the registry).
#   scripts/test_monailabel.sh [pytest args]       (or: make test-monailabel)
# Environment: MONAILABEL_VENV (default .venv-monailabel), PYTHON (default python3), MEDVOL_DATA (shared
# datasets; defaults to ../shared/data when that folder exists; without it the data tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MONAILABEL_VENV:-.venv-monailabel}"
STAMP="$VENV/.monailabel-installed"
PIP=(-m pip install -q --disable-pip-version-check)

if [ ! -f "$STAMP" ] || [ scripts/monailabel-requirements.txt -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    start=$(date +%s)
    "$PYTHON" -m venv "$VENV"
    # 1. torch + torchvision first, as a matching pair. '===' (exact string match) picks the registry's
    #    build of 2.13.0 (CUDA), not a local '2.13.0+cpu' wheel that torchvision's CUDA build cannot use.
    "$VENV/bin/python" "${PIP[@]}" "torch===2.13.0" "torchvision===0.28.0"
    # 2. medvol (editable) with MONAI 1.6; torch is already satisfied.
    "$VENV/bin/python" "${PIP[@]}" -e .
    # 3. MONAI Label without its requirement list, then only what it imports.
    "$VENV/bin/python" "${PIP[@]}" --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1"
    "$VENV/bin/python" "${PIP[@]}" -r scripts/monailabel-requirements.txt
    "$VENV/bin/python" -c "import monailabel, monai, torch, torchvision; import monailabel.app; \
print('monailabel', monailabel.__version__, 'monai', monai.__version__, 'torch', torch.__version__, \
'torchvision', torchvision.__version__)"
    touch "$STAMP"
    echo "MONAI Label environment $VENV installed in $(( $(date +%s) - start )) s"
fi

if [ -z "${MEDVOL_DATA:-}" ] && [ -d ../shared/data ]; then
    MEDVOL_DATA="$(cd ../shared/data && pwd)"
    export MEDVOL_DATA
fi
echo "MEDVOL_DATA=${MEDVOL_DATA:-<unset: tests that need the shared datasets are skipped>}"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider tests/real_monailabel "$@"
