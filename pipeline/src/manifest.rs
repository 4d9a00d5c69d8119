//! `manifest.json`: what one run produced, with every path relative to the output directory.
//! Its field names are a contract (the CLI prints it, workers store it, checks read it).

use serde::Serialize;

use crate::loudness::LoudnessReport;
use crate::tags::Tags;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub source: Source,
    pub tags: ManifestTags,
    pub loudness: LoudnessReport,
    pub waveform: WaveformFiles,
    pub renditions: Vec<Rendition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub container: String,
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u16,
    pub bits_per_sample: Option<u32>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestTags {
    #[serde(flatten)]
    pub tags: Tags,
    /// The extracted cover, relative to the output directory.
    pub artwork: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaveformFiles {
    pub json: String,
    pub dat: String,
    pub summary: String,
    pub samples_per_pixel: u32,
    pub length: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RenditionKind {
    Progressive,
    Hls,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rendition {
    pub preset: String,
    pub kind: RenditionKind,
    /// The file, or the master playlist for HLS.
    pub path: String,
    pub codec: String,
    /// The nominal bitrate; the highest variant's for HLS.
    pub bitrate_kbps: u32,
    pub sample_rate: u32,
    pub channels: u16,
    pub duration_ms: u64,
    /// Every byte the preset wrote.
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variants: Option<Vec<Variant>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Variant {
    pub bitrate_kbps: u32,
    pub path: String,
    /// Peak segment bitrate in bits per second, as in the master playlist.
    pub bandwidth: u64,
    pub segments: usize,
    pub bytes: u64,
}
