//! `waveline process` end to end: the real binary on fixtures made at test time, its output
//! judged with ffprobe and ffmpeg rather than with the pipeline's own code.
//!
//! The suites cover every input format, channel layouts and sample-rate limits, loudness
//! against ffmpeg's EBU R128 meter, the rendition ladder (MP3, Opus, AAC over HLS, preview),
//! the audiowaveform files, tags and cover art, custom presets, and a corpus of malformed
//! uploads that must each be refused with exit code 2 and the right error code.
//!
//! Durations of progressive renditions are measured by decoding them with ffmpeg and
//! counting samples, because ffprobe's container duration of an MP3 counts whole frames,
//! encoder delay and padding included (up to about 2.5 frames over what plays), while the
//! decoder trims what the LAME header or the Opus pre-skip declares, as a player does. HLS
//! variants are measured by ffprobe on their playlists (the sum of `EXTINF`), which is what
//! a player's timeline shows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use waveline_tests::audio::{
    WAVE_FORMAT_EXTENSIBLE, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_PCM, audio_stream, cover_png, cut, decoded_seconds,
    ebur128_reference, ffmpeg, ffprobe_json, ffprobe_json_with, max_volume_db, probe_number, raw_pcm, render,
    seeded_bytes, sine_s16, sox, tone, tone_source, wav_header, write_wav,
};
use waveline_tests::{temp_dir, waveline_bin};

/// Slack on top of a codec frame when comparing durations: rounding to milliseconds and
/// ffprobe's six decimals.
const SLACK_S: f64 = 0.005;
const MP3_FRAME: f64 = 1152.0;
const AAC_FRAME: f64 = 1024.0;
const OPUS_FRAME_S: f64 = 0.020;

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

/// Runs `waveline process INPUT --out OUT EXTRA…` with no `WAVELINE_*` variable inherited.
fn run_process(input: &Path, out: &Path, extra: &[&str]) -> Result<Output> {
    let mut command = Command::new(waveline_bin());
    command.arg("process").arg(input).arg("--out").arg(out).args(extra);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
        command.env_remove(name);
    }
    command
        .output()
        .with_context(|| format!("cannot run {}; build it with `cargo build -p waveline`", waveline_bin().display()))
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Processes `input` with `--json`, requires success, and returns the manifest after
/// checking what every run must satisfy: stdout is the manifest, and every file the
/// manifest names exists with the size it states.
fn process_ok(input: &Path, out: &Path, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let output = run_process(input, out, &args)?;
    ensure!(output.status.success(), "processing {} failed: {}", input.display(), describe(&output));
    ensure!(!String::from_utf8_lossy(&output.stderr).contains("panicked"), "{}", describe(&output));
    let printed: Value =
        serde_json::from_slice(&output.stdout).with_context(|| format!("stdout is not JSON: {}", describe(&output)))?;
    let written: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).context("no manifest.json")?)
        .context("manifest.json is not JSON")?;
    ensure!(printed == written, "--json printed something else than manifest.json:\n{printed}\n{written}");
    check_listed_files(out, &written)?;
    Ok(written)
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).with_context(|| format!("{} is listed but missing", path.display()))?.len())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).with_context(|| format!("{}", next.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn total_size(files: &[PathBuf]) -> Result<u64> {
    files.iter().map(|f| file_size(f)).sum()
}

fn text<'a>(value: &'a Value, what: &str) -> Result<&'a str> {
    value.as_str().with_context(|| format!("{what} is not a string: {value}"))
}

fn number(value: &Value, what: &str) -> Result<f64> {
    value.as_f64().with_context(|| format!("{what} is not a number: {value}"))
}

fn integer(value: &Value, what: &str) -> Result<u64> {
    value.as_u64().with_context(|| format!("{what} is not a non-negative integer: {value}"))
}

fn renditions(manifest: &Value) -> Result<&Vec<Value>> {
    manifest["renditions"].as_array().with_context(|| format!("no renditions in {manifest}"))
}

fn rendition<'a>(manifest: &'a Value, preset: &str) -> Result<&'a Value> {
    renditions(manifest)?
        .iter()
        .find(|r| r["preset"] == preset)
        .with_context(|| format!("no {preset} rendition in {manifest}"))
}

/// The manifest's promise that all its paths exist (relative to the out dir) with the
/// sizes it states.
fn check_listed_files(out: &Path, manifest: &Value) -> Result<()> {
    for key in ["json", "dat", "summary"] {
        let path = text(&manifest["waveform"][key], "waveform path")?;
        ensure!(out.join(path).is_file(), "waveform.{key} {path} is missing");
    }
    if let Some(artwork) = manifest["tags"]["artwork"].as_str() {
        ensure!(out.join(artwork).is_file(), "artwork {artwork} is missing");
    }
    for rendition in renditions(manifest)? {
        let path = out.join(text(&rendition["path"], "rendition path")?);
        let bytes = integer(&rendition["bytes"], "rendition bytes")?;
        match rendition["kind"].as_str() {
            Some("progressive") => {
                let size = file_size(&path)?;
                ensure!(bytes == size, "{rendition}: bytes {bytes}, file has {size}");
            }
            Some("hls") => {
                let folder = path.parent().context("HLS master has no folder")?;
                let size = total_size(&files_under(folder)?)?;
                ensure!(bytes == size, "{rendition}: bytes {bytes}, the preset's files hold {size}");
                let variants =
                    rendition["variants"].as_array().with_context(|| format!("no variants in {rendition}"))?;
                for variant in variants {
                    let playlist = out.join(text(&variant["path"], "variant path")?);
                    let folder = playlist.parent().context("variant has no folder")?;
                    let all = files_under(folder)?;
                    let media: Vec<PathBuf> =
                        all.iter().filter(|f| f.extension().is_none_or(|e| e != "m3u8")).cloned().collect();
                    let bytes = integer(&variant["bytes"], "variant bytes")?;
                    // The contract does not say whether a variant's bytes count its
                    // playlist; either reading is a truthful size.
                    let (with, without) = (total_size(&all)?, total_size(&media)?);
                    ensure!(
                        bytes == with || bytes == without,
                        "{variant}: bytes {bytes}, its folder holds {with} ({without} without the playlist)"
                    );
                }
            }
            _ => bail!("unknown rendition kind in {rendition}"),
        }
    }
    Ok(())
}

/// The JSON error a refused input must print: exactly `{"error":{"code","message"}}`.
fn error_code(output: &Output) -> Result<String> {
    let printed: Value = serde_json::from_slice(&output.stdout).context("stdout is not JSON")?;
    let top = printed.as_object().context("stdout is not an object")?;
    ensure!(top.len() == 1 && top.contains_key("error"), "stdout has more than the error: {printed}");
    let error = printed["error"].as_object().context("error is not an object")?;
    ensure!(error.len() == 2, "error has other fields than code and message: {printed}");
    let message = text(&printed["error"]["message"], "error.message")?;
    ensure!(!message.trim().is_empty(), "the message is empty");
    Ok(text(&printed["error"]["code"], "error.code")?.to_owned())
}

// ---------------------------------------------------------------------------------------
// Checks on the renditions, as a listener's player sees them
// ---------------------------------------------------------------------------------------

fn close(got: f64, expected: f64, tolerance: f64) -> bool {
    (got - expected).abs() <= tolerance
}

/// The first MPEG audio frame after any ID3v2 tag.
fn first_mp3_frame(bytes: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    if bytes.starts_with(b"ID3") && bytes.len() >= 10 {
        let size = bytes[6..10].iter().fold(0usize, |size, b| (size << 7) | usize::from(b & 0x7f));
        let footer = if bytes[5] & 0x10 != 0 { 10 } else { 0 };
        start = 10 + size + footer;
    }
    let rest = bytes.get(start..)?;
    let sync = rest.windows(2).position(|w| w[0] == 0xff && w[1] & 0xe0 == 0xe0)?;
    rest.get(sync..(sync + 418).min(rest.len()))
}

/// A format tag of `path` (ffprobe prints tag names as the container spells them).
fn format_tag(probe: &Value, name: &str) -> Option<String> {
    probe["format"]["tags"].as_object().and_then(|tags| {
        tags.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| value.as_str().map(str::to_owned))
    })
}

