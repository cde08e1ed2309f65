#!/usr/bin/env bash
# Create RecBole's own virtual environment for bench/quality.py (its pins clash with st2si's).
#
#   bash bench/setup_recbole.sh [VENV_DIR]        # default: bench/.venv-recbole
#
# Pins (see the RecBole notes): torch first, then recbole 1.2.1 with numpy < 2, pandas < 3 and
# setuptools < 81 (unpinned, it fails on pkg_resources / np.bool8 / np.float_). The two run-time
# work-arounds (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for its own checkpoint, anomaly detection off after
# importing its sequential models) are applied by bench/recbole_runner.py and bench/quality.py.
# Set PYTHON to choose the interpreter (default python3, 3.10 or 3.11).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-recbole}"
python="${PYTHON:-python3}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import recbole, numpy, torch; assert recbole.__version__ == '1.2.1'" 2>/dev/null; then
  echo "RecBole environment ready: $venv"
  exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q recbole==1.2.1 numpy==1.26.4 pandas==2.2.3 "setuptools<81"
"$venv/bin/python" -c "import recbole, torch, numpy; print('recbole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
echo "RecBole environment ready: $venv"
