//! Logging (tracing, JSON or pretty) and the process-wide Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` filters (default `info,sqlx=warn`).
pub fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    // A subscriber set already (tests start several apps in one process) is fine.
    drop(result);
}

/// Latency buckets (seconds) for every histogram but the long ones below: 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for what may take minutes: a job's run (up to its kind's timeout, 300 s by default),
/// a job waiting in a backlog, a storage operation streaming gigabytes.
const LONG_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const LONG_HISTOGRAMS: &[&str] = &[
    "job_duration_seconds",
    "job_pickup_delay_seconds",
    "storage_operation_duration_seconds",
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder, installed on first use (several apps in one test process share it).
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                // The bucket lists are fixed and non-empty, which is all set_buckets checks.
                .expect("histogram buckets are non-empty");
            for name in LONG_HISTOGRAMS {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), LONG_BUCKETS)
                    .expect("histogram buckets are non-empty");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe_metrics();
            handle
        })
        .clone()
}

fn describe_metrics() {
    crate::http::router::describe_metrics();
    crate::db::describe_metrics();
    crate::events::describe_metrics();
    crate::routes::webhooks::describe_metrics();
    crate::jobs::describe_metrics();
    crate::storage::metered::describe_metrics();
    crate::jobs::storage_reconciliation::describe_metrics();
    crate::routes::telegram::describe_metrics();
}

/// Histograms keep samples until upkeep folds them; run it in the background.
pub fn spawn_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    });
}
