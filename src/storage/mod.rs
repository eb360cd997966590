//! Object storage behind one trait, with a local-filesystem, an S3-compatible and an in-memory
//! backend chosen by configuration. Bodies are streams both ways, so an object of any size passes
//! through in constant memory.
//!
//! Paths come from [`StoragePath`]: a tenant's prefix and a validated [`ObjectKey`], joined by the
//! platform, so nothing a tenant sends can reach another tenant's objects or leave the backend's
//! root.
//!
//! [`ObjectKey`]: crate::domain::object_key::ObjectKey

pub mod local;
pub mod memory;
pub mod metered;
pub mod s3;

use std::collections::BTreeMap;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use crate::domain::object_key::StoragePath;

/// A body streamed in or out.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("no such object")]
    NotFound,
    /// `put` with [`PutOptions::if_absent`] found an object already there.
    #[error("an object already exists at this key")]
    AlreadyExists,
    /// The range does not fit an object of `size` bytes.
    #[error("range not satisfiable for an object of {size} bytes")]
    InvalidRange { size: u64 },
    /// The body stream failed (the client went away, or the upload was cut off for being too
    /// large): nothing was stored.
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    #[error("storage backend: {0}")]
    Backend(String),
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            Self::NotFound
        } else {
            Self::Backend(e.to_string())
        }
    }
}

/// How an object is stored.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub content_type: String,
    /// User metadata (`X-Artifact-Meta-*`), stored with the object.
    pub metadata: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    /// Refuse with [`StorageError::AlreadyExists`] instead of replacing an existing object.
    pub if_absent: bool,
}

/// What a backend knows of a stored object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub path: String,
    pub size: u64,
    pub content_type: String,
    pub metadata: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    /// Lowercase hex SHA-256 of the bytes, computed while they were written. Always known to
    /// `put`; `None` from `head` or `list` on a backend that could not store it with the object
    /// (an S3 object uploaded in parts: its metadata is fixed before the bytes are seen).
    pub sha256: Option<String>,
    pub modified_at: DateTime<Utc>,
}

/// An object's bytes (all of them, or `range`), streamed.
pub struct GetResult {
    pub meta: ObjectMeta,
    /// The bytes the body holds, within `0..meta.size`.
    pub range: Range<u64>,
    pub body: ByteStream,
    /// The same bytes as a span of a local file, when the backend keeps them in one, for a sender
    /// that can have the kernel move them to a socket (`sendfile`) instead of polling `body`. A
    /// sender uses one or the other: `body` reads nothing until it is first polled.
    pub file: Option<FileSpan>,
}

/// Bytes of an object held in a local file.
#[derive(Clone)]
pub struct FileSpan {
    /// Opened read-only; never written while open (a replacement is a new file renamed over it).
    pub file: std::sync::Arc<std::fs::File>,
    /// Where the bytes lie in the file.
    pub range: Range<u64>,
    /// Counts the bytes sent from the span (`storage_bytes_total{direction="out"}`), when metered.
    pub sent: Option<metrics::Counter>,
}

impl FileSpan {
    /// Records `n` bytes sent from the span.
    pub fn count_sent(&self, n: u64) {
        if let Some(counter) = &self.sent {
            counter.increment(n);
        }
    }
}

/// One page of a listing, in byte order of path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub items: Vec<Listed>,
    /// The last path of this page when more may follow: pass it as `after` for the next.
    pub next: Option<String>,
}

/// An object as a listing names it: what every backend's listing tells without reading the
/// object itself (an S3 listing gives no content type, metadata or tags; [`Storage::head`] does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    pub size: u64,
    pub modified_at: DateTime<Utc>,
}

impl From<&ObjectMeta> for Listed {
    fn from(meta: &ObjectMeta) -> Self {
        Self {
            path: meta.path.clone(),
            size: meta.size,
            modified_at: meta.modified_at,
        }
    }
}

/// One storage backend.
pub trait Storage: Send + Sync + 'static {
    /// The backend's name, for metrics and logs: `local`, `s3` or `memory`.
    fn backend(&self) -> &'static str;

    /// Stores `body` at `path`, replacing what was there unless `options.if_absent`. The object
    /// appears whole or not at all: a body stream that fails leaves nothing behind.
    fn put<'a>(
        &'a self,
        path: &'a StoragePath,
        body: ByteStream,
        options: PutOptions,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>>;

    /// Streams the object, or the bytes of `range` (end exclusive; clamped to the object's size,
    /// refused when it starts at or past the end of a non-empty object).
    fn get<'a>(
        &'a self,
        path: &'a StoragePath,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<GetResult, StorageError>>;

    fn head<'a>(&'a self, path: &'a StoragePath)
    -> BoxFuture<'a, Result<ObjectMeta, StorageError>>;

    /// Deletes the object; deleting one that is not there succeeds.
    fn delete<'a>(&'a self, path: &'a StoragePath) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Up to `limit` objects whose path starts with `prefix` and sorts after `after`, in byte
    /// order of their paths.
    fn list<'a>(
        &'a self,
        prefix: &'a StoragePath,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>>;

    /// Ends the unfinished uploads below `prefix` begun before `before`, which their own process
    /// did not get to clean up (it was killed, or its runtime stopped first), and returns how many.
    /// Only a backend that keeps unfinished uploads apart from its objects has any: S3's multipart
    /// uploads (the local backend removes its own when it opens; memory keeps nothing).
    fn abort_stale_uploads<'a>(
        &'a self,
        _prefix: &'a StoragePath,
        _before: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<usize, StorageError>> {
        Box::pin(async { Ok(0) })
    }
}

/// The backend the configuration names. A local root is created when missing, and what uploads
/// cut off by a crash left in it is removed.
pub async fn open(
    backend: &crate::config::StorageBackend,
) -> Result<std::sync::Arc<dyn Storage>, StorageError> {
    use crate::config::StorageBackend;
    let inner: std::sync::Arc<dyn Storage> = match backend {
        StorageBackend::Local { root } => {
            std::sync::Arc::new(local::LocalStorage::open(root).await?)
        }
        StorageBackend::S3(config) => std::sync::Arc::new(s3::S3Storage::new(config).await),
        StorageBackend::Memory => std::sync::Arc::new(memory::MemoryStorage::new()),
    };
    Ok(std::sync::Arc::new(metered::Metered::new(inner)))
}

/// `range` checked against an object of `size` bytes: the end is clamped to the size; a range
/// that starts at or past the end (of a non-empty object) or is empty is refused.
pub fn fit_range(range: Option<Range<u64>>, size: u64) -> Result<Range<u64>, StorageError> {
    match range {
        None => Ok(0..size),
        Some(r) if r.start < r.end && r.start < size => Ok(r.start..r.end.min(size)),
        Some(_) => Err(StorageError::InvalidRange { size }),
    }
}

/// A body for tests and small writes: the given bytes as one chunk.
pub fn body_from(bytes: impl Into<Bytes>) -> ByteStream {
    let bytes: Bytes = bytes.into();
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_fit_the_object() {
        assert_eq!(fit_range(None, 10).unwrap(), 0..10);
        assert_eq!(fit_range(Some(2..5), 10).unwrap(), 2..5);
        assert_eq!(fit_range(Some(8..100), 10).unwrap(), 8..10);
        assert!(fit_range(Some(10..12), 10).is_err());
        assert!(fit_range(Some(3..3), 10).is_err());
        assert!(fit_range(Some(0..1), 0).is_err());
        assert_eq!(fit_range(None, 0).unwrap(), 0..0);
    }
}
