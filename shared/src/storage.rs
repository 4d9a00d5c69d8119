//! The `Storage` seam: where originals, renditions, waveforms and artwork live.
//!
//! Two backends implement [`Storage`]: [`S3Storage`] (any S3-compatible server, path-style)
//! and [`FsStorage`] (a local directory, for the embedded mode). [`CachedStorage`] wraps
//! either with a read-through cache on local disk (API processes put it in front of S3 for
//! renditions). All three pass the same contract suite (`tests/tests/storage_contract.rs`).
//! Callers hold an `Arc<dyn Storage>` built by [`open`] from the configured [`StorageBackend`].
//!
//! Bodies move as streams of [`Bytes`] in both directions, so memory use is bounded by the
//! chunk size (and, for S3 multipart uploads, by one part), never by the object size.

mod cache;
mod fs;
mod s3;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::Serialize;

pub use aws_sdk_s3::config::Credentials as S3Credentials;
pub use cache::{CacheSettings, CacheStats, CachedStorage, renditions_only};
pub use fs::FsStorage;
pub use s3::S3Storage;

use crate::config::StorageBackend;
use crate::domain::TrackId;

/// A body in flight: chunks of bytes, or the error that cut it short.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send>>;

/// Turns any stream of `io::Result<Bytes>` (a file, an HTTP body) into a [`ByteStream`].
pub fn byte_stream<S>(stream: S) -> ByteStream
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    use futures::StreamExt;
    Box::pin(stream.map(|chunk| chunk.map_err(|err| StorageError::Body(err.to_string()))))
}

/// A validated object key: relative, `/`-separated, with no empty, `.` or `..` segment and no
/// segment that starts with `.` (the filesystem backend keeps its temporary files there).
/// Keys of at most 1024 bytes of printable ASCII and UTF-8 letters, as S3 allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Checks `key` and wraps it.
    pub fn parse(key: impl Into<String>) -> Result<ObjectKey, StorageError> {
        let key = key.into();
        let reason = if key.is_empty() {
            Some("it is empty")
        } else if key.len() > 1024 {
            Some("it is longer than 1024 bytes")
        } else if key.chars().any(|c| c.is_control() || c == '\\') {
            Some("it holds a control character or a backslash")
        } else if key.split('/').any(|segment| segment.is_empty() || segment.starts_with('.')) {
            Some("a segment is empty or starts with a dot")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StorageError::InvalidKey { key, reason }),
            None => Ok(ObjectKey(key)),
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as a URL path (and as `x-amz-copy-source` wants it): percent-encoded, slashes
    /// kept.
    pub fn url_path(&self) -> String {
        let mut encoded = String::with_capacity(self.0.len());
        for byte in self.0.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
                encoded.push(byte as char);
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        encoded
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a track's original lives: the key workers read. No URL handed to a client ever
/// names it, so once an upload is complete nothing outside Waveline can change these bytes.
pub fn original_key(track: TrackId) -> ObjectKey {
    ObjectKey(format!("{ORIGINALS_PREFIX}{track}/source"))
}

/// Where the bytes of a direct upload land (the presigned URL, or `PUT /v1/uploads/{id}`)
/// until `complete` moves them to [`original_key`] and checks them there.
pub fn upload_key(track: TrackId) -> ObjectKey {
    ObjectKey(format!("{UPLOADS_PREFIX}{track}/source"))
}

/// The prefix of one revision's renditions, waveform, artwork and manifest, with the trailing
/// slash: `renditions/{track}/{revision}/`.
pub fn revision_prefix(track: TrackId, revision: i32) -> String {
    format!("{}{revision}/", renditions_prefix(track))
}

/// The key of a file the pipeline wrote for one revision, `relative` to its output directory
/// (`mp3_128/audio.mp3`, `aac_hls/master.m3u8`, `waveform/waveform.json`, …).
pub fn rendition_key(track: TrackId, revision: i32, relative: &str) -> Result<ObjectKey, StorageError> {
    ObjectKey::parse(format!("{}{relative}", revision_prefix(track, revision)))
}

/// The prefix of every revision of a track: `renditions/{track}/`.
pub fn renditions_prefix(track: TrackId) -> String {
    format!("{RENDITIONS_PREFIX}{track}/")
}

/// The prefixes under which every object of a track lies: its original, a direct upload not
/// yet completed, every revision's renditions, and its artwork. Deleting a track deletes all four.
pub fn track_prefixes(track: TrackId) -> [String; 4] {
    [
        format!("{ORIGINALS_PREFIX}{track}/"),
        format!("{UPLOADS_PREFIX}{track}/"),
        renditions_prefix(track),
        crate::images::image_prefix(crate::images::ImageSubject::Track, track.0),
    ]
}

/// The prefix under which every [`original_key`] lies.
pub const ORIGINALS_PREFIX: &str = "originals/";

/// The prefix under which every [`upload_key`] lies.
pub const UPLOADS_PREFIX: &str = "uploads/";

/// The prefix under which every [`revision_prefix`] lies.
pub const RENDITIONS_PREFIX: &str = "renditions/";

/// The track a key under [`UPLOADS_PREFIX`] belongs to.
pub fn upload_track(key: &ObjectKey) -> Option<TrackId> {
    let rest = key.as_str().strip_prefix(UPLOADS_PREFIX)?;
    let (id, _) = rest.split_once('/')?;
    id.parse().ok()
}

/// A byte range as a client asks for it (RFC 9110 `bytes=` forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=first-last`, both inclusive.
    Inclusive { first: u64, last: u64 },
    /// `bytes=first-`: from `first` to the end.
    From { first: u64 },
    /// `bytes=-len`: the last `len` bytes.
    Suffix { len: u64 },
}

impl ByteRange {
    /// Resolves the range against an object of `size` bytes, clamping the end as RFC 9110
    /// says; `None` when it is unsatisfiable.
    pub fn resolve(self, size: u64) -> Option<ResolvedRange> {
        let (first, last) = match self {
            ByteRange::Inclusive { first, last } if first <= last => (first, last.min(size.checked_sub(1)?)),
            ByteRange::Inclusive { .. } => return None,
            ByteRange::From { first } => (first, size.checked_sub(1)?),
            ByteRange::Suffix { len } if len > 0 => (size.saturating_sub(len), size.checked_sub(1)?),
            ByteRange::Suffix { .. } => return None,
        };
        (first < size && first <= last).then_some(ResolvedRange { first, last })
    }

    /// The range in HTTP header syntax (`bytes=0-99`).
    pub fn header_value(self) -> String {
        match self {
            ByteRange::Inclusive { first, last } => format!("bytes={first}-{last}"),
            ByteRange::From { first } => format!("bytes={first}-"),
            ByteRange::Suffix { len } => format!("bytes=-{len}"),
        }
    }
}

/// A satisfiable range within an object: `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResolvedRange {
    pub first: u64,
    pub last: u64,
}

