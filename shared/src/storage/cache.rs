//! `CachedStorage`: a read-through cache of immutable objects on local disk, in front of
//! another store, the way nginx's `proxy_cache` sits in front of object storage. API processes
//! of the distributed mode put it in front of S3, so a listener's run of range requests costs
//! one GET of the object from S3 and then local reads, not one S3 round trip per range.
//!
//! **What is cached.** Only keys the `cacheable` predicate accepts: in `waveline serve`,
//! rendition keys ([`renditions_only`]). They name the revision (`renditions/{track}/{revision}/…`)
//! and a revision's files are written once, before it goes live, so a cached copy can never be
//! stale: a reprocessed track is a new revision under new keys. Everything else (originals,
//! uploads, listings, presigning) goes straight to the store. Writes, deletes and renames made
//! through this store also drop what it holds of the keys they touch (the contract suite runs
//! with every key cacheable to prove that); changes made by other processes (workers removing
//! an old revision) are not seen, which is harmless for renditions: nothing names a removed
//! revision any more, and its files leave with the least recently used.
//!
//! **Serving.** A complete copy is a file `objects/{name}` under the cache's slot directory,
//! with its original metadata (ETag, `Last-Modified`, content type from the store) in the index
//! and beside it in `objects/{name}.meta`. Reads go through the filesystem store's hot-file
//! path ([`read_local`]): a file read in the last second stays open and a small range is one
//! positional read. Files are named by a random name per fetch, not by key, so an entry
//! replaced or evicted can never be confused with the next copy of the same key, and the
//! hot-file table needs no invalidation of its own. The metadata served is the store's, so an
//! answer from the cache and one straight from the store carry the same validators and a
//! client can revalidate against any replica.
//!
//! **Filling.** The first read of an uncached object starts one fetch of the whole object
//! (single flight: every read of the key meanwhile joins it rather than fetching again). The
//! fetch streams the body into `tmp/{name}`, publishing the written length on a watch channel,
//! and readers are served from the part already on disk as it grows, so the first reader's
//! first byte comes when the store's first bytes do, not when the whole object has arrived. A
//! read that starts more than [`READ_AHEAD`] beyond what has arrived (a seek far ahead) goes
//! straight to the store instead of waiting. Only a whole body of exactly the announced size
//! becomes an entry: the file is synced, renamed into `objects/` and its metadata written, in
//! that order. A fetch that fails (the store answers an error, the body breaks off or stalls for
//! [`FILL_STALL`], the disk fails) removes its temp file, leaves nothing in the index, and its
//! readers get the error (before their first byte: the store's own error; mid-body: a `Body`
//! error that cuts the response short). The next read fetches again.
//!
//! **Bounds.** At most `max_bytes` of complete files and fetches in flight (a fetch reserves
//! its object's size when the store announces it), least recently read evicted first; an
//! object larger than `max_bytes` is never cached (its reads go to the store, and the key is
//! remembered so later reads do not start a fetch). At most [`MAX_FILLS`] fetches run at once;
//! beyond that, misses read from the store without caching, so requests for many different
//! objects cannot queue unbounded work.
//!
//! **Restarts and sharing a directory.** The cache survives a restart: at start-up the index
//! is rebuilt from the `.meta` files (a data file without one, or whose size differs, is
//! removed, as are temp files), in the order the objects were fetched. Each process takes the
//! first free slot `dir/0`, `dir/1`, … (it holds an exclusive lock on `slot/lock` while it
//! runs), so processes that share a directory never share files, and a restarted process
//! finds its predecessor's slot. A slot remembers which store it was filled from (`origin`);
//! pointed at another one, it starts empty.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::fs::{CHUNK, HotFiles, read_local, read_part, resolve};
use super::{
    ByteRange, ByteStream, ObjectKey, ObjectMeta, ObjectRead, ObjectSummary, PresignedRead, PresignedUpload,
    RENDITIONS_PREFIX, ReadMethod, Storage, StorageError,
};

