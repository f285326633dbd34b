#!/usr/bin/env bash
# `diffuse serve` against real clients: the webuiapi package (A1111 API), the openai SDK, and
# Playwright driving Debian's Chromium through the web page. Makes its own venv (pinned
# versions in requirements.txt) and installs Debian's chromium when it is missing.
#
#   tests/clients/run.sh [--screenshot docs/serve-page.png]
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${CLIENTS_VENV:-target/clients-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r tests/clients/requirements.txt
fi
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    # Playwright's own browser download is not reachable; Debian's build is.
    sudo_if_needed=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo_if_needed apt-get install -y -q chromium >/dev/null
fi
cargo build --release --bin diffuse
"$venv/bin/python" tests/clients/test_clients.py --diffuse "${CARGO_TARGET_DIR:-target}/release/diffuse" "$@"