impl ResolvedRange {
    /// How many bytes the range covers.
    pub fn len(self) -> u64 {
        self.last - self.first + 1
    }

    /// Never true: a resolved range holds at least one byte.
    pub fn is_empty(self) -> bool {
        false
    }
}

/// What `head` tells about an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectMeta {
    /// Size in bytes.
    pub size: u64,
    /// A strong entity tag, quoted as in HTTP (`"…"`); it changes whenever the object is
    /// replaced.
    pub etag: String,
    /// The media type given to `put` (S3) or derived from the key's extension (filesystem).
    pub content_type: String,
    /// When this version of the object was written.
    pub last_modified: DateTime<Utc>,
}

/// An object being read: its metadata, the bytes served, and the body.
pub struct ObjectRead {
    pub meta: ObjectMeta,
    /// The part of the object in `body`; the whole object when no range was asked for (and
    /// `None` then only for an empty object).
    pub range: Option<ResolvedRange>,
    pub body: ByteStream,
}

impl fmt::Debug for ObjectRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectRead").field("meta", &self.meta).field("range", &self.range).finish_non_exhaustive()
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectSummary {
    pub key: ObjectKey,
    pub size: u64,
}

/// A URL a client can PUT an object's bytes to directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresignedUpload {
    pub method: String,
    pub url: String,
    /// Headers the client must send with the request, as signed.
    pub headers: Vec<(String, String)>,
    pub expires_at: DateTime<Utc>,
}

/// Which request a presigned read URL is signed for: S3 signs the method, so a GET URL does
/// not answer a HEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMethod {
    Get,
    Head,
}

/// A URL anyone holding it may read an object from, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresignedRead {
    pub url: String,
    /// When the URL stops working: never later than the moment the caller asked for.
    pub expires_at: DateTime<Utc>,
}

