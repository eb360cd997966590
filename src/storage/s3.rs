//! The S3 backend (aws-sdk-s3): AWS S3 and S3-compatible servers (MinIO and the like).
//!
//! A body up to the part size goes up in one `PutObject`, with its SHA-256 in the object's
//! metadata (`x-amz-meta-cyb-sha256`). A larger one is a multipart upload: parts of `part_size`
//! bytes, at most `parts_in_flight` of them uploading at once, and the upload is aborted on any
//! failure, the body's included, so no orphaned parts are left to bill. Each upload allocates at
//! most `parts_in_flight` part buffers and fills them again as their parts finish, so its memory
//! stays at `part_size × parts_in_flight` whatever the object's size (and does not depend on the
//! allocator returning hundreds of freed 8 MiB blocks promptly). Downloads stream.
//!
//! Against a custom endpoint the client computes request checksums only where the operation
//! requires them: several S3-compatible servers refuse the newer default checksum headers.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as AwsBody;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use sha2::{Digest, Sha256};

use super::{
    ByteStream, GetResult, ListPage, Listed, ObjectMeta, PutOptions, Storage, StorageError,
    StoragePath, fit_range,
};
use crate::config::Secret;

/// The user-metadata key the object's SHA-256 is kept under.
const SHA256_KEY: &str = "cyb-sha256";
/// When a cancelled multipart upload is aborted a second time, for parts that S3 was still
/// storing during the first abort.
const ABORT_AGAIN: std::time::Duration = std::time::Duration::from_secs(10);
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// A custom endpoint (MinIO, a local S3 server); `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    /// Static credentials; without them the AWS default chain (environment, profile, instance
    /// role) is used.
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub part_size: usize,
    pub parts_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    part_size: usize,
    parts_in_flight: usize,
}

impl S3Storage {
    /// One page of the multipart uploads in progress below `prefix`, from a marker: the uploads
    /// begun before `before`, and the marker of the next page if any.
    async fn stale_uploads(
        &self,
        prefix: &StoragePath,
        before: DateTime<Utc>,
        marker: Option<(String, String)>,
    ) -> Result<(Vec<(String, String)>, Option<(String, String)>), StorageError> {
        let (key_marker, upload_marker) = marker.unzip();
        let page = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix.as_str())
            .set_key_marker(key_marker)
            .set_upload_id_marker(upload_marker)
            .send()
            .await
            .map_err(backend)?;
        let stale = page
            .uploads()
            .iter()
            .filter(|u| u.initiated().is_some_and(|t| time(Some(t)) < before))
            .filter_map(|u| Some((u.key()?.to_owned(), u.upload_id()?.to_owned())))
            .collect();
        let next = match (
            page.is_truncated(),
            page.next_key_marker(),
            page.next_upload_id_marker(),
        ) {
            (Some(true), Some(key), Some(upload)) => Some((key.to_owned(), upload.to_owned())),
            _ => None,
        };
        Ok((stale, next))
    }

    pub async fn new(config: &S3Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()));
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.expose(),
                secret.expose(),
                None,
                None,
                "cybernetic-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(config.force_path_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .endpoint_url(endpoint)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            part_size: config.part_size.max(MIN_PART_SIZE),
            parts_in_flight: config.parts_in_flight.max(1),
        }
    }

    /// The client, for set-up work such as creating the bucket in tests.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Uploads `first` and the rest of `parts` as a multipart upload.
    async fn put_multipart(
        &self,
        key: &str,
        first: Bytes,
        parts: &mut PartReader,
        options: &PutOptions,
    ) -> Result<(), StorageError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(&options.content_type)
            .set_metadata(Some(user_metadata(options, None)))
            .set_tagging(tagging(&options.tags))
            .send()
            .await
            .map_err(backend)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::Backend("S3 returned no upload id".into()))?
            .to_owned();
        // Aborts the upload if this future is dropped before it ends (the client went away and
        // the request was cancelled), as it is below when the upload fails.
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id: Some(upload_id.clone()),
        };
        let mut in_flight = FuturesUnordered::new();
        let uploaded = async {
            let mut done_parts = Vec::new();
            let mut number = 0;
            let mut ready = Some(first);
            loop {
                let part = match ready.take() {
                    Some(part) => part,
                    None => match parts.next_part().await? {
                        Some(part) => part,
                        None => break,
                    },
                };
                number += 1;
                in_flight.push(self.upload_part(key, &upload_id, number, part));
                if in_flight.len() >= self.parts_in_flight
                    && let Some(done) = in_flight.next().await
                {
                    let (completed, sent) = done?;
                    done_parts.push(completed);
                    parts.recycle(sent);
                }
            }
            while let Some(done) = in_flight.next().await {
                done_parts.push(done?.0);
            }
            done_parts.sort_by_key(|p: &CompletedPart| p.part_number());
            let mut complete = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(done_parts))
                        .build(),
                );
            if options.if_absent {
                complete = complete.if_none_match("*");
            }
            complete.send().await.map_err(put_error)?;
            Ok::<(), StorageError>(())
        }
        .await;
        if uploaded.is_err() {
            // No part is left behind to be stored (and billed) for nothing. The parts still being
            // sent are cut off; S3 may yet store one it had received in full after this abort,
            // so it is repeated once they have settled.
            drop(in_flight);
            abort_again_later(&self.client, &self.bucket, key, &upload_id);
            if let Err(e) = abort(&self.client, &self.bucket, key, &upload_id)
                .send()
                .await
            {
                tracing::warn!(key, error = %e, "could not abort a failed multipart upload");
            }
        }
        // Done, or aborted above: from here a drop of this future leaves nothing to abort. (If
        // it is dropped while the abort above runs, the guard aborts the upload itself.)
        guard.upload_id = None;
        uploaded
    }

    /// Uploads one part; returns it with its bytes, for [`PartReader::recycle`].
    fn upload_part<'a>(
        &'a self,
        key: &'a str,
        upload_id: &'a str,
        number: i32,
        part: Bytes,
    ) -> BoxFuture<'a, Result<(CompletedPart, Bytes), StorageError>> {
        Box::pin(async move {
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(AwsBody::from(part.clone()))
                .send()
                .await
                .map_err(backend)?;
            let completed = CompletedPart::builder()
                .set_e_tag(uploaded.e_tag().map(str::to_owned))
                .part_number(number)
                .build();
            Ok((completed, part))
        })
    }

    /// The object's metadata (a HEAD and its tagging) and its ETag.
    async fn describe(
        &self,
        path: &StoragePath,
    ) -> Result<(ObjectMeta, Option<String>), StorageError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .send()
            .await
            .map_err(read_error)?;
        let (metadata, sha256) = split_metadata(head.metadata());
        let meta = ObjectMeta {
            path: path.as_str().to_owned(),
            size: u64::try_from(head.content_length().unwrap_or(0)).unwrap_or(0),
            content_type: head.content_type().unwrap_or_default().to_owned(),
            metadata,
            tags: self.tags(path.as_str()).await?,
            sha256,
            modified_at: time(head.last_modified()),
        };
        Ok((meta, head.e_tag().map(str::to_owned)))
    }

    async fn tags(&self, key: &str) -> Result<BTreeMap<String, String>, StorageError> {
        let tagging = self
            .client
            .get_object_tagging()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(read_error)?;
        Ok(tagging
            .tag_set()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect())
    }
}

