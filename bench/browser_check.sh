#!/usr/bin/env bash
# The story playground (inference.py --serve) in a real browser: headless Chromium types a prompt, generates, hovers a
# token, branches, stops, scores, and saves docs/playground.png. Installs nothing.
#   bash bench/browser_check.sh [--model out/quickstart/best] [--out docs/playground.png]
set -euo pipefail
cd "$(dirname "$0")/.."
browser=""
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" > /dev/null; then browser=$(command -v "$name"); break; fi
done
if [ -z "$browser" ]; then
    echo "no Chromium here: on Debian or Ubuntu, sudo apt install chromium (or chromium-browser); on macOS, install" \
         "Google Chrome and put google-chrome on the PATH; then run this again" >&2
    exit 2
fi
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$python" bench/browser_check.py --chromium "$browser" "$@"
