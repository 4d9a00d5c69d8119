#!/usr/bin/env bash
# Waveline's main job on the embedded default: one process, the filesystem store, the
# in-process queue, and the local PostgreSQL as the only service. Needs nothing set up first:
# it installs and starts what it needs (scripts/setup.sh --embedded).
#
# What it runs today: prepares the database and storage, proves that every backend answers,
# and makes a 30 s test track. The audio pipeline and the API that process and serve that
# track are the next issues; until they land, this script says so instead of pretending.
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

say "Done"
cat <<TXT
What ran: the embedded configuration is healthy (PostgreSQL migrated, objects under
${WAVELINE_STORAGE#file://}, in-process queue), and a test track waits at $demo/input.flac.
Not yet built: processing that track into renditions (the pipeline issue) and serving it over
HTTP (the API issue); this script will upload, follow and stream it once they land.
TXT
