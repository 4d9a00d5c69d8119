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

say "waveline process: one decode → MP3, Opus, HLS AAC ×3, preview, waveform, loudness"
"$waveline" process "$demo/input.flac" --out "$demo/renditions"

say "What a player gets"
ffprobe -v error -show_entries format=format_name,duration,bit_rate -of compact "$demo/renditions/mp3_128.mp3"
head -n 8 "$demo/renditions/aac_hls/master.m3u8"
python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('loudness', m['loudness']); print('waveform points', m['waveform']['length'])" \
  "$demo/renditions/manifest.json"

say "Done"
cat <<TXT
What ran: the embedded configuration is healthy (PostgreSQL migrated, objects under
${WAVELINE_STORAGE#file://}, in-process queue); a 30 s track at $demo/input.flac was processed
into $demo/renditions (manifest.json lists every file).
Not yet built: uploading it over HTTP to \`waveline serve --workers N\` and streaming it back
(the API issue); the distributed worker fleet is in the README under "Scaling workers".
TXT