/// A progressive MP3 rendition: MPEG layer 3, CBR at `kbps`, the rate and channels given,
/// a Xing/Info frame, and as long as `expected_s` within one MP3 frame.
fn check_mp3(path: &Path, kbps: f64, rate: f64, expected_s: f64) -> Result<()> {
    let probe = ffprobe_json(path)?;
    let stream = audio_stream(&probe)?;
    ensure!(stream["codec_name"] == "mp3", "{}: {stream}", path.display());
    ensure!(
        probe_number(&stream["sample_rate"]) == Some(rate) && stream["channels"] == 2,
        "{}: expected {rate} Hz stereo, got {stream}",
        path.display()
    );
    let bit_rate = probe_number(&stream["bit_rate"]).context("no MP3 bit rate")?;
    ensure!(
        close(bit_rate, kbps * 1000.0, kbps * 1000.0 * 0.03),
        "{}: bit rate {bit_rate}, expected {kbps} kb/s",
        path.display()
    );
    let bytes = std::fs::read(path)?;
    let frame = first_mp3_frame(&bytes).context("no MPEG frame")?;
    ensure!(
        frame.windows(4).any(|w| w == b"Info" || w == b"Xing"),
        "{}: the first frame has no Xing/Info header",
        path.display()
    );
    let played = decoded_seconds(path)?;
    ensure!(
        close(played, expected_s, MP3_FRAME / rate + SLACK_S),
        "{}: plays {played:.4} s, expected {expected_s:.4} s within one MP3 frame",
        path.display()
    );
    Ok(())
}

/// A progressive Opus rendition: Opus in Ogg at 48 kHz, stereo, `expected_s` long within
/// one 20 ms frame.
fn check_opus(path: &Path, expected_s: f64) -> Result<()> {
    let probe = ffprobe_json(path)?;
    let stream = audio_stream(&probe)?;
    ensure!(
        probe["format"]["format_name"] == "ogg" && stream["codec_name"] == "opus",
        "{}: expected Opus in Ogg, got {probe}",
        path.display()
    );
    ensure!(
        probe_number(&stream["sample_rate"]) == Some(48_000.0) && stream["channels"] == 2,
        "{}: expected 48 kHz stereo, got {stream}",
        path.display()
    );
    let played = decoded_seconds(path)?;
    ensure!(
        close(played, expected_s, OPUS_FRAME_S + SLACK_S),
        "{}: plays {played:.4} s, expected {expected_s:.4} s within one Opus frame",
        path.display()
    );
    Ok(())
}

/// `KEY=value` out of an HLS attribute list, quotes removed.
fn attribute<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[at..];
    if let Some(quoted) = rest.strip_prefix('"') { quoted.split('"').next() } else { rest.split(',').next() }
}

/// The value after `TAG:` on the first line that starts with it.
fn tag_value<'a>(playlist: &'a str, tag: &str) -> Option<&'a str> {
    playlist.lines().find_map(|line| line.strip_prefix(tag)?.strip_prefix(':'))
}

/// An AAC-over-HLS rendition: the master lists one variant per bitrate, each a VOD fMP4
/// playlist of about `segment_s` segments that ffprobe reads through to stereo AAC lasting
/// as long as the source within one AAC frame; the manifest's figures match the files.
/// With `rich_signal`, each variant's segments must also average its nominal bitrate
/// (an encoder may rightly spend far less on a bare sine or on silence).
fn check_hls(
    out: &Path,
    rendition: &Value,
    variants_kbps: &[u64],
    segment_s: f64,
    expected_s: f64,
    rich_signal: bool,
) -> Result<()> {
    ensure!(rendition["kind"] == "hls" && rendition["codec"] == "aac", "{rendition}");
    ensure!(
        rendition["bitrate_kbps"].as_u64() == variants_kbps.iter().max().copied(),
        "the preset's bitrate is not its top variant's: {rendition}"
    );
    let master_path = out.join(text(&rendition["path"], "master path")?);
    let master_dir = master_path.parent().context("master has no folder")?;
    let master = std::fs::read_to_string(&master_path).with_context(|| format!("{}", master_path.display()))?;
    ensure!(master.starts_with("#EXTM3U"), "master: {master}");

    let mut listed = Vec::new();
    let mut lines = master.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("#EXT-X-STREAM-INF:") {
            let bandwidth: u64 = attribute(line, "BANDWIDTH")
                .and_then(|b| b.parse().ok())
                .with_context(|| format!("no BANDWIDTH in {line}"))?;
            ensure!(attribute(line, "CODECS") == Some("mp4a.40.2"), "CODECS is not \"mp4a.40.2\": {line}");
            let uri = lines
                .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .with_context(|| format!("no URI after {line}"))?;
            listed.push((bandwidth, master_dir.join(uri.trim())));
        }
    }
    ensure!(
        listed.len() == variants_kbps.len(),
        "master lists {} variants, expected {}: {master}",
        listed.len(),
        variants_kbps.len()
    );

    let variants = rendition["variants"].as_array().with_context(|| format!("no variants in {rendition}"))?;
    let kbps: Vec<u64> = variants.iter().filter_map(|v| v["bitrate_kbps"].as_u64()).collect();
    ensure!(kbps == variants_kbps, "variant bitrates {kbps:?}");

    let mut total_segments = 0;
    for variant in variants {
        let playlist_path = out.join(text(&variant["path"], "variant path")?);
        let (bandwidth, _) = listed
            .iter()
            .find(|(_, uri)| *uri == playlist_path)
            .with_context(|| format!("the master does not point at {}: {master}", playlist_path.display()))?;
        ensure!(variant["bandwidth"].as_u64() == Some(*bandwidth), "{variant}: the master says BANDWIDTH={bandwidth}");
        let folder = playlist_path.parent().context("variant has no folder")?;
        let playlist =
            std::fs::read_to_string(&playlist_path).with_context(|| format!("{}", playlist_path.display()))?;
        let name = playlist_path.display();
        ensure!(playlist.starts_with("#EXTM3U"), "{name}: {playlist}");
        ensure!(tag_value(&playlist, "#EXT-X-PLAYLIST-TYPE") == Some("VOD"), "{name} is not VOD: {playlist}");
        ensure!(playlist.lines().any(|l| l.trim() == "#EXT-X-ENDLIST"), "{name} has no ENDLIST: {playlist}");
        let map = tag_value(&playlist, "#EXT-X-MAP")
            .with_context(|| format!("{name} is not fMP4 (no EXT-X-MAP): {playlist}"))?;
        ensure!(
            attribute(map, "URI") == Some("init.mp4") && folder.join("init.mp4").is_file(),
            "{name}: EXT-X-MAP {map}, or init.mp4 missing"
        );
        let target: f64 = tag_value(&playlist, "#EXT-X-TARGETDURATION")
            .and_then(|t| t.trim().parse().ok())
            .with_context(|| format!("{name}: no TARGETDURATION"))?;
        ensure!(target <= segment_s.ceil() + 1.0, "{name}: TARGETDURATION {target} for {segment_s} s segments");
        let durations: Vec<f64> = playlist
            .lines()
            .filter_map(|l| l.strip_prefix("#EXTINF:"))
            .filter_map(|d| d.split(',').next()?.trim().parse().ok())
            .collect();
        let segments: Vec<&str> =
            playlist.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        ensure!(
            !segments.is_empty() && segments.len() == durations.len(),
            "{name}: {} segments for {} EXTINF",
            segments.len(),
            durations.len()
        );
        for segment in &segments {
            ensure!(
                segment.ends_with(".m4s") && folder.join(segment).is_file(),
                "{name}: segment {segment} is not an .m4s beside it"
            );
        }
        for (index, duration) in durations.iter().enumerate() {
            ensure!(
                duration.round() <= target,
                "{name}: segment {index} lasts {duration} s, over TARGETDURATION {target}"
            );
            if index + 1 < durations.len() {
                ensure!(
                    close(*duration, segment_s, 0.5),
                    "{name}: segment {index} lasts {duration} s, expected about {segment_s} s"
                );
            }
        }
        ensure!(
            variant["segments"].as_u64() == Some(segments.len() as u64),
            "{variant}: the playlist has {} segments",
            segments.len()
        );
        total_segments += segments.len();

        let probe = ffprobe_json(&playlist_path)?;
        let stream = audio_stream(&probe)?;
        ensure!(
            stream["codec_name"] == "aac"
                && probe_number(&stream["sample_rate"]) == Some(44_100.0)
                && stream["channels"] == 2,
            "{name}: expected 44.1 kHz stereo AAC, got {stream}"
        );
        let duration = probe_number(&probe["format"]["duration"]).context("no duration")?;
        ensure!(
            close(duration, expected_s, AAC_FRAME / 44_100.0 + SLACK_S),
            "{name}: lasts {duration:.4} s, expected {expected_s:.4} s within one AAC frame"
        );
        let media: u64 = segments.iter().map(|s| file_size(&folder.join(s))).sum::<Result<u64>>()?;
        let nominal = integer(&variant["bitrate_kbps"], "variant bitrate")? as f64;
        let actual_kbps = media as f64 * 8.0 / duration / 1000.0;
        ensure!(
            !rich_signal || close(actual_kbps, nominal, nominal * 0.2),
            "{name}: the segments average {actual_kbps:.1} kb/s for a {nominal} kb/s variant"
        );
    }
    ensure!(total_segments > 0, "no segments at all");

    // A player starts from the master: ffprobe must get through it to AAC audio.
    let probe = ffprobe_json_with(&master_path, &["-allowed_extensions", "ALL", "-protocol_whitelist", "file"])?;
    let programs = probe["programs"].as_array().map_or(0, Vec::len);
    let aac_streams = probe["streams"].as_array().map_or(0, |s| s.iter().filter(|s| s["codec_name"] == "aac").count());
    ensure!(
        programs == variants_kbps.len() && aac_streams == variants_kbps.len(),
        "ffprobe found {programs} programs and {aac_streams} AAC streams in the master"
    );
    Ok(())
}

