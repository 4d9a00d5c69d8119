#!/usr/bin/env bash
# Benchmarks, each against its reference on the same input in the same run. Machines here are
# noisy: runs alternate between Waveline and the reference, and the table quotes medians and
# ratios. Paste the printed table into BENCHMARKS.md with the command that made it.
#
#   Every mode builds what it measures (release) first; BENCH_PREBUILT=1 skips that.
#
#   scripts/bench.sh pipeline [SECONDS=600] [RUNS=3]
#       `waveline process` against ../shared/bench/ffmpeg-reference.sh (the same ladder,
#       loudness and waveform in one ffmpeg command) on a generated SECONDS-long signal.
#
#   scripts/bench.sh fleet [TRACKS=20] [SECONDS=120]
#       drains TRACKS imported tracks with 1, then 2 `waveline worker` processes (RabbitMQ, S3).
#
#   scripts/bench.sh stream [SECONDS=15] [RUNS=3]
#       range serving: the same ~10 MB MP3 (the mp3_128 rendition of a 640 s upload) from
#       ../shared/bench/nginx-range.sh and from `waveline serve` in both configurations: the
#       filesystem store (anonymous), and the distributed one, an S3 store (a private s3s-fs)
#       behind the stream cache, hot, anonymous and with a Bearer token; driven by wrk
#       (2 threads, 32 connections, SECONDS per run) with a random 64 KiB-aligned 64 KiB range
#       per request, alternating runs; prints successful answers per second, p50/p99 and the
#       ratios to nginx. Then the cold first byte of a range: the distributed API with an empty
#       stream cache against a bare SigV4-signed GET of the same range from the S3 server
#       (curl's time to first byte, alternating, 2×RUNS+1 samples).
#       Then status polling (`If-None-Match` on /v1/tracks/ID/status: 304s per second, p99), side by side
#       with a bare poem handler answering the same poll (bench/src/bare_304.rs), and
#       a 1 GiB streaming multipart upload to a `serve --workers 0` instance (throughput, the
#       server's RSS growth from VmRSS before to VmHWM after). Targets: range req/s ≥ 0.5×
#       nginx with p99 ≤ 10 ms; upload RSS growth ≤ 64 MiB. Needs local PostgreSQL (started by
#       scripts/setup.sh --embedded when it does not answer) and installs wrk and nginx-light.
#       Ends with stream-transcode.
#
#   scripts/bench.sh realtime [ACCOUNTS=1000] [RATE=100]
#       the realtime socket: RSS per idle socket with ACCOUNTS×10 sockets on one process, and
#       direct-message delivery latency between ACCOUNTS clients on two replicas joined by
#       RabbitMQ at RATE messages a second (see realtime below).
#
#   scripts/bench.sh stream-transcode [SECONDS=15] [RUNS=3]
#       range p99 and req/s idle and during the transcode of a 10-minute WAV upload, in the
#       embedded mode, with the pipeline's default scheduling (low: nice 10, rationed to
#       pipeline_share_under_load 0.25 while the API is busy), with the same unrationed
#       (share 1, the defaults before the rationing), with idle (SCHED_IDLE, share 1), and
#       with normal priority on every core (share 1); BENCH_TRANSCODE_ROWS picks some of
#       `defaults unrationed idle normal`. Target: busy p99 ≤ 1.5× idle (see
#       stream_during_transcode).
#
#   scripts/bench.sh social [SECONDS=10] [RUNS=3]
#       the social layer at scale, in a database of its own (waveline_bench_social, dropped
#       and made again each run): 10,000 accounts, 100,000 public ready tracks and 1,000,000
#       activities written with SQL (scripts/bench-social-seed.sql), and one account,
#       registered and logged in through the API, following 1,000 of them; `serve --workers 0`
#       with every rate limit off. wrk (2 threads, 8 connections, SECONDS per run, RUNS runs
#       each, alternating) on GET /v1/me/feed's first page and its 100th page, side by side
#       with the bare SQL of the PostgreSQL documents backend's feed query at the same
#       positions (pgbench, 8 clients); the same pages one at a time (1 connection); likes
#       given and taken back (PUT/DELETE /v1/me/likes/tracks/ID). Then the same feed pages with
#       the activities in a private MongoDB stand-in (nx-27017, from the venv setup.sh makes
#       under WAVELINE_STATE_DIR, default REPO/.waveline). Prints successful answers per
#       second, p50/p99 and the ratios. Target: a feed page's p99 ≤ 50 ms on PostgreSQL.
#       About 11 minutes; WAVELINE_BENCH_KEEP=1 keeps the database for EXPLAIN.
#
#   scripts/bench.sh trending [RUNS=5]
#       one computation of every chart (`waveline charts rebuild`, release) over 1,000,000
#       plays on 100,000 tracks (with 100,000 likes, 20,000 reposts and 10,000 comments;
#       scripts/bench-trending-seed.sql, in a database of its own, waveline_bench_trending),
#       side by side with the bare SQL that only reads the same engagement (the four windows'
#       sums per track, no scoring, ranking or writes) in psql, alternating, RUNS each;
#       prints medians and the ratio. About 2 minutes.
#
#   scripts/bench.sh search [SECONDS=10] [RUNS=3]
#       GET /v1/search at scale, in a database of its own (waveline_bench_search): 10,000
#       accounts, 100,000 tracks and 10,000 playlists with varied names written with SQL
#       (scripts/bench-search-seed.sql); 40 searches (whole words, prefixes as typed, accented
#       and folded words, typos) as a signed-in account, one at a time per group and mixed
#       with 8 connections (wrk), side by side with the same searches' bare SQL (pgbench);
#       each search's first page is checked against its bare SQL first. Prints p50/p99 and the
#       ratios. Target: p99 <= 20 ms one search at a time. About 8 minutes.
#   scripts/bench.sh artwork [RUNS=11] [SIDE=3000]
#       the image job's variant generation (bench/src/artwork_variants.rs: the worker's own
#       code, decode → centre square → t500x500, t300x300, large, t67x67, small → JPEG q85)
#       against ImageMagick's `convert` making the same five sizes from the same input in one
#       command (one decode, centre crop, each size resized from the square with its default
#       filter, -strip, -quality 85), on a SIDE×SIDE JPEG generated once (plasma fractal, q92).
#       RUNS runs each, alternating; wall and CPU medians, peak RSS and the ratios; ImageMagick
#       with its default threads (OpenMP, every core) and with one thread. Installs
#       imagemagick when `convert` is missing. Target: ≤ 0.5× ImageMagick's wall time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Where cargo puts what it builds (CARGO_TARGET_DIR and .cargo/config.toml included).
target_dir() {
  (cd "$root" && cargo metadata --format-version 1 --no-deps --locked) | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}
# own_copy NAME: copies the release binary NAME into $work and prints the copy's path. The runs
# start it again and again for minutes, and a build meanwhile (the target directory may be
# shared) would replace it under them.
own_copy() { mkdir -p "$work/bin" && cp "$(target_dir)/release/$1" "$work/bin/$1" && echo "$work/bin/$1"; }
shared=${WAVELINE_SHARED_DIR:-$root/../shared}
mode=${1:-}

die() { echo "bench: $*" >&2; exit 1; }
# release_build ARGS…: the release build a mode measures. BENCH_PREBUILT=1 takes the
# binaries already in the target directory as they are (a build made before the sources were
# edited, say); the mode then measures that build, not the work tree, and says so.
release_build() {
  if [ "${BENCH_PREBUILT:-}" = 1 ]; then
    echo "BENCH_PREBUILT=1: measuring the release binaries in $(target_dir)/release as built, not rebuilt from the work tree" >&2
    return 0
  fi
  (cd "$root" && cargo build --release --locked --quiet "$@")
}
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
  release_build -p waveline
  work=$(mktemp -d)  # global: the EXIT trap needs it
  trap 'rm -rf "$work"' EXIT
  local bin; bin=$(own_copy waveline)
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
  release_build -p waveline
  work=$(mktemp -d)
  trap 'rm -rf "$work"; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS waveline_bench WITH (FORCE)" >/dev/null 2>&1' EXIT
  local bin; bin=$(own_copy waveline)
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

# --- stream: range serving, status polling and upload against nginx ---------------------------

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# free_port: a port nothing listens on, below the kernel's ephemeral ports: an outgoing
# connection (wrk's, the database pool's) may hold any port in that range, and a server asked to
# listen there fails with "Address already in use".
free_port() {
  local low p
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] || low=32768
  while :; do p=$((10000 + RANDOM % (low - 10000))); port_open "$p" || { echo "$p"; return; }; done
}
# first_string FIELD <JSON: the first string value of "FIELD" in compact JSON.
first_string() { grep -o "\"$1\":\"[^\"]*\"" | head -1 | cut -d'"' -f4; }
# le VALUE BYTES: VALUE as little-endian bytes.
le() { local i out=; for ((i = 0; i < $2; i++)); do out+=$(printf '\\x%02x' $((($1 >> (8 * i)) & 255))); done; printf "$out"; }
# wav FILE BYTES: a 16-bit stereo 44.1 kHz WAV of silence, BYTES long in all.
wav() {
  local data=$(($2 - 44))
  { printf 'RIFF'; le $((data + 36)) 4; printf 'WAVEfmt '; le 16 4; le 1 2; le 2 2; le 44100 4; le 176400 4; le 4 2; le 16 2
    printf 'data'; le "$data" 4; head -c "$data" /dev/zero; } >"$1"
}
rss_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# start_serve WORKERS STORE: starts `waveline serve` on a free port; sets serve_pid and base.
# STORE is a directory (the file store) or a storage URL (s3://…).
start_serve() {
  local port store=$2; port=$(free_port)
  case "$store" in *://*) ;; *) store=file://$store ;; esac
  WAVELINE_LISTEN=127.0.0.1:$port WAVELINE_STORAGE=$store "$bin" serve --workers "$1" >>"$work/serve.log" 2>&1 &
  serve_pid=$!; serve_pids+=("$serve_pid"); base=http://127.0.0.1:$port
  local deadline=$((SECONDS + 30))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/healthz")" = 200 ]; do
    kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "waveline serve exited"; }
    [ "$SECONDS" -lt "$deadline" ] || { cat "$work/serve.log" >&2; die "waveline serve is not answering on $base"; }
    sleep 0.2
  done
}
stop_serve() { kill -TERM "$1" 2>/dev/null && wait "$1" 2>/dev/null || true; }

# stop_nginx: stops the reference and removes the config directory nginx-range.sh made.
stop_nginx() {
  [ -n "${nginx_pid:-}" ] || return 0
  local conf
  conf=$(tr '\0' ' ' <"/proc/$nginx_pid/cmdline" 2>/dev/null | grep -o -- '-c [^ ]*/nginx.conf' | cut -c4- || true)
  kill -QUIT "$nginx_pid" 2>/dev/null || true
  nginx_pid=
  if [ -n "$conf" ] && [ -f "$conf" ]; then sleep 0.3; rm -rf "$(dirname "$conf")"; fi
}

stream_cleanup() {
  local pid
  for pid in "${serve_pids[@]}"; do stop_serve "$pid"; done
  [ -z "${s3_pid:-}" ] || kill "$s3_pid" 2>/dev/null || true
  [ -z "${bare_pid:-}" ] || kill "$bare_pid" 2>/dev/null || true
  stop_nginx
  rm -rf "$work" "${www:-}"
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}

# wrk_run NAME URL SCRIPT [HEADER...]: one wrk run ($threads threads, 2 by default;
# $connections connections, 32 by default; $wrk_timeout seconds before a request counts as
# timed out, wrk's 2 by default); appends its RESULT line (see the scripts) to $work/NAME.
wrk_run() {
  local name=$1 url=$2 script=$3 h args=(); shift 3
  for h in "$@"; do args+=(-H "$h"); done
  wrk -t"${threads:-2}" -c"${connections:-32}" -d"${duration}s" --timeout "${wrk_timeout:-2}s" --latency -s "$script" "${args[@]}" "$url" >"$work/wrk.out" 2>&1 \
    || { cat "$work/wrk.out" >&2; die "wrk failed against $url"; }
  grep '^RESULT ' "$work/wrk.out" | cut -d' ' -f2- >>"$work/$name" || { cat "$work/wrk.out" >&2; die "no result from wrk"; }
}
col() { cut -d' ' -f"$1" "$work/$2" | median; }
# s3 ARGS…: curl with SigV4 request signing against the bench's S3 server (the payload is
# left unsigned, as S3 allows; curl does not hash it).
s3() {
  curl -sS --aws-sigv4 "aws:amz:us-east-1:s3" --user "$s3_access:$s3_secret" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}
# cache_objects URL: the stream cache's object count from the server's /metrics.
cache_objects() { curl -sS "$1/metrics" | awk '$1 == "waveline_stream_cache_objects" {print $2}'; }
sum_col() { cut -d' ' -f"$1" "$work/$2" | paste -sd+ | bc; }

