//! `storage_reconciliation` (cron, hourly by default): makes each tenant's objects in the storage
//! backend and its `artifacts` rows agree again after a crash.
//!
//! The artifact API orders its steps so that the only straggler a crash, a lost connection or a
//! refused delete can leave is an object no row names (see `routes::artifacts`). This job walks
//! the tenant's objects page by page beside the rows covering the same range of paths (both in
//! byte order, a merge of two sorted lists):
//!
//! - an object no row names, written longer ago than `STORAGE_ORPHAN_GRACE` (1 hour), is deleted.
//!   The grace covers an upload that is complete in the backend but whose row is not committed
//!   yet (which takes moments), with room for the backend's clock to differ from the database's;
//! - a row whose object is missing cannot come from the platform's own order of operations (only
//!   from something deleting objects behind its back). Nothing is deleted for it: the job reports
//!   the keys and ends dead, so the loss shows in `GET /v1/jobs?state=dead` and in the
//!   `storage_reconciliation_findings_total{finding="missing"}` counter.
//!
//! - an upload left unfinished in the backend (an S3 multipart upload whose process was killed, or
//!   whose runtime stopped before its own abort ran) begun more than 24 hours ago is aborted, so
//!   no orphan parts stay behind (`storage_reconciliation_findings_total{finding="stale_upload"}`).
//!
//! Each page lists the backend before reading the rows, so a row the page reads whose object was
//! deleted meanwhile cannot be mistaken for a missing object: its object is deleted only after the
//! row, and the row was still there when the listing was already done. Rows written after the
//! job started are left out of the missing check, since the listing may predate their objects.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cron::{Scheduled, Tick};
use super::{Job, JobContext, JobError};
use crate::db::{DbError, artifacts, tenant as scope};
use crate::domain::job::Queue;
use crate::domain::tenant::TenantId;
use crate::storage::{StorageError, StoragePath};

/// An unfinished upload begun longer ago than this was abandoned (its process died, or stopped
/// before its own abort ran): a 5 GiB upload at 1 MB/s takes under an hour and a half.
const STALE_UPLOAD: Duration = Duration::from_secs(24 * 3600);
/// Objects looked at per backend listing call.
const PAGE: usize = 1000;
/// Keys of missing objects named in the job's error (the counter counts them all).
const REPORTED_KEYS: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageReconciliation(pub Tick);

impl From<Tick> for StorageReconciliation {
    fn from(tick: Tick) -> Self {
        Self(tick)
    }
}

impl Scheduled for StorageReconciliation {
    const LOCAL_TIME: bool = false;
}

impl Job for StorageReconciliation {
    const KIND: &'static str = "storage_reconciliation";
    const QUEUE: Queue = Queue::Default;
    const MAX_ATTEMPTS: i32 = 5;
    /// A walk over every object of a large tenant.
    const TIMEOUT: Duration = Duration::from_secs(30 * 60);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        let tenant = ctx.tenant()?;
        let started = database_now(&ctx, tenant).await?;
        let cutoff = started
            - chrono::Duration::from_std(ctx.services.orphan_grace)
                .unwrap_or_else(|_| chrono::Duration::zero());
        let report = reconcile(&ctx, tenant, started, cutoff).await?;
        if !report.missing.is_empty() {
            let shown: Vec<&str> = report
                .missing
                .iter()
                .take(REPORTED_KEYS)
                .map(String::as_str)
                .collect();
            return Err(JobError::permanent(format!(
                "{} artifact(s) have no object in the storage backend (deleted outside the \
                 platform?): {}{}; {} unreferenced object(s) deleted",
                report.missing.len(),
                shown.join(", "),
                if report.missing.len() > shown.len() {
                    ", …"
                } else {
                    ""
                },
                report.orphans_deleted,
            )));
        }
        Ok(json!({
            "objects_checked": report.objects_checked,
            "orphans_deleted": report.orphans_deleted,
            "orphans_in_grace": report.orphans_in_grace,
            "stale_uploads_aborted": report.stale_uploads_aborted,
        }))
    }
}