/// The three stereo renditions of the default ladder, checked lightly: right codec, rate,
/// two channels, and not silent (a mix-down that loses the signal would be).
fn check_default_ladder_is_stereo(out: &Path) -> Result<()> {
    for (file, codec, rate) in [
        ("mp3_128.mp3", "mp3", 44_100.0),
        ("opus_64.opus", "opus", 48_000.0),
        ("aac_hls/96k/index.m3u8", "aac", 44_100.0),
        ("preview.mp3", "mp3", 44_100.0),
    ] {
        let probe = ffprobe_json(&out.join(file))?;
        let stream = audio_stream(&probe)?;
        ensure!(
            stream["codec_name"] == codec
                && probe_number(&stream["sample_rate"]) == Some(rate)
                && stream["channels"] == 2,
            "{file}: expected {codec} {rate} Hz stereo, got {stream}"
        );
    }
    let peak = max_volume_db(&out.join("mp3_128.mp3"), &[])?;
    ensure!(peak > -20.0, "mp3_128 is near silent: peak {peak} dBFS");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------------------

/// What the manifest's `source` block must say about a fixture.
#[derive(Debug)]
struct Source {
    container: &'static str,
    codec: &'static str,
    sample_rate: u64,
    channels: u64,
    bits: Option<u64>,
    /// How long the fixture is, and how far a decoder may be off (a codec frame for lossy
    /// codecs, whose delay and padding a reader may or may not trim).
    seconds: f64,
    tolerance_s: f64,
}

fn lossless(container: &'static str, codec: &'static str, rate: u64, channels: u64, bits: u64) -> Source {
    Source { container, codec, sample_rate: rate, channels, bits: Some(bits), seconds: 8.0, tolerance_s: 0.002 }
}

fn lossy(container: &'static str, codec: &'static str, rate: u64, frame_samples: f64) -> Source {
    Source {
        container,
        codec,
        sample_rate: rate,
        channels: 2,
        bits: None,
        seconds: 8.0,
        tolerance_s: frame_samples / rate as f64 + 0.002,
    }
}

/// Makes a fixture with `make`, processes it, and checks the source block, the waveform's
/// length rule, a measured loudness and stereo renditions.
fn check_format(file_name: &str, make: impl FnOnce(&Path) -> Result<()>, expected: &Source) -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join(file_name);
    make(&input)?;
    let out = dir.path().join("out");
    let manifest = process_ok(&input, &out, &[])?;
    let source = &manifest["source"];
    ensure!(
        source["container"] == expected.container && source["codec"] == expected.codec,
        "expected {expected:?}, got {source}"
    );
    ensure!(
        source["sample_rate"] == expected.sample_rate && source["channels"] == expected.channels,
        "expected {expected:?}, got {source}"
    );
    match expected.bits {
        Some(bits) => ensure!(source["bits_per_sample"] == bits, "expected {bits} bits: {source}"),
        None => ensure!(source["bits_per_sample"].is_null(), "a lossy codec has no bit depth: {source}"),
    }
    let duration_ms = integer(&source["duration_ms"], "source.duration_ms")?;
    ensure!(
        close(duration_ms as f64 / 1000.0, expected.seconds, expected.tolerance_s),
        "source lasts {duration_ms} ms, expected {} s within {} s",
        expected.seconds,
        expected.tolerance_s
    );
    // The waveform covers the source frames at the source rate; the manifest's duration is
    // rounded to a millisecond, which can move the count by one pixel.
    let frames = duration_ms as f64 * expected.sample_rate as f64 / 1000.0;
    let length = integer(&manifest["waveform"]["length"], "waveform.length")?;
    ensure!(close(length as f64, (frames / 256.0).ceil(), 1.0), "waveform length {length} for about {frames} frames");
    let lufs = number(&manifest["loudness"]["integrated_lufs"], "integrated_lufs")?;
    // −6 dBFS sines read from about −10 LUFS (mono) to about 0 LUFS (7.1, where the
    // surrounds weigh more): the point here is that loudness was measured at all.
    ensure!((-30.0..3.0).contains(&lufs), "a −6 dBFS tone reads {lufs} LUFS");
    check_default_ladder_is_stereo(&out)
}

#[test]
fn wav_pcm_s16() -> Result<()> {
    check_format(
        "s16.wav",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "pcm_s16le"]),
        &lossless("wav", "pcm_s16le", 44_100, 2, 16),
    )
}

#[test]
fn wav_pcm_s24() -> Result<()> {
    // ffmpeg writes WAVE_FORMAT_EXTENSIBLE for anything over 16 bits, so the plain-PCM
    // header is our own.
    check_format(
        "s24.wav",
        |p| write_wav(p, WAVE_FORMAT_PCM, 2, 48_000, 24, &raw_pcm(8.0, 48_000, 2, "s24le")?),
        &lossless("wav", "pcm_s24le", 48_000, 2, 24),
    )
}

#[test]
fn wav_pcm_s32() -> Result<()> {
    check_format(
        "s32.wav",
        |p| write_wav(p, WAVE_FORMAT_PCM, 2, 44_100, 32, &raw_pcm(8.0, 44_100, 2, "s32le")?),
        &lossless("wav", "pcm_s32le", 44_100, 2, 32),
    )
}

#[test]
fn wav_ieee_float_32() -> Result<()> {
    // The fmt chunk declares 32 bits per sample, and ffprobe reports 32 for pcm_f32le: the
    // depth is defined here even though the samples are floats.
    check_format(
        "f32.wav",
        |p| write_wav(p, WAVE_FORMAT_IEEE_FLOAT, 2, 48_000, 32, &raw_pcm(8.0, 48_000, 2, "f32le")?),
        &lossless("wav", "pcm_f32le", 48_000, 2, 32),
    )
}

#[test]
fn wav_extensible_six_channels() -> Result<()> {
    check_format(
        "extensible.wav",
        |p| {
            tone(p, 8.0, 48_000, 6, &["-c:a", "pcm_s24le"])?;
            let bytes = std::fs::read(p)?;
            // The fmt chunk's format tag sits right after "fmt " and its size.
            ensure!(
                bytes.get(12..16) == Some(b"fmt ".as_slice())
                    && bytes.get(20..22) == Some(WAVE_FORMAT_EXTENSIBLE.to_le_bytes().as_slice()),
                "the fixture is not WAVE_FORMAT_EXTENSIBLE: {:02x?}",
                bytes.get(..24)
            );
            Ok(())
        },
        &lossless("wav", "pcm_s24le", 48_000, 6, 24),
    )
}

#[test]
fn aiff() -> Result<()> {
    check_format(
        "tone.aiff",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "pcm_s16be"]),
        &lossless("aiff", "pcm_s16be", 44_100, 2, 16),
    )
}

#[test]
fn flac_24_bit_96k() -> Result<()> {
    check_format(
        "hires.flac",
        |p| tone(p, 8.0, 96_000, 2, &["-c:a", "flac", "-sample_fmt", "s32", "-bits_per_raw_sample", "24"]),
        &lossless("flac", "flac", 96_000, 2, 24),
    )
}

