#!/usr/bin/env bash
# Waveline's main job on the embedded default: one process, the filesystem store, the
# in-process queue, and the local PostgreSQL as the only service. Needs nothing set up first:
# it installs and starts what it needs (scripts/setup.sh --embedded).
#
# What it runs: `waveline serve --workers 1` (the API and an in-process worker in one
# process); registers a user, uploads a generated 30 s track over HTTP, follows its processing
# as Server-Sent Events until ready, fetches a byte range of the MP3 and the waveform; then a
# second account follows the uploader, likes the track, comments at a timestamp, reads its
# feed and sends the uploader a direct message over the realtime socket; and it prints what
# it did.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Where cargo puts what it builds (CARGO_TARGET_DIR and .cargo/config.toml included).
target_dir() {
  (cd "$root" && cargo metadata --format-version 1 --no-deps --locked) | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}
cd "$root"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Set-up (packages and PostgreSQL, if missing)"
scripts/setup.sh --embedded

say "Build the waveline binary"
# The whole workspace, as scripts/test.sh builds it: one feature set, so neither rebuilds the other.
cargo build --locked --quiet --workspace --bins
waveline=$(target_dir)/debug/waveline

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
api=http://$listen
# Sessions survive a restart of the demo server only with a fixed key.
export WAVELINE_JWT_SECRET=${WAVELINE_JWT_SECRET:-demo-only-secret-change-me-in-production-0123}
WAVELINE_LISTEN=$listen "$waveline" serve --workers 1 >"$demo/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 100); do curl -fs "$api/healthz" >/dev/null && break; sleep 0.2; done
echo "GET /readyz → $(curl -fs "$api/readyz")"

json() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"; }

say "POST /v1/auth/register and /v1/auth/login"
user=demo_$(date +%s)
curl -fsS -X POST "$api/v1/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$user@example.com\",\"username\":\"$user\",\"password\":\"correct horse battery\"}"
echo
token=$(curl -fsS -X POST "$api/v1/auth/login" -H 'content-type: application/json' -c "$demo/cookies" \
  -d "{\"email\":\"$user@example.com\",\"password\":\"correct horse battery\"}" | json access_token)
echo "logged in as $user; the JWT is also in the session cookie ($(grep -c waveline_session "$demo/cookies") cookie)"

say "POST /v1/tracks (multipart, streamed into storage)"
curl -fsS -X POST "$api/v1/tracks" -H "authorization: Bearer $token" \
  -F "file=@$demo/input.flac" -F "title=Demo track" -F "tags=demo,noise" -o "$demo/upload.json" \
  -w 'HTTP %{http_code}, %{size_upload} bytes up in %{time_total} s\n'
id=$(json id <"$demo/upload.json")
echo "track $id is $(json state <"$demo/upload.json")"

say "GET /v1/tracks/$id/events (Server-Sent Events) until ready"
curl -fsSN -H "authorization: Bearer $token" "$api/v1/tracks/$id/events" | while IFS= read -r line; do
  case "$line" in
    data:*) echo "${line#data: }" | python3 -c 'import json,sys; s=json.load(sys.stdin)
print("  event:", s["state"], s["stage"] or "", str(s["progress"]) + "%", s["error"] or "")' ;;
  esac
done

say "GET /v1/tracks/$id"
curl -fsS "$api/v1/tracks/$id" | python3 -c 'import json,sys; t=json.load(sys.stdin)
print("  state:", t["state"], "| duration:", t["duration_ms"], "ms | loudness:", t["loudness"]["integrated_lufs"], "LUFS")
print("  streams:", ", ".join(t["stream_urls"].values()))
print("  hls:", t["hls_master_url"], "| waveform:", t["waveform_url"])'

say "GET /v1/tracks/$id/stream/mp3_128 with Range: bytes=0-65535"
curl -fsS -H 'range: bytes=0-65535' -D "$demo/range.headers" -o "$demo/range.bin" "$api/v1/tracks/$id/stream/mp3_128"
grep -iE '^(HTTP|content-range|content-length|content-type|etag|accept-ranges)' "$demo/range.headers" | tr -d '\r' | sed 's/^/  /'
echo "  $(stat -c %s "$demo/range.bin") bytes received"

say "GET /v1/tracks/$id/waveform"
curl -fsS "$api/v1/tracks/$id/waveform" | python3 -c 'import json,sys; w=json.load(sys.stdin)
print("  audiowaveform v%d: %d channel(s), %d Hz, %d samples per pixel, %d-bit, %d pixels" % (w["version"], w["channels"], w["sample_rate"], w["samples_per_pixel"], w["bits"], w["length"]))'
curl -fsS "$api/metrics" | grep -E '^waveline_(jobs_total|http_stream_bytes_total)' | sed 's/^/  /' || true

say "The social layer: a listener follows, likes, comments at 0:12, and reads the feed"
fan=fan_$(date +%s)
curl -fsS -o /dev/null -X POST "$api/v1/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$fan@example.com\",\"username\":\"$fan\",\"password\":\"correct horse battery\"}"
fan_token=$(curl -fsS -X POST "$api/v1/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$fan@example.com\",\"password\":\"correct horse battery\"}" | json access_token)
echo "  PUT /v1/me/followings/$user → $(curl -fsS -o /dev/null -w '%{http_code}' -X PUT -H "authorization: Bearer $fan_token" "$api/v1/me/followings/$user")"
echo "  PUT /v1/me/likes/tracks/$id → $(curl -fsS -o /dev/null -w '%{http_code}' -X PUT -H "authorization: Bearer $fan_token" "$api/v1/me/likes/tracks/$id")"
curl -fsS -X POST "$api/v1/tracks/$id/comments" -H "authorization: Bearer $fan_token" -H 'content-type: application/json' \
  -d '{"body":"that noise swell at 0:12","timestamp_ms":12000}' | python3 -c 'import json,sys; c=json.load(sys.stdin)
