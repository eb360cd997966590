//! `artifact_processing`: enqueued with every stored artifact. Reads the bytes back from the
//! storage backend, checks them against the SHA-256 computed at upload, and detects the content
//! type from the bytes themselves (their magic numbers); records both on the artifact
//! (`checksum_verified_at`, `detected_content_type`). A mismatch is a permanent failure: the job
//! is dead, which is how a corrupted object shows in `GET /v1/jobs?state=dead`.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Job, JobContext, JobError};
use crate::db::{DbError, artifacts, tenant as scope};
use crate::domain::job::Queue;
use crate::storage::{StorageError, StoragePath};

/// Bytes enough for every signature the detector knows.
const SNIFF_BYTES: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactProcessing {
    pub key: String,
    /// The upload this job checks; a newer upload of the key gets its own job.
    pub storage_path: String,
    pub sha256: String,
}

impl Job for ArtifactProcessing {
    const KIND: &'static str = "artifact_processing";
    const QUEUE: Queue = Queue::Analysis;
    const MAX_ATTEMPTS: i32 = 5;
    /// Reading back an artifact of several GiB.
    const TIMEOUT: Duration = Duration::from_secs(30 * 60);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        let tenant = ctx.tenant()?;
        let path = StoragePath::raw(&self.storage_path);
        let object = match ctx.services.storage.get(&path, None).await {
            Ok(object) => object,
            // Replaced or deleted since: its successor (if any) has its own job.
            Err(StorageError::NotFound) => return Ok(json!({"skipped": "superseded"})),
            Err(e) => return Err(JobError::retry(format!("reading the artifact: {e}"))),
        };
        let mut hash = Sha256::new();
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        let mut body = object.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| JobError::retry(format!("reading the artifact: {e}")))?;
            if head.len() < SNIFF_BYTES {
                let take = (SNIFF_BYTES - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
            }
            hash.update(&chunk);
            if ctx.cancelled().is_cancelled() {
                return Err(JobError::retry("stopped"));
            }
        }
        let actual = hex::encode(hash.finalize());
        let verified = actual == self.sha256;
        let detected = infer::get(&head).map(|t| t.mime_type().to_owned());
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let recorded = artifacts::record_processing(
            &mut tx,
            tenant,
            &self.key,
            &self.storage_path,
            verified,
            detected.as_deref(),
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        if !recorded {
            return Ok(json!({"skipped": "superseded"}));
        }
        if !verified {
            return Err(JobError::permanent(format!(
                "checksum mismatch: recorded {} at upload, the stored bytes hash to {actual}",
                self.sha256
            )));
        }
        Ok(json!({"checksum_verified": true, "detected_content_type": detected}))
    }
}