#[test]
fn mp3_vbr() -> Result<()> {
    check_format(
        "tone.mp3",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "libmp3lame", "-q:a", "2"]),
        &lossy("mp3", "mp3", 44_100, MP3_FRAME),
    )
}

#[test]
fn aac_in_m4a() -> Result<()> {
    check_format(
        "tone.m4a",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "aac", "-b:a", "160k"]),
        &lossy("mp4", "aac", 44_100, AAC_FRAME),
    )
}

// ffmpeg's FLAC and ALAC encoders pick 24 bits for the sine's float samples unless told
// otherwise, so the 16-bit fixtures ask for 16-bit samples.

#[test]
fn alac_in_m4a() -> Result<()> {
    check_format(
        "lossless.m4a",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "alac", "-sample_fmt", "s16p"]),
        &lossless("mp4", "alac", 44_100, 2, 16),
    )
}

#[test]
fn alac_24_bit_in_m4a() -> Result<()> {
    // The ALAC cookie of this file declares a bit depth of 24 (ffprobe's
    // bits_per_raw_sample), though its decoder hands out 32-bit samples.
    check_format(
        "hires.m4a",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "alac", "-sample_fmt", "s32p"]),
        &lossless("mp4", "alac", 44_100, 2, 24),
    )
}

#[test]
fn ogg_vorbis() -> Result<()> {
    // A Vorbis long block is 2048 samples.
    check_format(
        "tone.ogg",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "libvorbis", "-q:a", "4"]),
        &lossy("ogg", "vorbis", 44_100, 2048.0),
    )
}

#[test]
fn opus_in_ogg() -> Result<()> {
    check_format(
        "tone.opus",
        |p| tone(p, 8.0, 48_000, 2, &["-c:a", "libopus", "-b:a", "96k"]),
        &lossy("ogg", "opus", 48_000, 960.0),
    )
}

#[test]
fn the_type_comes_from_the_bytes_not_the_extension() -> Result<()> {
    // A FLAC named .mp3 and a WAV named .flac are what their bytes say.
    check_format(
        "really-flac.mp3",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "flac", "-sample_fmt", "s16", "-f", "flac"]),
        &lossless("flac", "flac", 44_100, 2, 16),
    )?;
    check_format(
        "really-wav.flac",
        |p| tone(p, 8.0, 44_100, 2, &["-c:a", "pcm_s16le", "-f", "wav"]),
        &lossless("wav", "pcm_s16le", 44_100, 2, 16),
    )
}

// ---------------------------------------------------------------------------------------
// Channels and sample rates
// ---------------------------------------------------------------------------------------

#[test]
fn mono_becomes_stereo_renditions() -> Result<()> {
    check_format(
        "mono.wav",
        |p| tone(p, 8.0, 44_100, 1, &["-c:a", "pcm_s16le"]),
        &lossless("wav", "pcm_s16le", 44_100, 1, 16),
    )
}

#[test]
fn surround_5_1_aac_is_mixed_down_to_stereo() -> Result<()> {
    let mut expected = lossy("mp4", "aac", 48_000, AAC_FRAME);
    expected.channels = 6;
    check_format("surround51.m4a", |p| tone(p, 8.0, 48_000, 6, &["-c:a", "aac", "-b:a", "384k"]), &expected)
}

#[test]
fn surround_7_1_flac_is_mixed_down_to_stereo() -> Result<()> {
    check_format(
        "surround71.flac",
        |p| tone(p, 8.0, 48_000, 8, &["-c:a", "flac", "-sample_fmt", "s16"]),
        &lossless("flac", "flac", 48_000, 8, 16),
    )
}

#[test]
fn rate_8_khz_is_accepted() -> Result<()> {
    check_format(
        "phone.wav",
        |p| tone(p, 8.0, 8_000, 1, &["-c:a", "pcm_s16le"]),
        &lossless("wav", "pcm_s16le", 8_000, 1, 16),
    )
}

#[test]
fn rate_192_khz_is_accepted() -> Result<()> {
    check_format(
        "hires.wav",
        |p| tone(p, 8.0, 192_000, 2, &["-c:a", "pcm_s24le"]),
        &lossless("wav", "pcm_s24le", 192_000, 2, 24),
    )
}

// ---------------------------------------------------------------------------------------
// Loudness
// ---------------------------------------------------------------------------------------

#[test]
fn sine_at_minus_23_dbfs_reads_minus_23_lufs() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("ref.wav");
    // EBU Tech 3341's calibration: a 1 kHz sine of peak −23 dBFS on both channels of a
    // stereo pair reads −23.0 LUFS.
    let amplitude = format!("{}", 10f64.powf(-23.0 / 20.0));
    let input_str = input.to_str().context("temp path is not UTF-8")?;
    sox(&[
        "-D", "-n", "-r", "48000", "-c", "2", "-b", "16", input_str, "synth", "20", "sine", "1000", "vol", &amplitude,
    ])?;
    let manifest = process_ok(&input, &dir.path().join("out"), &[])?;
    let loudness = &manifest["loudness"];
    let integrated = number(&loudness["integrated_lufs"], "integrated_lufs")?;
    ensure!(close(integrated, -23.0, 0.1), "integrated {integrated} LUFS, expected −23.0 ± 0.1: {loudness}");
    let range = number(&loudness["range_lu"], "range_lu")?;
    ensure!(range.abs() <= 0.5, "a steady tone has no loudness range: {loudness}");
    let sample_peak = number(&loudness["sample_peak_dbfs"], "sample_peak_dbfs")?;
    ensure!(close(sample_peak, -23.0, 0.1), "sample peak {sample_peak} dBFS, expected −23.0: {loudness}");
    let true_peak = number(&loudness["true_peak_dbtp"], "true_peak_dbtp")?;
    ensure!(
        close(true_peak, -23.0, 0.3) && true_peak >= sample_peak - 0.05,
        "true peak {true_peak} dBTP, expected about −23.0 and not under the sample peak: {loudness}"
    );
    // ReplayGain 2.0 plays tracks at −18 LUFS, so this one gets +5 dB.
    let gain = number(&loudness["replaygain_track_gain_db"], "replaygain_track_gain_db")?;
    ensure!(
        close(gain, -18.0 - integrated, 0.1),
        "ReplayGain {gain} dB, expected {} dB (−18 LUFS reference): {loudness}",
        -18.0 - integrated
    );
    Ok(())
}

#[test]
fn loudness_agrees_with_ffmpeg_ebur128() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("rich.wav");
    // Pink noise and two tones under a slow swell: a loudness range of several LU. 48 kHz
    // because ffmpeg's meter resamples anything else. ffmpeg samples the short-term loudness
    // for LRA at 10 Hz, as EBU Tech 3342 (2016) requires, so on 20 s the LRA comparison also
    // tells whether the meter does.
    let input_str = input.to_str().context("temp path is not UTF-8")?;
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "anoisesrc=color=pink:seed=7:amplitude=0.25:sample_rate=48000:duration=20",
        "-f",
        "lavfi",
        "-i",
        "aevalsrc=exprs='0.2*sin(2*PI*220*t)*(0.5+0.5*sin(2*PI*t/7))+0.1*sin(2*PI*3000*t)':s=48000:d=20",
        "-filter_complex",
        "[0][1]amix=inputs=2:normalize=0,volume='0.3+0.7*abs(sin(2*PI*t/13))':eval=frame,aformat=channel_layouts=stereo",
        "-c:a",
        "pcm_s16le",
        "-fflags",
        "+bitexact",
        input_str,
    ])?;
    let reference = ebur128_reference(&input)?;
    let manifest = process_ok(&input, &dir.path().join("out"), &[])?;
    let loudness = &manifest["loudness"];
    let integrated = number(&loudness["integrated_lufs"], "integrated_lufs")?;
    let range = number(&loudness["range_lu"], "range_lu")?;
    let true_peak = number(&loudness["true_peak_dbtp"], "true_peak_dbtp")?;
    let sample_peak = number(&loudness["sample_peak_dbfs"], "sample_peak_dbfs")?;
    let mut mismatches = Vec::new();
    if !close(integrated, reference.integrated_lufs, 0.2) {
        mismatches.push(format!("integrated {integrated} vs ffmpeg {}", reference.integrated_lufs));
    }
    if !close(range, reference.range_lu, 0.5) {
        mismatches.push(format!("LRA {range} vs ffmpeg {}", reference.range_lu));
    }
    if !close(true_peak, reference.true_peak_dbtp, 0.3) {
        mismatches.push(format!("true peak {true_peak} vs ffmpeg {}", reference.true_peak_dbtp));
    }
    let detected = max_volume_db(&input, &[])?;
    if !close(sample_peak, detected, 0.15) {
        mismatches.push(format!("sample peak {sample_peak} vs volumedetect {detected}"));
    }
    ensure!(mismatches.is_empty(), "{}\nmanifest: {loudness}\nffmpeg: {reference:?}", mismatches.join("\n"));
    ensure!(reference.range_lu > 3.0, "the fixture is too steady: {reference:?}");
    Ok(())
}

