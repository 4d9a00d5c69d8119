//! The `Storage` contract: every case runs against `FsStorage` on a temp dir, `S3Storage` on a
//! real S3-compatible server, and `CachedStorage` in front of such an `S3Storage` (caching
//! every key, so each write, delete and rename through it must drop what it holds), each with
//! a bucket or directory of its own.

use std::sync::Arc;

use anyhow::{Result, ensure};
use bytes::Bytes;
use futures::StreamExt;
use waveline_shared::storage::{
    ByteRange, ByteStream, CacheSettings, CachedStorage, FsStorage, ObjectKey, ReadMethod, ResolvedRange, S3Storage,
    Storage, StorageError, byte_stream,
};
use waveline_tests::{temp_dir, test_bucket};

/// A backend under test and what to clean up after it.
struct Backend {
    storage: Arc<dyn Storage>,
    s3: Option<S3Storage>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn fs() -> Result<Backend> {
        let dir = temp_dir()?;
        let storage = FsStorage::open(dir.path()).await?;
        Ok(Backend { storage: Arc::new(storage), s3: None, _dir: Some(dir) })
    }

    async fn s3() -> Result<Backend> {
        let s3 = test_bucket().await?;
        Ok(Backend { storage: Arc::new(s3.clone()), s3: Some(s3), _dir: None })
    }

    /// A cache of every key in front of S3, large enough for every case's objects.
    async fn cached() -> Result<Backend> {
        let s3 = test_bucket().await?;
        let dir = temp_dir()?;
        let settings = CacheSettings {
            dir: dir.path().to_path_buf(),
            max_bytes: 256 << 20,
            cacheable: |_| true,
            origin: s3.bucket().to_owned(),
        };
        let storage = CachedStorage::open(Arc::new(s3.clone()), settings).await?;
        Ok(Backend { storage: Arc::new(storage), s3: Some(s3), _dir: Some(dir) })
    }

    async fn cleanup(self) -> Result<()> {
        if let Some(s3) = self.s3 {
            s3.destroy_bucket().await?;
        }
        Ok(())
    }
}

fn key(text: &str) -> ObjectKey {
    ObjectKey::parse(text).expect("valid key")
}

fn body_of(bytes: impl Into<Bytes>) -> ByteStream {
    let bytes = bytes.into();
    byte_stream(futures::stream::iter([Ok(bytes)]))
}

/// A reproducible pseudo-random byte sequence (xorshift), generated chunk by chunk so the
/// whole object never exists in memory.
fn generated(total: usize, chunk: usize, seed: u64) -> ByteStream {
    let mut state = seed | 1;
    let mut left = total;
    byte_stream(futures::stream::iter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(chunk);
        left -= n;
        let mut buf = Vec::with_capacity(n);
        while buf.len() < n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buf.extend_from_slice(&state.to_le_bytes()[..(n - buf.len()).min(8)]);
        }
        Some(Ok(Bytes::from(buf)))
    })))
}

/// Streams a body through, returning its length and MD5, without keeping it.
async fn digest(mut body: ByteStream) -> Result<(u64, [u8; 16])> {
    use md5::Digest;
    let (mut len, mut hash) = (0u64, md5::Md5::new());
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        hash.update(&chunk);
        len += chunk.len() as u64;
    }
    Ok((len, hash.finalize().into()))
}

async fn collect(mut body: ByteStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// Peak resident memory of this process so far, in bytes (each nextest test is a process).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmHWM:")
                    .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            })
        })
        .map_or(0, |kib| kib * 1024)
}

async fn a_64_mib_object_streams_in_and_out_in_bounded_memory(b: &Backend) -> Result<()> {
    const SIZE: usize = 64 * 1024 * 1024;
    let k = key("originals/big/source.wav");
    let before = peak_rss();
    let meta = b.storage.put(&k, "audio/wav", generated(SIZE, 256 * 1024, 7)).await?;
    ensure!(meta.size == SIZE as u64, "put reported {} bytes", meta.size);
    let read = b.storage.get(&k, None).await?;
    ensure!(read.meta.size == SIZE as u64);
    ensure!(read.range == Some(ResolvedRange { first: 0, last: SIZE as u64 - 1 }));
    let got = digest(read.body).await?;
    let want = digest(generated(SIZE, 1024 * 1024, 7)).await?;
    ensure!(got == want, "the bytes read back differ from the bytes written");
    let growth = peak_rss().saturating_sub(before);
    ensure!(growth < 48 * 1024 * 1024, "peak memory grew by {} MiB for a 64 MiB object", growth >> 20);
    Ok(())
}