/// The most fetches one cache runs at once.
pub const MAX_FILLS: usize = 64;
/// How far beyond a fetch's written bytes a read may start and still wait for them; a read
/// further ahead goes to the store. 256 KiB arrive in about 5 ms at 50 MB/s.
pub const READ_AHEAD: u64 = 256 * 1024;
/// How long a fetch may receive nothing before it fails.
pub const FILL_STALL: Duration = Duration::from_secs(30);
/// How many processes may share one cache directory.
pub const MAX_SLOTS: usize = 64;
/// How many keys of objects too large to cache are remembered.
const TOO_LARGE_MAX: usize = 4096;
/// How many body chunks already received are written in one trip to the blocking pool.
const WRITE_BATCH: usize = 32;

/// The keys `waveline serve` caches: renditions, whose keys name their revision.
pub fn renditions_only(key: &ObjectKey) -> bool {
    key.as_str().starts_with(RENDITIONS_PREFIX)
}

/// How a [`CachedStorage`] is set up.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// The directory the cache's slots live in (absolute).
    pub dir: PathBuf,
    /// The most bytes held (complete files and fetches in flight).
    pub max_bytes: u64,
    /// Which keys are cached; the others go straight to the store.
    pub cacheable: fn(&ObjectKey) -> bool,
    /// Names the store behind the cache (its backend and bucket, say); a slot last filled
    /// from another origin is emptied at start-up.
    pub origin: String,
}

/// A read-through cache on local disk in front of another [`Storage`] (see the module doc).
#[derive(Debug, Clone)]
pub struct CachedStorage {
    shared: Arc<Shared>,
}

/// What the cache holds, for tests and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Complete objects.
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Fetches in flight.
    pub fetching: usize,
}

struct Shared {
    inner: Arc<dyn Storage>,
    slot: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    cacheable: fn(&ObjectKey) -> bool,
    index: Mutex<Index>,
    hot: HotFiles,
    /// `waveline_stream_cache_hits_total`, registered once: it is counted on the hot path.
    hits: metrics::Counter,
    /// Holds the slot's lock for as long as the cache lives.
    _lock: std::fs::File,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStorage")
            .field("inner", &self.inner)
            .field("slot", &self.slot)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// The complete entries, their use order, and the fetches in flight.
#[derive(Default)]
struct Index {
    entries: HashMap<ObjectKey, Entry>,
    /// Place tick → key, oldest first (see [`Entry::placed`]).
    lru: BTreeMap<u64, ObjectKey>,
    tick: u64,
    /// Bytes of complete entries.
    held: u64,
    /// Bytes reserved by fetches in flight.
    reserved: u64,
    fills: HashMap<ObjectKey, Arc<Fill>>,
    too_large: HashSet<ObjectKey>,
}

struct Entry {
    /// The file's name under `objects/`.
    name: Arc<str>,
    meta: Arc<ObjectMeta>,
    /// The tick of its last use.
    used: u64,
    /// Its place in `lru`: the tick of its last use when it was put there. A hit only sets
    /// `used` (no reordering on the hot path); eviction puts an entry whose place is older
    /// than its last use back at that use, so the order evicted is still least recent first.
    placed: u64,
}

impl Index {
    /// The entry of `key`, marked as just used.
    fn touch(&mut self, key: &ObjectKey) -> Option<(Arc<str>, Arc<ObjectMeta>)> {
        self.tick += 1;
        let entry = self.entries.get_mut(key)?;
        entry.used = self.tick;
        Some((entry.name.clone(), entry.meta.clone()))
    }

    /// Adds an entry; the name of the file it replaces, if any.
    fn insert(&mut self, key: ObjectKey, name: String, meta: ObjectMeta) -> Option<String> {
        self.tick += 1;
        self.held += meta.size;
        self.lru.insert(self.tick, key.clone());
        let entry = Entry { name: name.into(), meta: Arc::new(meta), used: self.tick, placed: self.tick };
        let old = self.entries.insert(key, entry)?;
        self.lru.remove(&old.placed);
        self.held -= old.meta.size;
        Some(old.name.to_string())
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.lru.remove(&entry.placed);
        self.held -= entry.meta.size;
        Some(entry)
    }

