//! The rendition ladder and the pipeline's limits, as data.
//!
//! Operators change them with a TOML presets file (`waveline process --presets FILE`); every
//! section is optional and a missing one keeps its default. A `[[presets]]` list, when
//! present, replaces the default ladder whole, so a file says exactly what it produces.
//! `DEFAULT_PRESETS` below is the compiled-in default, in the same format.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::PipelineError;

/// The default ladder of DESIGN.md, in presets-file form.
pub const DEFAULT_PRESETS: &str = r#"
[limits]
max_duration_s = 21600     # 6 h
max_channels = 8
min_sample_rate = 8000
max_sample_rate = 192000

[waveform]
samples_per_pixel = 256
bits = 8
summary_points = 1800

[[presets]]
name = "mp3_128"
kind = "progressive"
codec = "mp3"
bitrate_kbps = 128
sample_rate = 44100

[[presets]]
name = "aac_hls"
kind = "hls"
codec = "aac"
sample_rate = 44100
variants_kbps = [96, 160, 256]
segment_s = 6

[[presets]]
name = "opus_64"
kind = "progressive"
codec = "opus"
bitrate_kbps = 64
sample_rate = 48000

[[presets]]
name = "preview"
kind = "progressive"
codec = "mp3"
bitrate_kbps = 128
sample_rate = 44100
clip_start_s = 0
clip_duration_s = 30
"#;

/// Everything a run is configured by.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineConfig {
    pub limits: Limits,
    pub waveform: WaveformSettings,
    pub presets: Vec<Preset>,
}

/// Inputs beyond these fail before the expensive work starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest accepted input, in seconds.
    pub max_duration_s: u64,
    pub max_channels: u16,
    pub min_sample_rate: u32,
    pub max_sample_rate: u32,
}

/// How the waveform is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaveformSettings {
    /// Source samples per waveform point.
    pub samples_per_pixel: u32,
    /// 8 or 16.
    pub bits: u8,
    /// Points of the fixed-width summary for list views.
    pub summary_points: usize,
}

/// A key left out of `[limits]` keeps its default: tightening one limit should not mean
/// restating the others.
impl Default for Limits {
    fn default() -> Limits {
        Limits { max_duration_s: 6 * 3600, max_channels: 8, min_sample_rate: 8000, max_sample_rate: 192_000 }
    }
}

impl Default for WaveformSettings {
    fn default() -> WaveformSettings {
        WaveformSettings { samples_per_pixel: 256, bits: 8, summary_points: 1800 }
    }
}

/// The codec a preset encodes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Mp3,
    Opus,
    Aac,
}

impl Codec {
    /// The name in manifests (`mp3`, `opus`, `aac`).
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Mp3 => "mp3",
            Codec::Opus => "opus",
            Codec::Aac => "aac",
        }
    }
}

/// One rendition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Preset {
    /// One file, streamed with byte ranges.
    Progressive {
        name: String,
        codec: Codec,
        bitrate_kbps: u32,
        sample_rate: u32,
        /// Start of a clip (previews), in seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_start_s: Option<f64>,
        /// Length of a clip (previews), in seconds; the whole track when shorter.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_duration_s: Option<f64>,
    },
    /// HLS: one fMP4 variant per bitrate and a master playlist.
    Hls { name: String, codec: Codec, sample_rate: u32, variants_kbps: Vec<u32>, segment_s: u32 },
}

impl Preset {
    pub fn name(&self) -> &str {
        match self {
            Preset::Progressive { name, .. } | Preset::Hls { name, .. } => name,
        }
    }

    pub fn codec(&self) -> Codec {
        match self {
            Preset::Progressive { codec, .. } | Preset::Hls { codec, .. } => *codec,
        }
    }

