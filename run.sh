#!/usr/bin/env bash
# The whole nanochat pipeline in one command: tokenizer -> base -> mid -> SFT -> RL -> eval -> report.
#   bash run.sh            the profile follows the hardware (8 GPUs: d20 speedrun; fewer GPUs: same with grad accumulation; no GPU: CPU profile)
#   bash run.sh --smoke    the smallest settings that still run every stage end to end (CI)
#   bash run.sh --tests    set up .venv and run the test suite, printing the time each section took
# Offline machines: export NANOCHAT_MIRROR=/path/to/mirror (a directory or an http(s) base URL).
set -euo pipefail
cd "$(dirname "$0")"

MODE=auto
for arg in "$@"; do
  case "$arg" in
    --smoke) MODE=smoke ;;
    --tests) MODE=tests ;;
    *) echo "unknown argument: $arg (use --smoke or --tests)" >&2; exit 2 ;;
  esac
done

# --- environment: .venv at the repo root, from requirements.txt (reinstalled only when it changes) ---
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
STAMP=.venv/.requirements.sha
if [ ! -f "$STAMP" ] || [ "$(sha256sum requirements.txt | cut -d' ' -f1)" != "$(cat "$STAMP")" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  sha256sum requirements.txt | cut -d' ' -f1 > "$STAMP"
fi
source .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

if [ "$MODE" = tests ]; then
  JUNIT=$(mktemp --suffix=.xml)
  set +e
  python -m pytest test_all.py -q -rs --junitxml="$JUNIT"
  rc=$?
  set -e
  python - "$JUNIT" <<'PY'
import sys, collections, xml.etree.ElementTree as ET
times = collections.Counter(); counts = collections.Counter()
for case in ET.parse(sys.argv[1]).iter("testcase"):
    section = case.get("name").split("[")[0].split("_")[1]
    times[section] += float(case.get("time", 0)); counts[section] += 1
print("time per test section:")
for section, t in times.most_common():
    print(f"  {section:<10} {counts[section]:>3} tests {t:8.1f} s")
PY
  rm -f "$JUNIT"
  [ $rc -eq 5 ] && { echo "no tests collected"; exit 1; }
  exit $rc
fi

echo "pipeline not written yet" >&2
exit 1