print("  POST /v1/tracks/…/comments → 201: %s at %d ms: %r" % (c["user"]["username"], c["timestamp_ms"], c["body"]))'
curl -fsS "$api/v1/tracks/$id/comments?from_ms=10000&to_ms=15000" | python3 -c 'import json,sys; p=json.load(sys.stdin)
print("  GET /v1/tracks/…/comments?from_ms=10000&to_ms=15000 → %d comment(s) in that part of the waveform" % len(p["comments"]))'
curl -fsS "$api/v1/users/$user" | python3 -c 'import json,sys; u=json.load(sys.stdin)
print("  GET /v1/users/%s → followers %d, tracks %d" % (u["username"], u["followers_count"], u["track_count"]))'
echo "  GET /v1/me/feed (as $fan):"
curl -fsS -H "authorization: Bearer $fan_token" "$api/v1/me/feed" | python3 -c 'import json,sys; f=json.load(sys.stdin)
for a in f["activities"]:
    o = a.get("track") or a.get("playlist")
    print("    %s  %-14s by %s: %r (likes %d, comments %d)" % (a["created_at"][:19], a["type"], a["actor"]["username"], o["title"], o["likes_count"], o["comment_count"]))
if not f["activities"]:
    print("    (empty)")'

say "Plays and charts: the listener plays the track, and the charts are computed"
echo "  GET /v1/tracks/$id/stream/mp3_128 (Range: bytes=0-65535, as $fan) → $(curl -fsS -o /dev/null -w '%{http_code}' \
  -H "authorization: Bearer $fan_token" -H 'range: bytes=0-65535' "$api/v1/tracks/$id/stream/mp3_128")"
plays=0
for _ in $(seq 50); do # the API writes plays every second
  plays=$(curl -fsS "$api/v1/tracks/$id" | json playback_count)
  [ "$plays" = 1 ] && break
  sleep 0.1
done
echo "  GET /v1/tracks/$id → playback_count $plays"
"$waveline" charts rebuild --json | python3 -c 'import json,sys; r=json.load(sys.stdin)
print("  waveline charts rebuild → %d chart entries in %d ms" % (r["entries"], r["duration_ms"]))'
curl -fsS "$api/v1/charts/trending?limit=3" | python3 -c 'import json,sys; p=json.load(sys.stdin)
for t in p["tracks"]:
    print("  GET /v1/charts/trending → #%d %r (score %.1f: %d play(s), %d like(s), %d comment(s))" % (t["rank"], t["track"]["title"], t["score"], t["track"]["playback_count"], t["track"]["likes_count"], t["track"]["comment_count"]))'
curl -fsS -H "authorization: Bearer $token" "$api/v1/tracks/$id/stats?days=1" | python3 -c 'import json,sys; s=json.load(sys.stdin)
d=s["days"][-1]; print("  GET /v1/tracks/…/stats?days=1 (as the uploader) → %s: %d play(s), %d like(s), %d comment(s)" % (d["day"], d["plays"], d["likes"], d["comments"]))'

say "A direct message over the realtime socket (GET /v1/ws), both sides"
wsload=$(target_dir)/debug/ws-load
"$wsload" listen --url "ws://$listen/v1/ws" --token "$token" --seconds 4 >"$demo/uploader.jsonl" &
listener=$!
sleep 1
"$wsload" send --url "ws://$listen/v1/ws" --token "$fan_token" --to "$user" --body "loved the swell at 0:12" \
  --seconds 2 >"$demo/fan.jsonl"
wait $listener
show_frames() { python3 -c 'import json,sys
for line in sys.stdin:
    f = json.loads(line)
    if f["type"] == "message.new":
        m = f["message"]; print("    %s message.new: %r (%s)" % (sys.argv[1], m["body"], m["created_at"][:19]))
    elif f["type"] == "notification":
        n = f["notification"]; print("    %s notification: %s from %s" % (sys.argv[1], n["type"], (n.get("actor") or {}).get("username")))
    else:
        print("    %s %s" % (sys.argv[1], f["type"]))' "$1"; }
echo "  the sender ($fan), its own socket:"
show_frames "$fan →" <"$demo/fan.jsonl"
echo "  the recipient ($user):"
show_frames "$user ←" <"$demo/uploader.jsonl"

say "Done"
cat <<TXT
What ran: \`waveline serve --workers 1\` in the embedded configuration (PostgreSQL, objects under
${WAVELINE_STORAGE#file://}, the in-process queue). A user registered and logged in, uploaded a
30 s track over HTTP, watched it go through the pipeline (MP3, Opus, HLS AAC x3, a preview,
waveform, loudness) as Server-Sent Events, then fetched a 64 KiB range of the MP3 (206) and the
waveform. A second account followed the uploader, liked the track, commented at 0:12 and read
its feed, where the new track appears, played it (counted once, shown in the charts and the
uploader's statistics), then sent the uploader a direct message over the realtime
socket, which both sides received live. The API's contract is at $api/openapi.json and $api/docs while a server runs.
TXT