async fn ranges_at_the_edges(b: &Backend) -> Result<()> {
    let k = key("renditions/t/1/mp3_128/audio.mp3");
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    b.storage.put(&k, "audio/mpeg", body_of(data.clone())).await?;
    let cases = [
        (ByteRange::Inclusive { first: 0, last: 0 }, 0, 0),
        (ByteRange::Inclusive { first: 999, last: 999 }, 999, 999),
        (ByteRange::Inclusive { first: 990, last: 5000 }, 990, 999),
        (ByteRange::From { first: 500 }, 500, 999),
        (ByteRange::Suffix { len: 1 }, 999, 999),
        (ByteRange::Suffix { len: 10 }, 990, 999),
        (ByteRange::Suffix { len: 5000 }, 0, 999),
        (ByteRange::Inclusive { first: 100, last: 199 }, 100, 199),
    ];
    for (range, first, last) in cases {
        let read = b.storage.get(&k, Some(range)).await?;
        ensure!(read.range == Some(ResolvedRange { first, last }), "{range:?}: got {:?}", read.range);
        ensure!(read.meta.size == 1000, "{range:?}: size {}", read.meta.size);
        let body = collect(read.body).await?;
        ensure!(body == data[first as usize..=last as usize], "{range:?}: wrong bytes");
    }
    for range in [ByteRange::From { first: 1000 }, ByteRange::Inclusive { first: 1000, last: 1001 }] {
        match b.storage.get(&k, Some(range)).await {
            Err(StorageError::RangeNotSatisfiable { size: 1000 }) => {}
            other => anyhow::bail!("{range:?}: expected RangeNotSatisfiable, got {:?}", other.map(|r| r.range)),
        }
    }
    Ok(())
}

async fn missing_keys_are_not_found(b: &Backend) -> Result<()> {
    let k = key("originals/nope/source");
    ensure!(matches!(b.storage.head(&k).await, Err(StorageError::NotFound { .. })));
    ensure!(matches!(b.storage.get(&k, None).await.map(|r| r.meta), Err(StorageError::NotFound { .. })));
    let ranged = b.storage.get(&k, Some(ByteRange::From { first: 0 })).await.map(|r| r.meta);
    ensure!(matches!(ranged, Err(StorageError::NotFound { .. })), "{ranged:?}");
    b.storage.delete(&k).await?;
    ensure!(b.storage.list_prefix("originals/nope/").await?.is_empty());
    Ok(())
}

async fn head_reports_size_type_and_an_etag_that_changes(b: &Backend) -> Result<()> {
    let k = key("renditions/t/1/waveform.json");
    let first = b.storage.put(&k, "application/json", body_of(&b"{\"v\":1}"[..])).await?;
    let head = b.storage.head(&k).await?;
    ensure!(head.size == 7 && head.content_type == "application/json", "{head:?}");
    ensure!(head.etag == first.etag && head.etag.starts_with('"') && head.etag.ends_with('"'), "{head:?}");
    let second = b.storage.put(&k, "application/json", body_of(&b"{\"v\":22}"[..])).await?;
    ensure!(second.etag != first.etag, "the ETag did not change when the object was replaced");
    ensure!(b.storage.head(&k).await?.size == 8);
    let typed = key("renditions/t/1/aac_hls/master.m3u8");
    b.storage.put(&typed, "application/vnd.apple.mpegurl", body_of(&b"#EXTM3U\n"[..])).await?;
    ensure!(b.storage.head(&typed).await?.content_type == "application/vnd.apple.mpegurl");
    Ok(())
}