stream() {
  duration=${1:-15}; local runs=${2:-3}
  [ -f "$shared/bench/nginx-range.sh" ] || die "the reference scripts are not at $shared/bench (set WAVELINE_SHARED_DIR)"
  export PATH=$PATH:/usr/sbin
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v ffmpeg >/dev/null || missing+=(ffmpeg)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v bc >/dev/null || missing+=(bc)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}…" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || bash "$root/scripts/setup.sh" --embedded >&2
  echo "building waveline and the bare poem reference (release)…" >&2
  release_build -p waveline -p waveline-bench
  work=$(mktemp -d) db=waveline_bench_$$ serve_pids=() nginx_pid= www= bare_pid= s3_pid=
  trap stream_cleanup EXIT
  bin=$(own_copy waveline)
  local bare_304; bare_304=$(own_copy bare-304)
  [ "$(df -Pk "$work" | awk 'NR == 2 {print $4}')" -gt $((4 * 1024 * 1024)) ] || die "the upload test needs 4 GiB free in $work"
  export WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db WAVELINE_QUEUE=memory WAVELINE_LOG=warn
  export WAVELINE_JWT_SECRET=bench-secret-$$-0123456789abcdefghijklmnopqrstuvwxyz
  export WAVELINE_UPLOAD_MAX_BYTES=$((2 << 30)) WAVELINE_ACCESS_TOKEN_TTL_S=86400
  # One client address sends every request here; the per-address limiter stays in the path
  # (it is part of what a request costs) with a ceiling this load cannot reach.
  export WAVELINE_RATE_LIMIT_PER_MINUTE=1000000000
  local store=$work/store
  WAVELINE_STORAGE=file://$store "$bin" migrate >/dev/null
  start_serve 1 "$store"
  local api=$base api_pid=$serve_pid

  echo "generating a 640 s signal and uploading it…" >&2
  bash "$shared/bench/gen-signal.sh" 640 "$work/input.flac"
  local code
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"bench@example.com","username":"bench","password":"bench-password-123"}' "$api/v1/auth/register")
  [ "$code" = 202 ] || die "register: HTTP $code $(cat "$work/resp")"
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"bench@example.com","password":"bench-password-123"}' "$api/v1/auth/login")
  [ "$code" = 200 ] || die "login: HTTP $code $(cat "$work/resp")"
  local token auth
  token=$(first_string access_token <"$work/resp"); auth="Authorization: Bearer $token"
  [ -n "$token" ] || die "login: no access_token in $(cat "$work/resp")"
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H "$auth" -F "file=@$work/input.flac" -F title=bench -F visibility=public "$api/v1/tracks")
  [ "$code" = 202 ] || die "upload: HTTP $code $(cat "$work/resp")"
  local id state=
  id=$(first_string id <"$work/resp")
  [ -n "$id" ] || die "upload: no track id in $(cat "$work/resp")"
  local deadline=$((SECONDS + 900))
  until [ "$state" = ready ]; do
    code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H "$auth" "$api/v1/tracks/$id/status")
    [ "$code" = 200 ] || die "status: HTTP $code $(cat "$work/resp")"
    state=$(first_string state <"$work/resp")
    [ "$state" != failed ] || die "processing failed: $(cat "$work/resp")"
    [ "$SECONDS" -lt "$deadline" ] || die "the track is not ready after 900 s: $(cat "$work/resp")"
    sleep 1
  done

  local mp3 size
  mp3=$(find "$store/renditions/$id" -path '*/mp3_128/*' -name '*.mp3' | head -1)
  [ -n "$mp3" ] || die "no mp3_128 rendition under $store/renditions/$id"
  size=$(stat -c %s "$mp3")
  [ "$size" -ge $((64 * 65536)) ] || die "the rendition is only $size bytes"
  www=$(mktemp -d); chmod 755 "$www"  # nginx's workers run as nobody under root
  cp "$mp3" "$www/track.mp3"; chmod 644 "$www/track.mp3"
  local nport; nport=$(free_port)
  nginx_pid=$(bash "$shared/bench/nginx-range.sh" "$www" "$nport")
  [ -n "$nginx_pid" ] && kill -0 "$nginx_pid" 2>/dev/null || die "nginx did not start"
  local wl_url=$api/v1/tracks/$id/stream/mp3_128 ng_url=http://127.0.0.1:$nport/track.mp3

  # The distributed configuration: the same rendition in a bucket of a private S3 server
  # (s3s-fs), served by `serve --workers 0` on the same database through its stream cache.
  local s3fs=${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs s3port s3url key=${mp3#"$store"/}
  [ -x "$s3fs" ] || die "no $s3fs: run scripts/setup.sh"
  s3_access=${AWS_ACCESS_KEY_ID:-waveline-test} s3_secret=${AWS_SECRET_ACCESS_KEY:-waveline-test-secret}
  s3port=$(free_port); s3url=http://127.0.0.1:$s3port; mkdir -p "$work/s3"
  "$s3fs" --host 127.0.0.1 --port "$s3port" --access-key "$s3_access" --secret-key "$s3_secret" "$work/s3" >>"$work/s3.log" 2>&1 &
  s3_pid=$!
  local deadline=$((SECONDS + 30))
  until port_open "$s3port"; do
    kill -0 "$s3_pid" 2>/dev/null || { cat "$work/s3.log" >&2; die "s3s-fs exited"; }
    [ "$SECONDS" -lt "$deadline" ] || { cat "$work/s3.log" >&2; die "s3s-fs is not answering on port $s3port after 30 s"; }
    sleep 0.1
  done
  code=$(s3 -o /dev/null -w '%{http_code}' -X PUT "$s3url/bench"); [ "$code" = 200 ] || die "creating the bucket: HTTP $code"
  code=$(s3 -o /dev/null -w '%{http_code}' -H 'Content-Type: audio/mpeg' -T "$mp3" "$s3url/bench/$key")
  [ "$code" = 200 ] || die "putting the rendition into the bucket: HTTP $code"
  local s3_store="s3://bench?endpoint=$s3url&region=us-east-1" cache_dir=$work/stream-cache
  export AWS_ACCESS_KEY_ID=$s3_access AWS_SECRET_ACCESS_KEY=$s3_secret
  # start_dist: a distributed API with an empty stream cache; sets dist_pid, dist and ds_url.
  start_dist() {
    [ -z "${dist_pid:-}" ] || stop_serve "$dist_pid"
    rm -rf "$cache_dir"
    WAVELINE_STREAM_CACHE_DIR=$cache_dir start_serve 0 "$s3_store"
    dist_pid=$serve_pid dist=$base ds_url=$base/v1/tracks/$id/stream/mp3_128
  }
  local dist_pid= dist ds_url got s3_range_url=$s3url/bench/$key

  # Cold first byte: the distributed API with an empty cache, after a HEAD of the stream (the
  # track's lookup and a connection to S3 are warm, the object is not), against a bare signed
  # GET of the same range from the S3 server; alternating which goes first.
  echo "cold first byte: $((2 * runs + 1)) samples, alternating with a bare S3 GET…" >&2
  for i in $(seq $((2 * runs + 1))); do
    start_dist
    code=$(curl -sS -o /dev/null -w '%{http_code}' -I "$ds_url"); [ "$code" = 200 ] || die "HEAD of the cold stream: HTTP $code"
    local order="waveline s3"; [ $((i % 2)) = 0 ] && order="s3 waveline"
    for server in $order; do
      if [ "$server" = s3 ]; then
        got=$(s3 -o "$work/cold.$server" -w '%{http_code} %{size_download} %{time_starttransfer}' -H 'Range: bytes=0-65535' "$s3_range_url")
      else
        got=$(curl -sS -o "$work/cold.$server" -w '%{http_code} %{size_download} %{time_starttransfer}' -H 'Range: bytes=0-65535' "$ds_url")
      fi
      [ "${got% *}" = "206 65536" ] || die "$server: a cold 64 KiB range answered '$got' (status, bytes, seconds)"
      echo "${got##* }" | awk '{printf "%.3f\n", $1 * 1000}' >>"$work/cold_$server"
    done
    cmp -s "$work/cold.s3" "$work/cold.waveline" || die "the cold range differs between S3 and waveline"
  done

  # Hot: the distributed API once it holds the rendition.
  start_dist
  curl -sS -o "$work/whole.dist" "$ds_url" && cmp -s "$work/whole.dist" "$mp3" || die "the distributed stream differs from the rendition"
  deadline=$((SECONDS + 30))
  until [ "$(cache_objects "$dist")" = 1 ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "the stream cache does not hold the rendition after 30 s"
    sleep 0.1
  done
  got=$(curl -sS -o "$work/range.dist" -w '%{http_code} %{size_download}' -H "$auth" -H 'Range: bytes=65536-131071' "$ds_url")
  [ "$got" = "206 65536" ] || die "distributed, signed in: a 64 KiB range answered '$got'"

  # Both must answer a range with 206 and the same 65536 bytes, and the whole file must match.
  local first=$(((size / 65536 / 2) * 65536)) got
  for server in nginx waveline; do
    local url=$ng_url; [ "$server" = waveline ] && url=$wl_url
    got=$(curl -sS -o "$work/range.$server" -w '%{http_code} %{size_download}' -H "Range: bytes=$first-$((first + 65535))" "$url")
    [ "$got" = "206 65536" ] || die "$server: a 64 KiB range answered '$got' (status, bytes), expected '206 65536'"
  done
  cmp -s "$work/range.nginx" "$work/range.waveline" || die "the same range differs between nginx and waveline"
  curl -sS -o "$work/whole" "$wl_url" && cmp -s "$work/whole" "$mp3" || die "waveline's whole stream differs from the stored rendition"

  range_lua "$work/range.lua" "$size"
  echo "range serving: warming up, then $runs runs of ${duration}s each, alternating…" >&2
  local saved=$duration; duration=3
  wrk_run warmup "$ng_url" "$work/range.lua"; wrk_run warmup "$wl_url" "$work/range.lua"
  wrk_run warmup "$ds_url" "$work/range.lua"; wrk_run warmup "$ds_url" "$work/range.lua" "$auth"
  duration=$saved
  for i in $(seq "$runs"); do
    echo "run $i/$runs…" >&2
    wrk_run nginx "$ng_url" "$work/range.lua"
    wrk_run waveline "$wl_url" "$work/range.lua"
    wrk_run dist_anon "$ds_url" "$work/range.lua"
    wrk_run dist_bearer "$ds_url" "$work/range.lua" "$auth"
  done
  local cache_hits
  cache_hits=$(curl -sS "$dist/metrics" | awk '$1 == "waveline_stream_cache_hits_total" {print $2}')
  stop_serve "$dist_pid"; kill "$s3_pid" 2>/dev/null; wait "$s3_pid" 2>/dev/null || true; s3_pid=

  # Status polling: the owner's client revalidates with If-None-Match.
  local etag
  etag=$(curl -sS -D - -o /dev/null -H "$auth" "$api/v1/tracks/$id/status" | tr -d '\r' | awk -F': ' 'tolower($1) == "etag" {print $2}')
  [ -n "$etag" ] || die "status: no ETag header"
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H "$auth" -H "If-None-Match: $etag" "$api/v1/tracks/$id/status")
  [ "$code" = 304 ] || die "status with If-None-Match: $etag answered HTTP $code, expected 304"
  cat >"$work/status.lua" <<'LUA'
-- Counts the answers that are not 304; RESULT's first field is 304s per second.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) other = 0 end
function response(status, headers, body) if status ~= 304 then other = other + 1 end end
function done(summary, latency, requests)
  local bad, e, secs = 0, summary.errors, summary.duration / 1e6
  for _, thread in ipairs(threads) do bad = bad + thread:get("other") end
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d %.0f\n", (summary.requests - bad) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, bad,
    e.connect + e.read + e.write + e.timeout, summary.bytes / math.max(summary.requests, 1)))
