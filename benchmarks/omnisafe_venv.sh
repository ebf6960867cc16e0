#!/usr/bin/env bash
# OmniSafe 0.5.0 (the peer of benchmarks/omnisafe_throughput.py) in its own virtual environment, .venv-omnisafe,
# beside .venv (run `make install` first). OmniSafe pins pandas==2.0.3, which has no build for numpy 2.3, so it is
# installed without its pins: its runtime dependencies come from the package index (pandas at a version that
# supports numpy 2), and torch, numpy, mujoco, gymnasium and safety-gymnasium from .venv, whose site-packages the
# new environment reads after its own: both libraries run on the same stack.
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/python || { echo "no .venv: run 'make install' first" >&2; exit 1; }
VENV=.venv-omnisafe
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -m venv --clear "$VENV"
# the new environment's site-packages first, then .venv's (with its .pth files: the editable sb3_metacpo)
TARGET=$("$VENV"/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$SITE')" > "$TARGET/zz_sb3_metacpo_venv.pth"
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV"/bin/python -m pip install --no-deps omnisafe==0.5.0
"$VENV"/bin/python -m pip install "pandas>=2.2.3" seaborn gdown wandb typer "moviepy<2"
"$VENV"/bin/python -c "import sb3_metacpo, omnisafe; print('OmniSafe', omnisafe.__version__, 'ready in $VENV')"
