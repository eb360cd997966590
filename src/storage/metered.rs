//! Every backend's operations counted and timed: `storage_operations_total{backend,op,outcome}`,
//! `storage_operation_duration_seconds{backend,op}` and `storage_bytes_total{backend,direction}`.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::{
    ByteStream, FileSpan, GetResult, ListPage, ObjectMeta, PutOptions, Storage, StorageError,
    StoragePath,
};

/// A backend with its metrics.
pub struct Metered {
    inner: Arc<dyn Storage>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner }
    }
}

fn outcome<T>(result: &Result<T, StorageError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StorageError::NotFound) => "not_found",
        Err(StorageError::AlreadyExists) => "exists",
        Err(StorageError::InvalidRange { .. }) => "invalid_range",
        Err(StorageError::Interrupted(_)) => "interrupted",
        Err(StorageError::Backend(_)) => "error",
    }
}

fn record<T>(
    backend: &'static str,
    op: &'static str,
    started: Instant,
    result: &Result<T, StorageError>,
) {
    metrics::counter!("storage_operations_total", "backend" => backend, "op" => op, "outcome" => outcome(result))
        .increment(1);
    metrics::histogram!("storage_operation_duration_seconds", "backend" => backend, "op" => op)
        .record(started.elapsed().as_secs_f64());
}

fn bytes_counter(backend: &'static str, direction: &'static str) -> metrics::Counter {
    metrics::counter!("storage_bytes_total", "backend" => backend, "direction" => direction)
}

/// Counts the bytes a body carries as they pass.
fn counting(body: ByteStream, backend: &'static str, direction: &'static str) -> ByteStream {
    let bytes = bytes_counter(backend, direction);
    Box::pin(body.map(move |chunk| {
        if let Ok(c) = &chunk {
            bytes.increment(c.len() as u64);
        }
        chunk
    }))
}

impl Storage for Metered {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn put<'a>(
        &'a self,
        path: &'a StoragePath,
        body: ByteStream,
        options: PutOptions,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            let backend = self.inner.backend();
            let started = Instant::now();
            let result = self
                .inner
                .put(path, counting(body, backend, "in"), options)
                .await;
            record(backend, "put", started, &result);
            result
        })
    }

    fn get<'a>(
        &'a self,
        path: &'a StoragePath,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<GetResult, StorageError>> {
        Box::pin(async move {
            let backend = self.inner.backend();
            let started = Instant::now();
            let result = self.inner.get(path, range).await;
            // Timed to the start of the body: its streaming is the reader's pace.
            record(backend, "get", started, &result);
            result.map(|got| GetResult {
                body: counting(got.body, backend, "out"),
                file: got.file.map(|span| FileSpan {
                    sent: Some(bytes_counter(backend, "out")),
                    ..span
                }),
                ..got
            })
        })
    }

    fn head<'a>(
        &'a self,
        path: &'a StoragePath,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.head(path).await;
            record(self.inner.backend(), "head", started, &result);
            result
        })
    }

    fn delete<'a>(&'a self, path: &'a StoragePath) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.delete(path).await;
            record(self.inner.backend(), "delete", started, &result);
            result
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a StoragePath,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.list(prefix, after, limit).await;
            record(self.inner.backend(), "list", started, &result);
            result
        })
    }

    fn abort_stale_uploads<'a>(
        &'a self,
        prefix: &'a StoragePath,
        before: chrono::DateTime<chrono::Utc>,
    ) -> BoxFuture<'a, Result<usize, StorageError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.abort_stale_uploads(prefix, before).await;
            record(
                self.inner.backend(),
                "abort_stale_uploads",
                started,
                &result,
            );
            result
        })
    }
}

pub fn describe_metrics() {
    metrics::describe_counter!(
        "storage_operations_total",
        "Storage backend operations, by backend, operation and outcome."
    );
    metrics::describe_histogram!(
        "storage_operation_duration_seconds",
        metrics::Unit::Seconds,
        "Time a storage operation took (for get, until its body starts), by backend and operation."
    );
    metrics::describe_counter!(
        "storage_bytes_total",
        metrics::Unit::Bytes,
        "Bytes written to (in) and read from (out) the storage backend."
    );
}
