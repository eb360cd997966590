//! The in-memory backend: for tests and throwaway development runs. Objects live in the process and
//! vanish with it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::StreamExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{
    ByteStream, GetResult, ListPage, Listed, ObjectMeta, PutOptions, Storage, StorageError,
    StoragePath, fit_range,
};

#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    objects: Arc<RwLock<BTreeMap<String, (ObjectMeta, Bytes)>>>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, (ObjectMeta, Bytes)>> {
        // The map is replaced entry by entry; a panic elsewhere cannot leave one half-written.
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, (ObjectMeta, Bytes)>> {
        self.objects.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for MemoryStorage {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn put<'a>(
        &'a self,
        path: &'a StoragePath,
        mut body: ByteStream,
        options: PutOptions,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            let mut bytes = BytesMut::new();
            let mut hash = Sha256::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                hash.update(&chunk);
                bytes.extend_from_slice(&chunk);
            }
            let meta = ObjectMeta {
                path: path.as_str().to_owned(),
                size: bytes.len() as u64,
                content_type: options.content_type,
                metadata: options.metadata,
                tags: options.tags,
                sha256: Some(hex::encode(hash.finalize())),
                modified_at: Utc::now(),
            };
            let mut objects = self.write();
            if options.if_absent && objects.contains_key(path.as_str()) {
                return Err(StorageError::AlreadyExists);
            }
            objects.insert(meta.path.clone(), (meta.clone(), bytes.freeze()));
            Ok(meta)
        })
    }

    fn get<'a>(
        &'a self,
        path: &'a StoragePath,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<GetResult, StorageError>> {
        Box::pin(async move {
            let (meta, bytes) = self
                .read()
                .get(path.as_str())
                .cloned()
                .ok_or(StorageError::NotFound)?;
            let range = fit_range(range, meta.size)?;
            // Bounds come from fit_range against this object's own size.
            let slice = bytes.slice(range.start as usize..range.end as usize);
            Ok(GetResult {
                meta,
                range,
                body: super::body_from(slice),
                file: None,
            })
        })
    }

    fn head<'a>(
        &'a self,
        path: &'a StoragePath,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            self.read()
                .get(path.as_str())
                .map(|(meta, _)| meta.clone())
                .ok_or(StorageError::NotFound)
        })
    }

    fn delete<'a>(&'a self, path: &'a StoragePath) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            self.write().remove(path.as_str());
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
            let objects = self.read();
            let start = match after {
                Some(after) if after >= prefix.as_str() => std::ops::Bound::Excluded(after),
                _ => std::ops::Bound::Included(prefix.as_str()),
            };
            let mut items: Vec<Listed> = objects
                .range::<str, _>((start, std::ops::Bound::Unbounded))
                .take_while(|(path, _)| path.starts_with(prefix.as_str()))
                .take(limit.saturating_add(1))
                .map(|(_, (meta, _))| Listed::from(meta))
                .collect();
            let next = (items.len() > limit).then(|| {
                items.truncate(limit);
                items.last().map(|m| m.path.clone())
            });
            Ok(ListPage {
                items,
                next: next.flatten(),
            })
        })
    }
}
