//! The stream cache (`CachedStorage`) in front of a real S3 server: single flight, eviction,
//! an outage during a fetch, restarts. The store behind it is a `Counted` wrapper around a real
//! `S3Storage` that counts the GETs the cache sends, and can cut a body short.
//!
//! The same cache in a running `waveline serve` (ranges served while S3 is down, a new revision
//! served at once) is tested in `api.rs`; the storage contract runs it as a third backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use waveline_shared::storage::{
    ByteRange, ByteStream, CacheSettings, CacheStats, CachedStorage, ObjectKey, ObjectMeta, ObjectRead, ObjectSummary,
    PresignedUpload, S3Storage, Storage, StorageError, byte_stream, renditions_only,
};
use waveline_tests::{temp_dir, test_bucket};

/// A real store that counts GETs and, while `break_after` is set, cuts every body short
/// after that many bytes (the store going away mid-answer).
#[derive(Debug)]
struct Counted {
    inner: S3Storage,
    gets: AtomicU64,
    break_after: AtomicU64,
    broken: AtomicBool,
}

impl Counted {
    fn new(inner: S3Storage) -> Arc<Counted> {
        Arc::new(Counted {
            inner,
            gets: AtomicU64::new(0),
            break_after: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        })
    }

    fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    fn cut_bodies_after(&self, bytes: Option<u64>) {
        self.break_after.store(bytes.unwrap_or(0), Ordering::SeqCst);
        self.broken.store(bytes.is_some(), Ordering::SeqCst);
    }
}

#[async_trait]
impl Storage for Counted {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn put(&self, key: &ObjectKey, content_type: &str, body: ByteStream) -> Result<ObjectMeta, StorageError> {
        self.inner.put(key, content_type, body).await
    }
    async fn get(&self, key: &ObjectKey, range: Option<ByteRange>) -> Result<ObjectRead, StorageError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let mut read = self.inner.get(key, range).await?;
        if self.broken.load(Ordering::SeqCst) {
            let left = self.break_after.load(Ordering::SeqCst);
            let body = read.body;
            read.body = Box::pin(futures::stream::unfold(Some((body, left)), |state| async move {
                let (mut body, left) = state?;
                if left == 0 {
                    return Some((Err(StorageError::Body("connection reset by the store".into())), None));
                }
                let chunk = match body.next().await? {
                    Ok(chunk) => chunk,
                    Err(err) => return Some((Err(err), None)),
                };
                let chunk = chunk.slice(..chunk.len().min(left as usize));
                let left = left - chunk.len() as u64;
                Some((Ok(chunk), Some((body, left))))
            }));
        }
        Ok(read)
    }
    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        self.inner.head(key).await
    }
    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.inner.delete(key).await
    }
    async fn list_prefix(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StorageError> {
        self.inner.list_prefix(prefix).await
    }
    async fn rename(&self, from: &ObjectKey, to: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        self.inner.rename(from, to).await
    }
    async fn presign_put(
        &self,
        key: &ObjectKey,
        content_type: &str,
        size: u64,
        expires_in: Duration,
    ) -> Result<Option<PresignedUpload>, StorageError> {
        self.inner.presign_put(key, content_type, size, expires_in).await
    }
}

/// A bucket of the test's own behind a counter, and a cache directory.
struct Setup {
    store: Arc<Counted>,
    s3: S3Storage,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Result<Setup> {
        let s3 = test_bucket().await?;
        Ok(Setup { store: Counted::new(s3.clone()), s3, dir: temp_dir()? })
    }

    async fn cache(&self, max_bytes: u64) -> Result<CachedStorage> {
        let settings = CacheSettings {
            dir: self.dir.path().to_path_buf(),
            max_bytes,
            cacheable: renditions_only,
            origin: format!("s3://{}", self.s3.bucket()),
        };
        Ok(CachedStorage::open(self.store.clone(), settings).await?)
    }