async fn concurrent_writers_leave_one_whole_version(b: &Backend) -> Result<()> {
    const SIZE: usize = 9 * 1024 * 1024;
    let k = key("originals/race/source");
    let writers: Vec<_> = (0..4u8)
        .map(|writer| {
            let storage = b.storage.clone();
            let k = k.clone();
            tokio::spawn(async move {
                let chunks = (0..SIZE / (256 * 1024)).map(move |_| Ok(Bytes::from(vec![writer; 256 * 1024])));
                storage.put(&k, "application/octet-stream", byte_stream(futures::stream::iter(chunks))).await
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let data = collect(b.storage.get(&k, None).await?.body).await?;
    ensure!(data.len() == SIZE, "{} bytes", data.len());
    ensure!(data.iter().all(|byte| *byte == data[0]), "the object mixes the bytes of several writers");
    let listed = b.storage.list_prefix("originals/race/").await?;
    ensure!(listed.len() == 1 && listed[0].size == SIZE as u64, "{listed:?}");
    Ok(())
}

async fn list_and_delete_by_prefix(b: &Backend) -> Result<()> {
    for name in
        ["renditions/t/1/a.mp3", "renditions/t/1/hls/s0001.m4s", "renditions/t/2/a.mp3", "renditions/tt/1/a.mp3"]
    {
        b.storage.put(&key(name), "audio/mpeg", body_of(name.as_bytes().to_vec())).await?;
    }
    let listed: Vec<String> =
        b.storage.list_prefix("renditions/t/").await?.into_iter().map(|o| o.key.to_string()).collect();
    ensure!(listed == ["renditions/t/1/a.mp3", "renditions/t/1/hls/s0001.m4s", "renditions/t/2/a.mp3"], "{listed:?}");
    let partial = b.storage.list_prefix("renditions/t").await?;
    ensure!(partial.len() == 4, "{partial:?}");
    ensure!(partial[0].size == "renditions/t/1/a.mp3".len() as u64);
    ensure!(b.storage.delete_prefix("renditions/t/1/").await? == 2);
    let left: Vec<String> = b.storage.list_prefix("").await?.into_iter().map(|o| o.key.to_string()).collect();
    ensure!(left == ["renditions/t/2/a.mp3", "renditions/tt/1/a.mp3"], "{left:?}");
    ensure!(b.storage.delete_prefix("nothing/").await? == 0);
    Ok(())
}

async fn a_failed_body_leaves_nothing_behind(b: &Backend) -> Result<()> {
    let k = key("originals/cut/source");
    b.storage.put(&k, "audio/flac", body_of(&b"the old version"[..])).await?;
    // More than one multipart part, then the client goes away.
    let chunks = (0..40)
        .map(|_| Ok(Bytes::from(vec![1u8; 256 * 1024])))
        .chain([Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "client went away"))]);
    let result = b.storage.put(&k, "audio/flac", byte_stream(futures::stream::iter(chunks))).await;
    ensure!(matches!(result, Err(StorageError::Body(_))), "{:?}", result.map(|m| m.size));
    let kept = collect(b.storage.get(&k, None).await?.body).await?;
    ensure!(kept == b"the old version", "the previous version was damaged");
    let fresh = key("originals/cut2/source");
    let chunks = [Ok(Bytes::from_static(b"partial")), Err(std::io::Error::other("truncated"))];
    ensure!(b.storage.put(&fresh, "audio/flac", byte_stream(futures::stream::iter(chunks))).await.is_err());
    ensure!(matches!(b.storage.head(&fresh).await, Err(StorageError::NotFound { .. })), "a cut upload became visible");
    ensure!(b.storage.list_prefix("originals/").await?.len() == 1);
    Ok(())
}

async fn empty_objects_have_no_ranges(b: &Backend) -> Result<()> {
    let k = key("empty/object");
    let meta = b.storage.put(&k, "application/octet-stream", byte_stream(futures::stream::empty())).await?;
    ensure!(meta.size == 0);
    let read = b.storage.get(&k, None).await?;
    ensure!(collect(read.body).await?.is_empty());
    ensure!(matches!(
        b.storage.get(&k, Some(ByteRange::Suffix { len: 1 })).await.map(|r| r.range),
        Err(StorageError::RangeNotSatisfiable { size: 0 })
    ));
    Ok(())
}

async fn presigned_uploads_work_where_supported(b: &Backend) -> Result<()> {
    let k = key("uploads/direct/source");
    let presigned = b.storage.presign_put(&k, "audio/mpeg", 12, std::time::Duration::from_secs(300)).await?;
    ensure!(b.storage.presigns() == presigned.is_some());
    match (b.storage.backend(), presigned) {
        ("fs", None) => Ok(()),
        ("s3", Some(upload)) => {
            ensure!(upload.method == "PUT" && upload.url.contains("X-Amz-Signature="), "{upload:?}");
            let client = reqwest::Client::new();
            // The length is signed: a longer body (sent with its own length) is refused.
            let mut request = client.put(&upload.url).body(&b"direct bytes and then some"[..]);
            for (name, value) in upload.headers.iter().filter(|(name, _)| !name.eq_ignore_ascii_case("content-length"))
            {
                request = request.header(name, value);
            }
            let response = request.send().await?;
            ensure!(response.status().as_u16() == 403, "a longer body than signed got {}", response.status());
            ensure!(matches!(b.storage.head(&k).await, Err(StorageError::NotFound { .. })));
            let mut request = client.put(&upload.url).body(&b"direct bytes"[..]);
            for (name, value) in &upload.headers {
                request = request.header(name, value);
            }
            let response = request.send().await?;
            ensure!(response.status().is_success(), "PUT to the presigned URL: {}", response.status());
            ensure!(collect(b.storage.get(&k, None).await?.body).await? == b"direct bytes");
            // The signature covers the key: the same URL aimed at another key is refused.
            let tampered = upload.url.replace("uploads/direct/source", "uploads/direct/other");
            ensure!(tampered != upload.url);
            let response = client.put(&tampered).body(&b"evil"[..]).send().await?;
            ensure!(response.status().as_u16() == 403, "a tampered signature got {}", response.status());
            Ok(())
        }
        (backend, other) => anyhow::bail!("{backend}: unexpected presign answer {other:?}"),
    }
}

async fn presigned_reads_work_where_supported(b: &Backend) -> Result<()> {
    let k = key("renditions/t/1/mp3_128/audio.mp3");
    b.storage.put(&k, "audio/mpeg", body_of(&b"0123456789abcdef"[..])).await?;
    let until = chrono::Utc::now() + chrono::Duration::seconds(30);
    let get = b.storage.presign_get(&k, ReadMethod::Get, until).await?;
    let head = b.storage.presign_get(&k, ReadMethod::Head, until).await?;
    ensure!(b.storage.presigns() == get.is_some() && get.is_some() == head.is_some());
    match (b.storage.backend(), get, head) {
        ("fs", None, None) => Ok(()),
        ("s3", Some(get), Some(head)) => {
            ensure!(get.url.contains("X-Amz-Signature=") && get.expires_at <= until, "{get:?}");
            ensure!(until.timestamp() - get.expires_at.timestamp() <= 1, "{get:?} ends well before {until}");
            let client = reqwest::Client::new();
            let response = client.get(&get.url).send().await?;
            ensure!(response.status() == 200 && response.bytes().await? == b"0123456789abcdef"[..]);
            let response = client.get(&get.url).header("range", "bytes=4-7").send().await?;
            ensure!(response.status() == 206 && response.bytes().await? == b"4567"[..], "a range");
            let response = client.head(&head.url).send().await?;
            ensure!(response.status() == 200, "HEAD: {}", response.status());
            ensure!(response.headers().get("content-length").is_some_and(|v| v == "16"), "{:?}", response.headers());
            // The method and the key are signed.
            ensure!(client.head(&get.url).send().await?.status() == 403, "a GET URL answered a HEAD");
            let other = get.url.replace("mp3_128/audio.mp3", "opus_64/audio.mp3");
            ensure!(other != get.url && client.get(&other).send().await?.status() == 403, "another key");
            // Expiry is whole seconds, at least one.
            let soon = chrono::Utc::now();
            let refused = b.storage.presign_get(&k, ReadMethod::Get, soon).await;
            ensure!(matches!(refused, Err(StorageError::Config(_))), "{refused:?}");
            Ok(())
        }
        (backend, get, head) => anyhow::bail!("{backend}: unexpected presigned reads {get:?} {head:?}"),
    }
}

async fn rename_moves_an_object_whole(b: &Backend) -> Result<()> {
    let (from, to) = (key("uploads/t1/source"), key("originals/t1/source"));
    b.storage.put(&to, "application/octet-stream", body_of(&b"old"[..])).await?;
    b.storage.put(&from, "audio/wav", generated(3 * 1024 * 1024 + 17, 64 * 1024, 7)).await?;
    let (size, sum) = digest(b.storage.get(&from, None).await?.body).await?;
    let meta = b.storage.rename(&from, &to).await?;
    ensure!(meta.size == size, "{meta:?}");
    ensure!(digest(b.storage.get(&to, None).await?.body).await? == (size, sum), "the moved bytes differ");
    ensure!(matches!(b.storage.head(&from).await, Err(StorageError::NotFound { .. })), "the source is still there");
    let missing = b.storage.rename(&from, &key("originals/t2/source")).await;
    ensure!(matches!(missing, Err(StorageError::NotFound { .. })), "{missing:?}");
    ensure!(matches!(b.storage.head(&key("originals/t2/source")).await, Err(StorageError::NotFound { .. })));
    // Nothing of the upload key's directory is left listed.
    ensure!(b.storage.list_prefix("uploads/").await?.is_empty());
    Ok(())
}

async fn repeated_reads_agree_on_bytes_and_validators(b: &Backend) -> Result<()> {
    const SIZE: usize = 3 * 1024 * 1024 + 5;
    let k = key("renditions/t/1/opus_64/audio.ogg");
    b.storage.put(&k, "audio/ogg", generated(SIZE, 100_000, 3)).await?;
    let want = collect(generated(SIZE, 100_000, 3)).await?;
    let head = b.storage.head(&k).await?;
    // Whole, concurrently and then again; then ranges at the start, the middle and the end.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (storage, k) = (b.storage.clone(), k.clone());
            tokio::spawn(async move {
                let read = storage.get(&k, None).await?;
                anyhow::Ok((read.meta.clone(), collect(read.body).await?))
            })
        })
        .collect();
    for reader in readers {
        let (meta, bytes) = reader.await??;
        ensure!(meta == head, "a read's metadata {meta:?} differs from HEAD's {head:?}");
        ensure!(bytes == want, "a whole read differs ({} bytes)", bytes.len());
    }
    for (first, last) in
        [(0, 65_535), (SIZE as u64 / 2, SIZE as u64 / 2 + 300_000), (SIZE as u64 - 10, SIZE as u64 - 1)]
    {
        for _ in 0..2 {
            let read = b.storage.get(&k, Some(ByteRange::Inclusive { first, last })).await?;
            ensure!(read.meta == head, "{first}-{last}: {:?}", read.meta);
            ensure!(collect(read.body).await? == want[first as usize..=last as usize], "{first}-{last}: wrong bytes");
        }
    }
    ensure!(b.storage.head(&k).await? == head, "HEAD changed between reads");
    Ok(())
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::Backend::fs().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::Backend::s3().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
        mod cached {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::Backend::cached().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
    };
}

contract!(
    a_64_mib_object_streams_in_and_out_in_bounded_memory,
    ranges_at_the_edges,
    missing_keys_are_not_found,
    head_reports_size_type_and_an_etag_that_changes,
    concurrent_writers_leave_one_whole_version,
    list_and_delete_by_prefix,
    a_failed_body_leaves_nothing_behind,
    empty_objects_have_no_ranges,
    presigned_uploads_work_where_supported,
    presigned_reads_work_where_supported,
    rename_moves_an_object_whole,
    repeated_reads_agree_on_bytes_and_validators,
);