/// The storage seam. Every method is safe to call concurrently; writes of the same key race
/// to a last-writer-wins result in which readers only ever see one complete version.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Which backend this is (`s3`, `fs`), for logs and health checks.
    fn backend(&self) -> &'static str;

    /// Streams `body` into `key`, replacing any object there. Nothing becomes visible under
    /// `key` unless the whole body arrived: a body that ends in an error leaves the previous
    /// object (or nothing) in place.
    async fn put(&self, key: &ObjectKey, content_type: &str, body: ByteStream) -> Result<ObjectMeta, StorageError>;

    /// Reads an object, or the asked-for part of it.
    async fn get(&self, key: &ObjectKey, range: Option<ByteRange>) -> Result<ObjectRead, StorageError>;

    /// Size, ETag, content type and modification time, without the body.
    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, StorageError>;

    /// Removes an object; removing a missing object succeeds.
    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError>;

    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list_prefix(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StorageError>;

    /// Removes every object whose key starts with `prefix`; returns how many went.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let objects = self.list_prefix(prefix).await?;
        for object in &objects {
            self.delete(&object.key).await?;
        }
        Ok(objects.len() as u64)
    }

    /// Moves the object at `from` to `to`, replacing anything there: afterwards `to` holds
    /// the bytes `from` held at one moment, whole, and `from` is gone. `NotFound` when there
    /// is nothing at `from`.
    async fn rename(&self, from: &ObjectKey, to: &ObjectKey) -> Result<ObjectMeta, StorageError>;

    /// Whether [`presign_put`](Storage::presign_put) and [`presign_get`](Storage::presign_get)
    /// hand out URLs.
    fn presigns(&self) -> bool {
        false
    }

    /// A URL for uploading exactly `size` bytes to `key` directly, valid for `expires_in`:
    /// the length is part of the signature, so the store refuses a body of any other size.
    /// `None` when the backend has no such thing (the filesystem), and callers then upload
    /// through the API.
    async fn presign_put(
        &self,
        key: &ObjectKey,
        content_type: &str,
        size: u64,
        expires_in: Duration,
    ) -> Result<Option<PresignedUpload>, StorageError>;

    /// A URL for reading `key` directly (a GET, with any `Range` or validator the client
    /// adds, or a HEAD, as `method` says) that stops working at `until` at the latest: the
    /// caller states the end of the access it grants, and the URL never outlives it. Expiry
    /// is counted in whole seconds, so `until` must be at least a second away (`Config`
    /// error otherwise). `None` when the backend has no such thing (the filesystem). Nothing
    /// is asked of the store: the object may be gone by the time the URL is used.
    async fn presign_get(
        &self,
        _key: &ObjectKey,
        _method: ReadMethod,
        _until: DateTime<Utc>,
    ) -> Result<Option<PresignedRead>, StorageError> {
        Ok(None)
    }

    /// Checks that the backend answers (a cheap listing), for readiness probes.
    async fn ping(&self) -> Result<(), StorageError> {
        self.list_prefix("healthcheck/").await.map(|_| ())
    }
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} does not exist")]
    NotFound { key: String },
    #[error("range not satisfiable: the object has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("the body stream failed: {0}")]
    Body(String),
    #[error("storage configuration: {0}")]
    Config(String),
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("object store request failed: {0}")]
    Remote(String),
}

impl StorageError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::NotFound { .. } => "not_found",
            StorageError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            StorageError::InvalidKey { .. } => "invalid_key",
            StorageError::Body(_) => "body_failed",
            StorageError::Config(_) => "storage_config",
            StorageError::Io(_) => "storage_io",
            StorageError::Remote(_) => "storage_unavailable",
        }
    }

    /// Whether retrying the same call cannot help. I/O and remote failures are transient: a
    /// full disk is freed, a server comes back.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            StorageError::NotFound { .. }
                | StorageError::RangeNotSatisfiable { .. }
                | StorageError::InvalidKey { .. }
                | StorageError::Config(_)
        )
    }
}