end
LUA
  # The reference: a bare poem handler answering the same poll (bench/src/bare_304.rs).
  local bare_port bare_etag='"5d41402abc4b2a76b9719d911017c592"'
  bare_port=$(free_port)
  "$bare_304" "127.0.0.1:$bare_port" &
  bare_pid=$!
  local tries=0
  until port_open "$bare_port"; do tries=$((tries + 1)); [ "$tries" -lt 100 ] || die "bare-304 did not start"; sleep 0.1; done
  echo "status polling: $runs runs of ${duration}s each, alternating with a bare poem 304 handler…" >&2
  wrk_run warmup "http://127.0.0.1:$bare_port/v1/tracks/x/status" "$work/status.lua" "If-None-Match: $bare_etag"
  wrk_run warmup "$api/v1/tracks/$id/status" "$work/status.lua" "$auth" "If-None-Match: $etag"
  for i in $(seq "$runs"); do
    wrk_run bare "http://127.0.0.1:$bare_port/v1/tracks/x/status" "$work/status.lua" "If-None-Match: $bare_etag"
    wrk_run status "$api/v1/tracks/$id/status" "$work/status.lua" "$auth" "If-None-Match: $etag"
  done
  kill "$bare_pid" 2>/dev/null; wait "$bare_pid" 2>/dev/null || true
  stop_nginx
  stop_serve "$api_pid"

  # Upload: an API-only instance (--workers 0) only stores and queues, so no processing runs.
  echo "upload: $runs streaming uploads of 1 GiB…" >&2
  local store2=$work/store-upload
  WAVELINE_STORAGE=file://$store2 "$bin" migrate >/dev/null
  start_serve 0 "$store2"
  wav "$work/small.wav" $((1 << 20)); wav "$work/big.wav" $((1 << 30))
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H "$auth" -F "file=@$work/small.wav;type=audio/wav" "$base/v1/tracks")
  [ "$code" = 202 ] || die "upload (1 MiB warm-up): HTTP $code $(cat "$work/resp")"
  local rss0 hwm0 hwm1 stored
  rss0=$(rss_kib "$serve_pid" VmRSS); hwm0=$(rss_kib "$serve_pid" VmHWM)
  echo 5 >"/proc/$serve_pid/clear_refs" 2>/dev/null || true  # resets VmHWM to the current RSS where allowed
  for i in $(seq "$runs"); do
    got=$(curl -sS -o "$work/resp" -w '%{http_code} %{time_total} %{size_upload}' -H "$auth" \
      -F "file=@$work/big.wav;type=audio/wav" -F visibility=private "$base/v1/tracks")
    [ "${got%% *}" = 202 ] || die "upload (1 GiB): HTTP ${got%% *} $(cat "$work/resp")"
    id=$(first_string id <"$work/resp")
    stored=$(find "$store2" -type f -size +1000M -newer "$work/small.wav" -printf '%s\n' | sort -n | tail -1)
    echo "$got" | awk '{printf "%.2f %.1f\n", $2, $3 / $2 / 1048576}' >>"$work/upload"
    [ "${stored:-0}" = $((1 << 30)) ] || die "upload (1 GiB): the store holds ${stored:-no} bytes, expected $((1 << 30))"
    find "$store2" -type f -size +1000M -delete  # keep the disk use to one copy
  done
  hwm1=$(rss_kib "$serve_pid" VmHWM)
  stop_serve "$serve_pid"

  # Medians and the tables.
  local nr n50 n99 wr w50 w99 sr s50 s99 ut ur growth ratio
  nr=$(col 1 nginx); n50=$(col 2 nginx); n99=$(col 3 nginx)
  wr=$(col 1 waveline); w50=$(col 2 waveline); w99=$(col 3 waveline)
  local ar a50 a99 aratio tr t50 t99 tratio cw cs cdiff
  ar=$(col 1 dist_anon); a50=$(col 2 dist_anon); a99=$(col 3 dist_anon); aratio=$(echo "$ar / $nr" | bc -l)
  tr=$(col 1 dist_bearer); t50=$(col 2 dist_bearer); t99=$(col 3 dist_bearer); tratio=$(echo "$tr / $nr" | bc -l)
  cw=$(median <"$work/cold_waveline"); cs=$(median <"$work/cold_s3"); cdiff=$(echo "$cw - $cs" | bc -l)
  sr=$(col 1 status); s50=$(col 2 status); s99=$(col 3 status)
  local br b50 b99 sratio
  br=$(col 1 bare); b50=$(col 2 bare); b99=$(col 3 bare)
  sratio=$(echo "$sr / $br" | bc -l)
  ut=$(col 1 upload); ur=$(col 2 upload)
  ratio=$(echo "$wr / $nr" | bc -l)
  growth=$(echo "($hwm1 - $rss0) / 1024" | bc -l)
  mark() { if [ "$1" = 1 ]; then echo met; else echo "**missed**"; fi; }
  echo
  echo "stream: a $(echo "$size / 1048576" | bc -l | xargs printf %.1f) MiB MP3 (the mp3_128 rendition of a 640 s upload); wrk 2 threads, 32 connections, ${duration} s per run, $runs runs each, alternating; medians ($(nproc) cores, wrk on the same machine)"
  echo
  echo "| random 64 KiB range GETs | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  printf "| nginx %s (sendfile) | %.0f | %.2f | %.2f |\n" "$(nginx -v 2>&1 | sed 's|.*/||')" "$nr" "$n50" "$n99"
  printf "| waveline serve (file store) | %.0f | %.2f | %.2f |\n" "$wr" "$w50" "$w99"
  printf "| waveline serve (S3 store, stream cache hot), anonymous | %.0f | %.2f | %.2f |\n" "$ar" "$a50" "$a99"
  printf "| waveline serve (S3 store, stream cache hot), Bearer token | %.0f | %.2f | %.2f |\n" "$tr" "$t50" "$t99"
  printf "| ratio waveline / nginx: file store, anonymous | **%.2f×** | %.2f× | %.2f× |\n" "$ratio" "$(echo "$w50 / $n50" | bc -l)" "$(echo "$w99 / $n99" | bc -l)"
  printf "| ratio waveline / nginx: S3 + cache, anonymous | **%.2f×** | %.2f× | %.2f× |\n" "$aratio" "$(echo "$a50 / $n50" | bc -l)" "$(echo "$a99 / $n99" | bc -l)"
  printf "| ratio waveline / nginx: S3 + cache, Bearer token | **%.2f×** | %.2f× | %.2f× |\n" "$tratio" "$(echo "$t50 / $n50" | bc -l)" "$(echo "$t99 / $n99" | bc -l)"
  echo
  echo "| cold first byte of bytes=0-65535 ($((2 * runs + 1)) samples, alternating) | median ms | min ms | max ms |"
  echo "|---|---:|---:|---:|"
  printf "| bare SigV4-signed GET from the S3 server (s3s-fs) | %.2f | %.2f | %.2f |\n" "$cs" "$(sort -g "$work/cold_s3" | head -1)" "$(sort -g "$work/cold_s3" | tail -1)"
  printf "| waveline serve (S3 store), empty stream cache | %.2f | %.2f | %.2f |\n" "$cw" "$(sort -g "$work/cold_waveline" | head -1)" "$(sort -g "$work/cold_waveline" | tail -1)"
  printf "| difference of the medians | %+.2f | | |\n" "$cdiff"
  echo
  echo "| status polling with If-None-Match | 304/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  printf "| bare poem handler answering 304 (bench/src/bare_304.rs) | %.0f | %.2f | %.2f |\n" "$br" "$b50" "$b99"
  printf "| waveline serve, GET /v1/tracks/ID/status (Bearer token) | %.0f | %.2f | %.2f |\n" "$sr" "$s50" "$s99"
  printf "| ratio waveline / bare poem | **%.2f×** | %.2f× | %.2f× |\n" "$sratio" "$(echo "$s50 / $b50" | bc -l)" "$(echo "$s99 / $b99" | bc -l)"
  echo
  echo "| 1 GiB streaming multipart upload (serve --workers 0) | s | MiB/s | RSS before MiB | peak RSS MiB | growth MiB |"
  echo "|---|---:|---:|---:|---:|---:|"
  printf "| waveline serve, POST /v1/tracks (median of %d) | %.2f | %.0f | %.1f | %.1f | %.1f |\n" \
    "$runs" "$ut" "$ur" "$(echo "$rss0 / 1024" | bc -l)" "$(echo "$hwm1 / 1024" | bc -l)" "$growth"
  echo
  echo "| target | measured | |"
  echo "|---|---:|---|"
  printf "| range req/s ≥ 0.5× nginx | %.2f× | %s |\n" "$ratio" "$(mark "$(echo "$ratio >= 0.5" | bc -l)")"
  printf "| range p99 ≤ 10 ms | %.2f ms | %s |\n" "$w99" "$(mark "$(echo "$w99 <= 10" | bc -l)")"
  printf "| S3 + cache, anonymous: range req/s ≥ 0.5× nginx | %.2f× | %s |\n" "$aratio" "$(mark "$(echo "$aratio >= 0.5" | bc -l)")"
  printf "| S3 + cache, Bearer token: range req/s ≥ 0.5× nginx | %.2f× | %s |\n" "$tratio" "$(mark "$(echo "$tratio >= 0.5" | bc -l)")"
  printf "| S3 + cache: range p99 ≤ 10 ms (anonymous, Bearer) | %.2f, %.2f ms | %s |\n" "$a99" "$t99" "$(mark "$(echo "$a99 <= 10 && $t99 <= 10" | bc -l)")"
  printf "| cold first byte ≤ S3's own + 5 ms | %+.2f ms | %s |\n" "$cdiff" "$(mark "$(echo "$cdiff <= 5" | bc -l)")"
  printf "| status polls ≥ 0.5× a bare poem 304 handler | %.2f× | %s |\n" "$sratio" "$(mark "$(echo "$sratio >= 0.5" | bc -l)")"
  printf "| upload RSS growth ≤ 64 MiB | %.1f MiB | %s |\n" "$growth" "$(mark "$(echo "$growth <= 64" | bc -l)")"
  echo
  local bad
  bad=$(( $(sum_col 4 nginx) + $(sum_col 5 nginx) + $(sum_col 4 waveline) + $(sum_col 5 waveline) + $(sum_col 4 status) + $(sum_col 5 status) + $(sum_col 4 bare) + $(sum_col 5 bare) ))
  bad=$(( bad + $(sum_col 4 dist_anon) + $(sum_col 5 dist_anon) + $(sum_col 4 dist_bearer) + $(sum_col 5 dist_bearer) ))
  [ "$bad" = 0 ] || echo "WARNING: $bad failed answers (HTTP ≥ 400, socket errors, or non-304 status polls): see the runs below"
  echo "bytes per answer (median; headers included): nginx $(col 6 nginx), waveline $(col 6 waveline), status 304 $(col 6 status)"
  echo "VmHWM before the upload: $((hwm0 / 1024)) MiB (includes start-up and the 1 MiB warm-up upload; reset before the 1 GiB uploads where /proc allows)"
  echo "every run (req/s p50-ms p99-ms http-errors socket-errors bytes/answer): nginx: $(paste -sd';' "$work/nginx") waveline: $(paste -sd';' "$work/waveline") S3+cache anonymous: $(paste -sd';' "$work/dist_anon") S3+cache Bearer: $(paste -sd';' "$work/dist_bearer") status: $(paste -sd';' "$work/status") bare 304: $(paste -sd';' "$work/bare")"
  echo "every cold first byte (ms): S3: $(paste -sd';' "$work/cold_s3") waveline: $(paste -sd';' "$work/cold_waveline"); stream cache hits after the hot runs: ${cache_hits:-?}"
  echo "load while measuring (uptime at the end): $(uptime)"
  echo "every upload (s MiB/s): $(paste -sd';' "$work/upload")"
  stream_during_transcode "$duration" "$runs"
}

# --- stream during a transcode: playback while the embedded pipeline works ---------------------

# range_lua OUT SIZE: the wrk script of the range runs: a random 64 KiB-aligned 64 KiB range of
# a SIZE-byte file per request; its RESULT line is "successful answers/s p50-ms p99-ms
# http-errors socket-errors bytes/answer".
range_lua() {
  cat >"$1" <<LUA
local blocks, counter = math.floor($2 / 65536), 0
function setup(thread) counter = counter + 1; thread:set("thread_id", counter) end
function init(args) math.randomseed(os.time() * 97 + thread_id) end
function request()
  local first = math.random(0, blocks - 1) * 65536
  wrk.headers["Range"] = "bytes=" .. first .. "-" .. (first + 65535)
  return wrk.format()
end
function done(summary, latency, requests)
  local e, secs = summary.errors, summary.duration / 1e6
  -- Successful answers only: e.status counts the answers with a status of 400 or more.
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d %.0f\n", (summary.requests - e.status) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, e.status,
    e.connect + e.read + e.write + e.timeout, summary.bytes / math.max(summary.requests, 1)))
end
LUA
}

now_s() { date +%s.%N; }

# track_state API AUTH ID: the track's state.
track_state() {
  curl -sS -H "$2" "$1/v1/tracks/$3/status" | first_string state
}

# transcode_upload API AUTH WAV: uploads WAV as a public track; prints its id.
transcode_upload() {
  local code id
  code=$(curl -sS -o "$work/tr.resp" -w '%{http_code}' -H "$2" -F "file=@$3;type=audio/wav" -F title=transcode \
    -F visibility=public "$1/v1/tracks")
  [ "$code" = 202 ] || die "upload: HTTP $code $(cat "$work/tr.resp")"
  id=$(first_string id <"$work/tr.resp")
  [ -n "$id" ] || die "upload: no track id in $(cat "$work/tr.resp")"
  echo "$id"
}

# wait_state API AUTH ID STATE…: waits (at most 900 s) until the track is in one of STATEs.
wait_state() {
  local api=$1 auth=$2 id=$3 state deadline=$((SECONDS + 900)); shift 3
  while :; do
    state=$(track_state "$api" "$auth" "$id")
    [ "$state" != failed ] || die "the transcode of $id failed: $(curl -sS -H "$auth" "$api/v1/tracks/$id/status")"
    case " $* " in *" $state "*) return 0 ;; esac
    [ "$SECONDS" -lt "$deadline" ] || die "$id is still $state after 900 s"
    sleep 0.1
  done
}

