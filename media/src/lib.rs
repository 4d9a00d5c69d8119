//! `waveline-media`: what media the bytes are, from their first bytes: the container's magic number, never
//! the file name or a declared `Content-Type`; and the media type Waveline gives each file it
//! stores ([`content_type`]). Shared by the API (which refuses non-audio
//! uploads with 415 before storing them) and the pipeline (which refuses them before any
//! decoder runs); [`sniff_image`] does the same for artwork and avatars, between the API and
//! the image job. A leaf crate with no dependencies, so the pipeline keeps depending on nothing
//! else of ours and the API never depends on the pipeline.

/// How many leading bytes [`sniff`] looks at; give it at least this many when there are.
pub const SNIFF_LEN: usize = 64;

/// Containers Waveline recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Wav,
    Aiff,
    Flac,
    /// MPEG audio (MP3), with or without an ID3v2 tag in front.
    Mp3,
    /// Raw AAC in ADTS frames.
    Adts,
    /// ISO base media (MP4, M4A).
    Mp4,
    Ogg,
    Caf,
    Matroska,
}

impl Container {
    /// The name in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Container::Wav => "wav",
            Container::Aiff => "aiff",
            Container::Flac => "flac",
            Container::Mp3 => "mp3",
            Container::Adts => "aac",
            Container::Mp4 => "mp4",
            Container::Ogg => "ogg",
            Container::Caf => "caf",
            Container::Matroska => "matroska",
        }
    }

    /// A file-name extension that steers decoders' probing.
    pub fn extension(self) -> &'static str {
        match self {
            Container::Wav => "wav",
            Container::Aiff => "aiff",
            Container::Flac => "flac",
            Container::Mp3 => "mp3",
            Container::Adts => "aac",
            Container::Mp4 => "m4a",
            Container::Ogg => "ogg",
            Container::Caf => "caf",
            Container::Matroska => "mka",
        }
    }
}

/// The media type of a file Waveline stores, from its name's extension: the one table the
/// worker writes objects with, the API serves them with, and the file store falls back on.
/// Anything it does not name is `application/octet-stream`.
pub fn content_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase());
    match extension.as_deref() {
        // The audio types the ladder writes, named as players expect them.
        Some("mp3") => "audio/mpeg",
        Some("opus" | "ogg" | "oga") => "audio/ogg",
        Some("m4a" | "m4s" | "mp4") => "audio/mp4",
        Some("aac") => "audio/aac",
        Some("m3u8") => "application/vnd.apple.mpegurl",
        Some("json") => "application/json",
        // Artwork read from the file's tags.
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

/// Names the container of a file that starts with `head`.
pub fn sniff(head: &[u8]) -> Option<Container> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if (at(0, b"RIFF") || at(0, b"RF64") || at(0, b"BW64")) && at(8, b"WAVE") {
        return Some(Container::Wav);
    }
    if at(0, b"FORM") && (at(8, b"AIFF") || at(8, b"AIFC")) {
        return Some(Container::Aiff);
    }
    if at(0, b"fLaC") {
        return Some(Container::Flac);
    }
    if at(0, b"OggS") {
        return Some(Container::Ogg);
    }
    if at(4, b"ftyp") {
        return Some(Container::Mp4);
    }
    if at(0, b"caff") {
        return Some(Container::Caf);
    }
    if at(0, &[0x1a, 0x45, 0xdf, 0xa3]) {
        return Some(Container::Matroska);
    }
    if at(0, b"ID3") {
        return Some(Container::Mp3);
    }
    // Frame sync: eleven set bits. Layer bits 00 mean ADTS (AAC); anything else MPEG audio.
    match head {
        [0xff, second, ..] if second & 0xe0 == 0xe0 => {
            let layer = (second >> 1) & 0b11;
            let version = (second >> 3) & 0b11;
            match (layer, version) {
                (0, 0b10 | 0b11) => Some(Container::Adts),
                (1..=3, 0 | 0b10 | 0b11) => Some(Container::Mp3),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The image formats artwork and avatars may be uploaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    WebP,
}

impl ImageKind {
    /// The name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "jpeg",
            ImageKind::Png => "png",
            ImageKind::WebP => "webp",
        }
    }
}

/// How many leading bytes [`sniff_image`] looks at.
pub const IMAGE_SNIFF_LEN: usize = 12;

/// Names the image format of a file that starts with `head` (JPEG, PNG or WebP), from its
/// signature alone.
pub fn sniff_image(head: &[u8]) -> Option<ImageKind> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, &[0xff, 0xd8, 0xff]) {
        Some(ImageKind::Jpeg)
    } else if at(0, b"\x89PNG\r\n\x1a\n") {
        Some(ImageKind::Png)
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        Some(ImageKind::WebP)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_signatures_decide() {
        assert_eq!(sniff_image(&[0xff, 0xd8, 0xff, 0xe0, 0, 0x10]), Some(ImageKind::Jpeg));
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some(ImageKind::Png));
        assert_eq!(sniff_image(b"RIFF\x24\0\0\0WEBPVP8 "), Some(ImageKind::WebP));
        assert_eq!(sniff_image(b"RIFF\x24\0\0\0WAVEfmt "), None);
        assert_eq!(sniff_image(b"GIF89a\x01\0"), None);
        assert_eq!(sniff_image(b"<svg xmlns"), None);
        assert_eq!(sniff_image(&[0xff, 0xd8]), None);
        assert_eq!(sniff_image(b""), None);
    }

    #[test]
    fn magic_numbers_decide() {
        assert_eq!(sniff(b"RIFF\x24\0\0\0WAVEfmt "), Some(Container::Wav));
        assert_eq!(sniff(b"FORM\0\0\0\0AIFFCOMM"), Some(Container::Aiff));
        assert_eq!(sniff(b"fLaC\0\0\0\x22"), Some(Container::Flac));
        assert_eq!(sniff(b"OggS\0\x02"), Some(Container::Ogg));
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A "), Some(Container::Mp4));
        assert_eq!(sniff(b"ID3\x04\0"), Some(Container::Mp3));
        assert_eq!(sniff(&[0xff, 0xfb, 0x90, 0x64]), Some(Container::Mp3));
        assert_eq!(sniff(&[0xff, 0xf1, 0x50, 0x80]), Some(Container::Adts));
        assert_eq!(sniff(b"hello, world"), None);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n"), None);
        assert_eq!(sniff(b"RIFF\0\0\0\0AVI "), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn content_types_follow_the_ladder() {
        assert_eq!(content_type("r/t/1/mp3_128/audio.mp3"), "audio/mpeg");
        assert_eq!(content_type("r/t/1/opus_64/audio.opus"), "audio/ogg");
        assert_eq!(content_type("r/t/1/aac_hls/master.m3u8"), "application/vnd.apple.mpegurl");
        assert_eq!(content_type("r/t/1/aac_hls/96k/seg_00001.m4s"), "audio/mp4");
        assert_eq!(content_type("r/t/1/waveform/waveform.json"), "application/json");
        assert_eq!(content_type("r/t/1/artwork/cover.JPG"), "image/jpeg");
        assert_eq!(content_type("r/t/1/waveform/waveform.dat"), "application/octet-stream");
        assert_eq!(content_type("originals/t/source"), "application/octet-stream");
        assert_eq!(content_type("x"), "application/octet-stream");
    }
}
