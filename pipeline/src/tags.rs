//! Tags and embedded artwork, read with lofty.
//!
//! Tags are best effort: a file whose tags cannot be parsed is still processed, with empty
//! tags, because the audio is what the uploader needs published; the failure is logged.

use std::path::Path;

use lofty::prelude::{Accessor, TaggedFileExt};
use serde::Serialize;

/// The tags Waveline keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tags {
    pub title: Option<String>,
    pub artist: Option<String>,
    pub album: Option<String>,
    pub genre: Option<String>,
    pub year: Option<u32>,
    pub track: Option<u32>,
}

/// Embedded cover art: the bytes as stored, and an extension that fits them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artwork {
    pub bytes: Vec<u8>,
    /// `png`, `jpg`, `gif`, `bmp` or `bin`, decided from the bytes themselves.
    pub extension: &'static str,
}

/// Reads the tags and the first (front cover first) picture of `path`.
pub fn read(path: &Path) -> (Tags, Option<Artwork>) {
    let parsed = lofty::probe::Probe::open(path)
        .and_then(|probe| probe.guess_file_type().map_err(Into::into))
        .and_then(|probe| probe.read());
    let file = match parsed {
        Ok(file) => file,
        Err(err) => {
            tracing::debug!(error = %err, "no readable tags");
            return (Tags::default(), None);
        }
    };
    let Some(tag) = file.primary_tag().or_else(|| file.first_tag()) else {
        return (Tags::default(), None);
    };
    let clean = |value: Option<std::borrow::Cow<'_, str>>| {
        value.map(|text| text.trim().to_owned()).filter(|text| !text.is_empty())
    };
    let tags = Tags {
        title: clean(tag.title()),
        artist: clean(tag.artist()),
        album: clean(tag.album()),
        genre: clean(tag.genre()),
        year: tag.date().map(|date| u32::from(date.year)).filter(|year| *year > 0),
        track: tag.track(),
    };
    let pictures = tag.pictures();
    let cover = pictures
        .iter()
        .find(|picture| picture.pic_type() == lofty::picture::PictureType::CoverFront)
        .or_else(|| pictures.first())
        .filter(|picture| !picture.data().is_empty())
        .map(|picture| Artwork { bytes: picture.data().to_vec(), extension: image_extension(picture.data()) });
    (tags, cover)
}

fn image_extension(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => "png",
        [0xff, 0xd8, 0xff, ..] => "jpg",
        [b'G', b'I', b'F', b'8', ..] => "gif",
        [b'B', b'M', ..] => "bmp",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "webp",
        _ => "bin",
    }
}
