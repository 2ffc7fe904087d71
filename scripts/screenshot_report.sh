#!/usr/bin/env bash
# Render a self-contained HTML report (e.g. a measure run's report.html) to a PNG with headless Chromium.
# Usage: scripts/screenshot_report.sh RUN_DIR/report.html OUT.png [WIDTH,HEIGHT]
set -euo pipefail
html="$(realpath "$1")"; png="$2"; size="${3:-1200,2000}"
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 1; }
profile="$(mktemp -d)"; trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --screenshot="$(realpath -m "$png")" \
  --window-size="$size" "file://$html" >/dev/null 2>&1
echo "wrote $png"