# stream_during_transcode [SECONDS=15] [RUNS=3]: issue 12's "playback that transcoding cannot
# starve". On the embedded configuration (serve --workers 1, file store, in-process queue),
# random 64 KiB ranges (wrk 2 threads, 32 connections, SECONDS per run) of a ready track's
# mp3_128, idle and while a 10-minute WAV upload transcodes, RUNS of each, alternating; with
# the pipeline's embedded defaults (pipeline_priority low, i.e. nice 10, pipeline_threads =
# cores - 1, pipeline_share_under_load 0.25), the same with share 1, with `idle` (SCHED_IDLE)
# in place of `low`, and as serve ran at first (normal priority, every core). Prints p99 idle and busy,
# their ratio, req/s, and the transcode's wall time (upload accepted to ready) alone and under
# the range load. Target: busy p99 <= 1.5x idle. Runs on its own (`scripts/bench.sh
# stream-transcode`) or at the end of stream(), whose set-up it reuses.
stream_during_transcode() {
  duration=${1:-${duration:-15}}; local runs=${2:-3}
  if [ -z "${bin:-}" ]; then
    export PATH=$PATH:/usr/sbin
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v ffmpeg >/dev/null || missing+=(ffmpeg)
    command -v psql >/dev/null || missing+=(postgresql-client)
    command -v bc >/dev/null || missing+=(bc)
    if [ "${#missing[@]}" -gt 0 ]; then
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || bash "$root/scripts/setup.sh" --embedded >&2
    echo "building waveline (release)…" >&2
    release_build -p waveline
    work=$(mktemp -d) db=waveline_bench_$$ serve_pids=() nginx_pid= www= bare_pid=
    trap stream_cleanup EXIT
    bin=$(own_copy waveline)
    export WAVELINE_QUEUE=memory WAVELINE_LOG=warn WAVELINE_ACCESS_TOKEN_TTL_S=86400
    export WAVELINE_JWT_SECRET=bench-secret-$$-0123456789abcdefghijklmnopqrstuvwxyz
    export WAVELINE_RATE_LIMIT_PER_MINUTE=1000000000
  fi
  # A database of its own: stream()'s holds tracks queued by its upload test (--workers 0).
  local tdb=${db}_transcode previous
  previous=$(trap -p EXIT); previous=${previous#trap -- \'}; previous=${previous%\' EXIT}
  trap "psql -h 127.0.0.1 -U postgres -qc 'DROP DATABASE IF EXISTS $tdb WITH (FORCE)' >/dev/null 2>&1 || true; $previous" EXIT
  local cores; cores=$(nproc)
  echo "stream during a transcode: generating a 600 s WAV…" >&2
  bash "$shared/bench/gen-signal.sh" 600 "$work/transcode.wav"
  local load_before; load_before=$(uptime)

  local label rows=() i
  for label in ${BENCH_TRANSCODE_ROWS:-defaults unrationed idle normal}; do
    local store=$work/store-transcode-$label
    unset WAVELINE_PIPELINE_PRIORITY WAVELINE_PIPELINE_THREADS WAVELINE_PIPELINE_SHARE_UNDER_LOAD
    case $label in
      defaults) ;;
      unrationed) export WAVELINE_PIPELINE_SHARE_UNDER_LOAD=1 ;;
      idle) export WAVELINE_PIPELINE_PRIORITY=idle WAVELINE_PIPELINE_SHARE_UNDER_LOAD=1 ;;
      normal) export WAVELINE_PIPELINE_PRIORITY=normal WAVELINE_PIPELINE_THREADS=$cores WAVELINE_PIPELINE_SHARE_UNDER_LOAD=1 ;;
      *) die "BENCH_TRANSCODE_ROWS: unknown row $label (defaults, unrationed, idle, normal)" ;;
    esac
    WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$tdb WAVELINE_STORAGE=file://$store "$bin" migrate >/dev/null
    WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$tdb start_serve 1 "$store"
    local api=$base code token auth
    code=$(curl -sS -o "$work/tr.resp" -w '%{http_code}' -H 'Content-Type: application/json' \
      -d "{\"email\":\"tr-$label@example.com\",\"username\":\"tr_$label\",\"password\":\"bench-password-123\"}" "$api/v1/auth/register")
    [ "$code" = 202 ] || die "register: HTTP $code $(cat "$work/tr.resp")"
    code=$(curl -sS -o "$work/tr.resp" -w '%{http_code}' -H 'Content-Type: application/json' \
      -d "{\"email\":\"tr-$label@example.com\",\"password\":\"bench-password-123\"}" "$api/v1/auth/login")
    [ "$code" = 200 ] || die "login: HTTP $code $(cat "$work/tr.resp")"
    token=$(first_string access_token <"$work/tr.resp"); auth="Authorization: Bearer $token"

    # The first transcode runs alone: its wall time is the baseline, its mp3_128 the ranges' file.
    echo "[$label] a transcode alone…" >&2
    local t0 id ref mp3 size
    t0=$(now_s); ref=$(transcode_upload "$api" "$auth" "$work/transcode.wav")
    wait_state "$api" "$auth" "$ref" ready
    echo "$(now_s) - $t0" | bc -l >>"$work/tr_alone_$label"
    mp3=$(find "$store/renditions/$ref" -path '*/mp3_128/*' -name '*.mp3' | head -1)
    [ -n "$mp3" ] || die "no mp3_128 rendition under $store/renditions/$ref"
    size=$(stat -c %s "$mp3")
    range_lua "$work/tr_range.lua" "$size"
    local url=$api/v1/tracks/$ref/stream/mp3_128 saved=$duration
    duration=3; wrk_run tr_warmup "$url" "$work/tr_range.lua"; duration=$saved
    for i in $(seq "$runs"); do
      echo "[$label] run $i/$runs: ranges idle, then during a transcode…" >&2
      wrk_run "tr_idle_$label" "$url" "$work/tr_range.lua"
      t0=$(now_s); id=$(transcode_upload "$api" "$auth" "$work/transcode.wav")
      wait_state "$api" "$auth" "$id" processing ready
      [ "$(track_state "$api" "$auth" "$id")" = processing ] || die "the transcode ended before the ranges started"
      wrk_run "tr_busy_$label" "$url" "$work/tr_range.lua"
      [ "$(track_state "$api" "$auth" "$id")" = processing ] \
        || echo "WARNING [$label] run $i: the transcode ended before the ranges did; its busy figures are partly idle" >&2
      wait_state "$api" "$auth" "$id" ready
      echo "$(now_s) - $t0" | bc -l >>"$work/tr_wall_$label"
    done
    stop_serve "$serve_pid"
    rows+=("$label")
  done
  unset WAVELINE_PIPELINE_PRIORITY WAVELINE_PIPELINE_THREADS WAVELINE_PIPELINE_SHARE_UNDER_LOAD
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $tdb WITH (FORCE)" >/dev/null 2>&1 || true

  echo
  echo "stream during a transcode: a $(echo "$size / 1048576" | bc -l | xargs printf %.1f) MiB MP3 (the mp3_128 of a 600 s WAV upload) served by \`serve --workers 1\` (file store), random 64 KiB ranges, wrk 2 threads, 32 connections, ${duration} s per run, $runs runs of each, idle and busy alternating, each busy run during the transcode of another upload of the same 600 s WAV ($(( $(stat -c %s "$work/transcode.wav") / 1000000 )) MB); medians ($cores cores, wrk on the same machine)"
  echo
  echo "| pipeline scheduling | idle req/s | idle p99 ms | busy req/s | busy p99 ms | p99 busy/idle | transcode alone s | transcode under ranges s |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  local ir i99 br b99 ratio name target=
  for label in "${rows[@]}"; do
    ir=$(col 1 "tr_idle_$label"); i99=$(col 3 "tr_idle_$label"); br=$(col 1 "tr_busy_$label"); b99=$(col 3 "tr_busy_$label")
    ratio=$(echo "$b99 / $i99" | bc -l)
    case $label in
      defaults) name="embedded defaults: pipeline_priority low (nice 10), pipeline_threads $(( cores > 1 ? cores - 1 : 1 )), pipeline_share_under_load 0.25"; target=$ratio ;;
      unrationed) name="low, pipeline_threads $(( cores > 1 ? cores - 1 : 1 )), share 1 (no rationing: the defaults before it)" ;;
      idle) name="pipeline_priority idle (SCHED_IDLE), pipeline_threads $(( cores > 1 ? cores - 1 : 1 )), share 1" ;;
      *) name="pipeline_priority normal, pipeline_threads $cores, share 1 (as serve was at first)" ;;
    esac
    printf "| %s | %.0f | %.2f | %.0f | %.2f | **%.2f×** | %.1f | %.1f |\n" "$name" "$ir" "$i99" "$br" "$b99" "$ratio" \
      "$(col 1 "tr_alone_$label")" "$(col 1 "tr_wall_$label")"
  done
  echo
  if [ -n "$target" ]; then
    printf "| target | measured | |\n|---|---:|---|\n| range p99 during a transcode ≤ 1.5× idle (embedded defaults) | %.2f× | %s |\n" \
      "$target" "$(if [ "$(echo "$target <= 1.5" | bc -l)" = 1 ]; then echo met; else echo "**missed**"; fi)"
  fi
  echo
  local bad=0
  for label in "${rows[@]}"; do
    bad=$((bad + $(sum_col 4 "tr_idle_$label") + $(sum_col 5 "tr_idle_$label") + $(sum_col 4 "tr_busy_$label") + $(sum_col 5 "tr_busy_$label")))
  done
  [ "$bad" = 0 ] || echo "WARNING: $bad failed answers (HTTP ≥ 400 or socket errors): see the runs below"
  echo "load: before: ${load_before##*load average: }; after: $(uptime | sed 's/.*load average: //')"
  for label in "${rows[@]}"; do
    echo "every run [$label] (req/s p50-ms p99-ms http-errors socket-errors bytes/answer): idle: $(paste -sd';' "$work/tr_idle_$label") busy: $(paste -sd';' "$work/tr_busy_$label"); transcodes under ranges (s): $(xargs printf '%.1f ' <"$work/tr_wall_$label")"
  done
}

# --- social: the feed and likes at scale ---------------------------------------------------------

# expect_lua OUT STATUS: a wrk script counting only answers with STATUS; its RESULT line is
# "STATUS answers/s p50-ms p99-ms other-answers socket-errors bytes/answer".
expect_lua() {
  cat >"$1" <<LUA
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) other = 0 end
function response(status, headers, body) if status ~= $2 then other = other + 1 end end
function done(summary, latency, requests)
  local bad, e, secs = 0, summary.errors, summary.duration / 1e6
  for _, thread in ipairs(threads) do bad = bad + thread:get("other") end
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d %.0f\n", (summary.requests - bad) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, bad,
    e.connect + e.read + e.write + e.timeout, summary.bytes / math.max(summary.requests, 1)))
end
LUA
}

# likes_lua OUT IDS: the like/unlike script: each thread likes a random track of the file IDS
# (one id a line), then takes the like back, and again; only 204s count (RESULT as above). Run
# it with one connection per thread, so that each like is taken back after it was given.
likes_lua() {
  { printf 'local ids = {'; sed 's/.*/"&",/' "$2" | tr -d '\n'; printf '}\n'; cat <<'LUA'
local threads, counter = {}, 0
function setup(thread) counter = counter + 1; thread:set("thread_id", counter); table.insert(threads, thread) end
function init(args) math.randomseed(os.time() * 97 + thread_id); other = 0 end
function request()
  if liked then
    local id = liked; liked = nil
    return wrk.format("DELETE", "/v1/me/likes/tracks/" .. id)
  end
  liked = ids[math.random(#ids)]
  return wrk.format("PUT", "/v1/me/likes/tracks/" .. liked)
end
function response(status, headers, body) if status ~= 204 then other = other + 1 end end
function done(summary, latency, requests)
  local bad, e, secs = 0, summary.errors, summary.duration / 1e6
  for _, thread in ipairs(threads) do bad = bad + thread:get("other") end
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d %.0f\n", (summary.requests - bad) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, bad,
    e.connect + e.read + e.write + e.timeout, summary.bytes / math.max(summary.requests, 1)))
end
LUA
  } >"$1"
}

# pgbench_run NAME SCRIPT [-D VAR=VALUE...]: one pgbench run of SCRIPT against $db ($clients
# clients, 2 threads, prepared statements, SECONDS); appends "transactions/s p50-ms p99-ms
# failed 0 0" to $work/NAME (the latencies from pgbench's per-transaction log).
pgbench_run() {
  local name=$1 script=$2; shift 2
  rm -f "$work"/pgb.log*
  pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$connections" -j 2 -T "$duration" -l --log-prefix="$work/pgb.log" \
    -f "$script" "$@" "$db" >"$work/pgbench.out" 2>&1 || { cat "$work/pgbench.out" >&2; die "pgbench failed ($script)"; }
  local tps failed
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$work/pgbench.out")
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$work/pgbench.out")
  [ -n "$tps" ] || { cat "$work/pgbench.out" >&2; die "no tps from pgbench"; }
  cat "$work"/pgb.log* | awk '{print $3 / 1000}' | sort -g | awk -v tps="$tps" -v failed="${failed:-0}" \
    '{a[NR] = $1} END {if (NR == 0) exit 1; printf "%.1f %.3f %.3f %d 0 0\n", tps, a[int(NR * 0.5) + (NR % 2)], a[int(NR * 0.99 + 0.999)], failed}' \
    >>"$work/$name" || die "pgbench logged no transactions ($script)"
}

# api_get URL [CURL-ARG...]: the body of a GET that must answer 200 (else the bench stops,
# naming the status and the body).
api_get() {
  local url=$1 code; shift
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' "$@" "$url") || die "GET $url: curl failed"
  [ "$code" = 200 ] || die "GET $url: HTTP $code $(head -c 2000 "$work/resp")"
  cat "$work/resp"
}

# activity_ids: the activity ids of a feed page (the JSON on stdin), in order.
activity_ids() { python3 -c 'import json, sys; [print(a["id"]) for a in json.load(sys.stdin)["activities"]]'; }

