#!/usr/bin/env bash
# Benchmarks, each against its reference on the same input in the same run. Machines here are
# noisy: runs alternate between Waveline and the reference, and the table quotes medians and
# ratios. Paste the printed table into BENCHMARKS.md with the command that made it.
#
#   scripts/bench.sh pipeline [SECONDS=600] [RUNS=3]
#       `waveline process` against ../shared/bench/ffmpeg-reference.sh (the same ladder,
#       loudness and waveform in one ffmpeg command) on a generated SECONDS-long signal.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${WAVELINE_SHARED_DIR:-$root/../shared}
mode=${1:-}

die() { echo "bench: $*" >&2; exit 1; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# measure OUTFILE CMD...: appends "wall cpu maxrss_kib" of one run of CMD.
measure() {
  local out=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$out.one" "$@" >/dev/null 2>"$out.err" || { cat "$out.err" >&2; die "failed: $*"; }
  awk '{printf "%s %.2f %s\n", $1, $2+$3, $4}' "$out.one" >>"$out"
}

pipeline() {
  local seconds=${1:-600} runs=${2:-3}
  [ -x "$shared/bench/ffmpeg-reference.sh" ] || [ -f "$shared/bench/ffmpeg-reference.sh" ] \
    || die "the reference scripts are not at $shared/bench (set WAVELINE_SHARED_DIR)"
  command -v /usr/bin/time >/dev/null || die "GNU time is missing: apt-get install time"
  echo "building waveline (release)…" >&2
  (cd "$root" && cargo build --release --locked --quiet -p waveline)
  local bin=$root/target/release/waveline
  work=$(mktemp -d)  # global: the EXIT trap needs it
  trap 'rm -rf "$work"' EXIT
  echo "generating a ${seconds}s signal…" >&2
  bash "$shared/bench/gen-signal.sh" "$seconds" "$work/input.flac"
  cc -O2 -o "${TMPDIR:-/tmp}/waveform-ref" "$shared/bench/waveform-ref.c"
  for i in $(seq "$runs"); do
    echo "run $i/$runs…" >&2
    measure "$work/ffmpeg" bash "$shared/bench/ffmpeg-reference.sh" "$work/input.flac" "$work/ref"
    WAVELINE_LOG=waveline_pipeline::cpu=info measure "$work/waveline" "$bin" process "$work/input.flac" --out "$work/out"
    grep -o 'analysis_share=[0-9.e-]*' "$work/waveline.err" | cut -d= -f2 >>"$work/share"
  done
  local fw fc fm ww wc wm
  fw=$(cut -d' ' -f1 "$work/ffmpeg" | median); fc=$(cut -d' ' -f2 "$work/ffmpeg" | median); fm=$(cut -d' ' -f3 "$work/ffmpeg" | median)
  ww=$(cut -d' ' -f1 "$work/waveline" | median); wc=$(cut -d' ' -f2 "$work/waveline" | median); wm=$(cut -d' ' -f3 "$work/waveline" | median)
  echo
  echo "pipeline: ${seconds} s stereo 44.1 kHz FLAC, $runs runs each, alternating; medians ($(nproc) cores)"
  echo
  echo "| | wall s | CPU s | peak RSS MiB |"
  echo "|---|---:|---:|---:|"
  printf "| ffmpeg reference | %.2f | %.2f | %.0f |\n" "$fw" "$fc" "$(echo "$fm / 1024" | bc -l)"
  printf "| waveline process | %.2f | %.2f | %.0f |\n" "$ww" "$wc" "$(echo "$wm / 1024" | bc -l)"
  printf "| ratio waveline / ffmpeg | **%.2f×** | **%.2f×** | %.2f× |\n" \
    "$(echo "$ww / $fw" | bc -l)" "$(echo "$wc / $fc" | bc -l)" "$(echo "$wm / $fm" | bc -l)"
  printf "\nloudness + waveform: %.1f%% of waveline's CPU time (median; from its per-stage accounting)\n" \
    "$(median <"$work/share" | awk '{print $1 * 100}')"
  echo
  echo "every run (wall CPU RSS-KiB): ffmpeg: $(tr '\n' ';' <"$work/ffmpeg") waveline: $(tr '\n' ';' <"$work/waveline")"
}

fleet() {
  local tracks=${1:-20} seconds=${2:-120}
  echo "building waveline (release)…" >&2
  (cd "$root" && cargo build --release --locked --quiet -p waveline)
  local bin=$root/target/release/waveline
  work=$(mktemp -d)
  trap 'rm -rf "$work"; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS waveline_bench WITH (FORCE)" >/dev/null 2>&1' EXIT
  export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-waveline-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-waveline-test-secret}
  export WAVELINE_QUEUE=amqp://guest:guest@127.0.0.1:5672/%2f WAVELINE_QUEUE_NAME=waveline.bench
  export WAVELINE_STORAGE="s3://waveline-bench?endpoint=http://127.0.0.1:${WAVELINE_TEST_S3_PORT:-9900}&region=us-east-1"
  export WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/waveline_bench WAVELINE_LOG=warn
  echo "generating $tracks tracks of ${seconds}s…" >&2
  for i in $(seq "$tracks"); do
    ffmpeg -hide_banner -loglevel error -y -f lavfi -i "anoisesrc=color=pink:amplitude=0.2:seed=$i:sample_rate=44100:duration=$seconds" \
      -f lavfi -i "sine=frequency=$((200 + i * 37)):sample_rate=44100:duration=$seconds" \
      -filter_complex "[0][1]amix=inputs=2:normalize=0,pan=stereo|c0=c0|c1=0.8*c0" "$work/track$i.flac"
  done
  echo
  echo "fleet: $tracks tracks of ${seconds}s FLAC, RabbitMQ + S3 (s3s-fs) + PostgreSQL on this machine ($(nproc) cores)"
  echo
  echo "| workers | drained in s | tracks/min | enqueue→start p50 s | p99 s |"
  echo "|---:|---:|---:|---:|---:|"
  for workers in 1 2; do
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS waveline_bench WITH (FORCE)" >/dev/null
    "$bin" migrate >/dev/null
    "$bin" import "$work"/track*.flac --json >/dev/null
    local start pids=()
    start=$(date +%s.%N)
    for _ in $(seq "$workers"); do "$bin" worker --concurrency 1 & pids+=($!); done
    until [ "$(psql "$WAVELINE_DATABASE_URL" -Atc "SELECT count(*) FROM tracks WHERE state IN ('ready','failed') AND id <> '00000000-0000-7000-8000-000000000001'")" -ge "$tracks" ]; do sleep 0.5; done
    local took
    took=$(echo "$(date +%s.%N) - $start" | bc -l)
    kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
    read -r p50 p99 < <(psql "$WAVELINE_DATABASE_URL" -Atc "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - created_at))::numeric, 1), round(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - created_at))::numeric, 1) FROM tracks WHERE claimed_at IS NOT NULL" | tr '|' ' ')
    printf "| %d | %.1f | %.1f | %s | %s |\n" "$workers" "$took" "$(echo "$tracks * 60 / $took" | bc -l)" "$p50" "$p99"
  done
  echo
  echo "delay: from the import's row creation to the claim; with a backlog, it is mostly waiting in line."
}

case "$mode" in
  pipeline) shift; pipeline "$@" ;;
  fleet) shift; fleet "$@" ;;
  *) die "usage: scripts/bench.sh pipeline [SECONDS] [RUNS] | fleet [TRACKS] [SECONDS]" ;;
esac
