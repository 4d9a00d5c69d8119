//! `FsStorage`: objects as files under one directory, for the embedded mode.
//!
//! A key maps to the path `root/key` ([`ObjectKey`] forbids anything that could step out of
//! the root or collide with our own dot-directories). A write streams into a uniquely named
//! file in `root/.tmp/`, is synced, then renamed over the key's path: rename is atomic on one
//! filesystem, so readers see the old object or the new one, never part of either, and of
//! two concurrent writers the later rename wins whole.
//!
//! The content type rides on the file itself as the `user.waveline.content_type` extended
//! attribute, set before the rename so it moves with the bytes; on a filesystem without user
//! attributes it is derived from the key's extension. The ETag is built from the inode,
//! modification time and size: every write creates a new inode, so it changes whenever the
//! object is replaced, without hashing the bytes.
//!
//! **Hot reads.** A player asks for one object in a run of small ranges. Files read in the
//! last second stay open (nginx's `open_file_cache`, at most 1024), with their metadata: a
//! range of up to 256 KiB from one of them is a single positional read, done on the calling
//! thread like nginx's own reads without `aio threads`, since the pages of a file just read are
//! almost always in the page cache. Everything else (a first read, a large range) opens the file
//! on the blocking pool. A write or delete through this store drops the entry at once; a
//! replacement by another process (another replica on the same directory) shows within the
//! second, and until then readers get the previous version whole, never a mix. The stream
//! cache ([`CachedStorage`](super::CachedStorage)) serves its files through the same path
//! ([`read_local`]), with the metadata of the store it caches.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;
use uuid::Uuid;

use super::{
    ByteRange, ByteStream, ObjectKey, ObjectMeta, ObjectRead, ObjectSummary, PresignedUpload, ResolvedRange, Storage,
    StorageError,
};

const CONTENT_TYPE_ATTR: &str = "user.waveline.content_type";
const TMP_DIR: &str = ".tmp";
/// Read chunk size: large enough for throughput, small enough to bound memory per stream.
pub(super) const CHUNK: usize = 64 * 1024;
/// Parts up to this size are read in the same blocking call that opens the file.
pub(super) const SMALL_READ: u64 = 256 * 1024;

/// How long an opened file is kept for the reads that follow.
const HOT_TTL: Duration = Duration::from_secs(1);
/// The most files kept open.
const HOT_MAX: usize = 1024;

/// Objects as files under a root directory.
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
    hot: Arc<HotFiles>,
}

/// Files opened in the last [`HOT_TTL`], by name: a key for [`FsStorage`], a cache file's
/// own name for [`CachedStorage`](super::CachedStorage).
#[derive(Debug, Default)]
pub(super) struct HotFiles {
    entries: Mutex<HashMap<String, Hot>>,
}

#[derive(Debug, Clone)]
struct Hot {
    file: Arc<std::fs::File>,
    meta: ObjectMeta,
    opened: Instant,
}

impl HotFiles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Hot>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, name: &str) -> Option<Hot> {
        self.lock().get(name).filter(|hot| hot.opened.elapsed() < HOT_TTL).cloned()
    }

    fn put(&self, name: &str, hot: Hot) {
        let mut entries = self.lock();
        if entries.len() >= HOT_MAX {
            entries.retain(|_, hot| hot.opened.elapsed() < HOT_TTL);
            if entries.len() >= HOT_MAX {
                entries.clear();
            }
        }
        entries.insert(name.to_owned(), hot);
    }

    /// Closes `name` here (it was replaced or removed).
    pub(super) fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// `len` bytes at `offset`, with positional reads (the file's cursor is not used, so one open
/// file serves concurrent readers).
pub(super) fn read_part(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<bytes::Bytes> {
    let mut bytes = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read_at(&mut bytes[filled..], offset + filled as u64)? {
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file is shorter than it was")),
            n => filled += n,
        }
    }
    Ok(bytes::Bytes::from(bytes))
}

/// `range` resolved against an object of `size` bytes as [`Storage::get`] answers it: the whole
/// object when no range is asked for (`None` then only for an empty object), 416 for a range
/// outside it.
pub(super) fn resolve(range: Option<ByteRange>, size: u64) -> Result<Option<ResolvedRange>, StorageError> {
    match range {
        Some(range) => Ok(Some(range.resolve(size).ok_or(StorageError::RangeNotSatisfiable { size })?)),
        None => Ok(ByteRange::From { first: 0 }.resolve(size)),
    }
}