/// Builds the configured backend.
pub async fn open(backend: &StorageBackend) -> Result<Arc<dyn Storage>, StorageError> {
    Ok(match backend {
        StorageBackend::Fs { root } => Arc::new(FsStorage::open(root).await?),
        StorageBackend::S3 { bucket, endpoint, region } => {
            Arc::new(S3Storage::from_env(bucket, endpoint.as_deref(), region)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_or_hide() {
        for good in ["originals/abc/source", "renditions/t/1/mp3_128/audio.mp3", "a", "ünï/cödé"] {
            assert!(ObjectKey::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "/abs", "a//b", "../x", "a/../b", "a/./b", ".tmp/x", "a/.hidden", "a\\b", "a\nb", "trailing/"] {
            let err = ObjectKey::parse(bad).expect_err(bad);
            assert_eq!(err.code(), "invalid_key");
        }
        assert!(ObjectKey::parse("x".repeat(1025)).is_err());
    }

    #[test]
    fn keys_are_encoded_for_url_paths() {
        let path = |key: &str| ObjectKey::parse(key).expect("a valid key").url_path();
        assert_eq!(path("originals/abc-1/source"), "originals/abc-1/source");
        assert_eq!(path("a b/ünï+x"), "a%20b/%C3%BCn%C3%AF%2Bx");
        assert_eq!(path("a?b#c%d"), "a%3Fb%23c%25d");
    }

    #[test]
    fn upload_keys_name_their_track_and_never_the_original() {
        let track = TrackId::new();
        let upload = upload_key(track);
        assert!(ObjectKey::parse(upload.as_str()).is_ok() && ObjectKey::parse(original_key(track).as_str()).is_ok());
        assert_ne!(upload, original_key(track));
        assert_eq!(upload_track(&upload), Some(track));
        assert_eq!(upload_track(&original_key(track)), None);
        assert_eq!(upload_track(&ObjectKey::parse("uploads/not-an-id/source").expect("a valid key")), None);
    }

    #[test]
    fn every_key_of_a_track_lies_under_one_of_its_prefixes() {
        let (track, other) = (TrackId::new(), TrackId::new());
        let prefixes = track_prefixes(track);
        let rendition = rendition_key(track, 2, "mp3_128/audio.mp3").expect("a valid key");
        assert!(rendition.as_str().starts_with(&revision_prefix(track, 2)));
        assert!(revision_prefix(track, 2).starts_with(&renditions_prefix(track)));
        let artwork = crate::images::variant_key(
            crate::images::ImageSubject::Track,
            track.0,
            &crate::images::new_version(),
            crate::images::ImageSize::Small,
        )
        .expect("a valid key");
        for key in [original_key(track), upload_key(track), rendition, artwork] {
            assert!(prefixes.iter().any(|prefix| key.as_str().starts_with(prefix.as_str())), "{key}");
        }
        for key in [original_key(other), upload_key(other), rendition_key(other, 2, "a.mp3").expect("key")] {
            assert!(!prefixes.iter().any(|prefix| key.as_str().starts_with(prefix.as_str())), "{key}");
        }
        // Revision 1's prefix is not a prefix of revision 10's keys.
        assert!(!rendition_key(track, 10, "a.mp3").expect("key").as_str().starts_with(&revision_prefix(track, 1)));
        assert!(rendition_key(track, 1, "../escape").is_err());
    }

    #[test]
    fn ranges_resolve_as_rfc_9110_says() {
        let r = |first, last| Some(ResolvedRange { first, last });
        assert_eq!(ByteRange::Inclusive { first: 0, last: 0 }.resolve(10), r(0, 0));
        assert_eq!(ByteRange::Inclusive { first: 9, last: 100 }.resolve(10), r(9, 9));
        assert_eq!(ByteRange::Inclusive { first: 10, last: 12 }.resolve(10), None);
        assert_eq!(ByteRange::Inclusive { first: 5, last: 4 }.resolve(10), None);
        assert_eq!(ByteRange::From { first: 3 }.resolve(10), r(3, 9));
        assert_eq!(ByteRange::From { first: 10 }.resolve(10), None);
        assert_eq!(ByteRange::Suffix { len: 4 }.resolve(10), r(6, 9));
        assert_eq!(ByteRange::Suffix { len: 40 }.resolve(10), r(0, 9));
        assert_eq!(ByteRange::Suffix { len: 0 }.resolve(10), None);
        assert_eq!(ByteRange::From { first: 0 }.resolve(0), None);
        assert_eq!(ByteRange::Suffix { len: 1 }.resolve(0), None);
    }
}
