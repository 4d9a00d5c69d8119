//! Artwork and avatars: what an image belongs to, the sizes it is served in, and its keys
//! and URLs (one function each, for the API, the worker and the tests).
//!
//! An uploaded image gets a fresh random *version* (128 bits, 32 hex digits). Everything of it
//! lives under `images/{subject}s/{id}/{version}/`: the original as uploaded (`original`) and
//! one JPEG per [`ImageSize`] (`t500x500.jpg`, …). Keys are deterministic given the version, so
//! a retried job overwrites the same objects; a new upload gets a new version, so a URL, once
//! handed out, always names the same bytes (served `immutable`). The version is also what
//! keeps a private track's artwork from being guessed: its URL cannot be made without it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::storage::{ObjectKey, StorageError};

/// What an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSubject {
    /// A track's artwork.
    Track,
    /// A playlist's artwork.
    Playlist,
    /// An account's avatar.
    User,
}

impl ImageSubject {
    pub const ALL: [ImageSubject; 3] = [ImageSubject::Track, ImageSubject::Playlist, ImageSubject::User];

    /// The name in the database and in job messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageSubject::Track => "track",
            ImageSubject::Playlist => "playlist",
            ImageSubject::User => "user",
        }
    }

    /// The segment in keys and URLs (`tracks`, `playlists`, `users`).
    pub fn plural(self) -> &'static str {
        match self {
            ImageSubject::Track => "tracks",
            ImageSubject::Playlist => "playlists",
            ImageSubject::User => "users",
        }
    }

    /// The subject named by a key or URL segment.
    pub fn from_plural(text: &str) -> Option<ImageSubject> {
        ImageSubject::ALL.into_iter().find(|subject| subject.plural() == text)
    }
}

impl fmt::Display for ImageSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageSubject {
    type Err = String;

    fn from_str(text: &str) -> Result<ImageSubject, String> {
        ImageSubject::ALL
            .into_iter()
            .find(|subject| subject.as_str() == text)
            .ok_or_else(|| format!("unknown image subject {text:?}"))
    }
}

/// The sizes every image is served in: SoundCloud's names, square JPEGs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageSize {
    /// 500×500.
    T500,
    /// 300×300.
    T300,
    /// 100×100 (`large`, the size `artwork_url` and `avatar_url` name).
    Large,
    /// 67×67.
    T67,
    /// 32×32.
    Small,
}

impl ImageSize {
    /// Largest first: each size is made from the one before it, or from the original.
    pub const ALL: [ImageSize; 5] =
        [ImageSize::T500, ImageSize::T300, ImageSize::Large, ImageSize::T67, ImageSize::Small];

    /// The name in keys and URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageSize::T500 => "t500x500",
            ImageSize::T300 => "t300x300",
            ImageSize::Large => "large",
            ImageSize::T67 => "t67x67",
            ImageSize::Small => "small",
        }
    }

    /// The side, in pixels.
    pub fn side(self) -> u32 {
        match self {
            ImageSize::T500 => 500,
            ImageSize::T300 => 300,
            ImageSize::Large => 100,
            ImageSize::T67 => 67,
            ImageSize::Small => 32,
        }
    }

    /// The size named `text`.
    pub fn parse(text: &str) -> Option<ImageSize> {
        ImageSize::ALL.into_iter().find(|size| size.as_str() == text)
    }

    /// The file name of the size's JPEG (`t500x500.jpg`).
    pub fn file_name(self) -> String {
        format!("{}.jpg", self.as_str())
    }
}

/// The largest image upload, in bytes (10 MiB); the worker reads no more of an original.
pub const IMAGE_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// A new random version: 32 lowercase hex digits.
pub fn new_version() -> String {
    Uuid::new_v4().simple().to_string()
}

/// Whether `text` has the shape of a version (32 lowercase hex digits).
pub fn is_version(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The prefix of every version of one subject's image, with the trailing slash.
pub fn image_prefix(subject: ImageSubject, id: Uuid) -> String {
    format!("{IMAGES_PREFIX}{}/{id}/", subject.plural())
}

/// The prefix of one version: its original and its sizes.
pub fn version_prefix(subject: ImageSubject, id: Uuid, version: &str) -> String {
    format!("{}{version}/", image_prefix(subject, id))
}

/// Where an uploaded original is kept.
pub fn original_image_key(subject: ImageSubject, id: Uuid, version: &str) -> Result<ObjectKey, StorageError> {
    ObjectKey::parse(format!("{}original", version_prefix(subject, id, version)))
}

/// Where one size of a version is kept.
pub fn variant_key(subject: ImageSubject, id: Uuid, version: &str, size: ImageSize) -> Result<ObjectKey, StorageError> {
    ObjectKey::parse(format!("{}{}", version_prefix(subject, id, version), size.file_name()))
}

/// The API path that serves one size: `/v1/images/{subjects}/{id}/{version}/{size}.jpg`.
pub fn image_path(subject: ImageSubject, id: Uuid, version: &str, size: ImageSize) -> String {
    format!("/v1/images/{}/{id}/{version}/{}", subject.plural(), size.file_name())
}

/// The prefix under which every image lies.
pub const IMAGES_PREFIX: &str = "images/";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_paths_are_one_shape() {
        let id = Uuid::nil();
        let version = "0123456789abcdef0123456789abcdef";
        assert!(is_version(version));
        assert!(is_version(&new_version()));
        assert!(!is_version("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_version("../x"));
        assert_eq!(
            variant_key(ImageSubject::Track, id, version, ImageSize::T500).expect("key").as_str(),
            format!("images/tracks/{id}/{version}/t500x500.jpg")
        );
        assert_eq!(
            original_image_key(ImageSubject::User, id, version).expect("key").as_str(),
            format!("images/users/{id}/{version}/original")
        );
        assert_eq!(
            image_path(ImageSubject::Playlist, id, version, ImageSize::Large),
            format!("/v1/images/playlists/{id}/{version}/large.jpg")
        );
        for subject in ImageSubject::ALL {
            assert_eq!(ImageSubject::from_plural(subject.plural()), Some(subject));
            assert_eq!(subject.as_str().parse::<ImageSubject>(), Ok(subject));
        }
        let sides: Vec<u32> = ImageSize::ALL.iter().map(|size| size.side()).collect();
        assert_eq!(sides, [500, 300, 100, 67, 32]);
        assert!(ImageSize::ALL.iter().all(|size| ImageSize::parse(size.as_str()) == Some(*size)));
    }
}
