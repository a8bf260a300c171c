#!/usr/bin/env bash
# The test command named in the README. Builds once (dev profile), runs the Rust test
# suite, then the Python Flight SQL client tests against the same `fedq` binary.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import adbc_driver_flightsql, pyarrow, pandas, pytest" 2>/dev/null; then
  echo "Installing the Python client test dependencies (adbc-driver-flightsql, pyarrow, pandas, pytest)..."
  python3 -m pip install --quiet adbc-driver-flightsql pyarrow pandas pytest
fi

cargo build --workspace --all-targets
cargo test --workspace
FEDQ_BIN="$(pwd)/target/debug/fedq" python3 -m pytest -q tests/python