/// Reads `range` of the local file at `path()`, named `name` among the `hot` files, with the
/// metadata `meta_of` gives for the opened file. A small part of a file read a moment ago is
/// one positional read on the calling thread; otherwise the file is opened, checked and, for a
/// small part (a player's range request), read on the blocking pool in one trip. `missing()`
/// is the error for a path with no file. (The path and the error are only made when needed:
/// the hot path allocates as little as it can.)
pub(super) async fn read_local<P, E, M>(
    hot: &HotFiles,
    name: &str,
    path: P,
    range: Option<ByteRange>,
    missing: E,
    meta_of: M,
) -> Result<ObjectRead, StorageError>
where
    P: FnOnce() -> PathBuf,
    E: FnOnce() -> StorageError + Send + 'static,
    M: FnOnce(&Path, &std::fs::Metadata) -> Result<ObjectMeta, StorageError> + Send + 'static,
{
    if let Some(hot_file) = hot.get(name) {
        match resolve(range, hot_file.meta.size)? {
            None => {
                return Ok(ObjectRead { meta: hot_file.meta, range: None, body: Box::pin(futures::stream::empty()) });
            }
            Some(part) if part.len() <= SMALL_READ => match read_part(&hot_file.file, part.first, part.len()) {
                Ok(bytes) => {
                    let body: ByteStream = Box::pin(futures::stream::once(async move { Ok(bytes) }));
                    return Ok(ObjectRead { meta: hot_file.meta, range: Some(part), body });
                }
                Err(_) => hot.forget(name),
            },
            Some(_) => {}
        }
    }

    let path = path();
    let opened = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
        use std::io::Seek;
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) if matches!(err.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                return Err(missing());
            }
            Err(err) => return Err(err.into()),
        };
        // The open handle pins this version of the object, even if a writer replaces it now.
        let stat = file.metadata()?;
        if stat.is_dir() {
            return Err(missing());
        }
        let meta = meta_of(&path, &stat)?;
        let resolved = resolve(range, meta.size)?;
        let small = match resolved {
            Some(part) if part.len() <= SMALL_READ => Some(read_part(&file, part.first, part.len())?),
            Some(part) => {
                file.seek(SeekFrom::Start(part.first))?;
                None
            }
            None => Some(bytes::Bytes::new()),
        };
        Ok((file, meta, resolved, small))
    })
    .await
    .map_err(|err| StorageError::Io(std::io::Error::other(err)))??;
    let (file, meta, resolved, small) = opened;
    let body: ByteStream = match (resolved, small) {
        (_, Some(bytes)) => {
            hot.put(name, Hot { file: Arc::new(file), meta: meta.clone(), opened: Instant::now() });
            if bytes.is_empty() {
                Box::pin(futures::stream::empty())
            } else {
                Box::pin(futures::stream::once(async move { Ok(bytes) }))
            }
        }
        (Some(range), None) => {
            super::byte_stream(ReaderStream::with_capacity(tokio::fs::File::from_std(file).take(range.len()), CHUNK))
        }
        (None, None) => Box::pin(futures::stream::empty()),
    };
    Ok(ObjectRead { meta, range: resolved, body })
}

impl FsStorage {
    /// Uses `root`, creating it (and its temp directory) when missing. Stale temp files of
    /// writes cut short by a crash are removed.
    pub async fn open(root: &Path) -> Result<FsStorage, StorageError> {
        if !root.is_absolute() {
            return Err(StorageError::Config(format!("{} is not an absolute path", root.display())));
        }
        let tmp = root.join(TMP_DIR);
        tokio::fs::create_dir_all(&tmp).await?;
        let mut entries = tokio::fs::read_dir(&tmp).await?;
        while let Some(entry) = entries.next_entry().await? {
            let stale = entry
                .metadata()
                .await
                .ok()
                .and_then(|meta| meta.modified().ok())
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(24 * 3600));
            if stale {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        Ok(FsStorage { root: root.to_path_buf(), hot: Arc::default() })
    }

    /// The directory objects live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// Writes a temp file and renames it over the key's path.
    async fn put_file(
        &self,
        key: &ObjectKey,
        content_type: &str,
        body: ByteStream,
    ) -> Result<ObjectMeta, StorageError> {
        let tmp = self.root.join(TMP_DIR).join(Uuid::new_v4().to_string());
        if let Err(err) = self.write_temp(&tmp, content_type, body).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err);
        }
        let path = self.path_of(key);
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        // A concurrent delete may prune the parent directory between the two calls; one more
        // round settles it.
        let mut renamed = Ok(());
        for _ in 0..3 {
            tokio::fs::create_dir_all(&parent).await?;
            renamed = tokio::fs::rename(&tmp, &path).await;
            match &renamed {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                _ => break,
            }
        }
        if let Err(err) = renamed {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err.into());
        }
        let stat = tokio::fs::metadata(&path).await?;
        Ok(meta_of(&path, key, &stat))
    }

    /// Removes the directories above `path` left empty, up to the root; a non-empty one
    /// stops the walk.
    async fn prune_empty_parents(&self, path: &Path) {
        let mut dir = path.parent();
        while let Some(current) = dir {
            if current == self.root || tokio::fs::remove_dir(current).await.is_err() {
                break;
            }
            dir = current.parent();
        }
    }

    async fn write_temp(&self, tmp: &Path, content_type: &str, mut body: ByteStream) -> Result<(), StorageError> {
        let mut file = tokio::fs::File::create(tmp).await?;
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk?).await?;
        }
        file.sync_all().await?;
        drop(file);
        match xattr::set(tmp, CONTENT_TYPE_ATTR, content_type.as_bytes()) {
            Ok(()) => Ok(()),
            // No user attributes on this filesystem: head falls back to the extension.
            Err(err) if err.raw_os_error() == Some(95) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}