# social [SECONDS=10] [RUNS=3]: the social layer at scale. A database of its own with
# 10,000 accounts, 100,000 public ready tracks and 1,000,000 activities (written with SQL:
# scripts/bench-social-seed.sql), one account (registered and logged in through the API)
# following 1,000 of them; `serve --workers 0` with every rate limit off. Measures with wrk
# (2 threads, 8 connections, SECONDS per run, RUNS runs each, alternating) the feed's first
# page and its 100th page, side by side with the bare SQL of the documents backend's feed
# query at the same positions (pgbench, 8 clients), and likes taken and taken back; then the
# same feed pages with the documents in a private MongoDB stand-in (nx-27017 from the venv of
# scripts/setup.sh) holding the same activities. Target: a feed page's p99 <= 50 ms on
# PostgreSQL. WAVELINE_BENCH_KEEP=1 keeps the database (and the stand-in's file) for EXPLAIN;
# WAVELINE_BENCH_MONGO_SEED_S (default 420) bounds the stand-in's seeding, newest activities
# first.
social() {
  duration=${1:-10}; local runs=${2:-3}
  local users=10000 tracks=100000 activities=1000000 followed=1000 depth=100
  local started=$SECONDS
  export PATH=$PATH:/usr/sbin
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v pgbench >/dev/null || missing+=(postgresql)
  command -v bc >/dev/null || missing+=(bc)
  command -v python3 >/dev/null || missing+=(python3-venv)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}…" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || bash "$root/scripts/setup.sh" --embedded >&2
  # The MongoDB stand-in and pymongo live in the venv scripts/setup.sh makes.
  local venv=${WAVELINE_STATE_DIR:-$root/.waveline}/venv
  [ -x "$venv/bin/nx-27017" ] || die "no MongoDB stand-in at $venv/bin/nx-27017: run scripts/setup.sh (or set WAVELINE_STATE_DIR to its state directory)"
  "$venv/bin/python" -c 'import pymongo' 2>/dev/null || {
    echo "installing pymongo into $venv…" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check pymongo
  }
  echo "building waveline (release)…" >&2
  release_build -p waveline
  work=$(mktemp -d) db=waveline_bench_social serve_pids=() mongo_pid=
  trap social_cleanup EXIT
  bin=$(own_copy waveline)
  export WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db WAVELINE_QUEUE=memory WAVELINE_LOG=warn
  export WAVELINE_STORAGE=file://$work/store WAVELINE_DOCUMENTS=postgres WAVELINE_ACCESS_TOKEN_TTL_S=86400
  export WAVELINE_JWT_SECRET=bench-secret-$$-0123456789abcdefghijklmnopqrstuvwxyz
  export WAVELINE_RATE_LIMIT_PER_MINUTE=0 WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE=0 WAVELINE_SOCIAL_WRITES_PER_MINUTE=0
  local load_before; load_before=$(uptime | sed 's/.*load average: //')

  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  "$bin" migrate >/dev/null
  start_serve 0 "$work/store"
  local api=$base code token auth viewer
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"viewer@example.com","username":"viewer","password":"bench-password-123"}' "$api/v1/auth/register")
  [ "$code" = 202 ] || die "register: HTTP $code $(cat "$work/resp")"
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"viewer@example.com","password":"bench-password-123"}' "$api/v1/auth/login")
  [ "$code" = 200 ] || die "login: HTTP $code $(cat "$work/resp")"
  token=$(first_string access_token <"$work/resp"); auth="Authorization: Bearer $token"
  [ -n "$token" ] || die "login: no access_token in $(cat "$work/resp")"
  viewer=$(api_get "$api/v1/me" -H "$auth" | first_string id)
  [ -n "$viewer" ] || die "GET /v1/me: no id"

  echo "seeding $users accounts, $tracks tracks, $activities activities (SQL)…" >&2
  local t0=$SECONDS seed_s vacuum_s
  psql -h 127.0.0.1 -U postgres -X -v users=$users -v tracks=$tracks -v activities=$activities -v followed=$followed \
    -v viewer="$viewer" -f "$root/scripts/bench-social-seed.sql" "$db" >"$work/seed.out" 2>&1 \
    || { cat "$work/seed.out" >&2; die "seeding failed"; }
  seed_s=$((SECONDS - t0)); t0=$SECONDS
  # As autovacuum leaves a table of old rows: all-visible (the feed's scans index-only) and
  # analyzed.
  psql -h 127.0.0.1 -U postgres -X -qc 'VACUUM (ANALYZE)' "$db" >/dev/null
  vacuum_s=$((SECONDS - t0))
  local counts
  counts=$(psql -h 127.0.0.1 -U postgres -X -Atc "SELECT (SELECT count(*) FROM users WHERE role = 'user'),
      (SELECT count(*) FROM tracks WHERE state = 'ready' AND visibility = 'public'), (SELECT count(*) FROM activity_documents),
      (SELECT count(*) FROM follows WHERE follower_id = '$viewer'),
      (SELECT count(*) FROM activity_documents a JOIN follows f ON f.followee_id = a.actor AND f.follower_id = '$viewer')" "$db")
  [ "${counts%|*}" = "$((users + 1))|$tracks|$activities|$followed" ] || die "seeded counts (accounts|tracks|activities|followed|their activities): $counts"
  local followed_activities=${counts##*|}

  # The first page, then ~100 pages down by next_cursor.
  local first_url="$api/v1/me/feed?limit=20" cursor page items=0 i
  page=$(api_get "$first_url" -H "$auth")
  echo "$page" | activity_ids >"$work/first.ids"
  [ "$(wc -l <"$work/first.ids")" = 20 ] || die "the first feed page holds $(wc -l <"$work/first.ids") activities, not 20: $page"
  for i in $(seq 2 "$depth"); do
    items=$((items + $(echo "$page" | activity_ids | wc -l)))
    cursor=$(echo "$page" | first_string next_cursor || true)
    [ -n "$cursor" ] || die "the feed ended after $((i - 1)) pages ($items activities)"
    page=$(api_get "$api/v1/me/feed?limit=20&cursor=$cursor" -H "$auth")
  done
  local deep_url="$api/v1/me/feed?limit=20&cursor=$cursor"
  echo "$page" | activity_ids >"$work/deep.ids"
  [ "$(wc -l <"$work/deep.ids")" = 20 ] || die "feed page $depth holds $(wc -l <"$work/deep.ids") activities, not 20"

  # The bare query of the documents backend's feed (shared/src/documents/postgres.rs), with the
  # API's parameters: the followed accounts sorted, a page of 20 (+1), the cursor's position.
  local actors at id
  actors=$(psql -h 127.0.0.1 -U postgres -X -Atc "SELECT '{' || string_agg(followee_id::text, ',' ORDER BY followee_id) || '}'
      FROM follows WHERE follower_id = '$viewer'" "$db")
  at=$(psql -h 127.0.0.1 -U postgres -X -Atc "SELECT timestamptz 'epoch' + ${cursor:1:$(( ${#cursor} - 34 ))} * interval '1 millisecond'" "$db")
  id=${cursor##*.}
  # The two steps of PgDocuments::feed: each followed account's newest activity, then only the
  # accounts whose newest reaches the page, each walked down to the page's bound.
  local feed_sql="WITH heads AS MATERIALIZED (
         SELECT followed.actor, h.created_at, h.id
         FROM unnest(:actors::uuid[]) AS followed(actor)
         CROSS JOIN LATERAL (
             SELECT a.created_at, a.id FROM activity_documents a
             WHERE a.actor = followed.actor POSITION
             ORDER BY a.created_at DESC, a.id DESC
             LIMIT 1
         ) h
     ),
     bound AS (
         SELECT created_at, id FROM (
             (SELECT created_at, id FROM heads ORDER BY created_at DESC, id DESC OFFSET 20 LIMIT 1)
             UNION ALL
             SELECT '-infinity'::timestamptz, '00000000-0000-0000-0000-000000000000'::uuid
         ) candidates
         ORDER BY created_at DESC, id DESC
         LIMIT 1
     )
     SELECT page.* FROM heads
     CROSS JOIN bound
     CROSS JOIN LATERAL (
         SELECT id, kind, actor, object_id, created_at FROM activity_documents a
         WHERE a.actor = heads.actor POSITION
           AND (a.created_at, a.id) >= (bound.created_at, bound.id)
         ORDER BY a.created_at DESC, a.id DESC
         LIMIT 21
     ) page
     WHERE (heads.created_at, heads.id) >= (bound.created_at, bound.id)
     ORDER BY page.created_at DESC, page.id DESC
     LIMIT 21;"
  echo "${feed_sql//POSITION/}" >"$work/feed_first.sql"
  echo "${feed_sql//POSITION/AND (a.created_at, a.id) < (:at::timestamptz, :id::uuid)}" >"$work/feed_deep.sql"
  local bare_first bare_deep
  bare_first=$(psql -h 127.0.0.1 -U postgres -X -At -v actors="'$actors'" -f "$work/feed_first.sql" "$db" | cut -d'|' -f1 | head -20)
  bare_deep=$(psql -h 127.0.0.1 -U postgres -X -At -v actors="'$actors'" -v at="'$at'" -v id="'$id'" -f "$work/feed_deep.sql" "$db" | cut -d'|' -f1)
  [ "$(echo "$bare_deep" | wc -l)" = 21 ] || die "the bare query at page $depth's cursor found $(echo "$bare_deep" | wc -l) rows, not 21"
  # The API's page is the query's page less what the feed shows elsewhere (each object once).
  [ "$(head -1 "$work/first.ids")" = "$(echo "$bare_first" | head -1)" ] || die "the feed's first activity is not the bare query's"

  # Likes: 1,000 random seeded tracks, taken and taken back.
  psql -h 127.0.0.1 -U postgres -X -Atc "SELECT id FROM tracks WHERE owner_id <> '$viewer' ORDER BY random() LIMIT 1000" "$db" >"$work/like.ids"
  local like_id; like_id=$(head -1 "$work/like.ids")
  for method in PUT DELETE; do
    code=$(curl -sS -o "$work/resp" -w '%{http_code}' -X "$method" -H "$auth" "$api/v1/me/likes/tracks/$like_id")
    [ "$code" = 204 ] || die "$method /v1/me/likes/tracks/$like_id: HTTP $code $(cat "$work/resp")"
  done

  expect_lua "$work/ok200.lua" 200
  likes_lua "$work/likes.lua" "$work/like.ids"
  connections=8
  echo "PostgreSQL documents: warming up, then $runs runs of ${duration}s each, alternating…" >&2
  local saved=$duration; duration=3
  wrk_run warmup "$first_url" "$work/ok200.lua" "$auth"; wrk_run warmup "$deep_url" "$work/ok200.lua" "$auth"
  pgbench_run warmup "$work/feed_first.sql" -D "actors=$actors"
  threads=8 wrk_run warmup "$api/" "$work/likes.lua" "$auth"
  duration=$saved
  for i in $(seq "$runs"); do
    echo "run $i/$runs…" >&2
    wrk_run pg_first "$first_url" "$work/ok200.lua" "$auth"
    pgbench_run bare_first "$work/feed_first.sql" -D "actors=$actors"
    wrk_run pg_deep "$deep_url" "$work/ok200.lua" "$auth"
    pgbench_run bare_deep "$work/feed_deep.sql" -D "actors=$actors" -D "at=$at" -D "id=$id"
    threads=8 wrk_run likes "$api/" "$work/likes.lua" "$auth"
    threads=1 connections=1 wrk_run pg_first_c1 "$first_url" "$work/ok200.lua" "$auth"
    threads=1 connections=1 wrk_run pg_deep_c1 "$deep_url" "$work/ok200.lua" "$auth"
  done
  local leftover_likes
  leftover_likes=$(psql -h 127.0.0.1 -U postgres -X -Atc "SELECT count(*) FROM track_likes" "$db")
  stop_serve "$serve_pid"
  local pg_done=$SECONDS

  # The same activities in a private MongoDB stand-in, newest first, within the time allowed.
  echo "MongoDB stand-in: seeding the activities (at most ${WAVELINE_BENCH_MONGO_SEED_S:-420} s)…" >&2
  local mport murl mongo_docs mongo_seed_s mongo_version
  mport=$(free_port); murl=mongodb://127.0.0.1:$mport/$db; mkdir -p "$work/mongodb"
  "$venv/bin/nx-27017" --host 127.0.0.1 --port "$mport" --data-dir "$work/mongodb" --log-file "$work/nx-27017.log" \
    --pid-file "$work/nx-27017.pid" >"$work/nx-27017.out" 2>&1 &
  mongo_pid=$!
  local deadline=$((SECONDS + 30))
  until port_open "$mport"; do
    kill -0 "$mongo_pid" 2>/dev/null || { cat "$work/nx-27017.out" >&2; die "nx-27017 exited"; }
    [ "$SECONDS" -lt "$deadline" ] || die "nx-27017 is not answering on port $mport after 30 s"
    sleep 0.2
  done
  mongo_version=$("$venv/bin/pip" show nx-27017 2>/dev/null | sed -n 's/^Version: //p')
  psql -h 127.0.0.1 -U postgres -X -qc "COPY (SELECT id, kind, actor, object_id, (extract(epoch FROM created_at) * 1000)::bigint
      FROM activity_documents ORDER BY id DESC) TO STDOUT" "$db" >"$work/activities.tsv"
  t0=$SECONDS
  mongo_docs=$("$venv/bin/python" - "$murl" "$db" "${WAVELINE_BENCH_MONGO_SEED_S:-420}" "$work/activities.tsv" <<'PY'
# The shape of shared/src/documents/mongo.rs: {_id, id, kind, actor, object_id, created_at},
# ids as lowercase hyphenated UUID text, created_at a BSON date (the id's millisecond).
import sys, time
import pymongo
from bson.datetime_ms import DatetimeMS
url, name, budget, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
client = pymongo.MongoClient(url, serverSelectionTimeoutMS=10000)
client.drop_database(name)
activities = client[name]["activities"]
start, stored, batch = time.monotonic(), 0, []
with open(path) as rows:
    for row in rows:
        id_, kind, actor, object_id, ms = row.rstrip("\n").split("\t")
        batch.append({"_id": id_, "id": id_, "kind": kind, "actor": actor, "object_id": object_id,
                      "created_at": DatetimeMS(int(ms))})
        if len(batch) == 10000:
            activities.insert_many(batch, ordered=False)
            stored, batch = stored + len(batch), []
            if stored % 100000 == 0:
                print(f"  {stored} documents, {time.monotonic() - start:.0f} s", file=sys.stderr)
            if time.monotonic() - start > budget:
                break
if batch and time.monotonic() - start <= budget:
    activities.insert_many(batch, ordered=False)
    stored += len(batch)
count = activities.count_documents({})
if count != stored:
    sys.exit(f"the stand-in holds {count} activities, {stored} were written")
print(stored)
PY
) || die "seeding the MongoDB stand-in failed"
  mongo_seed_s=$((SECONDS - t0))
  rm -f "$work/activities.tsv"
  WAVELINE_DOCUMENTS=$murl "$bin" migrate >/dev/null  # the collections' indexes
  WAVELINE_DOCUMENTS=$murl start_serve 0 "$work/store"
  local mongo_api=$base
  # The same data gives the same pages (when the whole feed is there).
  api_get "$mongo_api/v1/me/feed?limit=20" -H "$auth" | activity_ids >"$work/m_first.ids"
  api_get "$mongo_api/v1/me/feed?limit=20&cursor=$cursor" -H "$auth" | activity_ids >"$work/m_deep.ids"
  if [ "$mongo_docs" = "$activities" ]; then
    cmp -s "$work/first.ids" "$work/m_first.ids" || die "the stand-in's first feed page differs from PostgreSQL's"
    cmp -s "$work/deep.ids" "$work/m_deep.ids" || die "the stand-in's page $depth differs from PostgreSQL's"
  fi
  # The stand-in is one Python process answering one query at a time: more connections would
  # only queue there. One connection, and runs long enough for a few dozen pages.
  local m_duration=$((duration > 30 ? duration : 30))
  echo "MongoDB stand-in: $runs runs of ${m_duration}s each, alternating…" >&2
  saved=$duration; duration=$m_duration; wrk_timeout=120
  for i in $(seq "$runs"); do
    echo "run $i/$runs…" >&2
    threads=1 connections=1 wrk_run m_first "$mongo_api/v1/me/feed?limit=20" "$work/ok200.lua" "$auth"
    threads=1 connections=1 wrk_run m_deep "$mongo_api/v1/me/feed?limit=20&cursor=$cursor" "$work/ok200.lua" "$auth"
  done
  duration=$saved
  local mongo_hwm; mongo_hwm=$(rss_kib "$mongo_pid" VmHWM)
  stop_serve "$serve_pid"

  # Medians and the tables.
  local fr f50 f99 br b50 b99 dr d50 d99 er e50 e99 lr l50 l99 mr m50 m99 nr n50 n99
  fr=$(col 1 pg_first); f50=$(col 2 pg_first); f99=$(col 3 pg_first)
  br=$(col 1 bare_first); b50=$(col 2 bare_first); b99=$(col 3 bare_first)
  dr=$(col 1 pg_deep); d50=$(col 2 pg_deep); d99=$(col 3 pg_deep)
  er=$(col 1 bare_deep); e50=$(col 2 bare_deep); e99=$(col 3 bare_deep)
  lr=$(col 1 likes); l50=$(col 2 likes); l99=$(col 3 likes)
  local sr s50 s99 tr t50 t99
  sr=$(col 1 pg_first_c1); s50=$(col 2 pg_first_c1); s99=$(col 3 pg_first_c1)
  tr=$(col 1 pg_deep_c1); t50=$(col 2 pg_deep_c1); t99=$(col 3 pg_deep_c1)
  mr=$(col 1 m_first); m50=$(col 2 m_first); m99=$(col 3 m_first)
  nr=$(col 1 m_deep); n50=$(col 2 m_deep); n99=$(col 3 m_deep)
  ratio() { echo "$1 / $2" | bc -l; }
  mark() { if [ "$1" = 1 ]; then echo met; else echo "**missed**"; fi; }
  echo
  echo "social: $users accounts, $tracks public ready tracks, $activities activities ($tracks track, $((activities - tracks)) track_repost); the viewer follows $followed accounts ($followed_activities activities); page 1 and page $depth ($items activities down) of GET /v1/me/feed?limit=20; wrk 2 threads, 8 connections, pgbench 8 clients 2 threads (prepared), ${duration} s per run, $runs runs each, alternating; medians ($(nproc) cores; wrk, pgbench, PostgreSQL and Waveline on the same machine)"
  echo
  echo "| PostgreSQL documents (the default) | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  printf "| GET /v1/me/feed, first page | %.0f | %.2f | %.2f |\n" "$fr" "$f50" "$f99"
  printf "| bare feed query, first page (pgbench) | %.0f | %.2f | %.2f |\n" "$br" "$b50" "$b99"
  printf "| ratio API / bare query, first page | **%.2f×** | %.2f× | %.2f× |\n" "$(ratio "$fr" "$br")" "$(ratio "$f50" "$b50")" "$(ratio "$f99" "$b99")"
  printf "| GET /v1/me/feed, page %d | %.0f | %.2f | %.2f |\n" "$depth" "$dr" "$d50" "$d99"
  printf "| bare feed query at page %d's cursor (pgbench) | %.0f | %.2f | %.2f |\n" "$depth" "$er" "$e50" "$e99"
  printf "| ratio API / bare query, page %d | **%.2f×** | %.2f× | %.2f× |\n" "$depth" "$(ratio "$dr" "$er")" "$(ratio "$d50" "$e50")" "$(ratio "$d99" "$e99")"
  printf "| GET /v1/me/feed, first page, 1 connection (one page at a time) | %.0f | %.2f | %.2f |\n" "$sr" "$s50" "$s99"
  printf "| GET /v1/me/feed, page %d, 1 connection | %.0f | %.2f | %.2f |\n" "$depth" "$tr" "$t50" "$t99"
  printf "| PUT then DELETE /v1/me/likes/tracks/ID, random among 1,000 tracks (wrk 8 threads, 1 connection each; 204s) | %.0f | %.2f | %.2f |\n" "$lr" "$l50" "$l99"
  echo
  echo "| MongoDB stand-in (nx-27017 $mongo_version on SQLite; $mongo_docs activities; wrk 1 connection, $m_duration s per run) | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  printf "| GET /v1/me/feed, first page | %.2f | %.0f | %.0f |\n" "$mr" "$m50" "$m99"
  printf "| GET /v1/me/feed, page %d's cursor | %.2f | %.0f | %.0f |\n" "$depth" "$nr" "$n50" "$n99"
  printf "| req/s, stand-in / PostgreSQL: first page, page %d | %.4f×, %.4f× | | |\n" "$depth" "$(ratio "$mr" "$fr")" "$(ratio "$nr" "$dr")"
  echo
  echo "| target | measured | |"
  echo "|---|---:|---|"
  printf "| a feed page's p99 ≤ 50 ms on PostgreSQL, 8 connections (first page, page %d) | %.1f, %.1f ms | %s |\n" "$depth" "$f99" "$d99" \
    "$(mark "$(echo "$f99 <= 50 && $d99 <= 50" | bc -l)")"
  printf "| the same, 1 connection | %.1f, %.1f ms | %s |\n" "$s99" "$t99" "$(mark "$(echo "$s99 <= 50 && $t99 <= 50" | bc -l)")"
  echo
  local bad=0 name
  for name in pg_first bare_first pg_deep bare_deep likes pg_first_c1 pg_deep_c1 m_first m_deep; do
    bad=$((bad + $(sum_col 4 "$name") + $(sum_col 5 "$name")))
  done
  [ "$bad" = 0 ] || echo "WARNING: $bad failed answers (another status than 200, or 204 for likes; socket errors or timeouts; failed transactions): see the runs below"
  echo "seeding: PostgreSQL ${seed_s} s (SQL) + ${vacuum_s} s (VACUUM ANALYZE); the MongoDB stand-in $mongo_docs of $activities activities in ${mongo_seed_s} s (peak RSS $((mongo_hwm / 1024)) MiB); likes left after the runs: $leftover_likes"
  echo "load: before: $load_before; after: $(uptime | sed 's/.*load average: //')"
  echo "every run (req/s p50-ms p99-ms failed socket-errors bytes/answer): API first page: $(paste -sd';' "$work/pg_first") bare first page: $(paste -sd';' "$work/bare_first") API page $depth: $(paste -sd';' "$work/pg_deep") bare page $depth: $(paste -sd';' "$work/bare_deep") likes: $(paste -sd';' "$work/likes") API first page, 1 connection: $(paste -sd';' "$work/pg_first_c1") API page $depth, 1 connection: $(paste -sd';' "$work/pg_deep_c1") stand-in first page: $(paste -sd';' "$work/m_first") stand-in page $depth: $(paste -sd';' "$work/m_deep")"
  echo "took $((SECONDS - started)) s (PostgreSQL part $((pg_done - started)) s)"
}

social_cleanup() {
  local pid
  for pid in "${serve_pids[@]}"; do stop_serve "$pid"; done
  if [ -n "${mongo_pid:-}" ]; then kill "$mongo_pid" 2>/dev/null; wait "$mongo_pid" 2>/dev/null || true; fi
  if [ -n "${WAVELINE_BENCH_KEEP:-}" ]; then
    echo "kept: database $db, the stand-in's data in $work/mongodb" >&2
    return
  fi
  rm -rf "$work"
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}

# --- search: GET /v1/search on 100,000 tracks ----------------------------------------------------

# search_lua OUT PATHS: a wrk script sending a random path of the file PATHS (one a line) per
# request; only 200s count (RESULT as expect_lua's).
search_lua() {
  { printf 'local paths = {'; sed 's/.*/"&",/' "$2" | tr -d '\n'; printf '}\n'; cat <<'LUA'
local threads, counter = {}, 0
function setup(thread) counter = counter + 1; thread:set("thread_id", counter); table.insert(threads, thread) end
function init(args) math.randomseed(os.time() * 97 + thread_id); other = 0 end
function request() return wrk.format("GET", paths[math.random(#paths)]) end
function response(status, headers, body) if status ~= 200 then other = other + 1 end end
function done(summary, latency, requests)
  local bad, e, secs = 0, summary.errors, summary.duration / 1e6
  for _, thread in ipairs(threads) do bad = bad + thread:get("other") end
  io.write(string.format("RESULT %.1f %.3f %.3f %d %d %.0f\n", (summary.requests - bad) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, bad,
    e.connect + e.read + e.write + e.timeout, summary.bytes / math.max(summary.requests, 1)))
end
LUA
  } >"$1"
}

# The searches the bench makes, by group: type, then the query as typed.
search_queries() {
  cat <<'QUERIES'
words	tracks	love
words	tracks	midnight
words	tracks	summer love
words	tracks	crystal
words	tracks	paris
words	tracks	lighthouse
words	tracks	deep house remix
words	tracks	jazz
words	users	love
words	playlists	golden
prefixes	tracks	lo
prefixes	tracks	mid
prefixes	tracks	daft pu
prefixes	tracks	beyo
prefixes	tracks	summer lo
prefixes	tracks	ele
prefixes	tracks	thun
prefixes	tracks	reyk
prefixes	users	sky
prefixes	playlists	nig
accents	tracks	beyoncé
accents	tracks	beyonce
accents	tracks	café
accents	tracks	cafe
accents	tracks	sigur rós
accents	tracks	sigur ros
accents	tracks	reykjavík
accents	tracks	montreal
accents	users	björk
accents	playlists	corazon
typos	tracks	beyonse
typos	tracks	midnigth
typos	tracks	deadmau6
typos	tracks	skrilex
typos	tracks	odeza
typos	tracks	lighthose
typos	tracks	thundr
typos	users	deadmau6
typos	users	kaytranda
typos	playlists	paradyse
QUERIES
}

# search [SECONDS=10] [RUNS=3]: search at scale. A database of its own (waveline_bench_search,
# made again each run) with 10,000 accounts, 100,000 tracks and 10,000 playlists of varied
# names written with SQL (scripts/bench-search-seed.sql); one account, registered and logged
# in through the API, blocking 100 of them; `serve --workers 0` with every rate limit off.
# 40 searches in four groups (whole words, prefixes as typed, accented and folded, typos that
# fall back on trigram similarity), over tracks, accounts and playlists, as that account. Each
# group with wrk (1 connection: one search at a time), and the whole mix with 1 and 8
# connections (2 threads), side by side with the bare SQL of the repository for the same
# searches (pgbench, extended protocol so each is planned for its words as the API's are;
# for a typo, both statements the API runs); RUNS runs of SECONDS each, alternating. Before
# measuring, each search's first page from the API is checked against the bare SQL's.
# Prints answers per second, p50/p99 and the ratios. Target: p99 <= 20 ms, one search at a
# time. WAVELINE_BENCH_KEEP=1 keeps the database for EXPLAIN.
search() {
  duration=${1:-10}; local runs=${2:-3}
  local users=10000 tracks=100000 playlists=10000
  local started=$SECONDS
  export PATH=$PATH:/usr/sbin
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v pgbench >/dev/null || missing+=(postgresql)
  command -v bc >/dev/null || missing+=(bc)
  command -v python3 >/dev/null || missing+=(python3)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}…" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || bash "$root/scripts/setup.sh" --embedded >&2
  echo "building waveline (release)…" >&2
  release_build -p waveline
  work=$(mktemp -d) db=waveline_bench_search serve_pids=()
  trap search_cleanup EXIT
  bin=$(own_copy waveline)
  export WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db WAVELINE_QUEUE=memory WAVELINE_LOG=warn
  export WAVELINE_STORAGE=file://$work/store WAVELINE_DOCUMENTS=postgres WAVELINE_ACCESS_TOKEN_TTL_S=86400
  export WAVELINE_JWT_SECRET=bench-secret-$$-0123456789abcdefghijklmnopqrstuvwxyz
  export WAVELINE_RATE_LIMIT_PER_MINUTE=0 WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE=0 WAVELINE_SOCIAL_WRITES_PER_MINUTE=0
  local load_before; load_before=$(uptime | sed 's/.*load average: //')

  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  "$bin" migrate >/dev/null
  start_serve 0 "$work/store"
  local api=$base code token auth viewer
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"viewer@example.com","username":"viewer","password":"bench-password-123"}' "$api/v1/auth/register")
  [ "$code" = 202 ] || die "register: HTTP $code $(cat "$work/resp")"
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"viewer@example.com","password":"bench-password-123"}' "$api/v1/auth/login")
  [ "$code" = 200 ] || die "login: HTTP $code $(cat "$work/resp")"
  token=$(first_string access_token <"$work/resp"); auth="Authorization: Bearer $token"
  [ -n "$token" ] || die "login: no access_token in $(cat "$work/resp")"
  viewer=$(api_get "$api/v1/me" -H "$auth" | first_string id)
  [ -n "$viewer" ] || die "GET /v1/me: no id"

  echo "seeding $users accounts, $tracks tracks, $playlists playlists (SQL)…" >&2
  local t0=$SECONDS seed_s vacuum_s
  psql -h 127.0.0.1 -U postgres -X -v users=$users -v tracks=$tracks -v playlists=$playlists \
    -v viewer="$viewer" -f "$root/scripts/bench-search-seed.sql" "$db" >"$work/seed.out" 2>&1 \
    || { cat "$work/seed.out" >&2; die "seeding failed"; }
  seed_s=$((SECONDS - t0)); t0=$SECONDS
  psql -h 127.0.0.1 -U postgres -X -qc 'VACUUM (ANALYZE)' "$db" >/dev/null
  vacuum_s=$((SECONDS - t0))
  local counts
  counts=$(psql -h 127.0.0.1 -U postgres -X -Atc "SELECT (SELECT count(*) FROM users WHERE role = 'user'),
      (SELECT count(*) FROM tracks), (SELECT count(*) FROM playlists)" "$db")
  [ "$counts" = "$((users + 1))|$tracks|$playlists" ] || die "seeded counts (accounts|tracks|playlists): $counts"

  # For each search: its path, and the bare SQL the repository runs for it
  # (shared/src/db/search.rs: ranked_sql), as pgbench scripts per group.
  search_queries >"$work/queries.tsv"
  python3 - "$work" "$viewer" "$db" <<'PY' || die "preparing the searches failed"
import json, subprocess, sys, urllib.parse
work, viewer, db = sys.argv[1], sys.argv[2], sys.argv[3]
CANDIDATES, INDEX_READ_COST = 1000, 4.0
SHAPES = {  # table, columns, owner, visible, similar text
    "tracks": ("tracks", "t.id, t.search_document, t.title", "t.owner_id",
               "(t.owner_id = $3 OR (t.visibility = 'public' AND t.ready_revision IS NOT NULL))",
               "waveline_unaccent(t.title)"),
    "users": ("users", "t.id, t.search_document, t.username, t.display_name", "t.id", "t.role <> 'system'",
              "waveline_unaccent(t.username || ' ' || t.display_name)"),
    "playlists": ("playlists", "t.id, t.search_document, t.title", "t.owner_id",
                  "(t.owner_id = $3 OR t.visibility = 'public')", "waveline_unaccent(t.title)"),
}
def ranked(kind, condition, score, materialized):
    table, columns, owner, visible, _ = SHAPES[kind]
    return f"""WITH matched AS {materialized} (
    SELECT {columns} FROM {table} t
    WHERE {condition} AND {visible}
      AND NOT EXISTS (SELECT 1 FROM users s WHERE s.id = {owner} AND s.suspended_at IS NOT NULL)
      AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.blocker_id = $3 AND b.blocked_id = {owner})
      AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.blocker_id = {owner} AND b.blocked_id = $3)
)
SELECT r.id, r.score FROM (
    SELECT c.id, {score} AS score FROM (
        SELECT m.* FROM matched m ORDER BY m.id DESC LIMIT {CANDIDATES}
    ) c
) r
WHERE $2::real IS NULL OR (r.score, r.id) < ($2, $4)
ORDER BY r.score DESC, r.id DESC
LIMIT $5"""
def literal(text): return "'" + text.replace("'", "''") + "'"
def words(q):
    out, cur = [], ""
    for ch in q:
        if ch.isalnum(): cur += ch
        elif cur: out.append(cur.lower()); cur = ""
    if cur: out.append(cur.lower())
    return out[:32]
def psql(sql):
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-X", "-At", "-c", sql, db],
                          check=True, capture_output=True, text=True).stdout
groups = {}
with open(f"{work}/queries.tsv") as rows, open(f"{work}/checks.tsv", "w") as checks:
    for n, row in enumerate(rows):
        group, kind, q = row.rstrip("\n").split("\t")
        w = words(q)
        arr = "ARRAY[" + ",".join(literal(x) for x in w) + "]::text[]"
        params = {"$1": arr, "$2": "NULL", "$3": literal(viewer) + "::uuid", "$4": "NULL::uuid", "$5": "21",
                  "$6": literal(" ".join(w))}
        def bind(sql):
            for k in sorted(params, reverse=True): sql = sql.replace(k, params[k])
            return " ".join(sql.split())
        table = SHAPES[kind][0]
        # PgSearch::reading: the planner's estimates of the matches and the rows.
        explain = bind(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} t WHERE t.search_document @@ "
                       f"waveline_search_query($1, true) UNION ALL SELECT 1 FROM {table} t")
        plans = json.loads(psql(explain))[0]["Plan"]["Plans"]
        matches, total = plans[0]["Plan Rows"], plans[1]["Plan Rows"]
        newest = matches * matches * INDEX_READ_COST >= CANDIDATES * total
        by_words = bind(ranked(kind, "t.search_document @@ waveline_search_query($1, true)",
                               "ts_rank(c.search_document, waveline_search_query($1, true))",
                               "NOT MATERIALIZED" if newest else "MATERIALIZED"))
        similar = SHAPES[kind][4]
        by_similar = bind(ranked(kind, f"{similar} %> waveline_unaccent($6)",
                                 f"word_similarity(waveline_unaccent($6), {similar.replace('t.', 'c.')})",
                                 "MATERIALIZED"))
        path = "/v1/search?" + urllib.parse.urlencode({"q": q, "type": kind})
        typo = group == "typos"
        # What the repository runs for this search: the estimate, the words, and for a typo
        # (the words finding nothing) the similar text.
        script = explain + ";\n" + by_words + ";\n" + (by_similar + ";\n" if typo else "")
        with open(f"{work}/bare_{n}.sql", "w") as f: f.write(script)
        groups.setdefault(group, []).append((path, f"{work}/bare_{n}.sql"))
        groups.setdefault("mix", []).append((path, f"{work}/bare_{n}.sql"))
        checks.write("\t".join([path, by_similar if typo else by_words, group, "newest" if newest else "every"]) + "\n")
for group, items in groups.items():
    with open(f"{work}/paths_{group}", "w") as f: f.writelines(p + "\n" for p, _ in items)
    with open(f"{work}/scripts_{group}", "w") as f: f.writelines(s + "\n" for _, s in items)
PY

  # Each search's first page: the API's ids are the bare SQL's first 20 (typos: of the
  # similarity statement, after the words found nothing), and no page is empty.
  local path sql group reading api_ids bare_ids empty=0
  while IFS=$'\t' read -r path sql group reading; do
    api_ids=$(api_get "$api$path" -H "$auth" | python3 -c 'import json, sys
page = json.load(sys.stdin)
items = page.get("tracks") or page.get("users") or page.get("playlists") or []
print(" ".join(i["id"] for i in items))')
    bare_ids=$(psql -h 127.0.0.1 -U postgres -X -At -c "$sql" "$db" | head -20 | cut -d'|' -f1 | paste -sd' ')
    [ "$api_ids" = "$bare_ids" ] || die "GET $path differs from its bare query: API [$api_ids] bare [$bare_ids]"
    [ -n "$api_ids" ] || empty=$((empty + 1))
  done <"$work/checks.tsv"
  [ "$empty" = 0 ] || die "$empty searches found nothing"

  expect_lua "$work/ok200.lua" 200
  local groups=(words prefixes accents typos mix) g
  for g in "${groups[@]}"; do search_lua "$work/$g.lua" "$work/paths_$g"; done
  # pgbench_run with every script of a group, chosen at random per transaction.
  bare_run() {
    local name=$1 group=$2 args=() s
    while read -r s; do args+=(-f "$s"); done <"$work/scripts_$group"
    rm -f "$work"/pgb.log*
    pgbench -h 127.0.0.1 -U postgres -n -M extended -c "$connections" -j "$((connections > 1 ? 2 : 1))" -T "$duration" -l \
      --log-prefix="$work/pgb.log" "${args[@]}" "$db" >"$work/pgbench.out" 2>&1 \
      || { cat "$work/pgbench.out" >&2; die "pgbench failed ($group)"; }
    local tps failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$work/pgbench.out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$work/pgbench.out")
    [ -n "$tps" ] || { cat "$work/pgbench.out" >&2; die "no tps from pgbench"; }
    cat "$work"/pgb.log* | awk '{print $3 / 1000}' | sort -g | awk -v tps="$tps" -v failed="${failed:-0}" \
      '{a[NR] = $1} END {if (NR == 0) exit 1; printf "%.1f %.3f %.3f %d 0 0\n", tps, a[int(NR * 0.5) + (NR % 2)], a[int(NR * 0.99 + 0.999)], failed}' \
      >>"$work/$name" || die "pgbench logged no transactions ($group)"
  }
  echo "warming up, then $runs runs of ${duration}s each, alternating…" >&2
  local saved=$duration; duration=3
  threads=1 connections=1 wrk_run warmup "$api/" "$work/mix.lua" "$auth"
  connections=1 bare_run warmup mix
  duration=$saved
  local i
  for i in $(seq "$runs"); do
    echo "run $i/$runs…" >&2
    for g in "${groups[@]}"; do
      threads=1 connections=1 wrk_run "api_$g" "$api/" "$work/$g.lua" "$auth"
      connections=1 bare_run "bare_$g" "$g"
    done
    threads=2 connections=8 wrk_run api_mix8 "$api/" "$work/mix.lua" "$auth"
    connections=8 bare_run bare_mix8 mix
  done
  stop_serve "$serve_pid"

  ratio() { echo "$1 / $2" | bc -l; }
  mark() { if [ "$1" = 1 ]; then echo met; else echo "**missed**"; fi; }
  echo
  echo "search: $users accounts, $tracks tracks ($(psql -h 127.0.0.1 -U postgres -X -Atc "SELECT count(*) FROM tracks WHERE visibility = 'public' AND ready_revision IS NOT NULL" "$db" 2>/dev/null || echo '?') public and ready), $playlists playlists; 40 searches as a signed-in account blocking 100 (10 per group; tracks, accounts and playlists), each path at random; wrk 1 connection (and 2 threads, 8 connections for the mix), pgbench the same searches' bare SQL (extended protocol, one script per search), ${duration} s per run, $runs runs each, alternating; medians ($(nproc) cores; wrk, pgbench, PostgreSQL and Waveline on the same machine)"
  echo
  echo "| searches | API req/s | API p50 ms | API p99 ms | bare SQL p50 ms | bare SQL p99 ms | ratio p50 | ratio p99 |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  local label r a50 a99 b50 b99 worst=0
  for g in "${groups[@]}" mix8; do
    case "$g" in
      words) label="whole words (love, summer love, deep house remix, …)" ;;
      prefixes) label="prefixes as typed (lo, daft pu, beyo, …)" ;;
      accents) label="accented and folded (beyoncé, beyonce, sigur rós, …)" ;;
      typos) label="typos: words find nothing, then trigrams (beyonse, deadmau6, …)" ;;
      mix) label="all 40, one at a time" ;;
      mix8) label="all 40, 8 connections" ;;
    esac
    r=$(col 1 "api_$g"); a50=$(col 2 "api_$g"); a99=$(col 3 "api_$g"); b50=$(col 2 "bare_$g"); b99=$(col 3 "bare_$g")
    printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f× | %.2f× |\n" "$label" "$r" "$a50" "$a99" "$b50" "$b99" \
      "$(ratio "$a50" "$b50")" "$(ratio "$a99" "$b99")"
    if [ "$g" != mix8 ] && [ "$(echo "$a99 > $worst" | bc -l)" = 1 ]; then worst=$a99; fi
  done
  echo
  echo "| target | measured | |"
  echo "|---|---:|---|"
  printf "| p99 ≤ 20 ms on 100,000 tracks, one search at a time (the worst group) | %.1f ms | %s |\n" "$worst" \
    "$(mark "$(echo "$worst <= 20" | bc -l)")"
  echo
  local bad=0 name
  for name in "${groups[@]/#/api_}" api_mix8 "${groups[@]/#/bare_}" bare_mix8; do
    bad=$((bad + $(sum_col 4 "$name") + $(sum_col 5 "$name")))
  done
  [ "$bad" = 0 ] || echo "WARNING: $bad failed answers (another status than 200, socket errors, timeouts, failed transactions): see the runs below"
  echo "seeding: ${seed_s} s (SQL) + ${vacuum_s} s (VACUUM ANALYZE)"
  echo "load: before: $load_before; after: $(uptime | sed 's/.*load average: //')"
  local every=
  for name in "${groups[@]/#/api_}" api_mix8 "${groups[@]/#/bare_}" bare_mix8; do every+="$name: $(paste -sd';' "$work/$name") "; done
  echo "every run (req/s p50-ms p99-ms failed socket-errors bytes/answer): $every"
  echo "took $((SECONDS - started)) s"
}