/// Reads a body in parts of exactly `size` bytes (the last may be shorter), hashing and counting
/// as it goes. Each part is a buffer sized once, never doubled by growing or kept alive by a slice
/// of a larger one, and a sent part's buffer is filled again ([`recycle`](Self::recycle)).
struct PartReader {
    body: ByteStream,
    size: usize,
    /// What the last chunk had beyond the part it completed.
    leftover: Option<Bytes>,
    ended: bool,
    hash: Sha256,
    total: u64,
    /// Buffers of parts already uploaded, to fill again.
    spare: Vec<BytesMut>,
}

impl PartReader {
    fn new(body: ByteStream, size: usize) -> Self {
        Self {
            body,
            size,
            leftover: None,
            ended: false,
            hash: Sha256::new(),
            total: 0,
            spare: Vec::new(),
        }
    }

    /// Takes back the buffer of a part whose upload finished, when nothing else holds it (the SDK
    /// has let go of the request); otherwise it is simply freed.
    fn recycle(&mut self, part: Bytes) {
        if let Ok(mut buffer) = part.try_into_mut()
            && buffer.capacity() >= self.size
        {
            buffer.clear();
            self.spare.push(buffer);
        }
    }

    /// The body's next chunk, hashed and counted; `None` once it has ended.
    async fn read_chunk(&mut self) -> Result<Option<Bytes>, StorageError> {
        if self.ended {
            return Ok(None);
        }
        match self.body.next().await {
            Some(chunk) => {
                let chunk = chunk?;
                self.hash.update(&chunk);
                self.total += chunk.len() as u64;
                Ok(Some(chunk))
            }
            None => {
                self.ended = true;
                Ok(None)
            }
        }
    }