    /// Puts `size` pseudo-random bytes (seeded by `seed`) at a rendition key; returns them.
    async fn object(&self, name: &str, size: usize, seed: u8) -> Result<(ObjectKey, Vec<u8>)> {
        let key = ObjectKey::parse(format!("renditions/t/1/{name}"))?;
        let bytes: Vec<u8> = (0..size).map(|i| ((i * 31 + usize::from(seed) * 7) % 251) as u8 ^ seed).collect();
        let body = byte_stream(futures::stream::iter(
            bytes.chunks(256 * 1024).map(|chunk| Ok(Bytes::copy_from_slice(chunk))).collect::<Vec<_>>(),
        ));
        self.s3.put(&key, "audio/mpeg", body).await?;
        Ok((key, bytes))
    }

    async fn cleanup(self) -> Result<()> {
        self.s3.destroy_bucket().await?;
        Ok(())
    }
}

async fn collect(body: ByteStream) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    let mut body = body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

async fn read(cache: &CachedStorage, key: &ObjectKey, range: Option<ByteRange>) -> Result<(ObjectMeta, Vec<u8>)> {
    let read = cache.get(key, range).await?;
    Ok((read.meta, collect(read.body).await?))
}

/// Waits until no fetch is in flight (each settles as an entry or as nothing).
async fn settled(cache: &CachedStorage) -> Result<CacheStats> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = cache.stats();
        if stats.fetching == 0 {
            return Ok(stats);
        }
        ensure!(Instant::now() < deadline, "a fetch is still in flight after 10 s: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The files under the cache's slot, by kind: (complete data files, temp files).
fn files(cache: &CachedStorage) -> Result<(Vec<String>, Vec<String>)> {
    let names = |dir: &str| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(cache.slot().join(dir))?
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    };
    Ok((names("objects")?.into_iter().filter(|name| !name.ends_with(".meta")).collect(), names("tmp")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cold_readers_share_one_fetch() -> Result<()> {
    let setup = Setup::new().await?;
    let (key, bytes) = setup.object("mp3_128/audio.mp3", 6 * 1024 * 1024 + 123, 1).await?;
    let head = setup.s3.head(&key).await?;
    let cache = Arc::new(setup.cache(64 << 20).await?);
    let size = bytes.len() as u64;
    let bytes = Arc::new(bytes);
    // Fifty players starting at once, as players start: whole reads, `bytes=0-`, a first
    // range, and ranges a little further on (within what the fetch brings in moments).
    let readers: Vec<_> = (0..50u64)
        .map(|i| {
            let (cache, key, bytes) = (cache.clone(), key.clone(), bytes.clone());
            tokio::spawn(async move {
                let (range, first, last) = match i % 4 {
                    0 => (None, 0, size - 1),
                    1 => (Some(ByteRange::From { first: 0 }), 0, size - 1),
                    2 => (Some(ByteRange::Inclusive { first: 0, last: 65_535 }), 0, 65_535),
                    _ => {
                        let first = i * 4001;
                        (Some(ByteRange::Inclusive { first, last: first + 999_999 }), first, first + 999_999)
                    }
                };
                let (meta, got) = read(&cache, &key, range).await?;
                ensure!(got == bytes[first as usize..=last as usize], "reader {i}: wrong bytes for {range:?}");
                anyhow::Ok(meta)
            })
        })
        .collect();
    for reader in readers {
        let meta = reader.await??;
        ensure!(meta == head, "a reader got {meta:?}, the store says {head:?}");
    }
    ensure!(setup.store.gets() == 1, "50 cold readers cost {} GETs of the store", setup.store.gets());
    let stats = settled(&cache).await?;
    ensure!(stats.objects == 1 && stats.bytes == size, "{stats:?}");
    // Now hits, anywhere in the object: no GET, the store's validators, the same bytes.
    let (meta, got) = read(&cache, &key, Some(ByteRange::Inclusive { first: 1000, last: 1999 })).await?;
    ensure!(meta == head && got == bytes[1000..2000], "{meta:?}");
    let (meta, got) = read(&cache, &key, Some(ByteRange::Suffix { len: 300 })).await?;
    ensure!(meta == head && got == bytes[bytes.len() - 300..], "{meta:?}");
    ensure!(cache.head(&key).await? == head);
    ensure!(setup.store.gets() == 1, "a cached read went to the store: {} GETs", setup.store.gets());
    // Beyond the end: 416 with the size, as the store says.
    match cache.get(&key, Some(ByteRange::From { first: size })).await {
        Err(StorageError::RangeNotSatisfiable { size: told }) if told == size => {}
        other => anyhow::bail!("expected RangeNotSatisfiable, got {:?}", other.map(|r| r.range)),
    }
    setup.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_read_object_is_evicted_first() -> Result<()> {
    const MIB: usize = 1024 * 1024;
    let setup = Setup::new().await?;
    let mut objects = Vec::new();
    for (seed, name) in ["a.mp3", "b.mp3", "c.mp3", "d.mp3"].into_iter().enumerate() {
        objects.push(setup.object(name, MIB, seed as u8 + 1).await?);
    }
    let [a, b, c, d] = &objects[..] else { unreachable!() };
    // Room for three.
    let limit = 3 * MIB as u64 + 1000;
    let cache = setup.cache(limit).await?;
    for (key, bytes) in [a, b, c] {
        ensure!(read(&cache, key, None).await?.1 == *bytes);
        settled(&cache).await?;
    }
    ensure!(setup.store.gets() == 3);
    // A is read again (a hit), so B is now the least recently read.
    ensure!(read(&cache, &a.0, Some(ByteRange::Suffix { len: 10 })).await?.1 == a.1[MIB - 10..]);
    ensure!(setup.store.gets() == 3, "a cached read went to the store");
    // D needs room: B goes.
    ensure!(read(&cache, &d.0, None).await?.1 == d.1);
    let stats = settled(&cache).await?;
    ensure!(stats.objects == 3 && stats.bytes == 3 * MIB as u64 && stats.bytes <= limit, "{stats:?}");
    ensure!(files(&cache)?.0.len() == 3, "the files on disk: {:?}", files(&cache)?);
    let before = setup.store.gets();
    for (key, bytes) in [a, c, d] {
        ensure!(read(&cache, key, None).await?.1 == *bytes);
    }
    ensure!(setup.store.gets() == before, "A, C or D was evicted instead of B");
    ensure!(read(&cache, &b.0, None).await?.1 == b.1);
    ensure!(setup.store.gets() == before + 1, "B was still cached");

    // An object larger than the whole cache is served, never cached, and evicts nothing.
    let (big, big_bytes) = setup.object("big.mp3", 4 * MIB, 9).await?;
    settled(&cache).await?;
    let held = cache.stats();
    for _ in 0..2 {
        ensure!(read(&cache, &big, Some(ByteRange::Inclusive { first: 0, last: 99 })).await?.1 == big_bytes[..100]);
        ensure!(read(&cache, &big, None).await?.1 == big_bytes);
    }
    ensure!(settled(&cache).await? == held, "the large object changed what is held: {held:?}");
    let gets = setup.store.gets();
    ensure!(read(&cache, &big, None).await?.1 == big_bytes);
    ensure!(setup.store.gets() == gets + 1, "each read of a large object is one GET of the store");
    setup.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_during_a_fetch_leaves_nothing_half_cached() -> Result<()> {
    let setup = Setup::new().await?;
    let (key, bytes) = setup.object("opus_64/audio.ogg", 3 * 1024 * 1024, 4).await?;
    let cache = setup.cache(64 << 20).await?;
    setup.store.cut_bodies_after(Some(1024 * 1024));

    // The readers of the cut fetch: the start arrives whole, and the whole reads (the one that
    // started the fetch and one that joined it) fail with an error that says so.
    let whole = || async {
        let read = cache.get(&key, None).await?;
        Ok::<_, StorageError>(collect(read.body).await)
    };
    let (first, early, second) =
        tokio::join!(whole(), read(&cache, &key, Some(ByteRange::Inclusive { first: 0, last: 65_535 })), whole());
    ensure!(early?.1 == bytes[..65_536], "the part before the cut");
    for outcome in [first, second] {
        match outcome {
            // Mid-body, or before the first byte for a reader that came as the fetch failed.
            Ok(Err(StorageError::Body(text))) | Err(StorageError::Body(text)) => {
                ensure!(text.contains("broke off"), "{text}")
            }
            Ok(Ok(got)) => anyhow::bail!("a whole read of a cut fetch succeeded with {} bytes", got.len()),
            other => anyhow::bail!("expected a Body error, got {other:?}"),
        }
    }
    ensure!(setup.store.gets() == 1, "the readers of one fetch sent {} GETs", setup.store.gets());
    let stats = settled(&cache).await?;
    ensure!(stats.objects == 0 && stats.bytes == 0, "something was cached: {stats:?}");
    ensure!(files(&cache)? == (vec![], vec![]), "files were left: {:?}", files(&cache)?);
    ensure!(cache.head(&key).await? == setup.s3.head(&key).await?, "HEAD after the outage");

    // The store is back: the next read fetches again, whole and right, and then it is cached.
    setup.store.cut_bodies_after(None);
    let gets = setup.store.gets();
    ensure!(read(&cache, &key, None).await?.1 == bytes, "the read after the outage");
    ensure!(setup.store.gets() == gets + 1);
    let stats = settled(&cache).await?;
    ensure!(stats.objects == 1 && stats.bytes == bytes.len() as u64, "{stats:?}");
    ensure!(files(&cache)?.0.len() == 1 && files(&cache)?.1.is_empty(), "{:?}", files(&cache)?);
    ensure!(read(&cache, &key, Some(ByteRange::From { first: 2_000_000 })).await?.1 == bytes[2_000_000..]);
    ensure!(setup.store.gets() == gets + 1, "the cached copy was not used");
    setup.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_survives_a_restart_and_processes_take_their_own_slots() -> Result<()> {
    let setup = Setup::new().await?;
    let (key, bytes) = setup.object("preview/audio.mp3", 2 * 1024 * 1024, 6).await?;
    let head = setup.s3.head(&key).await?;
    let cache = setup.cache(64 << 20).await?;
    ensure!(read(&cache, &key, None).await?.1 == bytes);
    settled(&cache).await?;
    let slot = cache.slot().to_path_buf();
    // A second process on the same directory gets a slot of its own, empty.
    let other = setup.cache(64 << 20).await?;
    ensure!(other.slot() != slot && other.stats().objects == 0, "{}", other.slot().display());
    drop(other);
    // A data file without its metadata (a crash mid-commit) is not trusted.
    std::fs::write(slot.join("objects").join("0123456789abcdef"), b"torn")?;
    drop(cache);
    // The slot is free once the last task of the cache has let go of it.
    let lock = std::fs::File::open(slot.join("lock"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock.try_lock().is_err() {
        ensure!(Instant::now() < deadline, "the slot is still held 10 s after the cache was dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(lock);

    let cache = setup.cache(64 << 20).await?;
    ensure!(cache.slot() == slot, "the restarted cache took {} instead of {}", cache.slot().display(), slot.display());
    ensure!(cache.stats().objects == 1 && cache.stats().bytes == bytes.len() as u64, "{:?}", cache.stats());
    ensure!(files(&cache)?.0.len() == 1, "the torn file was kept: {:?}", files(&cache)?);
    let gets = setup.store.gets();
    let (meta, got) = read(&cache, &key, Some(ByteRange::Inclusive { first: 10, last: 1_000_009 })).await?;
    ensure!(meta == head && got == bytes[10..1_000_010], "{meta:?}");
    ensure!(setup.store.gets() == gets, "the restarted cache went to the store");
    setup.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_renditions_are_cached_and_deletes_through_the_cache_drop_them() -> Result<()> {
    let setup = Setup::new().await?;
    let cache = setup.cache(64 << 20).await?;
    let original = ObjectKey::parse("originals/t/source")?;
    setup
        .s3
        .put(&original, "audio/flac", byte_stream(futures::stream::iter([Ok(Bytes::from_static(b"flac"))])))
        .await?;
    for _ in 0..3 {
        ensure!(read(&cache, &original, None).await?.1 == b"flac");
    }
    ensure!(setup.store.gets() == 3, "an original was cached");
    let (key, bytes) = setup.object("mp3_128/audio.mp3", 100_000, 2).await?;
    ensure!(read(&cache, &key, None).await?.1 == bytes);
    ensure!(settled(&cache).await?.objects == 1);
    ensure!(cache.delete_prefix("renditions/t/").await? == 1);
    ensure!(cache.stats().objects == 0 && files(&cache)?.0.is_empty(), "{:?}", files(&cache)?);
    ensure!(matches!(cache.get(&key, None).await.map(|r| r.meta), Err(StorageError::NotFound { .. })));
    setup.cleanup().await
}
