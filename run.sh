#!/usr/bin/env bash
# The whole nanochat pipeline in one command: tokenizer -> base -> mid -> SFT -> RL -> eval -> report.
#   bash run.sh            profile from the hardware (8 GPUs: d20 speedrun; fewer: gradient accumulation; none: CPU)
#   bash run.sh --smoke    the smallest settings that still run every stage end to end (CI)
#   bash run.sh --tests    set up .venv and run the test suite, printing the time each section took
#   bash run.sh --gpu-check  a few minutes on one GPU running every CUDA path once, one summary table (no GPU: exit 2)
#   bash run.sh --data PATH [--chat-data FILE]   the same on your own text (see `python data.py prepare --help`)
#                          instead of FineWeb, your conversations added to midtraining and SFT (with --smoke too)
# Offline machines: export NANOCHAT_MIRROR=/path/to/mirror (a directory or an http(s) base URL).
set -euo pipefail

MODE=auto; DATA=""; OWN_CHAT=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --tests) MODE=tests ;;
    --gpu-check) MODE=gpucheck ;;
    --data|--chat-data)
      [ $# -ge 2 ] && [ -e "$2" ] || { echo "$1 needs an existing path after it (got '${2:-}')" >&2; exit 2; }
      if [ "$1" = --data ]; then DATA=$(realpath "$2"); else OWN_CHAT=(--chat-data "$(realpath "$2")"); fi
      shift ;;
    *) echo "unknown argument: $1 (use --smoke, --tests, --gpu-check, --data PATH or --chat-data FILE)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")"

