//! `S3Storage`: objects in an S3-compatible bucket (MinIO in production, any server speaking
//! SigV4), addressed path-style.
//!
//! Uploads stream: the body is cut into parts of [`PART_SIZE`] and sent as a multipart upload,
//! one part in flight, so memory holds at most one part whatever the object size; a body
//! smaller than one part goes up in a single `PutObject`. A multipart upload that fails is
//! aborted, so nothing half-written becomes visible. Reads pass the range to the server and
//! stream the response body through.
//!
//! A suffix range (`bytes=-N`) is resolved against a `HEAD` first and sent as an explicit
//! `first-last` range pinned to the ETag seen (`If-Match`): one more round trip for a rare
//! request form, in exchange for the same answer on every server (some S3-compatible servers
//! fail a suffix longer than the object, or one on an empty object, instead of clamping it).
//!
//! Checksums are sent and validated only where the S3 API requires them: several
//! S3-compatible servers reject the SDK's newer default of trailing checksums on every
//! request, and TLS plus SigV4 already protect the bytes in flight.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::{
    ByteRange, ByteStream, ObjectKey, ObjectMeta, ObjectRead, ObjectSummary, PresignedRead, PresignedUpload,
    ReadMethod, ResolvedRange, Storage, StorageError,
};

/// Size of one multipart part (S3's minimum is 5 MiB for all but the last part).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Objects in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
}

impl S3Storage {
    /// Connects with credentials from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and the
    /// optional `AWS_SESSION_TOKEN`.
    pub fn from_env(bucket: &str, endpoint: Option<&str>, region: &str) -> Result<S3Storage, StorageError> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let (Some(access_key), Some(secret_key)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) else {
            return Err(StorageError::Config(
                "the S3 backend needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment".into(),
            ));
        };
        let credentials = Credentials::new(access_key, secret_key, var("AWS_SESSION_TOKEN"), None, "environment");
        Ok(S3Storage::new(bucket, endpoint, region, credentials))
    }

    /// Connects with explicit credentials.
    pub fn new(bucket: &str, endpoint: Option<&str>, region: &str, credentials: Credentials) -> S3Storage {
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .credentials_provider(credentials)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(5)).build());
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        S3Storage { client: Client::from_conf(config.build()), bucket: bucket.to_owned() }
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket unless it exists (used by `waveline migrate` and the tests).
    pub async fn ensure_bucket(&self) -> Result<(), StorageError> {
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(err) => {
                let code = err.as_service_error().and_then(|e| e.meta().code()).unwrap_or_default();
                if matches!(code, "BucketAlreadyOwnedByYou" | "BucketAlreadyExists") {
                    Ok(())
                } else {
                    Err(remote(err))
                }
            }
        }
    }

    /// Deletes every object and then the bucket itself (test clean-up).
    pub async fn destroy_bucket(&self) -> Result<(), StorageError> {
        self.delete_prefix("").await?;
        self.client.delete_bucket().bucket(&self.bucket).send().await.map_err(remote)?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        key: &ObjectKey,
        content_type: &str,
        first: Bytes,
        body: ByteStream,
    ) -> Result<(), StorageError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key.as_str())
            .content_type(content_type)
            .send()
            .await
            .map_err(remote)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::Remote("CreateMultipartUpload returned no upload id".into()))?
            .to_owned();
        let result = self.upload_parts(key, &upload_id, first, body).await;
        let completed = match result {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key.as_str())
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map(|_| ())
                .map_err(remote),
            Err(err) => Err(err),
        };
        if completed.is_err() {
            // Without the abort, the parts would sit in the bucket, invisible but billed.
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key.as_str())
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(err) = aborted {
                tracing::warn!(key = %key, error = %DisplayErrorContext(&err), "could not abort a failed multipart upload");
            }
        }
        completed
    }

    async fn upload_parts(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        first: Bytes,
        mut body: ByteStream,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let mut parts = Vec::new();
        let mut pending = Some(first);
        let mut buffer = BytesMut::with_capacity(PART_SIZE);
        loop {
            let part = match pending.take() {
                Some(part) => part,
                None => match fill_part(&mut body, &mut buffer).await? {
                    Some(part) => part,
                    None => break,
                },
            };
            let number = parts.len() as i32 + 1;
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key.as_str())
                .upload_id(upload_id)
                .part_number(number)
                .body(SdkByteStream::from(part))
                .send()
                .await
                .map_err(remote)?;
            parts.push(CompletedPart::builder().part_number(number).set_e_tag(uploaded.e_tag).build());
        }
        Ok(parts)
    }
}

/// The largest object one `CopyObject` request moves.
const MAX_COPY: u64 = 5 * 1024 * 1024 * 1024;

