#!/usr/bin/env bash
# The test suite: sets everything up (scripts/setup.sh), then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
ruff check .
python -m pytest -q -p no:cacheprovider tests "$@"