# --- environment: .venv at the repo root, from requirements.txt (--tests: and requirements-test.txt); a file is
# installed again only when it changes (its hash is kept in .venv/.<name>.sha) ---
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
for FILE in requirements.txt $([ "$MODE" = tests ] && echo requirements-test.txt); do
  STAMP=.venv/.${FILE%.txt}.sha
  if [ ! -f "$STAMP" ] || [ "$(sha256sum $FILE | cut -d' ' -f1)" != "$(cat "$STAMP")" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r $FILE
    sha256sum $FILE | cut -d' ' -f1 > "$STAMP"
  fi
done
source .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

if [ "$MODE" = tests ]; then
  python -m ruff check .  # pyflakes, bugbear, 120-character lines (pyproject.toml); a finding stops the tests
  JUNIT=$(mktemp --suffix=.xml)
  rc=0
  python -m pytest test_all.py -q -rs --junitxml="$JUNIT" || rc=$?
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

if [ "$MODE" = gpucheck ]; then
  if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "--gpu-check: torch sees no CUDA GPU here; nothing to check (run it on a GPU machine)" >&2; exit 2
  fi
  export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/gpu_check
  export LOG=$NANOCHAT_BASE_DIR/log
  mkdir -p "$NANOCHAT_BASE_DIR"; : > "$LOG"; set +e   # a failed check shows in the table; the others still run
  check() { echo "== $1: ${*:2}" | tee -a "$LOG"; "${@:2}" >> "$LOG" 2>&1; echo "== $1 rc=$?" >> "$LOG"; }
  check setup bash -c \
    "python data.py download -n 2 && python tokenizer.py train --vocab-size 65536 --max-chars 20000000"
  check base python train.py --stage=base --depth 20 --recipe 2026 --total-batch-size 65536 --num-iterations 15 \
    --eval-every -1 --eval-tokens 0 --core-metric-every -1 --sample-every -1
  check sft python train.py --stage=sft --source base --num-iterations 5 --smoltalk-size 500 --arc-size 50 \
    --gsm8k-size 50 --identity-size 10 --simple-spelling-size 10 --spelling-bee-size 10 --eval-every -1 \
    --eval-tokens 0 --chat-eval-every -1
  check rl python train.py --stage=rl --num-iterations 3 --examples-per-step 2 --num-samples 8 --device-batch-size 8 \
    --max-new-tokens 128 --gsm8k-size 20 --eval-every -1 --eval-examples 0 --save-every -1
  check decode python model.py bench --depths 20 --batches 1 8 --device cuda
  check tests python -m pytest test_all.py -q -k cuda
  python - "$LOG" <<'PY'
import re, sys, torch
log = open(sys.argv[1]).read()
out = {m[1]: (m[2], m[3]) for m in re.finditer(r"^== (\w+): .*?\n(.*?)^== \1 rc=(\d+)", log, re.S | re.M)}
WANT = dict(setup=[], base=[r"tok/s [\d,]+ \| mfu [\d.]+", r"peak memory \d+ MiB",
                            r"estimate per rank at \d+ rows x \d+", r"total [\d.]+ GiB"],
            sft=[r"dt [\d.]+ms"], rl=[r"dt [\d.]+ms"],
            decode=[rf"num_samples {n} .*?decode +[\d.]+ tok/s" for n in (1, 8)], tests=[r"\d+ passed.*"])
print(f"\ngpu-check on {torch.cuda.get_device_name()} (log: {sys.argv[1]}); "
      "the figures of the last step (after compilation)")
for name, patterns in WANT.items():
    text, rc = out.get(name, ("", "missing"))
    found = "; ".join((re.findall(p, text) or ["?"])[-1] for p in patterns)
    print(f"{name:<7} {'ok' if rc == '0' else 'FAILED':<7} " + found)
sys.exit(any(out.get(name, ("", ""))[1] != "0" for name in WANT))
PY
  exit $?
fi

# --- the pipeline -------------------------------------------------------------------------------
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
STATE="$NANOCHAT_BASE_DIR/run_state"   # one marker file per finished stage, so a rerun skips it
mkdir -p "$STATE"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")

PROFILE=cpu
if [ "$NGPU" -gt 0 ]; then PROFILE=gpu; fi
if [ "$MODE" = smoke ]; then PROFILE=smoke; fi
echo "profile: $PROFILE (GPUs: $NGPU), artifacts in $NANOCHAT_BASE_DIR"

case $PROFILE in
  gpu)   # the release's d20 speedrun; with fewer than 8 GPUs the same run accumulates gradients
    LAUNCH="torchrun --standalone --nproc_per_node=$NGPU"
    FIRST_SHARDS=8; SHARDS=240; TOK="--vocab-size 65536 --max-chars 2000000000"
    # 2^19 tokens per step = rows x 2048 x GPUs x accumulation; train.py rounds every stage's batch for 3-7 GPUs
    # rows per GPU: auto (32, halved on out of memory); at d20 32 rows need over 80 GB (README "Profiles", --dry-run)
    BASE="--depth 20"
    MID=""; SFT=""; RL=""; BPB="--device-batch-size 32"; CORE=""; CHAT=""; EVALRL=""; ENDINGS="--num-prompts 50"
    ;;
  cpu)   # 30-40 minutes on 2 cores: vocab 8192 (at depth 4 the lm_head dominates), depth 4, seq 512, small mixtures
    LAUNCH="python"
    FIRST_SHARDS=11; SHARDS=11; CHATTEXT=""; TOK="--vocab-size 8192 --max-chars 20000000"
    BASE="--depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 8192 --num-iterations 300
          --eval-every 100 --eval-tokens 65536 --core-metric-every -1 --sample-every 200 --save-every 50 --compile 1"
    MID="--device-batch-size 8 --total-batch-size 4096 --num-iterations 150 --smoltalk-size 3000 --mmlu-size 500
         --gsm8k-size 500 --identity-size 250 --simple-spelling-size 300 --spelling-bee-size 300 --val-size 200
         --eval-every 100 --eval-tokens 32768 --save-every 50 --compile 0"
    SFT="--device-batch-size 8 --total-batch-size 4096 --num-iterations 100 --smoltalk-size 2000 --arc-size 300
         --gsm8k-size 300 --identity-size 50 --val-size 100 --eval-every 50 --eval-tokens 32768 --chat-eval-every -1
         --save-every 50 --compile 0"
    RL="--num-iterations 16 --examples-per-step 4 --num-samples 8 --device-batch-size 8 --max-new-tokens 128
        --eval-every -1 --eval-examples 20 --save-every 8"
    BPB="--device-batch-size 8 --eval-tokens 65536"; CORE="--max-per-task 20"; ENDINGS="--num-prompts 50"
    CHAT="--max-problems 20 --max-new-tokens 256"; EVALRL="--max-problems 40 --max-new-tokens 256"
    ;;
  smoke) # the smallest settings that still run every stage end to end
    LAUNCH="python"
    FIRST_SHARDS=2; SHARDS=2; CHATTEXT="-n 200"; TOK="--vocab-size 1024 --max-chars 1000000"
    BASE="--depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 512 --num-iterations 10 --eval-every 5
          --eval-tokens 2048 --core-metric-every -1 --sample-every -1 --save-every 5 --compile 0"
    MID="--device-batch-size 4 --total-batch-size 512 --num-iterations 4 --smoltalk-size 40 --mmlu-size 10
         --gsm8k-size 10 --identity-size 10 --simple-spelling-size 10 --spelling-bee-size 10 --val-size 10
         --eval-every -1 --eval-tokens 1024 --compile 0"
    SFT="--device-batch-size 4 --total-batch-size 512 --num-iterations 4 --smoltalk-size 40 --arc-size 10
         --gsm8k-size 10 --identity-size 10 --simple-spelling-size 10 --spelling-bee-size 10 --val-size 10
         --eval-every -1 --eval-tokens 1024 --chat-eval-every -1 --compile 0"
    RL="--num-iterations 2 --examples-per-step 1 --num-samples 2 --device-batch-size 2 --max-new-tokens 16
        --eval-every -1 --eval-examples 2 --save-every -1"
    BPB="--device-batch-size 4 --eval-tokens 2048"; CORE="--max-per-task 2"; ENDINGS="--num-prompts 4"
    CHAT="--max-problems 2 --max-new-tokens 16"; EVALRL="--max-problems 2 --max-new-tokens 16"
    ;;
