# Sourced by scripts/demo and scripts/test: make .venv with everything the project needs, once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.lightning-dana-installed
want=$(cat pyproject.toml constraints/ci.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints/ci.txt -e '.[dev]'
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
