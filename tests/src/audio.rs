//! Audio fixtures and measurements for the pipeline suites.
//!
//! Every fixture is made at test time, either by the `ffmpeg` and `sox` command-line tools or,
//! where a test needs a header that no tool would write (a sample rate of zero, sizes that
//! lie), byte by byte by [`wav_header`]. Measurements go through `ffprobe` and `ffmpeg` as
//! well, so the suites judge the pipeline's output with the same tools a user would reach for,
//! never with the pipeline's own code.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The `WAVE_FORMAT_PCM` tag of a WAV `fmt ` chunk: integer samples.
pub const WAVE_FORMAT_PCM: u16 = 0x0001;
/// The `WAVE_FORMAT_IEEE_FLOAT` tag: 32- or 64-bit float samples.
pub const WAVE_FORMAT_IEEE_FLOAT: u16 = 0x0003;
/// The `WAVE_FORMAT_EXTENSIBLE` tag: the real format is a GUID further into the chunk.
pub const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs `ffmpeg` quietly, overwriting its output; fails with ffmpeg's own message.
pub fn ffmpeg(args: &[&str]) -> Result<()> {
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .context("cannot run ffmpeg; run scripts/setup.sh")?;
    ensure!(output.status.success(), "ffmpeg {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// Runs `sox`; fails with sox's own message.
pub fn sox(args: &[&str]) -> Result<()> {
    let output = Command::new("sox").args(args).output().context("cannot run sox; run scripts/setup.sh")?;
    ensure!(output.status.success(), "sox {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// The ffmpeg channel layout for a channel count, when it has a usual one.
fn layout(channels: u32) -> Option<&'static str> {
    match channels {
        1 => Some("mono"),
        2 => Some("stereo"),
        6 => Some("5.1"),
        8 => Some("7.1"),
        _ => None,
    }
}

/// An `aevalsrc` source of `secs` seconds with a different sine on each channel (440 Hz,
/// 550 Hz, …, all at −6 dBFS), so a mix-down that drops or cancels a channel shows.
pub fn tone_source(secs: f64, rate: u32, channels: u32) -> String {
    let exprs: Vec<String> =
        (0..channels).map(|channel| format!("0.5*sin(2*PI*{}*t)", 440.0 * (1.0 + 0.25 * f64::from(channel)))).collect();
    let mut source = format!("aevalsrc=exprs='{}':s={rate}:d={secs}", exprs.join("|"));
    if let Some(layout) = layout(channels) {
        source.push_str(&format!(":c={layout}"));
    }
    source
}

/// Writes an ffmpeg `lavfi` source to `path` with the given output (codec) arguments.
/// `-fflags +bitexact` keeps ffmpeg's own "encoder" tag out, so a file carries only the
/// tags a test gave it.
pub fn render(path: &Path, source: &str, codec_args: &[&str]) -> Result<()> {
    let mut args = vec!["-f", "lavfi", "-i", source, "-fflags", "+bitexact"];
    args.extend_from_slice(codec_args);
    args.push(path_str(path)?);
    ffmpeg(&args)
}

/// A sine fixture (see [`tone_source`]) encoded with `codec_args`, e.g.
/// `["-c:a", "libmp3lame", "-b:a", "192k"]`; the container comes from the extension.
pub fn tone(path: &Path, secs: f64, rate: u32, channels: u32, codec_args: &[&str]) -> Result<()> {
    render(path, &tone_source(secs, rate, channels), codec_args)
}

/// Raw interleaved PCM of a [`tone_source`] in an ffmpeg sample format (`s16le`, `s24le`,
/// `s32le`, `f32le`), for wrapping in a header of the test's own.
pub fn raw_pcm(secs: f64, rate: u32, channels: u32, sample_format: &str) -> Result<Vec<u8>> {
    let source = tone_source(secs, rate, channels);
    let codec = format!("pcm_{sample_format}");
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error"])
        .args(["-f", "lavfi", "-i", &source, "-c:a", &codec, "-f"])
        .args([sample_format, "-"])
        .output()
        .context("cannot run ffmpeg; run scripts/setup.sh")?;
    ensure!(output.status.success(), "ffmpeg raw {sample_format}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(output.stdout)
}

/// A 44-byte canonical WAV header (`RIFF`, a 16-byte `fmt ` chunk, then the `data` chunk's
/// header) declaring `data_len` bytes of samples. Every field is taken as given, even
/// nonsense, because the malformed-input tests need headers that lie.
pub fn wav_header(format_tag: u16, channels: u16, rate: u32, bits: u16, data_len: u32) -> Vec<u8> {
    let block_align = channels.wrapping_mul(bits.div_ceil(8));
    let byte_rate = rate.wrapping_mul(u32::from(block_align));
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"RIFF");
    header.extend_from_slice(&data_len.wrapping_add(36).to_le_bytes());
    header.extend_from_slice(b"WAVE");
    header.extend_from_slice(b"fmt ");
    header.extend_from_slice(&16u32.to_le_bytes());
    header.extend_from_slice(&format_tag.to_le_bytes());
    header.extend_from_slice(&channels.to_le_bytes());
    header.extend_from_slice(&rate.to_le_bytes());
    header.extend_from_slice(&byte_rate.to_le_bytes());
    header.extend_from_slice(&block_align.to_le_bytes());
    header.extend_from_slice(&bits.to_le_bytes());
    header.extend_from_slice(b"data");
    header.extend_from_slice(&data_len.to_le_bytes());
    header
}

/// Writes a WAV whose header truthfully declares `samples`.
pub fn write_wav(path: &Path, format_tag: u16, channels: u16, rate: u32, bits: u16, samples: &[u8]) -> Result<()> {
    let data_len = u32::try_from(samples.len()).context("too many samples for a WAV")?;
    let mut bytes = wav_header(format_tag, channels, rate, bits, data_len);
    bytes.extend_from_slice(samples);
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Interleaved signed 16-bit samples: `frames` frames of a 440 Hz sine of peak `amplitude`
/// (0..1 of full scale), the same on every channel, silent before `onset_frame`.
pub fn sine_s16(frames: u64, channels: u16, rate: u32, amplitude: f64, onset_frame: u64) -> Vec<u8> {
    let mut samples = Vec::with_capacity(frames as usize * usize::from(channels) * 2);
    for frame in 0..frames {
        let value = if frame < onset_frame {
            0
        } else {
            let t = frame as f64 / f64::from(rate);
            (amplitude * 32767.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()).round() as i16
        };
        for _ in 0..channels {
            samples.extend_from_slice(&value.to_le_bytes());
        }
    }
    samples
}

/// `len` pseudo-random bytes from `seed` (SplitMix64), the same on every run, so a failure
/// on "random" input can be reproduced.
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        bytes.extend_from_slice(&z.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// A 64×64 red PNG, for embedding as cover art.
pub fn cover_png(path: &Path) -> Result<()> {
    ffmpeg(&["-f", "lavfi", "-i", "color=red:s=64x64", "-frames:v", "1", path_str(path)?])
}

/// Copies the first `fraction` of `src` to `dst`, as an interrupted upload would leave it.
pub fn cut(src: &Path, dst: &Path, fraction: f64) -> Result<()> {
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    let keep = (bytes.len() as f64 * fraction) as usize;
    std::fs::write(dst, &bytes[..keep]).with_context(|| format!("writing {}", dst.display()))
}

/// `ffprobe -show_format -show_streams` of `path` as JSON, with any extra input options
/// (e.g. the HLS demuxer's) before the path.
pub fn ffprobe_json_with(path: &Path, input_options: &[&str]) -> Result<Value> {
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-print_format", "json", "-show_format"])
        .args(["-show_streams", "-show_programs"])
        .args(input_options)
        .arg(path)
        .output()
        .context("cannot run ffprobe; run scripts/setup.sh")?;
    ensure!(output.status.success(), "ffprobe {}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).context("ffprobe printed no JSON")
}

/// `ffprobe -show_format -show_streams` of `path` as JSON.
pub fn ffprobe_json(path: &Path) -> Result<Value> {
    ffprobe_json_with(path, &[])
}

/// The first audio stream of an [`ffprobe_json`] report.
pub fn audio_stream(probe: &Value) -> Result<&Value> {
    probe["streams"]
        .as_array()
        .and_then(|streams| streams.iter().find(|s| s["codec_type"] == "audio"))
        .with_context(|| format!("no audio stream in {probe}"))
}

/// A numeric ffprobe field, which ffprobe prints as a string or a number depending on it.
pub fn probe_number(value: &Value) -> Option<f64> {
    value.as_f64().or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// How long `path` plays, in seconds: its first audio stream decoded by ffmpeg and the
/// samples counted. Unlike the container's duration this drops the encoder delay and padding
/// that a gapless header (LAME, Opus pre-skip, MP4 edit list) declares, as a player does.
pub fn decoded_seconds(path: &Path) -> Result<f64> {
    let probe = ffprobe_json(path)?;
    let rate = probe_number(&audio_stream(&probe)?["sample_rate"])
        .filter(|rate| *rate > 0.0)
        .with_context(|| format!("no sample rate for {}", path.display()))?;
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-i"])
        .arg(path)
        .args(["-map", "0:a:0", "-ac", "1", "-c:a", "pcm_s16le", "-f", "s16le", "-"])
        .output()
        .context("cannot run ffmpeg; run scripts/setup.sh")?;
    ensure!(output.status.success(), "decoding {}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
    Ok(output.stdout.len() as f64 / 2.0 / rate)
}

/// Runs an ffmpeg analysis filter over `path` (after any input options) and returns its
/// stderr, where those filters print.
fn analyse(path: &Path, input_options: &[&str], filter: &str) -> Result<String> {
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-nostats"])
        .args(input_options)
        .arg("-i")
        .arg(path)
        .args(["-map", "0:a:0", "-af", filter, "-f", "null", "-"])
        .output()
        .context("cannot run ffmpeg; run scripts/setup.sh")?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "ffmpeg {filter} on {}: {stderr}", path.display());
    Ok(stderr)
}

/// The first number after `label` in `text`.
fn number_after(text: &str, label: &str) -> Result<f64> {
    let at = text.find(label).with_context(|| format!("no {label:?} in {text}"))?;
    let rest = text[at + label.len()..].trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '-' || c == '.' || c == '+')).unwrap_or(rest.len());
    rest[..end].parse().with_context(|| format!("{label:?} is followed by {:?}", &rest[..end]))
}

/// The sample peak of `path` in dBFS as ffmpeg's `volumedetect` reports it (0.1 dB steps),
/// optionally over part of it (input options such as `-ss 0 -t 0.5`). Digital silence reads
/// about −91 dB.
pub fn max_volume_db(path: &Path, input_options: &[&str]) -> Result<f64> {
    let stderr = analyse(path, input_options, "volumedetect")?;
    number_after(&stderr, "max_volume:")
}

/// Loudness as ffmpeg's own EBU R128 meter (`ebur128=peak=true`) summarises it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ebur128Summary {
    pub integrated_lufs: f64,
    pub range_lu: f64,
    pub true_peak_dbtp: f64,
}

/// Measures `path` with ffmpeg's `ebur128` filter, the reference the pipeline's meter is
/// held to. ffmpeg meters at 48 kHz (it resamples anything else), so references are best
/// taken on 48 kHz files.
pub fn ebur128_reference(path: &Path) -> Result<Ebur128Summary> {
    // `framelog=verbose` keeps the per-100-ms lines out of the default log level.
    let stderr = analyse(path, &[], "ebur128=peak=true:framelog=verbose")?;
    let Some(at) = stderr.rfind("Summary:") else {
        bail!("no ebur128 summary in {stderr}");
    };
    let summary = &stderr[at..];
    Ok(Ebur128Summary {
        integrated_lufs: number_after(summary, "I:")?,
        range_lu: number_after(summary, "LRA:")?,
        true_peak_dbtp: number_after(summary, "Peak:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_header_lays_out_riff_fields() {
        let header = wav_header(WAVE_FORMAT_PCM, 2, 44_100, 16, 1000);
        assert_eq!(header.len(), 44);
        assert_eq!(&header[0..4], b"RIFF");
        assert_eq!(&header[4..8], &1036u32.to_le_bytes());
        assert_eq!(&header[20..22], &1u16.to_le_bytes());
        assert_eq!(&header[24..28], &44_100u32.to_le_bytes());
        assert_eq!(&header[28..32], &176_400u32.to_le_bytes());
        assert_eq!(&header[32..34], &4u16.to_le_bytes());
        assert_eq!(&header[36..40], b"data");
        assert_eq!(&header[40..44], &1000u32.to_le_bytes());
    }

    #[test]
    fn seeded_bytes_repeat_per_seed() {
        assert_eq!(seeded_bytes(7, 100), seeded_bytes(7, 100));
        assert_ne!(seeded_bytes(7, 100), seeded_bytes(8, 100));
        assert_eq!(seeded_bytes(7, 13).len(), 13);
    }

    #[test]
    fn number_after_reads_ffmpeg_summaries() -> Result<()> {
        let text = "  Integrated loudness:\n    I:         -21.5 LUFS\n    LRA:         9.8 LU\n";
        assert_eq!(number_after(text, "I:")?, -21.5);
        assert_eq!(number_after(text, "LRA:")?, 9.8);
        assert!(number_after(text, "Peak:").is_err());
        Ok(())
    }
}