#[test]
fn true_peak_finds_the_peaks_between_samples() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("quarter.wav");
    // A sine at a quarter of the sample rate, 45° off: every sample lands at ±0.707 of the
    // wave's peak of 0.5, so the sample peak is −9.03 dBFS and the true peak −6.02 dBTP.
    render(
        &input,
        "aevalsrc=exprs='0.5*sin(2*PI*12000*t+PI/4)|0.5*sin(2*PI*12000*t+PI/4)':s=48000:d=10:c=stereo",
        &["-c:a", "pcm_s16le"],
    )?;
    let manifest = process_ok(&input, &dir.path().join("out"), &[])?;
    let loudness = &manifest["loudness"];
    let sample_peak = number(&loudness["sample_peak_dbfs"], "sample_peak_dbfs")?;
    let true_peak = number(&loudness["true_peak_dbtp"], "true_peak_dbtp")?;
    ensure!(close(sample_peak, -9.03, 0.1), "sample peak {sample_peak} dBFS, expected −9.03: {loudness}");
    ensure!(
        close(true_peak, -6.02, 0.3),
        "true peak {true_peak} dBTP, expected −6.02 (3 dB over the samples): {loudness}"
    );
    Ok(())
}

#[test]
fn silence_has_null_loudness() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("silence.wav");
    render(&input, "anullsrc=channel_layout=stereo:sample_rate=44100:duration=8", &["-c:a", "pcm_s16le"])?;
    let out = dir.path().join("out");
    let manifest = process_ok(&input, &out, &[])?;
    let loudness = &manifest["loudness"];
    for key in ["integrated_lufs", "true_peak_dbtp", "sample_peak_dbfs", "replaygain_track_gain_db"] {
        ensure!(loudness[key].is_null(), "{key} of silence is not null: {loudness}");
    }
    ensure!(loudness["range_lu"].as_f64() == Some(0.0), "silence has a loudness range: {loudness}");
    let waveform: Value = serde_json::from_slice(&std::fs::read(out.join("waveform.json"))?)?;
    let data = waveform["data"].as_array().context("no waveform data")?;
    ensure!(!data.is_empty() && data.iter().all(|v| v == 0), "the waveform of silence is not flat");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Renditions
// ---------------------------------------------------------------------------------------

/// Pink noise with a tone, so the encoders have something to spend their bitrate on.
fn music_like(path: &Path, secs: f64) -> Result<()> {
    let source = format!("anoisesrc=color=pink:seed=11:amplitude=0.3:sample_rate=44100:duration={secs}");
    let tone = tone_source(secs, 44_100, 1);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &source,
        "-f",
        "lavfi",
        "-i",
        &tone,
        "-filter_complex",
        "[0][1]amix=inputs=2:normalize=0,aformat=channel_layouts=stereo",
        "-c:a",
        "pcm_s16le",
        "-fflags",
        "+bitexact",
        path.to_str().context("temp path is not UTF-8")?,
    ])
}

#[test]
fn default_ladder_renditions_play_as_promised() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("track.wav");
    music_like(&input, 10.0)?;
    let out = dir.path().join("out");
    let manifest = process_ok(&input, &out, &[])?;

    let presets: BTreeSet<&str> = renditions(&manifest)?.iter().filter_map(|r| r["preset"].as_str()).collect();
    ensure!(presets == BTreeSet::from(["aac_hls", "mp3_128", "opus_64", "preview"]), "presets {presets:?}");
    let expect = |preset: &str, fields: Value| -> Result<()> {
        let rendition = rendition(&manifest, preset)?;
        for (key, value) in fields.as_object().context("fields")? {
            ensure!(&rendition[key] == value, "{preset}.{key}: expected {value}, got {rendition}");
        }
        Ok(())
    };
    expect(
        "mp3_128",
        serde_json::json!({"kind": "progressive", "path": "mp3_128.mp3", "codec": "mp3",
            "bitrate_kbps": 128, "sample_rate": 44100, "channels": 2}),
    )?;
    expect(
        "opus_64",
        serde_json::json!({"kind": "progressive", "path": "opus_64.opus", "codec": "opus",
            "bitrate_kbps": 64, "sample_rate": 48000, "channels": 2}),
    )?;
    expect(
        "aac_hls",
        serde_json::json!({"kind": "hls", "path": "aac_hls/master.m3u8", "codec": "aac",
            "bitrate_kbps": 256, "sample_rate": 44100, "channels": 2}),
    )?;
    expect(
        "preview",
        serde_json::json!({"kind": "progressive", "path": "preview.mp3", "codec": "mp3",
            "bitrate_kbps": 128, "sample_rate": 44100, "channels": 2}),
    )?;
    for rendition in renditions(&manifest)? {
        let ms = integer(&rendition["duration_ms"], "duration_ms")? as f64;
        ensure!(
            close(ms / 1000.0, 10.0, MP3_FRAME / 44_100.0 + SLACK_S),
            "{rendition}: duration_ms {ms} for a 10 s source"
        );
    }

    let mut failures = Vec::new();
    let mut record = |what: &str, result: Result<()>| {
        if let Err(err) = result {
            failures.push(format!("{what}: {err:#}"));
        }
    };
    record("mp3_128", check_mp3(&out.join("mp3_128.mp3"), 128.0, 44_100.0, 10.0));
    record("opus_64", check_opus(&out.join("opus_64.opus"), 10.0));
    record(
        "aac_hls",
        rendition(&manifest, "aac_hls").and_then(|r| check_hls(&out, r, &[96, 160, 256], 6.0, 10.0, true)),
    );
    record("preview", check_mp3(&out.join("preview.mp3"), 128.0, 44_100.0, 10.0));
    record("variant paths", check_default_variant_paths(&manifest));
    record("no artwork", check_no_artwork(&out, &manifest));
    record("manifest written last", check_manifest_written_last(&out));
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn check_default_variant_paths(manifest: &Value) -> Result<()> {
    let variants: Vec<&str> = rendition(manifest, "aac_hls")?["variants"]
        .as_array()
        .context("no variants")?
        .iter()
        .filter_map(|v| v["path"].as_str())
        .collect();
    ensure!(
        variants == ["aac_hls/96k/index.m3u8", "aac_hls/160k/index.m3u8", "aac_hls/256k/index.m3u8"],
        "variant paths {variants:?}"
    );
    Ok(())
}

/// An input without cover art gets `"artwork": null` and no artwork file.
fn check_no_artwork(out: &Path, manifest: &Value) -> Result<()> {
    ensure!(manifest["tags"]["artwork"].is_null(), "{}", manifest["tags"]);
    let stray: Vec<PathBuf> =
        files_under(out)?.into_iter().filter(|f| f.file_stem().is_some_and(|s| s == "artwork")).collect();
    ensure!(stray.is_empty(), "artwork without cover art: {stray:?}");
    Ok(())
}

/// A reader that sees manifest.json can trust every file it names is complete.
fn check_manifest_written_last(out: &Path) -> Result<()> {
    let manifest_time = std::fs::metadata(out.join("manifest.json"))?.modified()?;
    for file in files_under(out)? {
        let modified = std::fs::metadata(&file)?.modified()?;
        ensure!(modified <= manifest_time, "{} was written after manifest.json", file.display());
    }
    Ok(())
}

#[test]
fn preview_is_the_first_30_seconds_of_a_longer_track() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("long.wav");
    let frames = 36 * 22_050;
    write_wav(&input, WAVE_FORMAT_PCM, 2, 22_050, 16, &sine_s16(frames, 2, 22_050, 0.5, 0))?;
    let out = dir.path().join("out");
    let manifest = process_ok(&input, &out, &[])?;
    ensure!(manifest["source"]["duration_ms"] == 36_000, "{}", manifest["source"]);
    let preview = rendition(&manifest, "preview")?;
    let ms = integer(&preview["duration_ms"], "preview.duration_ms")?;
    ensure!(
        close(ms as f64 / 1000.0, 30.0, MP3_FRAME / 44_100.0 + SLACK_S),
        "preview duration_ms {ms}, expected 30000"
    );
    check_mp3(&out.join("preview.mp3"), 128.0, 44_100.0, 30.0)?;
    check_mp3(&out.join("mp3_128.mp3"), 128.0, 44_100.0, 36.0)
}