    /// Whether the body has bytes beyond what was read (reading one chunk ahead to know).
    async fn more(&mut self) -> Result<bool, StorageError> {
        while self.leftover.is_none() {
            match self.read_chunk().await? {
                Some(chunk) if !chunk.is_empty() => self.leftover = Some(chunk),
                Some(_) => {}
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    async fn next_part(&mut self) -> Result<Option<Bytes>, StorageError> {
        let mut part = self
            .spare
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(self.size));
        while part.len() < self.size {
            let chunk = match self.leftover.take() {
                Some(chunk) => chunk,
                None => match self.read_chunk().await? {
                    Some(chunk) => chunk,
                    None => break,
                },
            };
            let room = self.size - part.len();
            if chunk.len() > room {
                part.extend_from_slice(&chunk[..room]);
                self.leftover = Some(chunk.slice(room..));
            } else {
                part.extend_from_slice(&chunk);
            }
        }
        Ok((!part.is_empty()).then(|| part.freeze()))
    }
}

/// Aborts a multipart upload whose future was dropped mid-way.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %self.key, "multipart upload dropped outside a runtime; not aborted");
            return;
        };
        let abort = abort(&self.client, &self.bucket, &self.key, &upload_id);
        let key = self.key.clone();
        abort_again_later(&self.client, &self.bucket, &key, &upload_id);
        runtime.spawn(async move {
            if let Err(e) = abort.send().await {
                tracing::warn!(%key, error = %e, "could not abort a cancelled multipart upload");
            }
        });
    }
}

/// The request that aborts a multipart upload, dropping the parts it has.
fn abort(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> aws_sdk_s3::operation::abort_multipart_upload::builders::AbortMultipartUploadFluentBuilder {
    client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
}

/// Aborts a multipart upload once more after [`ABORT_AGAIN`], in the background: S3 may store a
/// part whose request was cut off by the first abort after it, if it had received it in full,
/// and its advice is to abort again once such parts have settled. The second answer (usually
/// "no such upload") is not looked at.
fn abort_again_later(client: &Client, bucket: &str, key: &str, upload_id: &str) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let again = abort(client, bucket, key, upload_id);
    runtime.spawn(async move {
        tokio::time::sleep(ABORT_AGAIN).await;
        let _already_gone = again.send().await;
    });
}

fn user_metadata(options: &PutOptions, sha256: Option<&str>) -> HashMap<String, String> {
    let mut metadata: HashMap<String, String> = options
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(sha) = sha256 {
        metadata.insert(SHA256_KEY.to_owned(), sha.to_owned());
    }
    metadata
}

/// Tags as S3's `x-amz-tagging` header wants them: a URL-encoded query string.
fn tagging(tags: &BTreeMap<String, String>) -> Option<String> {
    if tags.is_empty() {
        return None;
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in tags {
        query.append_pair(k, v);
    }
    Some(query.finish())
}

fn status<E, R: HttpStatus>(e: &SdkError<E, R>) -> Option<u16> {
    e.raw_response().map(HttpStatus::status_code)
}

/// The raw response's status, whatever the SDK's response type.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn backend<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: SdkError<E, R>,
) -> StorageError {
    let detail = match e.as_service_error() {
        Some(service) => format!(
            "{}: {}",
            service.code().unwrap_or("error"),
            service.message().unwrap_or_default()
        ),
        None => aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
    };
    StorageError::Backend(format!("S3: {detail}"))
}

fn read_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StorageError {
    if status(&e) == Some(404) {
        StorageError::NotFound
    } else {
        backend(e)
    }
}

fn put_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StorageError {
    if status(&e) == Some(412) {
        StorageError::AlreadyExists
    } else {
        backend(e)
    }
}

fn time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> DateTime<Utc> {
    t.and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
        .unwrap_or_else(Utc::now)
}