/// Reads up to one part from `body`; `None` when the body is exhausted.
async fn fill_part(body: &mut ByteStream, buffer: &mut BytesMut) -> Result<Option<Bytes>, StorageError> {
    while buffer.len() < PART_SIZE {
        match body.next().await {
            Some(chunk) => buffer.extend_from_slice(&chunk?),
            None => break,
        }
    }
    if buffer.is_empty() {
        return Ok(None);
    }
    let take = buffer.len().min(PART_SIZE);
    Ok(Some(buffer.split_to(take).freeze()))
}

/// Maps an SDK failure by its HTTP status, which every S3-compatible server gets right even
/// when its error codes differ.
fn classify<E>(err: SdkError<E>, key: &ObjectKey) -> StorageError
where
    E: std::error::Error + Send + Sync + 'static,
{
    match err.raw_response().map(|response| response.status().as_u16()) {
        Some(404) => StorageError::NotFound { key: key.to_string() },
        _ => remote(err),
    }
}

fn remote<E>(err: SdkError<E>) -> StorageError
where
    E: std::error::Error + Send + Sync + 'static,
{
    StorageError::Remote(DisplayErrorContext(&err).to_string())
}

fn to_chrono(time: Option<&aws_sdk_s3::primitives::DateTime>) -> DateTime<Utc> {
    time.and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())).unwrap_or_default()
}

/// `bytes 0-99/1234` → (0..=99, 1234).
fn parse_content_range(value: &str) -> Option<(ResolvedRange, u64)> {
    let rest = value.strip_prefix("bytes ")?;
    let (span, size) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    Some((ResolvedRange { first: first.parse().ok()?, last: last.parse().ok()? }, size.parse().ok()?))
}

fn sdk_body_stream(body: SdkByteStream) -> ByteStream {
    Box::pin(futures::stream::unfold(Some(body), |state| async move {
        let mut body = state?;
        match body.next().await {
            Some(Ok(bytes)) => Some((Ok(bytes), Some(body))),
            Some(Err(err)) => Some((Err(StorageError::Body(DisplayErrorContext(&err).to_string())), None)),
            None => None,
        }
    }))
}

