#!/usr/bin/env bash
# Waveline's main job on the embedded default: one process, the filesystem store, the
# in-process queue, and the local PostgreSQL as the only service. Needs nothing set up first:
# it installs and starts what it needs (scripts/setup.sh --embedded).
#
# What it runs today: prepares the database and storage, proves that every backend answers,
# makes a 30 s test track and runs the audio pipeline over it (`waveline process`): the
# rendition ladder, waveform, loudness and manifest. Uploading it over HTTP to
# `waveline serve --workers N` (API and in-process workers in one process) is the API issue;
# this script says so instead of pretending.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Set-up (packages and PostgreSQL, if missing)"
scripts/setup.sh --embedded

say "Build the waveline binary"
cargo build --locked --quiet -p waveline
waveline=$root/target/debug/waveline

demo=$root/.waveline/demo
mkdir -p "$demo"
export WAVELINE_DATABASE_URL=${WAVELINE_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/waveline_demo}
export WAVELINE_STORAGE=${WAVELINE_STORAGE:-file://$demo/objects}
export WAVELINE_QUEUE=memory

say "Configuration in effect (secrets redacted)"
"$waveline" config

say "waveline migrate: database, schema and storage"
"$waveline" migrate

say "waveline check: a round trip through each backend"
"$waveline" check

say "A 30 s test track (pink noise and two tones, stereo 44.1 kHz)"
ffmpeg -hide_banner -loglevel error -y \
  -f lavfi -i "anoisesrc=color=pink:amplitude=0.25:seed=42:sample_rate=44100:duration=30" \
  -f lavfi -i "sine=frequency=220:sample_rate=44100:duration=30" \
  -filter_complex "[0][1]amix=inputs=2:normalize=0,pan=stereo|c0=c0|c1=0.8*c0" \
  "$demo/input.flac"
ffprobe -v error -show_entries format=duration,size:stream=codec_name,sample_rate,channels \
  -of default=noprint_wrappers=1 "$demo/input.flac"

say "waveline serve --workers 1: the API and an in-process worker, one process"
listen=127.0.0.1:${WAVELINE_DEMO_PORT:-8088}
WAVELINE_LISTEN=$listen "$waveline" serve --workers 1 >"$demo/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 100); do curl -fs "http://$listen/healthz" >/dev/null && break; sleep 0.2; done
curl -fs "http://$listen/readyz"; echo

say "waveline import: the track is stored and queued (the server's relay hands it to its worker)"
id=$("$waveline" import "$demo/input.flac" --title "Demo track" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tracks"][0]["id"])')
echo "track $id"

say "Following GET /v1/tracks/$id/status (ETag polling) until ready"
etag="" last=""
for _ in $(seq 600); do
  status=$(curl -fs -D "$demo/headers" -H "If-None-Match: ${etag:-none}" "http://$listen/v1/tracks/$id/status" || true)
  if [ -n "$status" ]; then
    etag=$(awk 'tolower($1)=="etag:" {print $2}' "$demo/headers" | tr -d '\r')
    now=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(s["state"], s["stage"] or "", str(s["progress"]) + "%")' "$status")
    [ "$now" != "$last" ] && echo "  $now" && last=$now
    case "$now" in ready*|failed*) break ;; esac
  fi
  sleep 0.2
done

say "What was stored"
"$waveline" tracks show "$id"
find "${WAVELINE_STORAGE#file://}/renditions/$id" -type f | sed "s|${WAVELINE_STORAGE#file://}/||" | sort | head -n 20
curl -fs "http://$listen/metrics" | grep -E '^waveline_jobs_total' || true

say "waveline process: the same pipeline on one file, no services (for a look at the files)"
"$waveline" process "$demo/input.flac" --out "$demo/renditions"
ffprobe -v error -show_entries format=format_name,duration,bit_rate -of compact "$demo/renditions/mp3_128.mp3"

say "Done"
cat <<TXT
What ran: \`waveline serve --workers 1\` in the embedded configuration (PostgreSQL, objects under
${WAVELINE_STORAGE#file://}, the in-process queue); a 30 s track imported, processed by the
in-process worker into MP3, Opus, HLS AAC x3, a preview, waveform and loudness, and followed
over HTTP to ready. Not yet built: accounts, HTTP upload and range streaming (the API issue).
TXT