fn not_found(key: &ObjectKey) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |err| match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => {
            StorageError::NotFound { key: key.to_string() }
        }
        _ => StorageError::Io(err),
    }
}

/// Size, ETag, content type and modification time of a stored file (blocking: the xattr).
fn meta_of(path: &Path, key: &ObjectKey, stat: &std::fs::Metadata) -> ObjectMeta {
    let content_type = xattr::get(path, CONTENT_TYPE_ATTR)
        .ok()
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_else(|| waveline_media::content_type(key.as_str()).to_owned());
    let mtime_ns = stat.mtime() as i128 * 1_000_000_000 + i128::from(stat.mtime_nsec());
    ObjectMeta {
        size: stat.len(),
        etag: format!("\"{:x}-{:x}-{:x}\"", stat.ino(), mtime_ns, stat.len()),
        content_type,
        last_modified: DateTime::<Utc>::from_timestamp(stat.mtime(), stat.mtime_nsec() as u32).unwrap_or_default(),
    }
}

#[async_trait]
impl Storage for FsStorage {
    fn backend(&self) -> &'static str {
        "fs"
    }

    async fn put(&self, key: &ObjectKey, content_type: &str, body: ByteStream) -> Result<ObjectMeta, StorageError> {
        let result = self.put_file(key, content_type, body).await;
        self.hot.forget(key.as_str());
        result
    }
    async fn get(&self, key: &ObjectKey, range: Option<ByteRange>) -> Result<ObjectRead, StorageError> {
        let (owned_key, missing) = (key.clone(), key.clone());
        let missing = move || StorageError::NotFound { key: missing.to_string() };
        read_local(
            &self.hot,
            key.as_str(),
            || self.path_of(key),
            range,
            missing,
            move |path, stat| Ok(meta_of(path, &owned_key, stat)),
        )
        .await
    }

    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        let path = self.path_of(key);
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let stat = std::fs::metadata(&path).map_err(not_found(&key))?;
            if stat.is_dir() {
                return Err(StorageError::NotFound { key: key.to_string() });
            }
            Ok(meta_of(&path, &key, &stat))
        })
        .await
        .map_err(|err| StorageError::Io(std::io::Error::other(err)))?
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.hot.forget(key.as_str());
        let path = self.path_of(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(err) if matches!(err.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                return Ok(());
            }
            Err(err) if err.kind() == std::io::ErrorKind::IsADirectory => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        self.prune_empty_parents(&path).await;
        Ok(())
    }

    async fn rename(&self, from: &ObjectKey, to: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        self.hot.forget(from.as_str());
        self.hot.forget(to.as_str());
        let (source, target) = (self.path_of(from), self.path_of(to));
        match tokio::fs::metadata(&source).await {
            Ok(stat) if stat.is_file() => {}
            Ok(_) => return Err(StorageError::NotFound { key: from.to_string() }),
            Err(err) => return Err(not_found(from)(err)),
        }
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        // As in `put`: a concurrent delete may prune the target's parent between the calls.
        let mut renamed = Ok(());
        for _ in 0..3 {
            tokio::fs::create_dir_all(&parent).await?;
            renamed = tokio::fs::rename(&source, &target).await;
            match &renamed {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    if tokio::fs::metadata(&source).await.is_err() {
                        return Err(StorageError::NotFound { key: from.to_string() });
                    }
                }
                _ => break,
            }
        }
        renamed?;
        self.prune_empty_parents(&source).await;
        self.hot.forget(to.as_str());
        self.head(to).await
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StorageError> {
        // Walk only the deepest directory the prefix names whole.
        let base = match prefix.rfind('/') {
            Some(slash) => &prefix[..slash],
            None => "",
        };
        if !base.is_empty() && ObjectKey::parse(base).is_err() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        let mut pending = vec![(self.root.join(base), base.to_owned())];
        while let Some((dir, dir_key)) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(err) if matches!(err.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            while let Some(entry) = entries.next_entry().await? {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let key = if dir_key.is_empty() { name } else { format!("{dir_key}/{name}") };
                let file_type = entry.file_type().await?;
                if file_type.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        pending.push((entry.path(), key));
                    }
                } else if file_type.is_file() && key.starts_with(prefix) {
                    let size = match entry.metadata().await {
                        Ok(meta) => meta.len(),
                        // Deleted while we listed: it is not there any more.
                        Err(_) => continue,
                    };
                    if let Ok(key) = ObjectKey::parse(key) {
                        found.push(ObjectSummary { key, size });
                    }
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn presign_put(
        &self,
        _key: &ObjectKey,
        _content_type: &str,
        _size: u64,
        _expires_in: Duration,
    ) -> Result<Option<PresignedUpload>, StorageError> {
        Ok(None)
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let probe = self.root.join(TMP_DIR).join(format!("ping-{}", Uuid::new_v4()));
        tokio::fs::write(&probe, b"").await?;
        tokio::fs::remove_file(&probe).await?;
        Ok(())
    }
}