    /// Evicts the least recently used entries until `need` more bytes fit under `max`; the
    /// names of the evicted files, or `None` (and nothing evicted) when the fetches in flight
    /// leave no room for it.
    fn make_room(&mut self, need: u64, max: u64) -> Option<Vec<String>> {
        if self.reserved.saturating_add(need) > max {
            return None;
        }
        let mut evicted = Vec::new();
        while self.held + self.reserved + need > max {
            let Some((placed, key)) = self.lru.pop_first() else { break };
            let Some(entry) = self.entries.get_mut(&key) else { continue };
            if entry.used != placed {
                // Used since it was placed: back in line at its last use.
                entry.placed = entry.used;
                self.lru.insert(entry.used, key);
                continue;
            }
            if let Some(entry) = self.entries.remove(&key) {
                self.held -= entry.meta.size;
                evicted.push(entry.name.to_string());
            }
        }
        metrics::counter!("waveline_stream_cache_evictions_total").increment(evicted.len() as u64);
        Some(evicted)
    }

    fn remember_too_large(&mut self, key: &ObjectKey) {
        if self.too_large.len() >= TOO_LARGE_MAX {
            self.too_large.clear();
        }
        self.too_large.insert(key.clone());
    }

    fn publish(&self) {
        metrics::gauge!("waveline_stream_cache_bytes").set(self.held as f64);
        metrics::gauge!("waveline_stream_cache_objects").set(self.entries.len() as f64);
    }
}

/// One fetch of an object into the cache, and what its readers need to follow it.
struct Fill {
    /// The temp file's name under `tmp/`, and the complete file's under `objects/`.
    name: String,
    progress: watch::Sender<Progress>,
    /// The key was written or deleted through the cache meanwhile: the copy is not kept.
    stale: AtomicBool,
}

#[derive(Clone, Default)]
struct Progress {
    /// Set once the store has answered and the temp file exists.
    head: Option<Arc<Head>>,
    /// Bytes on disk so far.
    written: u64,
    end: Option<End>,
}

struct Head {
    meta: ObjectMeta,
    file: Arc<std::fs::File>,
}

#[derive(Clone)]
enum End {
    Complete,
    Failed(Arc<StorageError>),
    /// Not cached (too large, or no room beside the fetches in flight): readers go to the
    /// store themselves.
    Bypass,
}

/// How a miss is served.
enum Miss {
    Started(Arc<Fill>),
    Joined(Arc<Fill>),
    Bypass,
    /// The key was cached meanwhile.
    Cached,
}

/// The `.meta` file beside a cached object.
#[derive(Debug, Serialize, Deserialize)]
struct StoredMeta {
    key: String,
    size: u64,
    etag: String,
    content_type: String,
    last_modified: DateTime<Utc>,
}

/// The same error again, for the second and later readers of a failed fetch.
fn again(err: &StorageError) -> StorageError {
    match err {
        StorageError::NotFound { key } => StorageError::NotFound { key: key.clone() },
        StorageError::RangeNotSatisfiable { size } => StorageError::RangeNotSatisfiable { size: *size },
        StorageError::InvalidKey { key, reason } => StorageError::InvalidKey { key: key.clone(), reason },
        StorageError::Body(text) => StorageError::Body(text.clone()),
        StorageError::Config(text) => StorageError::Config(text.clone()),
        StorageError::Io(err) => StorageError::Io(std::io::Error::new(err.kind(), err.to_string())),
        StorageError::Remote(text) => StorageError::Remote(text.clone()),
    }
}

fn blocking_failed(err: tokio::task::JoinError) -> StorageError {
    StorageError::Io(std::io::Error::other(err))
}

fn miss(kind: &'static str) {
    metrics::counter!("waveline_stream_cache_misses_total", "kind" => kind).increment(1);
}

impl CachedStorage {
    /// Opens the cache in a free slot of `settings.dir` (creating it), rebuilding its index
    /// from what an earlier process left there.
    pub async fn open(inner: Arc<dyn Storage>, settings: CacheSettings) -> Result<CachedStorage, StorageError> {
        if !settings.dir.is_absolute() {
            return Err(StorageError::Config(format!("{} is not an absolute path", settings.dir.display())));
        }
        let prepared = {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || prepare(&settings)).await.map_err(blocking_failed)??
        };
        let Prepared { lock, slot, restored, evicted } = prepared;
        let mut index = Index::default();
        for (key, name, meta) in restored {
            index.insert(key, name, meta);
        }
        index.publish();
        let shared = Shared {
            inner,
            objects: slot.join("objects"),
            tmp: slot.join("tmp"),
            slot,
            max_bytes: settings.max_bytes,
            cacheable: settings.cacheable,
            index: Mutex::new(index),
            hot: HotFiles::default(),
            hits: metrics::counter!("waveline_stream_cache_hits_total"),
            _lock: lock,
        };
        shared.remove_files(evicted).await;
        tracing::info!(slot = %shared.slot.display(), objects = shared.stats().objects, bytes = shared.stats().bytes, "stream cache ready");
        Ok(CachedStorage { shared: Arc::new(shared) })
    }