#[async_trait]
impl Storage for S3Storage {
    fn backend(&self) -> &'static str {
        "s3"
    }

    async fn put(&self, key: &ObjectKey, content_type: &str, mut body: ByteStream) -> Result<ObjectMeta, StorageError> {
        let mut buffer = BytesMut::with_capacity(PART_SIZE);
        let first = fill_part(&mut body, &mut buffer).await?.unwrap_or_default();
        if first.len() < PART_SIZE {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .content_type(content_type)
                .body(SdkByteStream::from(first))
                .send()
                .await
                .map_err(remote)?;
        } else {
            self.put_multipart(key, content_type, first, body).await?;
        }
        self.head(key).await
    }

    async fn get(&self, key: &ObjectKey, range: Option<ByteRange>) -> Result<ObjectRead, StorageError> {
        let asked = range;
        let mut pinned_etag = None;
        let mut range = range;
        if let Some(ByteRange::Suffix { len }) = range {
            let head = self.head(key).await?;
            let resolved = ByteRange::Suffix { len }
                .resolve(head.size)
                .ok_or(StorageError::RangeNotSatisfiable { size: head.size })?;
            range = Some(ByteRange::Inclusive { first: resolved.first, last: resolved.last });
            pinned_etag = Some(head.etag);
        }
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .set_range(range.map(ByteRange::header_value))
            .set_if_match(pinned_etag.clone())
            .send()
            .await
        {
            Ok(output) => output,
            // Replaced between the HEAD and the GET: resolve again against the new version.
            Err(err) if pinned_etag.is_some() && err.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {
                return self.get(key, asked).await;
            }
            Err(err) if err.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                let size = self.head(key).await?.size;
                return Err(StorageError::RangeNotSatisfiable { size });
            }
            Err(err) => return Err(classify(err, key)),
        };
        let length = output.content_length().unwrap_or_default().max(0) as u64;
        let (resolved, size) = match output.content_range().and_then(parse_content_range) {
            Some((resolved, size)) => (Some(resolved), size),
            None if range.is_some() && length == 0 => {
                return Err(StorageError::RangeNotSatisfiable { size: 0 });
            }
            // No Content-Range: the server sent the whole object.
            None => (ByteRange::From { first: 0 }.resolve(length), length),
        };
        let meta = ObjectMeta {
            size,
            etag: output.e_tag().unwrap_or_default().to_owned(),
            content_type: output.content_type().unwrap_or("application/octet-stream").to_owned(),
            last_modified: to_chrono(output.last_modified()),
        };
        Ok(ObjectRead { meta, range: resolved, body: sdk_body_stream(output.body) })
    }

    async fn head(&self, key: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|err| classify(err, key))?;
        Ok(ObjectMeta {
            size: output.content_length().unwrap_or_default().max(0) as u64,
            etag: output.e_tag().unwrap_or_default().to_owned(),
            content_type: output.content_type().unwrap_or("application/octet-stream").to_owned(),
            last_modified: to_chrono(output.last_modified()),
        })
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|err| classify(err, key))
            .map(|_| ())
            .or_else(|err| if matches!(err, StorageError::NotFound { .. }) { Ok(()) } else { Err(err) })
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StorageError> {
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(remote)?;
            for object in page.contents() {
                if let Some(key) = object.key().and_then(|key| ObjectKey::parse(key).ok()) {
                    found.push(ObjectSummary { key, size: object.size().unwrap_or_default().max(0) as u64 });
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let objects = self.list_prefix(prefix).await?;
        // DeleteObjects takes at most 1000 keys a request.
        for batch in objects.chunks(1000) {
            let identifiers = batch
                .iter()
                .map(|object| ObjectIdentifier::builder().key(object.key.as_str()).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| StorageError::Remote(err.to_string()))?;
            let delete = Delete::builder()
                .set_objects(Some(identifiers))
                .quiet(true)
                .build()
                .map_err(|err| StorageError::Remote(err.to_string()))?;
            let output =
                self.client.delete_objects().bucket(&self.bucket).delete(delete).send().await.map_err(remote)?;
            if let Some(failure) = output.errors().first() {
                return Err(StorageError::Remote(format!(
                    "could not delete {}: {}",
                    failure.key().unwrap_or_default(),
                    failure.message().unwrap_or_default()
                )));
            }
        }
        Ok(objects.len() as u64)
    }

    async fn rename(&self, from: &ObjectKey, to: &ObjectKey) -> Result<ObjectMeta, StorageError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let source = self.head(from).await?;
            if source.size > MAX_COPY {
                return Err(StorageError::Config(format!(
                    "{from} has {} bytes; S3 copies at most {MAX_COPY} in one request",
                    source.size
                )));
            }
            // Pinned to the version just seen, so the copy is one whole version.
            let copied = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(to.as_str())
                .copy_source(format!("{}/{}", self.bucket, from.url_path()))
                .copy_source_if_match(&source.etag)
                .send()
                .await;
            match copied {
                Ok(_) => break,
                // Replaced between the HEAD and the copy: look again.
                Err(err) if attempts < 3 && err.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {}
                Err(err) => return Err(classify(err, from)),
            }
        }
        self.delete(from).await?;
        self.head(to).await
    }

    fn presigns(&self) -> bool {
        true
    }

    async fn presign_put(
        &self,
        key: &ObjectKey,
        content_type: &str,
        size: u64,
        expires_in: Duration,
    ) -> Result<Option<PresignedUpload>, StorageError> {
        let config = PresigningConfig::expires_in(expires_in).map_err(|err| StorageError::Config(err.to_string()))?;
        let length = i64::try_from(size).map_err(|_| StorageError::Config(format!("{size} bytes is too large")))?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .content_type(content_type)
            .content_length(length)
            .presigned(config)
            .await
            .map_err(remote)?;
        let mut headers: Vec<(String, String)> =
            request.headers().map(|(name, value)| (name.to_owned(), value.to_owned())).collect();
        if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length")) {
            headers.push(("content-length".to_owned(), size.to_string()));
        }
        Ok(Some(PresignedUpload {
            method: request.method().to_owned(),
            url: request.uri().to_owned(),
            headers,
            expires_at: Utc::now() + expires_in,
        }))
    }

    async fn presign_get(
        &self,
        key: &ObjectKey,
        method: ReadMethod,
        until: DateTime<Utc>,
    ) -> Result<Option<PresignedRead>, StorageError> {
        // Signed from the start of the current second: `X-Amz-Date` is in whole seconds, and
        // a later start would push the end past `until`.
        let start = Utc::now().timestamp();
        let seconds = until.timestamp() - start;
        if seconds < 1 {
            return Err(StorageError::Config(format!(
                "a presigned URL cannot end at {until}, under a second from now"
            )));
        }
        let start_time = std::time::UNIX_EPOCH + Duration::from_secs(start.unsigned_abs());
        let config = PresigningConfig::builder()
            .start_time(start_time)
            .expires_in(Duration::from_secs(seconds.unsigned_abs()))
            .build()
            .map_err(|err| StorageError::Config(err.to_string()))?;
        let request = match method {
            ReadMethod::Get => self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .presigned(config)
                .await
                .map_err(remote)?,
            ReadMethod::Head => self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .presigned(config)
                .await
                .map_err(remote)?,
        };
        let expires_at = DateTime::from_timestamp(start + seconds, 0).unwrap_or(until);
        Ok(Some(PresignedRead { url: request.uri().to_owned(), expires_at }))
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.client.head_bucket().bucket(&self.bucket).send().await.map_err(remote).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_read() {
        assert_eq!(parse_content_range("bytes 0-99/1234"), Some((ResolvedRange { first: 0, last: 99 }, 1234)));
        assert_eq!(parse_content_range("bytes */1234"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
