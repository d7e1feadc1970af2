#!/usr/bin/env bash
# Set up (venv, install) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh" test
cd "$REPO_ROOT"
exec python -m pytest "$@"