    /// The slot directory this process holds.
    pub fn slot(&self) -> &Path {
        &self.shared.slot
    }

    /// What the cache holds now.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }
}

struct Prepared {
    lock: std::fs::File,
    slot: PathBuf,
    restored: Vec<(ObjectKey, String, ObjectMeta)>,
    /// Restored files beyond the byte limit (it was lowered), to remove.
    evicted: Vec<String>,
}

/// Takes a free slot and reads back what it holds (blocking).
fn prepare(settings: &CacheSettings) -> Result<Prepared, StorageError> {
    std::fs::create_dir_all(&settings.dir)?;
    let mut claimed = None;
    for number in 0..MAX_SLOTS {
        let slot = settings.dir.join(number.to_string());
        std::fs::create_dir_all(&slot)?;
        let lock =
            std::fs::File::options().read(true).write(true).create(true).truncate(false).open(slot.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {
                claimed = Some((lock, slot));
                break;
            }
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(err)) => return Err(err.into()),
        }
    }
    let Some((lock, slot)) = claimed else {
        return Err(StorageError::Config(format!(
            "{}: all {MAX_SLOTS} cache slots are held by other processes",
            settings.dir.display()
        )));
    };
    let (objects, tmp) = (slot.join("objects"), slot.join("tmp"));
    let origin_file = slot.join("origin");
    let origin = std::fs::read_to_string(&origin_file).unwrap_or_default();
    if origin != settings.origin {
        if let Err(err) = std::fs::remove_dir_all(&objects)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            return Err(err.into());
        }
        std::fs::write(&origin_file, &settings.origin)?;
    }
    if let Err(err) = std::fs::remove_dir_all(&tmp)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(err.into());
    }
    std::fs::create_dir_all(&tmp)?;
    std::fs::create_dir_all(&objects)?;

    // Every `.meta` whose data file is whole is an entry; everything else goes.
    let mut found: Vec<(SystemTime, ObjectKey, String, ObjectMeta)> = Vec::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&objects)? {
        if let Ok(name) = entry?.file_name().into_string() {
            names.push(name);
        }
    }
    let mut keep = HashSet::new();
    for name in names.iter().filter_map(|name| name.strip_suffix(".meta")) {
        let meta_path = objects.join(format!("{name}.meta"));
        let restored = std::fs::read(&meta_path)
            .ok()
            .and_then(|text| serde_json::from_slice::<StoredMeta>(&text).ok())
            .and_then(|stored| {
                let key = ObjectKey::parse(stored.key).ok().filter(|key| (settings.cacheable)(key))?;
                let data = std::fs::metadata(objects.join(name)).ok()?;
                (data.is_file() && data.len() == stored.size).then_some(())?;
                let fetched =
                    std::fs::metadata(&meta_path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                let meta = ObjectMeta {
                    size: stored.size,
                    etag: stored.etag,
                    content_type: stored.content_type,
                    last_modified: stored.last_modified,
                };
                Some((fetched, key, meta))
            });
        if let Some((fetched, key, meta)) = restored {
            keep.insert(name.to_owned());
            found.push((fetched, key, name.to_owned(), meta));
        }
    }
    for name in &names {
        if !keep.contains(name.strip_suffix(".meta").unwrap_or(name)) {
            let _ = std::fs::remove_file(objects.join(name));
        }
    }
    found.sort_by_key(|(fetched, ..)| *fetched);
    // Newest first until the limit; the older rest goes.
    let mut total = 0u64;
    let mut cut = found.len();
    for (position, (_, _, _, meta)) in found.iter().enumerate().rev() {
        if total + meta.size > settings.max_bytes {
            break;
        }
        total += meta.size;
        cut = position;
    }
    let evicted = found.drain(..cut).map(|(_, _, name, _)| name).collect();
    let restored = found.into_iter().map(|(_, key, name, meta)| (key, name, meta)).collect();
    Ok(Prepared { lock, slot, restored, evicted })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stats(&self) -> CacheStats {
        let index = self.lock();
        CacheStats { objects: index.entries.len(), bytes: index.held, fetching: index.fills.len() }
    }

    /// Removes complete files (data and metadata) that are no longer entries.
    async fn remove_files(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        for name in &names {
            self.hot.forget(name);
        }
        let objects = self.objects.clone();
        let removed = tokio::task::spawn_blocking(move || {
            for name in names {
                let _ = std::fs::remove_file(objects.join(&name));
                let _ = std::fs::remove_file(objects.join(format!("{name}.meta")));
            }
        })
        .await;
        if let Err(err) = removed {
            tracing::warn!(error = %err, "could not remove evicted stream cache files");
        }
    }

    /// Forgets every entry whose key `matches`, and keeps no fetch of one in flight.
    async fn invalidate(&self, matches: impl Fn(&ObjectKey) -> bool) {
        let names = {
            let mut index = self.lock();
            let keys: Vec<ObjectKey> = index.entries.keys().filter(|key| matches(key)).cloned().collect();
            let names: Vec<String> =
                keys.iter().filter_map(|key| index.remove(key)).map(|entry| entry.name.to_string()).collect();
            index.fills.retain(|key, fill| {
                let keep = !matches(key);
                if !keep {
                    fill.stale.store(true, Ordering::SeqCst);
                }
                keep
            });
            index.too_large.retain(|key| !matches(key));
            index.publish();
            names
        };
        self.remove_files(names).await;
    }

    /// A read of a complete cached file, with the store's metadata.
    async fn read_cached(
        &self,
        name: &Arc<str>,
        meta: Arc<ObjectMeta>,
        range: Option<ByteRange>,
    ) -> Result<ObjectRead, StorageError> {
        let (missing, gone) = (name.clone(), name.clone());
        let missing = move || StorageError::NotFound { key: missing.to_string() };
        let path = || self.objects.join(&**name);
        read_local(&self.hot, name, path, range, missing, move |_, stat| {
            // Not the file that was cached (changed by hand): as good as missing.
            if stat.len() == meta.size {
                Ok(ObjectMeta::clone(&meta))
            } else {
                Err(StorageError::NotFound { key: gone.to_string() })
            }
        })
        .await
    }

    /// A read of an object that is not cached (yet).
    async fn read_through(
        self: &Arc<Self>,
        key: &ObjectKey,
        range: Option<ByteRange>,
    ) -> Result<ObjectRead, StorageError> {
        let how = {
            let mut index = self.lock();
            if index.entries.contains_key(key) {
                Miss::Cached
            } else if let Some(fill) = index.fills.get(key) {
                Miss::Joined(fill.clone())
            } else if index.too_large.contains(key) || index.fills.len() >= MAX_FILLS {
                Miss::Bypass
            } else {
                let fill = Arc::new(Fill {
                    name: Uuid::new_v4().simple().to_string(),
                    progress: watch::channel(Progress::default()).0,
                    stale: AtomicBool::new(false),
                });
                index.fills.insert(key.clone(), fill.clone());
                Miss::Started(fill)
            }
        };
        match how {
            Miss::Cached => {
                let cached = self.lock().touch(key);
                if let Some((name, meta)) = cached
                    && let Ok(read) = self.read_cached(&name, meta, range).await
                {
                    self.hits.increment(1);
                    return Ok(read);
                }
                miss("bypass");
                self.inner.get(key, range).await
            }
            Miss::Bypass => {
                miss("bypass");
                self.inner.get(key, range).await
            }
            Miss::Started(fill) => {
                miss("fetch");
                let (shared, owned_key, started) = (self.clone(), key.clone(), fill.clone());
                tokio::spawn(async move { shared.fill(owned_key, started).await });
                self.read_from(&fill, key, range).await
            }
            Miss::Joined(fill) => {
                miss("joined");
                self.read_from(&fill, key, range).await
            }
        }
    }

    /// Serves `range` from a fetch in flight: from the temp file as it grows.
    async fn read_from(
        &self,
        fill: &Fill,
        key: &ObjectKey,
        range: Option<ByteRange>,
    ) -> Result<ObjectRead, StorageError> {
        let mut progress = fill.progress.subscribe();
        let head = loop {
            let ended = {
                let now = progress.borrow_and_update();
                if let Some(head) = &now.head {
                    break head.clone();
                }
                match &now.end {
                    Some(End::Failed(err)) => return Err(again(err)),
                    Some(End::Bypass | End::Complete) => true,
                    None => false,
                }
            };
            if ended {
                // Not cached after all: the store answers this read itself.
                return self.inner.get(key, range).await;
            }
            if progress.changed().await.is_err() {
                return Err(StorageError::Body("the fetch from the object store stopped".into()));
            }
        };
        let meta = head.meta.clone();
        let Some(part) = resolve(range, meta.size)? else {
            return Ok(ObjectRead { meta, range: None, body: Box::pin(futures::stream::empty()) });
        };
        let (written, failure) = {
            let now = progress.borrow();
            let failure = match &now.end {
                Some(End::Failed(err)) => Some(again(err)),
                _ => None,
            };
            (now.written, failure)
        };
        if let Some(err) = failure
            && written <= part.last
        {
            return Err(err);
        }
        if part.first > written.saturating_add(READ_AHEAD) {
            // A seek far ahead of the fetch: the store answers sooner than the fetch would.
            miss("bypass");
            return self.inner.get(key, range).await;
        }
        let tail = Tail { progress, file: head.file.clone(), position: part.first, end: part.last + 1 };
        Ok(ObjectRead { meta, range: Some(part), body: tail.into_stream() })
    }

    /// Runs one fetch to its end and settles it: an entry, or nothing.
    async fn fill(self: Arc<Self>, key: ObjectKey, fill: Arc<Fill>) {
        let mut reserved = 0;
        let outcome = self.fetch(&key, &fill, &mut reserved).await;
        let (end, drop_files) = {
            let mut index = self.lock();
            index.reserved -= reserved;
            if index.fills.get(&key).is_some_and(|current| Arc::ptr_eq(current, &fill)) {
                index.fills.remove(&key);
            }
            let settled = match outcome {
                Ok(Some(meta)) if !fill.stale.load(Ordering::SeqCst) => {
                    let replaced = index.insert(key.clone(), fill.name.clone(), meta);
                    (End::Complete, replaced.into_iter().collect())
                }
                // Written or deleted through the cache meanwhile: the readers that joined got
                // the version they asked for, and the copy goes.
                Ok(Some(_)) => (End::Complete, vec![fill.name.clone()]),
                Ok(None) => (End::Bypass, Vec::new()),
                Err(err) => {
                    metrics::counter!("waveline_stream_cache_fetch_failures_total").increment(1);
                    tracing::warn!(key = %key, error = %err, "could not cache an object; its readers got the error");
                    (End::Failed(Arc::new(err)), Vec::new())
                }
            };
            index.publish();
            settled
        };
        self.remove_files(drop_files).await;
        fill.progress.send_modify(|progress| progress.end = Some(end));
    }

    /// Fetches `key` whole into a temp file and commits it: its metadata when it is complete on
    /// disk, `None` when it is not to be cached. On failure nothing is left on disk.
    async fn fetch(
        &self,
        key: &ObjectKey,
        fill: &Fill,
        reserved: &mut u64,
    ) -> Result<Option<ObjectMeta>, StorageError> {
        let read = self.inner.get(key, None).await?;
        let meta = read.meta;
        let evicted = {
            let mut index = self.lock();
            if meta.size > self.max_bytes {
                index.remember_too_large(key);
                return Ok(None);
            }
            let Some(evicted) = index.make_room(meta.size, self.max_bytes) else { return Ok(None) };
            index.reserved += meta.size;
            *reserved = meta.size;
            index.publish();
            evicted
        };
        self.remove_files(evicted).await;
        let temp = self.tmp.join(&fill.name);
        match self.write(&temp, fill, &meta, read.body).await {
            Ok(()) => {}
            Err(err) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(err);
            }
        }
        // Committed in this order: the data whole on disk, then in place, then its metadata
        // (which is what start-up trusts).
        let stored = StoredMeta {
            key: key.to_string(),
            size: meta.size,
            etag: meta.etag.clone(),
            content_type: meta.content_type.clone(),
            last_modified: meta.last_modified,
        };
        let (objects, tmp, name) = (self.objects.clone(), self.tmp.clone(), fill.name.clone());
        let committed = tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let text = serde_json::to_vec(&stored).map_err(|err| StorageError::Io(std::io::Error::other(err)))?;
            let meta_temp = tmp.join(format!("{name}.meta"));
            let result = (|| {
                std::fs::rename(tmp.join(&name), objects.join(&name))?;
                std::fs::write(&meta_temp, text)?;
                std::fs::rename(&meta_temp, objects.join(format!("{name}.meta")))
            })();
            if let Err(err) = result {
                for path in [tmp.join(&name), meta_temp, objects.join(&name)] {
                    let _ = std::fs::remove_file(path);
                }
                return Err(err.into());
            }
            Ok(())
        })
        .await
        .map_err(blocking_failed)?;
        committed?;
        Ok(Some(meta))
    }

    /// Streams `body` into `temp`, telling the readers how much is on disk after each write,
    /// and syncs it; fails unless exactly `meta.size` bytes arrived.
    async fn write(&self, temp: &Path, fill: &Fill, meta: &ObjectMeta, body: ByteStream) -> Result<(), StorageError> {
        let path = temp.to_path_buf();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::File::options().read(true).write(true).create_new(true).open(path)
        })
        .await
        .map_err(blocking_failed)??;
        let file = Arc::new(file);
        let head = Arc::new(Head { meta: meta.clone(), file: file.clone() });
        fill.progress.send_modify(|progress| progress.head = Some(head));
        let size = meta.size;
        let mut written = 0u64;
        // What has already arrived is written in one trip to the blocking pool.
        let mut batches = body.ready_chunks(WRITE_BATCH);
        loop {
            let Ok(next) = tokio::time::timeout(FILL_STALL, batches.next()).await else {
                return Err(StorageError::Body(format!(
                    "the object store sent nothing for {} s after {written} of {size} bytes",
                    FILL_STALL.as_secs()
                )));
            };
            let Some(batch) = next else { break };
            let mut chunks = Vec::with_capacity(batch.len());
            let mut failure = None;
            for chunk in batch {
                match chunk {
                    Ok(chunk) => chunks.push(chunk),
                    Err(err) => {
                        failure = Some(err);
                        break;
                    }
                }
            }
            let length: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
            if written + length > size {
                return Err(StorageError::Body(format!(
                    "the object store sent more than the {size} bytes it announced"
                )));
            }
            let (target, at) = (file.clone(), written);
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut at = at;
                for chunk in chunks {
                    target.write_all_at(&chunk, at)?;
                    at += chunk.len() as u64;
                }
                Ok(())
            })
            .await
            .map_err(blocking_failed)??;
            written += length;
            metrics::counter!("waveline_stream_cache_fetched_bytes_total").increment(length);
            fill.progress.send_modify(|progress| progress.written = written);
            if let Some(err) = failure {
                return Err(StorageError::Body(format!(
                    "the object store's answer broke off after {written} of {size} bytes: {err}"
                )));
            }
        }
        if written != size {
            return Err(StorageError::Body(format!("the object store's answer ended after {written} of {size} bytes")));
        }
        let target = file.clone();
        tokio::task::spawn_blocking(move || target.sync_data()).await.map_err(blocking_failed)??;
        Ok(())
    }
}