impl Storage for S3Storage {
    fn backend(&self) -> &'static str {
        "s3"
    }

    fn put<'a>(
        &'a self,
        path: &'a StoragePath,
        body: ByteStream,
        options: PutOptions,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            let key = path.as_str();
            let mut parts = PartReader::new(body, self.part_size);
            // A body that ends within one part goes up in one request.
            let first = parts.next_part().await?.unwrap_or_default();
            let more = first.len() == self.part_size && parts.more().await?;
            if more {
                self.put_multipart(key, first, &mut parts, &options).await?;
            } else {
                let sha = hex::encode(parts.hash.clone().finalize());
                let mut put = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .content_type(&options.content_type)
                    .set_metadata(Some(user_metadata(&options, Some(&sha))))
                    .set_tagging(tagging(&options.tags))
                    .body(AwsBody::from(first));
                if options.if_absent {
                    put = put.if_none_match("*");
                }
                put.send().await.map_err(put_error)?;
            }
            let size = parts.total;
            Ok(ObjectMeta {
                path: key.to_owned(),
                size,
                content_type: options.content_type,
                metadata: options.metadata,
                tags: options.tags,
                sha256: Some(hex::encode(parts.hash.finalize())),
                modified_at: Utc::now(),
            })
        })
    }

    fn get<'a>(
        &'a self,
        path: &'a StoragePath,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<GetResult, StorageError>> {
        Box::pin(async move {
            let (meta, etag) = self.describe(path).await?;
            let range = fit_range(range, meta.size)?;
            let mut get = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(path.as_str())
                // The object read is the one just described, not one replaced meanwhile.
                .set_if_match(etag);
            if range.end > range.start {
                get = get.range(format!("bytes={}-{}", range.start, range.end - 1));
            }
            let object = get.send().await.map_err(read_error)?;
            let body = futures::stream::unfold(object.body, |mut body| async move {
                body.next().await.map(|chunk| {
                    (
                        chunk.map_err(|e| StorageError::Backend(format!("S3 read: {e}"))),
                        body,
                    )
                })
            });
            Ok(GetResult {
                meta,
                range,
                body: Box::pin(body),
                file: None,
            })
        })
    }

    fn head<'a>(
        &'a self,
        path: &'a StoragePath,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move { self.describe(path).await.map(|(meta, _)| meta) })
    }

    fn delete<'a>(&'a self, path: &'a StoragePath) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(path.as_str())
                .send()
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a StoragePath,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>> {
        Box::pin(async move {
            // S3 answers at most 1000 keys a request: asking one more than the page tells if more
            // follow.
            let limit = limit.min(999);
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix.as_str())
                .set_start_after(after.map(str::to_owned))
                .max_keys(i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(backend)?;
            // The listing tells each object's size and age: nothing more is asked per object.
            let mut items: Vec<Listed> = listed
                .contents()
                .iter()
                .filter_map(|o| {
                    Some(Listed {
                        path: o.key()?.to_owned(),
                        size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                        modified_at: time(o.last_modified()),
                    })
                })
                .collect();
            // A server may also end a page early and say so.
            let more = items.len() > limit || listed.is_truncated() == Some(true);
            items.truncate(limit);
            Ok(ListPage {
                next: more.then(|| items.last().map(|i| i.path.clone())).flatten(),
                items,
            })
        })
    }

    fn abort_stale_uploads<'a>(
        &'a self,
        prefix: &'a StoragePath,
        before: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<usize, StorageError>> {
        Box::pin(async move {
            let mut aborted = 0;
            let mut marker = None;
            loop {
                let (stale, next) = self.stale_uploads(prefix, before, marker).await?;
                for (key, upload_id) in stale {
                    let done = abort(&self.client, &self.bucket, &key, &upload_id)
                        .send()
                        .await;
                    match done {
                        Ok(_) => {
                            aborted += 1;
                            tracing::info!(key, "aborted a multipart upload left unfinished");
                        }
                        // Finished or aborted since the listing.
                        Err(e) if status(&e) == Some(404) => {}
                        Err(e) => return Err(backend(e)),
                    }
                }
                match next {
                    Some(next) => marker = Some(next),
                    None => return Ok(aborted),
                }
            }
        })
    }
}

/// User metadata without our own key, and the SHA-256 kept under it.
fn split_metadata(
    metadata: Option<&HashMap<String, String>>,
) -> (BTreeMap<String, String>, Option<String>) {
    let mut user = BTreeMap::new();
    let mut sha = None;
    for (k, v) in metadata.into_iter().flatten() {
        if k == SHA256_KEY {
            sha = Some(v.clone());
        } else {
            user.insert(k.clone(), v.clone());
        }
    }
    (user, sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: Vec<&'static [u8]>) -> ByteStream {
        Box::pin(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from_static(c))),
        ))
    }

    #[tokio::test]
    async fn parts_are_cut_exactly_and_their_buffers_filled_again() {
        let mut parts = PartReader::new(body_of(vec![b"abcde", b"fghij", b"k"]), 4);
        let first = parts.next_part().await.unwrap().unwrap();
        assert_eq!(&first[..], b"abcd");
        let at = first.as_ptr();
        // A part still held elsewhere (its upload running) is not taken back.
        let held = first.clone();
        parts.recycle(first);
        assert!(parts.spare.is_empty());
        // Once its upload let go, the next part is read into the same buffer.
        parts.recycle(held);
        let second = parts.next_part().await.unwrap().unwrap();
        assert_eq!(&second[..], b"efgh");
        assert_eq!(second.as_ptr(), at);
        assert_eq!(&parts.next_part().await.unwrap().unwrap()[..], b"ijk");
        assert!(parts.next_part().await.unwrap().is_none());
        assert_eq!(parts.total, 11);
        assert_eq!(
            hex::encode(parts.hash.finalize()),
            hex::encode(Sha256::digest(b"abcdefghijk"))
        );
    }
}