esac

# run a stage once: skipped when its marker exists; a failure stops the script with the stage's own message.
# Training stages always get --resume: an interrupted stage continues from its latest checkpoint (a fresh one starts).
stage() {
  local name=$1; shift
  if [ -f "$STATE/$name.done" ]; then echo "== $name: done before, skipping"; return; fi
  echo "== $name: $*"
  "$@"
  touch "$STATE/$name.done"
}

if [ ! -f "$STATE/report_reset.done" ]; then python eval.py report reset; touch "$STATE/report_reset.done"; fi
if [ -n "$DATA" ]; then   # your own corpus as the shards, in place of the FineWeb download
  stage prepare python data.py prepare --input "$DATA" --replace
else
  stage download_first python data.py download -n "$FIRST_SHARDS"
fi
if [ "$PROFILE" = gpu ] && [ -z "$DATA" ] && [ ! -f "$STATE/download_all.done" ]; then
  python data.py download -n "$SHARDS" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &   # overlaps tokenizer training
  DOWNLOAD_PID=$!
fi
# off GPU the tokenizer also reads the SmolTalk train chats (the GPU run keeps FineWeb only): the mirror's stand-in is
# 2/3 code, which a FineWeb-only 8k vocab splits into ~1.6 bytes/token (replies ran past 256 tokens); with them ~2.4
if [ "$PROFILE" != gpu ]; then
  stage chat_text python data.py chat-text -o "$NANOCHAT_BASE_DIR/chat_text.jsonl" $CHATTEXT
  TOK="$TOK --input $NANOCHAT_BASE_DIR/chat_text.jsonl train-shards"
fi
stage tokenizer_train python tokenizer.py train $TOK
stage tokenizer_eval python tokenizer.py eval
if [ -n "${DOWNLOAD_PID:-}" ]; then wait "$DOWNLOAD_PID"; touch "$STATE/download_all.done"; fi
stage base_train $LAUNCH train.py --stage=base $BASE --resume
stage base_loss  $LAUNCH eval.py --stage base bpb $BPB
stage base_core  $LAUNCH eval.py --stage base core $CORE
stage mid_train  $LAUNCH train.py --stage=mid $MID "${OWN_CHAT[@]}" --resume
stage mid_eval   $LAUNCH eval.py --stage mid chat $CHAT
stage sft_train  $LAUNCH train.py --stage=sft $SFT "${OWN_CHAT[@]}" --resume
stage sft_eval   $LAUNCH eval.py --stage sft chat $CHAT
stage rl_train   $LAUNCH train.py --stage=rl $RL --resume
stage rl_eval    $LAUNCH eval.py --stage rl chat -a GSM8K $EVALRL
stage endings    python eval.py --stage sft endings $ENDINGS --max-new-tokens 256 -t 0.6 -k 50
python eval.py report
echo
sed -n '/^## Summary/,$p' "$NANOCHAT_BASE_DIR/report/report.md"
echo
echo "artifacts: $NANOCHAT_BASE_DIR (checkpoints in *_checkpoints/, report in report/report.md, copied to ./report.md)"
echo "talk to it: source .venv/bin/activate && python chat.py  " \
  "(or: python chat.py --web, then open http://127.0.0.1:8000)"