/// A reader's part of an object being fetched: `position..end` of the temp file, waiting for
/// the fetch where it has not arrived yet.
struct Tail {
    progress: watch::Receiver<Progress>,
    file: Arc<std::fs::File>,
    position: u64,
    end: u64,
}

impl Tail {
    fn into_stream(self) -> ByteStream {
        Box::pin(futures::stream::unfold(Some(self), |state| async move {
            let mut tail = state?;
            if tail.position >= tail.end {
                return None;
            }
            loop {
                let (written, end) = {
                    let now = tail.progress.borrow_and_update();
                    (now.written, now.end.clone())
                };
                if written > tail.position {
                    let length = (written.min(tail.end) - tail.position).min(CHUNK as u64);
                    // Bytes just written are in the page cache: one positional read, here.
                    return match read_part(&tail.file, tail.position, length) {
                        Ok(bytes) => {
                            tail.position += length;
                            Some((Ok(bytes), Some(tail)))
                        }
                        Err(err) => Some((Err(err.into()), None)),
                    };
                }
                let failure = match end {
                    Some(End::Failed(err)) => StorageError::Body(format!(
                        "the object store's answer broke off while this object was being cached: {err}"
                    )),
                    Some(_) => StorageError::Body("the object ended before its announced size".into()),
                    None => match tail.progress.changed().await {
                        Ok(()) => continue,
                        Err(_) => StorageError::Body("the fetch from the object store stopped".into()),
                    },
                };
                return Some((Err(failure), None));
            }
        }))
    }
}

