//! HLS packaging: measuring the variants FFmpeg's HLS muxer wrote, and the master playlist
//! that ties them together.
//!
//! `BANDWIDTH` is what RFC 8216 asks for, the peak segment bitrate (with the init segment
//! counted in the first), measured from the files rather than copied from the nominal
//! bitrate, so players pick variants on what they will really download. A closing segment
//! shorter than a second is left out of the peak: it is mostly fixed box overhead, and
//! counting it would misstate a 96 kb/s variant as 160.

use std::path::Path;

use crate::error::PipelineError;

/// The RFC 6381 codec string of AAC-LC.
pub const AAC_LC_CODECS: &str = "mp4a.40.2";

/// What one variant playlist holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariantStats {
    pub segments: usize,
    /// All files of the variant: playlist, init segment and media segments.
    pub bytes: u64,
    pub duration_s: f64,
    /// Peak segment bitrate, bits per second.
    pub peak_bps: u64,
    /// Average bitrate over the whole variant, bits per second.
    pub average_bps: u64,
}

/// Reads a variant playlist and sizes its files.
pub fn measure_variant(playlist: &Path) -> Result<VariantStats, PipelineError> {
    let dir = playlist.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(playlist)?;
    let mut init_bytes = 0;
    let mut segments = 0;
    let mut media_bytes = 0u64;
    let mut duration_s = 0.0;
    let mut peak_bps = 0u64;
    let mut pending_duration = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#EXT-X-MAP:URI=\"") {
            let uri = rest.trim_end_matches('"');
            init_bytes = std::fs::metadata(dir.join(uri))?.len();
        } else if let Some(rest) = line.strip_prefix("#EXTINF:") {
            let seconds = rest.split(',').next().and_then(|d| d.parse::<f64>().ok());
            pending_duration = seconds;
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let seconds = pending_duration.take().ok_or_else(|| {
                PipelineError::Internal(format!("segment {line} in {} has no duration", playlist.display()))
            })?;
            let size = std::fs::metadata(dir.join(line.trim()))?.len();
            let counted = size + if segments == 0 { init_bytes } else { 0 };
            if seconds >= 1.0 || segments == 0 {
                peak_bps = peak_bps.max((counted as f64 * 8.0 / seconds).ceil() as u64);
            }
            segments += 1;
            media_bytes += size;
            duration_s += seconds;
        }
    }
    if segments == 0 {
        return Err(PipelineError::Internal(format!("{} lists no segments", playlist.display())));
    }
    let playlist_bytes = std::fs::metadata(playlist)?.len();
    Ok(VariantStats {
        segments,
        bytes: playlist_bytes + init_bytes + media_bytes,
        duration_s,
        peak_bps,
        average_bps: ((init_bytes + media_bytes) as f64 * 8.0 / duration_s.max(0.001)).ceil() as u64,
    })
}

/// One line of the master playlist.
#[derive(Debug, Clone)]
pub struct MasterEntry<'a> {
    /// The variant playlist, relative to the master.
    pub uri: &'a str,
    pub stats: VariantStats,
}

/// The master playlist text, variants in the order given.
pub fn master_playlist(entries: &[MasterEntry<'_>]) -> String {
    let mut text = String::from("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for entry in entries {
        text.push_str(&format!(
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{AAC_LC_CODECS}\"\n{}\n",
            entry.stats.peak_bps, entry.stats.average_bps, entry.uri
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_measured_from_their_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("init.mp4"), vec![0u8; 1000]).expect("write");
        std::fs::write(dir.path().join("seg_00000.m4s"), vec![0u8; 74_000]).expect("write");
        std::fs::write(dir.path().join("seg_00001.m4s"), vec![0u8; 30_000]).expect("write");
        let playlist = dir.path().join("index.m3u8");
        std::fs::write(
            &playlist,
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:6\n#EXT-X-MAP:URI=\"init.mp4\"\n#EXTINF:6.0,\nseg_00000.m4s\n#EXTINF:3.0,\nseg_00001.m4s\n#EXT-X-ENDLIST\n",
        )
        .expect("write");
        let stats = measure_variant(&playlist).expect("measured");
        assert_eq!(stats.segments, 2);
        assert_eq!(stats.peak_bps, 100_000);
        assert_eq!(stats.average_bps, (105_000.0f64 * 8.0 / 9.0).ceil() as u64);
        let master = master_playlist(&[MasterEntry { uri: "96k/index.m3u8", stats }]);
        assert!(master.starts_with("#EXTM3U\n"));
        assert!(master.contains("BANDWIDTH=100000,") && master.contains("CODECS=\"mp4a.40.2\"\n96k/index.m3u8\n"));
    }
}
