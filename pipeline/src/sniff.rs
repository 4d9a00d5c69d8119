//! What the input is, from its first bytes: the container's magic number, never the
//! extension. Bytes with no known audio signature are refused before any decoder sees them,
//! so hostile or mislabelled uploads cost one read of 64 bytes.

use std::io::Read;
use std::path::Path;

use crate::error::PipelineError;
pub use waveline_media::{Container, sniff};

/// Reads the head of `path` and names its container.
pub fn sniff_file(path: &Path) -> Result<Container, PipelineError> {
    let unreadable = |source| PipelineError::InputUnreadable { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if meta.is_dir() {
        return Err(unreadable(std::io::Error::other("it is a directory")));
    }
    if meta.len() == 0 {
        return Err(PipelineError::EmptyAudio);
    }
    let mut head = [0u8; 64];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(unreadable)? {
            0 => break,
            n => filled += n,
        }
    }
    sniff(&head[..filled]).ok_or_else(|| {
        PipelineError::UnsupportedFormat(
            "the file does not start with the signature of any audio format Waveline reads".into(),
        )
    })
}

/// What a WAV or AIFF header declares, read before any decoder runs, so that absurd headers
/// (zero or huge rates, thousands of channels, billions of frames) are refused up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredFormat {
    pub channels: u32,
    pub sample_rate: u64,
    /// Frames the data chunk claims to hold, when its size and the frame size are known.
    pub frames: Option<u64>,
}

/// Reads the declared format of a WAV or AIFF file from its first 64 KiB; `None` for other
/// containers or when the chunks are not where they can be found cheaply.
pub fn declared_format(path: &Path, container: Container) -> Option<DeclaredFormat> {
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path).ok()?.take(64 * 1024).read_to_end(&mut head).ok()?;
    match container {
        Container::Wav => wav_format(&head),
        Container::Aiff => aiff_format(&head),
        _ => None,
    }
}

fn chunks(body: &[u8], big_endian: bool) -> impl Iterator<Item = (&[u8], u64, &[u8])> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let header = body.get(offset..offset + 8)?;
        let size_bytes = [header[4], header[5], header[6], header[7]];
        let size = u64::from(if big_endian { u32::from_be_bytes(size_bytes) } else { u32::from_le_bytes(size_bytes) });
        let start = offset + 8;
        let data = &body[start.min(body.len())..(start as u64 + size).min(body.len() as u64) as usize];
        offset = start.saturating_add(usize::try_from(size).ok()?).saturating_add((size % 2) as usize);
        Some((&header[..4], size, data))
    })
}

fn wav_format(head: &[u8]) -> Option<DeclaredFormat> {
    let mut format = None;
    let mut data_size = None;
    for (id, size, data) in chunks(head.get(12..)?, false) {
        match id {
            b"fmt " if data.len() >= 16 => {
                let channels = u32::from(u16::from_le_bytes([data[2], data[3]]));
                let rate = u64::from(u32::from_le_bytes([data[4], data[5], data[6], data[7]]));
                let block_align = u64::from(u16::from_le_bytes([data[12], data[13]]));
                format = Some((channels, rate, block_align));
            }
            b"data" => {
                data_size = Some(size);
                break;
            }
            _ => {}
        }
    }
    let (channels, sample_rate, block_align) = format?;
    // RF64 keeps the real size elsewhere: 0xFFFFFFFF here means "see ds64", not a size.
    let frames =
        data_size.filter(|size| *size != u64::from(u32::MAX) && block_align > 0).map(|size| size / block_align);
    Some(DeclaredFormat { channels, sample_rate, frames })
}

fn aiff_format(head: &[u8]) -> Option<DeclaredFormat> {
    for (id, _, data) in chunks(head.get(12..)?, true) {
        if id == b"COMM" && data.len() >= 18 {
            let channels = u32::from(u16::from_be_bytes([data[0], data[1]]));
            let frames = u64::from(u32::from_be_bytes([data[2], data[3], data[4], data[5]]));
            let rate = extended_to_u64(&data[8..18]);
            return Some(DeclaredFormat { channels, sample_rate: rate, frames: Some(frames) });
        }
    }
    None
}

/// AIFF stores its sample rate as an 80-bit IEEE extended float; whole rates are all we need.
fn extended_to_u64(bytes: &[u8]) -> u64 {
    let exponent = i32::from(u16::from_be_bytes([bytes[0], bytes[1]]) & 0x7fff) - 16383;
    let mantissa = u64::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7], bytes[8], bytes[9]]);
    match exponent {
        e if e < 0 => 0,
        e if e > 63 => u64::MAX,
        e => mantissa >> (63 - e),
    }
}

/// Whether an Ogg file's last page is complete and marks the end of its stream. A file cut
/// short ends in a partial page, or in a complete one without the end-of-stream flag.
pub fn ogg_ends_cleanly(path: &Path) -> bool {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    let window = len.min(128 * 1024);
    let mut tail = Vec::with_capacity(window as usize);
    if file.seek(SeekFrom::Start(len - window)).is_err() || file.take(window).read_to_end(&mut tail).is_err() {
        return false;
    }
    // The last page is the last capture pattern whose header and body exactly reach the end.
    let mut search = tail.len();
    while let Some(start) = tail[..search].windows(4).rposition(|w| w == b"OggS") {
        let page = &tail[start..];
        if page.len() >= 27 && page[4] == 0 {
            let segments = usize::from(page[26]);
            if let Some(table) = page.get(27..27 + segments) {
                let body: usize = table.iter().map(|&n| usize::from(n)).sum();
                if 27 + segments + body == page.len() {
                    return page[5] & 0x04 != 0;
                }
            }
        }
        search = start;
        if search == 0 {
            break;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(channels: u16, rate: u32, bits: u16, data_size: u32) -> Vec<u8> {
        let align = channels * bits / 8;
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&data_size.wrapping_add(36).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
        out.extend_from_slice(&align.to_le_bytes());
        out.extend_from_slice(&bits.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&data_size.to_le_bytes());
        out
    }

    #[test]
    fn wav_headers_are_read_without_decoding() {
        let header = wav(2, 44100, 16, 44100 * 4 * 10);
        assert_eq!(
            wav_format(&header),
            Some(DeclaredFormat { channels: 2, sample_rate: 44100, frames: Some(441_000) })
        );
        let absurd = wav(1, 8000, 8, 0xFFFF_FFF0);
        assert_eq!(wav_format(&absurd).and_then(|f| f.frames), Some(0xFFFF_FFF0));
        assert_eq!(wav_format(b"RIFF\0\0\0\0WAVE"), None);
    }

    #[test]
    fn aiff_rates_decode_from_extended_floats() {
        // 44100 as an 80-bit extended float.
        assert_eq!(extended_to_u64(&[0x40, 0x0e, 0xac, 0x44, 0, 0, 0, 0, 0, 0]), 44100);
        assert_eq!(extended_to_u64(&[0x40, 0x0b, 0xfa, 0, 0, 0, 0, 0, 0, 0]), 8000);
    }
}