#[derive(Debug, Default)]
struct Report {
    objects_checked: u64,
    orphans_deleted: u64,
    orphans_in_grace: u64,
    stale_uploads_aborted: u64,
    missing: Vec<String>,
}

async fn database_now(ctx: &JobContext, tenant: TenantId) -> Result<DateTime<Utc>, JobError> {
    let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
    let (now,): (DateTime<Utc>,) = sqlx::query_as("select now()")
        .fetch_one(&mut *tx)
        .await
        .map_err(DbError::from)?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(now)
}

async fn reconcile(
    ctx: &JobContext,
    tenant: TenantId,
    started: DateTime<Utc>,
    cutoff: DateTime<Utc>,
) -> Result<Report, JobError> {
    let storage = &ctx.services.storage;
    let prefix = StoragePath::prefix(tenant, "")
        .map_err(|e| JobError::permanent(format!("the tenant's prefix: {e}")))?;
    let mut report = Report::default();
    let mut after: Option<String> = None;
    loop {
        if ctx.cancelled().is_cancelled() {
            return Err(JobError::retry("stopped"));
        }
        let page = storage
            .list(&prefix, after.as_deref(), PAGE)
            .await
            .map_err(|e| JobError::retry(format!("listing the tenant's objects: {e}")))?;
        // The rows covering the same range of paths, read after the listing.
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let rows =
            artifacts::paths_between(&mut tx, tenant, after.as_deref(), page.next.as_deref())
                .await?;
        tx.commit().await.map_err(DbError::from)?;

        let mut rows = rows.into_iter().peekable();
        for object in &page.items {
            report.objects_checked += 1;
            // Rows sorting before this object have no object in the listing.
            while let Some(row) = rows.next_if(|r| r.storage_path.as_str() < object.path.as_str()) {
                missing(&mut report, &row, started);
            }
            if rows.next_if(|r| r.storage_path == object.path).is_some() {
                continue;
            }
            if object.modified_at > cutoff {
                report.orphans_in_grace += 1;
                continue;
            }
            match storage.delete(&StoragePath::raw(&object.path)).await {
                Ok(()) | Err(StorageError::NotFound) => {
                    report.orphans_deleted += 1;
                    metrics::counter!("storage_reconciliation_findings_total", "finding" => "orphan")
                        .increment(1);
                    tracing::info!(
                        tenant = %tenant,
                        path = object.path.as_str(),
                        modified_at = %object.modified_at,
                        "deleted an object no artifact names"
                    );
                }
                Err(e) => {
                    return Err(JobError::retry(format!(
                        "deleting the unreferenced object {}: {e}",
                        object.path
                    )));
                }
            }
        }
        for row in rows {
            missing(&mut report, &row, started);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let stale_before = started - chrono::Duration::seconds(STALE_UPLOAD.as_secs() as i64);
    let aborted = storage
        .abort_stale_uploads(&prefix, stale_before)
        .await
        .map_err(|e| JobError::retry(format!("ending the tenant's stale uploads: {e}")))?;
    if aborted > 0 {
        metrics::counter!("storage_reconciliation_findings_total", "finding" => "stale_upload")
            .increment(aborted as u64);
    }
    report.stale_uploads_aborted = aborted as u64;
    Ok(report)
}

/// A row the listing did not show: missing, unless written since the job started (the listing
/// may have run before its object appeared).
fn missing(report: &mut Report, row: &artifacts::StoredPath, started: DateTime<Utc>) {
    if row.updated_at >= started {
        return;
    }
    metrics::counter!("storage_reconciliation_findings_total", "finding" => "missing").increment(1);
    tracing::error!(
        key = row.key.as_str(),
        path = row.storage_path.as_str(),
        "an artifact's object is missing from the storage backend"
    );
    report.missing.push(row.key.clone());
}

pub fn describe_metrics() {
    metrics::describe_counter!(
        "storage_reconciliation_findings_total",
        "What storage reconciliation found: objects no artifact names, deleted (orphan), \
         artifacts whose object is missing (missing), and unfinished uploads aborted \
         (stale_upload)."
    );
}