// ---------------------------------------------------------------------------------------
// Waveform
// ---------------------------------------------------------------------------------------

/// A parsed audiowaveform binary (`.dat`, version 2, one channel).
#[derive(Debug)]
struct WaveformDat {
    version: i32,
    flags: u32,
    sample_rate: i32,
    samples_per_pixel: i32,
    length: u32,
    channels: i32,
    data: Vec<i64>,
}

fn parse_dat(bytes: &[u8]) -> Result<WaveformDat> {
    ensure!(bytes.len() >= 24, "waveform.dat is {} bytes", bytes.len());
    let word = |at: usize| -> [u8; 4] { [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]] };
    let flags = u32::from_le_bytes(word(4));
    let body = &bytes[24..];
    let data = if flags & 1 == 1 {
        body.iter().map(|b| i64::from(*b as i8)).collect()
    } else {
        body.chunks_exact(2).map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))).collect()
    };
    Ok(WaveformDat {
        version: i32::from_le_bytes(word(0)),
        flags,
        sample_rate: i32::from_le_bytes(word(8)),
        samples_per_pixel: i32::from_le_bytes(word(12)),
        length: u32::from_le_bytes(word(16)),
        channels: i32::from_le_bytes(word(20)),
        data,
    })
}

/// The three waveform files of `out` against one another and against the audiowaveform v2
/// layout, for `frames` source frames at `rate`. Returns the JSON's data and the summary.
fn check_waveform_files(
    out: &Path,
    manifest: &Value,
    frames: u64,
    rate: u64,
    samples_per_pixel: u64,
    bits: u32,
    summary_points: usize,
) -> Result<(Vec<i64>, Vec<f64>)> {
    let length = frames.div_ceil(samples_per_pixel);
    let listed = &manifest["waveform"];
    ensure!(
        listed["json"] == "waveform.json"
            && listed["dat"] == "waveform.dat"
            && listed["summary"] == "waveform_summary.json"
            && listed["samples_per_pixel"] == samples_per_pixel
            && listed["length"] == length,
        "expected {length} pixels of {samples_per_pixel} frames: {listed}"
    );

    let json: Value = serde_json::from_slice(&std::fs::read(out.join("waveform.json"))?)?;
    let header = serde_json::json!({"version": 2, "channels": 1, "sample_rate": rate,
        "samples_per_pixel": samples_per_pixel, "bits": bits, "length": length});
    for (key, value) in header.as_object().context("header")? {
        ensure!(&json[key] == value, "waveform.json {key}: expected {value}, got {}", json[key]);
    }
    let data: Vec<i64> = json["data"]
        .as_array()
        .context("waveform.json has no data")?
        .iter()
        .map(|v| v.as_i64().with_context(|| format!("{v} is not an integer")))
        .collect::<Result<_>>()?;
    ensure!(data.len() as u64 == 2 * length, "waveform.json holds {} values for {length} pixels", data.len());
    let limit = 1i64 << (bits - 1);
    ensure!(data.iter().all(|v| (-limit..limit).contains(v)), "waveform.json has values outside {bits} bits");
    ensure!(data.chunks_exact(2).all(|pair| pair[0] <= pair[1]), "waveform.json has a pixel whose min is over its max");

    let dat_bytes = std::fs::read(out.join("waveform.dat"))?;
    let bytes_per_value = u64::from(bits / 8);
    ensure!(
        dat_bytes.len() as u64 == 24 + 2 * length * bytes_per_value,
        "waveform.dat is {} bytes, expected 24 + {}",
        dat_bytes.len(),
        2 * length * bytes_per_value
    );
    let dat = parse_dat(&dat_bytes)?;
    ensure!(
        dat.version == 2
            && (dat.flags & 1 == 1) == (bits == 8)
            && i64::from(dat.sample_rate) == rate as i64
            && i64::from(dat.samples_per_pixel) == samples_per_pixel as i64
            && u64::from(dat.length) == length
            && dat.channels == 1,
        "waveform.dat header: {:?}",
        WaveformDat { data: Vec::new(), ..dat }
    );
    ensure!(dat.data == data, "waveform.dat and waveform.json disagree");

    let summary: Vec<f64> = serde_json::from_slice::<Value>(&std::fs::read(out.join("waveform_summary.json"))?)?
        .as_array()
        .context("the summary is not an array")?
        .iter()
        .map(|v| v.as_f64().with_context(|| format!("{v} is not a number")))
        .collect::<Result<_>>()?;
    ensure!(summary.len() == summary_points, "the summary has {} points, expected {summary_points}", summary.len());
    ensure!(summary.iter().all(|v| (0.0..=1.0).contains(v)), "summary values outside 0..1");
    Ok((data, summary))
}