#[async_trait]
impl Storage for CachedStorage {
    fn backend(&self) -> &'static str {
        self.shared.inner.backend()
    }

    async fn put(&self, key: &ObjectKey, content_type: &str, body: ByteStream) -> Result<ObjectMeta, StorageError> {
        let result = self.shared.inner.put(key, content_type, body).await;
        self.shared.invalidate(|cached| cached == key).await;
        result
    }

    async fn get(&self, key: &ObjectKey, range: Option<ByteRange>) -> Result<ObjectRead, StorageError> {
        let shared = &self.shared;
        if !(shared.cacheable)(key) {
            return shared.inner.get(key, range).await;
        }
        let cached = shared.lock().touch(key);
        if let Some((name, meta)) = cached {
            match shared.read_cached(&name, meta, range).await {
                Ok(read) => {
                    shared.hits.increment(1);
                    return Ok(read);
                }
                // The file is gone (removed by hand): forget it and read through.
                Err(StorageError::NotFound { .. }) => {
                    let mut index = shared.lock();
                    if index.entries.get(key).is_some_and(|entry| Arc::ptr_eq(&entry.name, &name)) {
                        index.remove(key);
                        index.publish();
                    }
                }
                Err(err) => return Err(err),
            }
        }
        shared.read_through(key, range).await
    }

    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        let shared = &self.shared;
        if (shared.cacheable)(key) {
            let known = {
                let mut index = shared.lock();
                match index.touch(key) {
                    Some((_, meta)) => Some(ObjectMeta::clone(&meta)),
                    None => index
                        .fills
                        .get(key)
                        .and_then(|fill| fill.progress.borrow().head.as_ref().map(|head| head.meta.clone())),
                }
            };
            if let Some(meta) = known {
                return Ok(meta);
            }
        }
        shared.inner.head(key).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let result = self.shared.inner.delete(key).await;
        self.shared.invalidate(|cached| cached == key).await;
        result
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StorageError> {
        self.shared.inner.list_prefix(prefix).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let result = self.shared.inner.delete_prefix(prefix).await;
        self.shared.invalidate(|cached| cached.as_str().starts_with(prefix)).await;
        result
    }

    async fn rename(&self, from: &ObjectKey, to: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        let result = self.shared.inner.rename(from, to).await;
        self.shared.invalidate(|cached| cached == from || cached == to).await;
        result
    }

    fn presigns(&self) -> bool {
        self.shared.inner.presigns()
    }

    async fn presign_put(
        &self,
        key: &ObjectKey,
        content_type: &str,
        size: u64,
        expires_in: Duration,
    ) -> Result<Option<PresignedUpload>, StorageError> {
        self.shared.inner.presign_put(key, content_type, size, expires_in).await
    }

    async fn presign_get(
        &self,
        key: &ObjectKey,
        method: ReadMethod,
        until: DateTime<Utc>,
    ) -> Result<Option<PresignedRead>, StorageError> {
        self.shared.inner.presign_get(key, method, until).await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.shared.inner.ping().await
    }
}
