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

case "$mode" in
  pipeline) shift; pipeline "$@" ;;
  *) die "usage: scripts/bench.sh pipeline [SECONDS] [RUNS]" ;;
esac
