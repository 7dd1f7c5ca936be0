#!/usr/bin/env bash
# The test suite: sets everything up (scripts/setup.sh), checks style (ruff), builds the documentation
# (mkdocs --strict), runs pytest, then builds the sdist + CPU wheel and smoke-tests the wheel in a fresh
# virtual environment (scripts/wheel_check.sh; MEDFAST_SKIP_WHEEL=1 skips that last step locally).
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
ruff check .
# Not --quiet: it also hides the warnings that --strict turns into a failure.
mkdocs build --strict --site-dir build/site 2>&1 | { grep -v '^INFO' || true; }
python -m pytest -q -p no:cacheprovider tests "$@"
if [ "${MEDFAST_SKIP_WHEEL:-0}" != "1" ]; then bash scripts/wheel_check.sh build/dist; fi