search_cleanup() {
  local pid
  for pid in "${serve_pids[@]}"; do stop_serve "$pid"; done
  if [ -n "${WAVELINE_BENCH_KEEP:-}" ]; then
    echo "kept: database $db" >&2
    return
  fi
  rm -rf "$work"
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}

realtime_cleanup() {
  local pid
  for pid in "${serve_pids[@]}"; do stop_serve "$pid"; done
  [ -z "${load_pid:-}" ] || kill "$load_pid" 2>/dev/null || true
  rm -rf "$work"
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}

# realtime [ACCOUNTS=1000] [RATE=100]: the socket. (1) Memory: ACCOUNTS×10 idle sockets on one
# `serve` (file store, in-process bus), RSS per socket from VmRSS before and after they are open
# (target ≤ 64 KiB, i.e. 10,000 sockets in ≤ 640 MiB). (2) Delivery: ACCOUNTS clients, one socket
# each, split across two `serve` replicas joined by RabbitMQ (the fanout exchange), sending each
# other direct messages at RATE per second in all for 10 s; each message carries its send time,
# the recipient measures delivery (target p99 ≤ 50 ms). Driven by bench/src/ws_load.rs.
realtime() {
  local accounts=${1:-1000} rate=${2:-100}
  local missing=()
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v bc >/dev/null || missing+=(bc)
  if [ "${#missing[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || bash "$root/scripts/setup.sh" >&2
  port_open 5672 || bash "$root/scripts/setup.sh" >&2
  echo "building waveline and ws-load (release)…" >&2
  release_build -p waveline -p waveline-bench
  work=$(mktemp -d) db=waveline_bench_rt_$$ serve_pids=() load_pid=
  trap realtime_cleanup EXIT
  bin=$(own_copy waveline)
  local wsload; wsload=$(own_copy ws-load)
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  [ "$(ulimit -n)" -ge $((accounts * 10 + 1000)) ] || die "needs $((accounts * 10 + 1000)) file descriptors; ulimit -n is $(ulimit -n)"
  export WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db WAVELINE_QUEUE=memory WAVELINE_LOG=warn
  export WAVELINE_JWT_SECRET=bench-secret-$$-0123456789abcdefghijklmnopqrstuvwxyz WAVELINE_ACCESS_TOKEN_TTL_S=86400
  export WAVELINE_RATE_LIMIT_PER_MINUTE=0 WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE=0 WAVELINE_SOCIAL_WRITES_PER_MINUTE=0
  # Every socket comes from this one address.
  export WAVELINE_MAX_CONNECTIONS=$((accounts * 10 + 1000)) WAVELINE_MAX_CONNECTIONS_PER_CLIENT=$((accounts * 10 + 1000))
  WAVELINE_STORAGE=file://$work/store "$bin" migrate >/dev/null
  start_serve 0 "$work/store"
  local api=$base code
  # One account through the API; the rest share its password hash (one argon2 hash, not
  # ACCOUNTS of them), and each logs in for a token of its own.
  code=$(curl -sS -o "$work/resp" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"email":"rt0@example.com","username":"rt0","password":"bench-password-123"}' "$api/v1/auth/register")
  [ "$code" = 202 ] || die "register: HTTP $code $(cat "$work/resp")"
  psql -h 127.0.0.1 -U postgres -d "$db" -qc "
    INSERT INTO users (id, email, username, password_hash)
    SELECT gen_random_uuid(), 'rt' || n || '@example.com', 'rt' || n, (SELECT password_hash FROM users WHERE username = 'rt0')
    FROM generate_series(1, $((accounts - 1))) AS n" >/dev/null
  echo "logging $accounts accounts in…" >&2
  rt_login() {
    curl -sS -H 'Content-Type: application/json' -d "{\"email\":\"rt$1@example.com\",\"password\":\"bench-password-123\"}" \
      "$rt_api/v1/auth/login" | grep -o '"access_token":"[^"]*"' | cut -d'"' -f4 | sed "s/\$/ rt$1/"
  }
  export -f rt_login; export rt_api=$api
  seq 0 $((accounts - 1)) | xargs -P 4 -I{} bash -c 'rt_login {}' >"$work/accounts"
  [ "$(wc -l <"$work/accounts")" = "$accounts" ] || die "only $(wc -l <"$work/accounts") of $accounts accounts logged in"

  # A fresh process for the memory figure: the logins' argon2 work (19 MiB a hash) leaves the
  # allocator holding memory that is not the sockets'.
  stop_serve "$serve_pid"; serve_pids=()
  start_serve 0 "$work/store"; api=$base
  echo "opening $((accounts * 10)) idle sockets…" >&2
  local before after opened
  before=$(rss_kib "$serve_pid" VmRSS)
  "$wsload" idle --url "ws://${api#http://}/v1/ws" --accounts "$work/accounts" --per-account 10 --hold 600 >"$work/idle.json" &
  load_pid=$!
  local deadline=$((SECONDS + 600))
  until [ -s "$work/idle.json" ]; do
    kill -0 "$load_pid" 2>/dev/null || die "ws-load idle exited"
    [ "$SECONDS" -lt "$deadline" ] || die "the sockets did not open within 600 s"
    sleep 1
  done
  sleep 3 # the server's side of the last sockets settles
  after=$(rss_kib "$serve_pid" VmRSS)
  opened=$(sed -n 's/.*"opened":\([0-9]*\).*/\1/p' "$work/idle.json")
  local connections; connections=$(curl -sS "$api/metrics" | awk '$1 == "waveline_ws_connections" {print $2}')
  kill "$load_pid" 2>/dev/null || true; wait "$load_pid" 2>/dev/null || true; load_pid=
  stop_serve "$serve_pid"; serve_pids=()

  echo "two replicas with RabbitMQ: $accounts clients, $rate messages/s for 10 s…" >&2
  export WAVELINE_QUEUE=amqp://guest:guest@127.0.0.1:5672/%2f WAVELINE_QUEUE_NAME=waveline.bench.realtime
  start_serve 0 "$work/store"; local a=$base
  start_serve 0 "$work/store"; local b=$base
  "$wsload" latency --a "ws://${a#http://}/v1/ws" --b "ws://${b#http://}/v1/ws" --accounts "$work/accounts" \
    --rate "$rate" --seconds 10 >"$work/latency.json"
  local field; field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" "$work/latency.json"; }

  echo
  echo "realtime socket ($(nproc) cores, the load generator on the same machine; $(date -u +%F), commit $(cd "$root" && git rev-parse --short HEAD))"
  echo
  echo "| measure | value | target |"
  echo "|---|---:|---|"
  printf "| idle sockets open on one process (of %d asked; server's gauge) | %d (%s) | 10,000 |\n" $((accounts * 10)) "$opened" "$connections"
  printf "| server RSS: before → with them open | %.0f → %.0f MiB | ≤ 640 MiB |\n" "$(echo "$before / 1024" | bc -l)" "$(echo "$after / 1024" | bc -l)"
  printf "| RSS per idle socket | **%.1f KiB** | ≤ 64 KiB |\n" "$(echo "($after - $before) / $opened" | bc -l)"
  printf "| messages delivered across two replicas (of sent) | %s of %s | all |\n" "$(field delivered)" "$(field sent)"
  printf "| delivery p50 / p99 / max | %s / **%s** / %s ms | p99 ≤ 50 ms |\n" "$(field p50_ms)" "$(field p99_ms)" "$(field max_ms)"
}

trending_cleanup() {
  [ -n "${WAVELINE_BENCH_KEEP:-}" ] || psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}

trending() {
  local runs=${1:-5} users=10000 tracks=100000 plays=1000000
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || bash "$root/scripts/setup.sh" --embedded >&2
  command -v bc >/dev/null || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc >/dev/null; }
  echo "building waveline (release)…" >&2
  release_build -p waveline
  work=$(mktemp -d) db=waveline_bench_trending
  trap trending_cleanup EXIT
  bin=$(own_copy waveline)
  export WAVELINE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db WAVELINE_QUEUE=memory WAVELINE_LOG=warn
  export WAVELINE_STORAGE=file://$work/store
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  "$bin" migrate >/dev/null
  echo "seeding $tracks tracks and $plays plays…" >&2
  psql -h 127.0.0.1 -U postgres -d "$db" -q -v users=$users -v tracks=$tracks -v plays=$plays \
    -f "$root/scripts/bench-trending-seed.sql" >/dev/null
  local counts; counts=$(psql -h 127.0.0.1 -U postgres -d "$db" -Atc "
    SELECT (SELECT sum(plays) FROM play_hours) || ' plays in ' || (SELECT count(*) FROM play_hours) || ' hourly rows, '
        || (SELECT count(*) FROM track_likes) || ' likes, ' || (SELECT count(*) FROM track_reposts) || ' reposts, '
        || (SELECT sum(comments) FROM comment_hours) || ' comments'")
  # The reference: the same engagement read and summed per track for each chart's window.
  local bare='' window
  for window in "7 days" "7 days" "30 days" "100 years"; do
    bare+="SELECT count(*) FROM (SELECT track_id, sum(w) FROM (
      SELECT track_id, plays::float8 AS w FROM play_hours WHERE hour >= now() - interval '$window'
      UNION ALL SELECT track_id, 1 FROM track_likes WHERE created_at >= now() - interval '$window'
      UNION ALL SELECT track_id, 50 FROM track_reposts WHERE created_at >= now() - interval '$window'
      UNION ALL SELECT track_id, comments FROM comment_hours WHERE hour >= now() - interval '$window') e GROUP BY 1) s;