#[test]
fn waveform_files_follow_audiowaveform_v2() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("half.wav");
    // Silence for 5 s, then a −6 dBFS sine: a frame count that is not a multiple of 256,
    // so the last pixel is partial and the length must round up.
    let frames = 441_100;
    let onset = 220_500;
    write_wav(&input, WAVE_FORMAT_PCM, 2, 44_100, 16, &sine_s16(frames, 2, 44_100, 0.5, onset))?;
    let out = dir.path().join("out");
    let manifest = process_ok(&input, &out, &[])?;
    let (data, summary) = check_waveform_files(&out, &manifest, frames, 44_100, 256, 8, 1800)?;
    ensure!(data.len() == 2 * 1724, "1724 pixels expected");

    let pixels: Vec<&[i64]> = data.chunks_exact(2).collect();
    let silent = (onset / 256) as usize;
    ensure!(
        pixels[..silent].iter().all(|p| p[0].abs() <= 1 && p[1].abs() <= 1),
        "pixels before the onset are not flat"
    );
    // Half of full scale is 64 in 8 bits; the last pixel is partial, so it is left out.
    for (index, pixel) in pixels.iter().enumerate().take(pixels.len() - 1).skip(silent + 1) {
        ensure!(
            (62..=65).contains(&pixel[1]) && (-65..=-62).contains(&pixel[0]),
            "pixel {index} is {pixel:?}, expected about ±64 for a −6 dBFS sine"
        );
    }
    ensure!(
        summary[..890].iter().all(|v| *v <= 0.02),
        "the summary is not flat over the first half: {:?}",
        &summary[..890]
    );
    ensure!(
        summary[910..1799].iter().all(|v| *v >= 0.2),
        "the summary is not high over the second half: {:?}",
        &summary[910..]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------------------

#[test]
fn custom_presets_replace_the_ladder_and_the_waveform_settings() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("late.wav");
    // Silent for 2 s, then a tone: a clip that starts at 2 s opens loud.
    let frames = 441_000;
    write_wav(&input, WAVE_FORMAT_PCM, 2, 44_100, 16, &sine_s16(frames, 2, 44_100, 0.5, 88_200))?;
    let presets = dir.path().join("presets.toml");
    std::fs::write(
        &presets,
        r#"
[waveform]
samples_per_pixel = 512
bits = 16
summary_points = 100

[[presets]]
name = "opus_32"
kind = "progressive"
codec = "opus"
bitrate_kbps = 32
sample_rate = 48000

[[presets]]
name = "aac_small"
kind = "hls"
codec = "aac"
sample_rate = 44100
variants_kbps = [64, 128]
segment_s = 4

[[presets]]
name = "teaser"
kind = "progressive"
codec = "mp3"
bitrate_kbps = 96
sample_rate = 44100
clip_start_s = 2
clip_duration_s = 5
"#,
    )?;
    let out = dir.path().join("out");
    let presets_arg = presets.to_str().context("temp path is not UTF-8")?;
    let manifest = process_ok(&input, &out, &["--presets", presets_arg])?;

    let names: Vec<&str> = renditions(&manifest)?.iter().filter_map(|r| r["preset"].as_str()).collect();
    ensure!(
        names.iter().copied().collect::<BTreeSet<_>>() == BTreeSet::from(["aac_small", "opus_32", "teaser"])
            && names.len() == 3,
        "the presets file replaces the ladder, got {names:?}"
    );
    for default in ["mp3_128.mp3", "opus_64.opus", "preview.mp3", "aac_hls"] {
        ensure!(!out.join(default).exists(), "{default} was made though the presets file replaces the default ladder");
    }

    let mut failures = Vec::new();
    let mut record = |what: &str, result: Result<()>| {
        if let Err(err) = result {
            failures.push(format!("{what}: {err:#}"));
        }
    };
    record(
        "opus_32",
        rendition(&manifest, "opus_32").and_then(|r| {
            ensure!(r["codec"] == "opus" && r["bitrate_kbps"] == 32, "{r}");
            check_opus(&out.join(text(&r["path"], "path")?), 10.0)
        }),
    );
    record(
        "aac_small",
        rendition(&manifest, "aac_small").and_then(|r| check_hls(&out, r, &[64, 128], 4.0, 10.0, false)),
    );
    record(
        "teaser",
        rendition(&manifest, "teaser").and_then(|r| {
            let ms = integer(&r["duration_ms"], "teaser.duration_ms")?;
            ensure!(
                close(ms as f64 / 1000.0, 5.0, MP3_FRAME / 44_100.0 + SLACK_S),
                "teaser duration_ms {ms}, expected 5000"
            );
            let path = out.join(text(&r["path"], "path")?);
            check_mp3(&path, 96.0, 44_100.0, 5.0)?;
            let opening = max_volume_db(&path, &["-t", "0.5"])?;
            ensure!(opening > -12.0, "the teaser's first 0.5 s peak at {opening} dBFS: the clip did not start at 2 s");
            Ok(())
        }),
    );
    record(
        "waveform",
        check_waveform_files(&out, &manifest, frames, 44_100, 512, 16, 100).and_then(|(data, _)| {
            // Half of full scale in 16 bits.
            let max = data.iter().copied().max().unwrap_or_default();
            ensure!((16_000..=16_500).contains(&max), "the 16-bit waveform peaks at {max}, expected about 16384");
            Ok(())
        }),
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tags and cover art
// ---------------------------------------------------------------------------------------

const TITLE: &str = "Café Nuit — Ω";
const ARTIST: &str = "Ünïcode Ärtist";

/// Encodes a tagged file with `cover` embedded as its front cover.
fn tagged(path: &Path, cover: &Path, codec_args: &[&str]) -> Result<()> {
    let source = tone_source(8.0, 44_100, 2);
    let title = format!("title={TITLE}");
    let artist = format!("artist={ARTIST}");
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        &source,
        "-i",
        cover.to_str().context("temp path is not UTF-8")?,
        "-map",
        "0:a",
        "-map",
        "1:v",
    ];
    args.extend_from_slice(codec_args);
    args.extend_from_slice(&[
        "-c:v",
        "copy",
        "-disposition:v",
        "attached_pic",
        "-metadata:s:v",
        "comment=Cover (front)",
        "-metadata",
        &title,
        "-metadata",
        &artist,
        "-metadata",
        "album=Test Album",
        "-metadata",
        "genre=Ambient",
        "-metadata",
        "date=2021",
        "-metadata",
        "track=7/12",
        path.to_str().context("temp path is not UTF-8")?,
    ]);
    ffmpeg(&args)
}

fn check_tags_and_artwork(file_name: &str, codec_args: &[&str]) -> Result<()> {
    let dir = temp_dir()?;
    let cover = dir.path().join("cover.png");
    cover_png(&cover)?;
    let input = dir.path().join(file_name);
    tagged(&input, &cover, codec_args)?;
    let out = dir.path().join("out");
    let manifest = process_ok(&input, &out, &[])?;
    let expected = serde_json::json!({"title": TITLE, "artist": ARTIST, "album": "Test Album",
        "genre": "Ambient", "year": 2021, "track": 7, "artwork": "artwork.png"});
    ensure!(manifest["tags"] == expected, "tags: expected {expected}, got {}", manifest["tags"]);
    ensure!(
        std::fs::read(out.join("artwork.png"))? == std::fs::read(&cover)?,
        "artwork.png is not the embedded cover byte for byte"
    );
    let probe = ffprobe_json(&out.join("mp3_128.mp3"))?;
    ensure!(
        format_tag(&probe, "title").as_deref() == Some(TITLE)
            && format_tag(&probe, "artist").as_deref() == Some(ARTIST),
        "mp3_128's ID3 does not carry the title and artist: {}",
        probe["format"]
    );
    Ok(())
}

#[test]
fn mp3_tags_and_cover_art_carry_through() -> Result<()> {
    check_tags_and_artwork("tagged.mp3", &["-c:a", "libmp3lame", "-b:a", "192k"])
}

#[test]
fn flac_tags_and_cover_art_carry_through() -> Result<()> {
    check_tags_and_artwork("tagged.flac", &["-c:a", "flac"])
}

// ---------------------------------------------------------------------------------------
// Terminal output
// ---------------------------------------------------------------------------------------

/// Whether `bytes` redraw a line as a progress bar does: a bare carriage return, or an
/// ANSI control sequence other than a colour (`ESC [ … m`), such as erase-line or cursor-up.
/// `\r\n` does not count: a terminal turns every newline into it.
fn redraws(bytes: &[u8]) -> bool {
    let bare_return = bytes.iter().enumerate().any(|(at, b)| *b == b'\r' && bytes.get(at + 1) != Some(&b'\n'));
    if bare_return {
        return true;
    }
    bytes.windows(2).enumerate().any(|(at, pair)| {
        pair == b"\x1b[" && {
            let end = bytes[at + 2..].iter().find(|b| !(b.is_ascii_digit() || **b == b';' || **b == b'?'));
            end.is_some_and(|b| *b != b'm')
        }
    })
}

#[test]
fn without_json_a_short_summary_and_no_progress_bar_off_a_terminal() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("tone.wav");
    tone(&input, 4.0, 44_100, 2, &["-c:a", "pcm_s16le"])?;
    let out = dir.path().join("out");
    let output = run_process(&input, &out, &[])?;
    ensure!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(!stdout.trim().is_empty(), "no summary on stdout");
    ensure!(serde_json::from_str::<Value>(&stdout).is_err(), "without --json stdout is for people, got JSON: {stdout}");
    ensure!(stdout.lines().count() <= 40, "the summary is not short: {stdout}");
    for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        ensure!(
            !redraws(bytes),
            "{stream} redraws lines (a progress bar) off a terminal: {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    ensure!(out.join("manifest.json").is_file(), "no manifest.json");
    Ok(())
}

#[test]
fn a_progress_bar_draws_on_a_terminal() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("tone.wav");
    tone(&input, 8.0, 44_100, 2, &["-c:a", "pcm_s16le"])?;
    let out = dir.path().join("out");
    // `script` runs the command on a pseudo-terminal and copies what it draws to stdout.
    let command = format!("'{}' process '{}' --out '{}'", waveline_bin().display(), input.display(), out.display());
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-c", &command, "/dev/null"]);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
        script.env_remove(name);
    }
    let output = script.output().context("cannot run script(1)")?;
    ensure!(output.status.success(), "{}", describe(&output));
    ensure!(
        redraws(&output.stdout),
        "nothing was redrawn on the terminal: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    ensure!(out.join("manifest.json").is_file(), "no manifest.json");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------------------

#[test]
fn an_out_dir_that_cannot_be_made_is_an_internal_failure() -> Result<()> {
    let dir = temp_dir()?;
    let input = dir.path().join("tone.wav");
    tone(&input, 2.0, 44_100, 2, &["-c:a", "pcm_s16le"])?;
    // The input is fine; the place to write is not: that is not the uploader's fault, so it
    // is exit 1 rather than the bad-input 2.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a directory")?;
    let output = run_process(&input, &blocker.join("out"), &["--json"])?;
    ensure!(output.status.code() == Some(1), "{}", describe(&output));
    ensure!(!String::from_utf8_lossy(&output.stderr).contains("panicked"), "{}", describe(&output));
    Ok(())
}

/// One refused input: the file (which may not exist), an optional presets file, and the
/// error code the JSON must carry.
#[derive(Debug)]
struct BadInput {
    name: &'static str,
    input: PathBuf,
    presets: Option<PathBuf>,
    code: &'static str,
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Encodes a 3 s stereo tone to `name` and keeps the first half of it, as an interrupted
/// upload would.
fn truncated(dir: &Path, name: &str, codec_args: &[&str]) -> Result<PathBuf> {
    let whole = dir.join(format!("whole-{name}"));
    tone(&whole, 3.0, 44_100, 2, codec_args)?;
    let half = dir.join(name);
    cut(&whole, &half, 0.5)?;
    Ok(half)
}

/// A canonical WAV header followed by 0.2 s of 16-bit samples (at 44.1 kHz), the header
/// saying whatever the case needs.
fn lying_wav(dir: &Path, name: &str, channels: u16, rate: u32) -> Result<PathBuf> {
    let data = sine_s16(8_820, channels, 44_100, 0.5, 0);
    let mut bytes = wav_header(WAVE_FORMAT_PCM, channels, rate, 16, u32::try_from(data.len())?);
    bytes.extend_from_slice(&data);
    put(dir, name, &bytes)
}

fn malformed_corpus(dir: &Path) -> Result<Vec<BadInput>> {
    let case = |name, input, code| BadInput { name, input, presets: None, code };
    let mut cases = vec![
        case("0-byte .wav", put(dir, "empty.wav", b"")?, "empty_audio"),
        case("0-byte .mp3", put(dir, "empty.mp3", b"")?, "empty_audio"),
    ];

    for (name, file, seed) in [
        ("random bytes .wav", "random.wav", 1),
        ("random bytes .mp3", "random.mp3", 2),
        ("random bytes .flac", "random.flac", 3),
    ] {
        let bytes = seeded_bytes(seed, 64 * 1024);
        // A seed whose bytes happened to open like audio would test something else.
        ensure!(bytes[0] != 0xff, "seed {seed} opens with an MPEG sync byte");
        cases.push(case(name, put(dir, file, &bytes)?, "unsupported_format"));
    }
    let prose = "This is a plain text file, not audio at all.\n".repeat(200);
    cases.push(case("text named .wav", put(dir, "notes.wav", prose.as_bytes())?, "unsupported_format"));
    cases.push(case("text named .flac", put(dir, "notes.flac", prose.as_bytes())?, "unsupported_format"));
    let png = dir.join("cover.png");
    cover_png(&png)?;
    cases.push(case("PNG named .mp3", put(dir, "cover.mp3", &std::fs::read(&png)?)?, "unsupported_format"));

    for (name, file, codec_args) in [
        ("truncated WAV", "cut.wav", &["-c:a", "pcm_s16le"][..]),
        ("truncated AIFF", "cut.aiff", &["-c:a", "pcm_s16be"][..]),
        ("truncated FLAC", "cut.flac", &["-c:a", "flac"][..]),
        ("truncated MP3 (LAME, Info frame count)", "cut.mp3", &["-c:a", "libmp3lame", "-b:a", "128k"][..]),
        ("truncated M4A (moov at the end)", "cut.m4a", &["-c:a", "aac", "-b:a", "128k"][..]),
        ("truncated Ogg Vorbis", "cut.ogg", &["-c:a", "libvorbis"][..]),
        ("truncated Opus", "cut.opus", &["-c:a", "libopus", "-b:a", "96k"][..]),
    ] {
        cases.push(case(name, truncated(dir, file, codec_args)?, "corrupt_audio"));
    }

    cases.push(case(
        "WAV header, zero data bytes",
        put(dir, "nodata.wav", &wav_header(WAVE_FORMAT_PCM, 2, 44_100, 16, 0))?,
        "empty_audio",
    ));
    cases.push(case("WAV at 0 Hz", lying_wav(dir, "rate0.wav", 2, 0)?, "corrupt_audio"));
    cases.push(case("WAV at 1 GHz", lying_wav(dir, "rate1g.wav", 2, 1_000_000_000)?, "limit_exceeded"));
    cases.push(case("WAV at 4 kHz", lying_wav(dir, "rate4k.wav", 2, 4_000)?, "limit_exceeded"));
    cases.push(case("WAV with 64 channels", lying_wav(dir, "ch64.wav", 64, 44_100)?, "limit_exceeded"));
    let nine = dir.join("ch9.wav");
    write_wav(&nine, WAVE_FORMAT_PCM, 9, 44_100, 16, &sine_s16(44_100, 9, 44_100, 0.5, 0))?;
    cases.push(case("valid WAV with 9 channels", nine, "limit_exceeded"));

    // 8 kHz mono 8-bit declaring 0xFFFFFFF0 bytes (about 149 h) but holding 1 s: the header
    // alone must be enough to refuse it.
    let mut huge = wav_header(WAVE_FORMAT_PCM, 1, 8_000, 8, 0xFFFF_FFF0);
    huge[4..8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    huge.extend((0..8_000).map(|i| {
        let t = f64::from(i) / 8_000.0;
        (128.0 + 64.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as u8
    }));
    cases.push(case("WAV declaring 149 h", put(dir, "huge.wav", &huge)?, "too_long"));

    for (name, file, magic, seed) in [
        ("\"ID3\" then garbage", "id3.mp3", &b"ID3"[..], 4),
        ("\"fLaC\" then garbage", "garbage.flac", &b"fLaC"[..], 5),
        ("\"OggS\" then garbage", "garbage.ogg", &b"OggS"[..], 6),
    ] {
        let mut bytes = magic.to_vec();
        bytes.extend(seeded_bytes(seed, 16 * 1024));
        cases.push(case(name, put(dir, file, &bytes)?, "corrupt_audio"));
    }

    let ten = dir.join("ten.wav");
    write_wav(&ten, WAVE_FORMAT_PCM, 2, 44_100, 16, &sine_s16(441_000, 2, 44_100, 0.5, 0))?;
    let limits = "[limits]\nmax_duration_s = 5\nmax_channels = 8\nmin_sample_rate = 8000\nmax_sample_rate = 192000\n";
    cases.push(BadInput {
        name: "10 s under max_duration_s = 5 (whole [limits] section)",
        input: ten.clone(),
        presets: Some(put(dir, "short.toml", limits.as_bytes())?),
        code: "too_long",
    });
    // A user tightening one limit should not have to restate the others.
    cases.push(BadInput {
        name: "10 s under max_duration_s = 5 (the only key given)",
        input: ten.clone(),
        presets: Some(put(dir, "short-only.toml", b"[limits]\nmax_duration_s = 5\n")?),
        code: "too_long",
    });
    cases.push(case("missing input", dir.join("no-such-file.wav"), "input_unreadable"));
    for (name, file, toml) in [
        ("presets that are not TOML", "broken.toml", "[waveform\nbits = 8\n"),
        ("presets with 12-bit waveform", "bits.toml", "[waveform]\nbits = 12\n"),
        (
            "presets with an unknown codec",
            "codec.toml",
            "[[presets]]\nname = \"wma_64\"\nkind = \"progressive\"\ncodec = \"wma\"\nbitrate_kbps = 64\nsample_rate = 44100\n",
        ),
    ] {
        cases.push(BadInput {
            name,
            input: ten.clone(),
            presets: Some(put(dir, file, toml.as_bytes())?),
            code: "invalid_presets",
        });
    }
    Ok(cases)
}

#[test]
fn malformed_inputs_are_refused_with_exit_2_and_the_right_code() -> Result<()> {
    let dir = temp_dir()?;
    let cases = malformed_corpus(dir.path())?;
    ensure!(cases.len() >= 20, "the corpus has only {} cases", cases.len());
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out-{index}"));
        let mut extra = vec!["--json"];
        if let Some(presets) = &case.presets {
            extra.push("--presets");
            extra.push(presets.to_str().context("temp path is not UTF-8")?);
        }
        let output = run_process(&case.input, &out, &extra)?;
        let mut problems = Vec::new();
        if output.status.code() != Some(2) {
            problems.push(format!("exit {:?}, expected 2", output.status.code()));
        }
        match error_code(&output) {
            Ok(code) if code == case.code => {}
            Ok(code) => problems.push(format!("code {code:?}, expected {:?}", case.code)),
            Err(err) => problems.push(format!("{err:#}")),
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("panicked") {
            problems.push("panicked".to_owned());
        }
        if out.join("manifest.json").exists() {
            problems.push("left a manifest.json".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} ({}): {}\n    stdout: {}\n    stderr: {}",
                case.name,
                case.input.display(),
                problems.join("; "),
                String::from_utf8_lossy(&output.stdout).trim(),
                stderr.trim().lines().last().unwrap_or_default()
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} malformed inputs were mishandled:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}