    pub fn sample_rate(&self) -> u32 {
        match self {
            Preset::Progressive { sample_rate, .. } | Preset::Hls { sample_rate, .. } => *sample_rate,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetsFile {
    limits: Option<Limits>,
    waveform: Option<WaveformSettings>,
    presets: Option<Vec<Preset>>,
}

impl Default for PipelineConfig {
    fn default() -> PipelineConfig {
        // The default text is ours and covered by a test; should it ever fail, say so loudly
        // rather than run with no ladder.
        match PipelineConfig::parse(DEFAULT_PRESETS, None) {
            Ok(config) => config,
            Err(err) => panic!("the compiled-in presets are invalid: {err}"),
        }
    }
}

impl PipelineConfig {
    /// Reads a presets file; its sections replace the defaults'.
    pub fn load(path: &Path) -> Result<PipelineConfig, PipelineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| PipelineError::InvalidPresets(format!("cannot read {}: {err}", path.display())))?;
        PipelineConfig::parse(&text, Some(&PipelineConfig::default()))
    }

    /// Parses presets text over `base` (or over nothing: then every section is required).
    pub fn parse(text: &str, base: Option<&PipelineConfig>) -> Result<PipelineConfig, PipelineError> {
        let file: PresetsFile = toml::from_str(text).map_err(|err| PipelineError::InvalidPresets(err.to_string()))?;
        let missing = |section: &str| PipelineError::InvalidPresets(format!("missing [{section}]"));
        let config = PipelineConfig {
            limits: file.limits.or(base.map(|b| b.limits)).ok_or_else(|| missing("limits"))?,
            waveform: file.waveform.or(base.map(|b| b.waveform)).ok_or_else(|| missing("waveform"))?,
            presets: file.presets.or(base.map(|b| b.presets.clone())).ok_or_else(|| missing("presets"))?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), PipelineError> {
        let bad = |message: String| Err(PipelineError::InvalidPresets(message));
        let limits = &self.limits;
        if limits.max_duration_s == 0 || limits.max_channels == 0 || limits.max_channels > 64 {
            return bad("limits: max_duration_s must be positive and max_channels 1..=64".into());
        }
        if limits.min_sample_rate == 0 || limits.min_sample_rate > limits.max_sample_rate {
            return bad("limits: need 0 < min_sample_rate <= max_sample_rate".into());
        }
        if !matches!(self.waveform.bits, 8 | 16) || self.waveform.samples_per_pixel == 0 {
            return bad("waveform: bits must be 8 or 16 and samples_per_pixel positive".into());
        }
        if self.waveform.summary_points == 0 || self.waveform.summary_points > 100_000 {
            return bad("waveform: summary_points must be 1..=100000".into());
        }
        if self.presets.is_empty() {
            return bad("presets: the ladder is empty".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for preset in &self.presets {
            let name = preset.name();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return bad(format!("preset name {name:?}: use letters, digits, _ and -"));
            }
            if !names.insert(name.to_owned()) {
                return bad(format!("preset {name} appears twice"));
            }
            let allowed_rates: &[u32] = match preset.codec() {
                Codec::Mp3 => &[8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000],
                Codec::Opus => &[8000, 12000, 16000, 24000, 48000],
                Codec::Aac => &[8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000],
            };
            if !allowed_rates.contains(&preset.sample_rate()) {
                return bad(format!(
                    "preset {name}: {} cannot encode at {} Hz (allowed: {allowed_rates:?})",
                    preset.codec().as_str(),
                    preset.sample_rate()
                ));
            }
            match preset {
                Preset::Progressive { bitrate_kbps, clip_start_s, clip_duration_s, .. } => {
                    if !(6..=512).contains(bitrate_kbps) {
                        return bad(format!("preset {name}: bitrate_kbps must be 6..=512"));
                    }
                    if clip_start_s.is_some_and(|s| !(s >= 0.0 && s.is_finite()))
                        || clip_duration_s.is_some_and(|d| !(d > 0.0 && d.is_finite()))
                    {
                        return bad(format!("preset {name}: clip_start_s >= 0 and clip_duration_s > 0"));
                    }
                }
                Preset::Hls { variants_kbps, segment_s, .. } => {
                    if variants_kbps.is_empty() || variants_kbps.iter().any(|k| !(6..=512).contains(k)) {
                        return bad(format!("preset {name}: variants_kbps needs bitrates in 6..=512"));
                    }
                    if !(1..=60).contains(segment_s) {
                        return bad(format!("preset {name}: segment_s must be 1..=60"));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ladder_is_the_designed_one() {
        let config = PipelineConfig::default();
        let names: Vec<&str> = config.presets.iter().map(Preset::name).collect();
        assert_eq!(names, ["mp3_128", "aac_hls", "opus_64", "preview"]);
        assert_eq!(config.limits.max_duration_s, 6 * 3600);
        assert_eq!(config.waveform.samples_per_pixel, 256);
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let one_key =
            PipelineConfig::parse("[limits]\nmax_duration_s = 5\n", Some(&PipelineConfig::default())).expect("valid");
        assert_eq!(one_key.limits, Limits { max_duration_s: 5, ..Limits::default() });
        let config = PipelineConfig::parse(
            "[limits]\nmax_duration_s = 5\nmax_channels = 2\nmin_sample_rate = 8000\nmax_sample_rate = 48000\n",
            Some(&PipelineConfig::default()),
        )
        .expect("valid");
        assert_eq!(config.limits.max_duration_s, 5);
        assert_eq!(config.presets.len(), 4);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let base = PipelineConfig::default();
        for text in [
            "nonsense = 1",
            "[[presets]]\nname = \"x\"\nkind = \"progressive\"\ncodec = \"flac\"\nbitrate_kbps = 1\nsample_rate = 44100",
            "[[presets]]\nname = \"x\"\nkind = \"progressive\"\ncodec = \"opus\"\nbitrate_kbps = 64\nsample_rate = 44100",
            "[[presets]]\nname = \"../x\"\nkind = \"progressive\"\ncodec = \"mp3\"\nbitrate_kbps = 64\nsample_rate = 44100",
            "[waveform]\nsamples_per_pixel = 256\nbits = 12\nsummary_points = 10",
            "presets = []",
        ] {
            let err = PipelineConfig::parse(text, Some(&base)).expect_err(text);
            assert_eq!(err.code(), "invalid_presets", "{text}");
        }
    }
}