"
  done
  "$bin" charts rebuild --json >/dev/null # warm the caches once
  : >"$work/ours"; : >"$work/bare"; : >"$work/wall"
  local i start out
  for ((i = 0; i < runs; i++)); do
    start=$(now_s)
    out=$("$bin" charts rebuild --json)
    echo "$(now_s) - $start" | bc -l | awk '{printf "%.1f\n", $1 * 1000}' >>"$work/wall"
    echo "$out" | sed -n 's/.*"duration_ms":\([0-9]*\).*/\1/p' >>"$work/ours"
    printf '\\timing on\n%s' "$bare" | psql -h 127.0.0.1 -U postgres -d "$db" -q 2>&1 \
      | awk '/^Time:/ {sum += $2} END {printf "%.1f\n", sum}' >>"$work/bare"
  done
  local entries; entries=$(echo "$out" | sed -n 's/.*"entries":\([0-9]*\).*/\1/p')
  local ours bare_ms wall
  ours=$(median <"$work/ours"); bare_ms=$(median <"$work/bare"); wall=$(median <"$work/wall")
  echo
  echo "trending ($(nproc) cores; $counts; $(date -u +%F), commit $(cd "$root" && git rev-parse --short HEAD))"
  echo
  echo "| measure | median of $runs | ratio |"
  echo "|---|---:|---:|"
  printf "| every chart computed and written (\`charts rebuild\`, %s rows) | **%s ms** | %.2f× |\n" "$entries" "$ours" "$(echo "$ours / $bare_ms" | bc -l)"
  printf "| the same, the CLI's wall time (start, connect, compute) | %s ms | |\n" "$wall"
  printf "| reference: the bare SQL summing the same engagement per track, four windows | %s ms | 1.00× |\n" "$bare_ms"
}

# --- artwork: the image job's sizes against ImageMagick ---------------------------------------

artwork() {
  local runs=${1:-11} side=${2:-3000}
  # Debian's ImageMagick by its own path: another `convert` may come first on PATH.
  local convert=/usr/bin/convert identify=/usr/bin/identify
  local missing=()
  "$convert" -version 2>/dev/null | grep -q '^Version: ImageMagick' || missing+=(imagemagick)
  [ -x /usr/bin/time ] || missing+=(time)
  command -v bc >/dev/null || missing+=(bc)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}…" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  echo "building the variant tool (release)…" >&2
  release_build -p waveline-bench --bin artwork-variants
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  local ours; ours=$(own_copy artwork-variants)
  echo "generating a ${side}×${side} JPEG…" >&2
  "$convert" -seed 7 -size "${side}x${side}" plasma:fractal -quality 92 "$work/input.jpg"
  # The same job in one ImageMagick command: one decode, the centre square, each size from it.
  local im=("$convert" "$work/input.jpg" -auto-orient -gravity center -crop "${side}x${side}+0+0" +repage -strip -quality 85)
  local size
  for size in t500x500:500 t300x300:300 large:100 t67x67:67 small:32; do
    im+=('(' +clone -resize "${size#*:}x${size#*:}!" -write "$work/im/${size%%:*}.jpg" +delete ')')
  done
  im+=(null:)
  mkdir -p "$work/im" "$work/ours"
  for i in $(seq "$runs"); do
    echo "run $i/$runs…" >&2
    measure "$work/ours.t" "$ours" "$work/input.jpg" "$work/ours"
    measure "$work/im.t" "${im[@]}"
    measure "$work/im1.t" env MAGICK_THREAD_LIMIT=1 "${im[@]}"
  done
  for size in t500x500:500 t300x300:300 large:100 t67x67:67 small:32; do
    local name=${size%%:*} want="${size#*:}x${size#*:}" got
    for dir in ours im; do
      got=$("$identify" -format '%wx%h %m' "$work/$dir/$name.jpg")
      [ "$got" = "$want JPEG" ] || die "$dir/$name.jpg is $got, not $want JPEG"
    done
  done
  local ow oc om iw ic imr i1w i1c i1m
  ow=$(cut -d' ' -f1 "$work/ours.t" | median); oc=$(cut -d' ' -f2 "$work/ours.t" | median); om=$(cut -d' ' -f3 "$work/ours.t" | median)
  iw=$(cut -d' ' -f1 "$work/im.t" | median); ic=$(cut -d' ' -f2 "$work/im.t" | median); imr=$(cut -d' ' -f3 "$work/im.t" | median)
  i1w=$(cut -d' ' -f1 "$work/im1.t" | median); i1c=$(cut -d' ' -f2 "$work/im1.t" | median); i1m=$(cut -d' ' -f3 "$work/im1.t" | median)
  echo
  echo "artwork: the five sizes from a ${side}×${side} JPEG ($(stat -c %s "$work/input.jpg") bytes), $runs runs each, alternating; medians ($(nproc) cores; $("$convert" -version | head -1 | cut -d' ' -f2-3); $(date -u +%F), commit $(cd "$root" && git rev-parse --short HEAD))"
  echo
  echo "| | wall s | CPU s | peak RSS MiB |"
  echo "|---|---:|---:|---:|"
  printf "| ImageMagick convert (default threads) | %.3f | %.3f | %.0f |
" "$iw" "$ic" "$(echo "$imr / 1024" | bc -l)"
  printf "| ImageMagick convert (MAGICK_THREAD_LIMIT=1) | %.3f | %.3f | %.0f |
" "$i1w" "$i1c" "$(echo "$i1m / 1024" | bc -l)"
  printf "| waveline (artwork-variants, one thread) | %.3f | %.3f | %.0f |
" "$ow" "$oc" "$(echo "$om / 1024" | bc -l)"
  printf "| ratio waveline / ImageMagick default | **%.2f×** | %.2f× | %.2f× |
" \
    "$(echo "$ow / $iw" | bc -l)" "$(echo "$oc / $ic" | bc -l)" "$(echo "$om / $imr" | bc -l)"
  printf "| ratio waveline / ImageMagick one thread | %.2f× | %.2f× | %.2f× |
" \
    "$(echo "$ow / $i1w" | bc -l)" "$(echo "$oc / $i1c" | bc -l)" "$(echo "$om / $i1m" | bc -l)"
  echo
  echo "bytes of the five sizes: waveline $(cat "$work"/ours/*.jpg | wc -c), ImageMagick $(cat "$work"/im/*.jpg | wc -c)"
  echo "every run (wall CPU RSS-KiB): waveline: $(tr '\n' ';' <"$work/ours.t") ImageMagick: $(tr '\n' ';' <"$work/im.t") one thread: $(tr '\n' ';' <"$work/im1.t")"
}

case "$mode" in
  pipeline) shift; pipeline "$@" ;;
  fleet) shift; fleet "$@" ;;
  stream) shift; stream "$@" ;;
  stream-transcode) shift; stream_during_transcode "$@" ;;
  social) shift; social "$@" ;;
  realtime) shift; realtime "$@" ;;
  trending) shift; trending "$@" ;;
  search) shift; search "$@" ;;
  artwork) shift; artwork "$@" ;;
  *) die "usage: scripts/bench.sh pipeline [SECONDS] [RUNS] | fleet [TRACKS] [SECONDS] | stream [SECONDS] [RUNS] | stream-transcode [SECONDS] [RUNS] | social [SECONDS] [RUNS] | realtime [ACCOUNTS] [RATE] | trending [RUNS] | search [SECONDS] [RUNS] | artwork [RUNS] [SIDE]" ;;
esac
