//! `policy_evaluation`: checks the tenant's active policies against the latest state of each
//! system, enqueued with every recorded state (and every policy change).
//!
//! Each rule that holds opens a violation, stored and announced once (`policy.violated`); while it
//! keeps holding nothing more is said; when it stops holding, or its policy is deactivated,
//! deleted or its rule changed, the violation is resolved (`policy.recovered`). Both events are
//! sent to every active notification channel that takes their severity, as `notification` jobs
//! enqueued in the same transaction. Evaluations of one tenant take turns (an advisory lock), so
//! two states recorded at once cannot both open the same violation.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::notification::Notification;
use super::{Enqueue, Job, JobContext, JobError, Wake, enqueue};
use crate::db::policies::{self, Policy};
use crate::db::system_states::{self, SystemState};
use crate::db::violations::{self, NewViolation, Violation};
use crate::db::{DbError, events, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::job::Queue;
use crate::domain::policy::{Rule, Severity};
use crate::domain::tenant::TenantId;

/// Advisory-lock class for "evaluate one tenant's policies".
const LOCK_CLASS: i32 = 0x5045; // "PE"

/// What triggered the evaluation (kept for the job's record; every rule is checked each time).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyEvaluation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<i16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<Uuid>,
}

impl Job for PolicyEvaluation {
    const KIND: &'static str = "policy_evaluation";
    const QUEUE: Queue = Queue::Critical;
    const MAX_ATTEMPTS: i32 = 10;
    const TIMEOUT: Duration = Duration::from_secs(60);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        let tenant = ctx.tenant()?;
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        sqlx::query("select pg_advisory_xact_lock($1, hashtext($2::text))")
            .bind(LOCK_CLASS)
            .bind(tenant.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(DbError::from)?;
        let states = system_states::latest_all(&mut tx, tenant).await?;
        let active = policies::active(&mut tx, tenant).await?;
        let open = violations::open(&mut tx, tenant).await?;
        let changes = evaluate(&states, &active, open);

        let mut appended = Vec::new();
        let mut wake = Wake::default();
        for change in &changes.changes {
            let (event_type, violation, reason) = match change {
                Change::Open { check } => {
                    let rule = serde_json::to_value(&check.rule).unwrap_or(Value::Null);
                    let violation = violations::insert(
                        &mut tx,
                        tenant,
                        &NewViolation {
                            policy_id: check.policy.id,
                            policy_name: &check.policy.name,
                            policy_version: check.policy.version,
                            rule_index: check.index,
                            rule: &rule,
                            system: check.rule.system,
                            severity: check.rule.severity.as_str(),
                            value: check.value.as_ref(),
                            state_version: check.state_version,
                        },
                    )
                    .await?;
                    (EventType::POLICY_VIOLATED, violation, None)
                }
                Change::Resolve {
                    violation,
                    value,
                    state_version,
                    reason,
                } => {
                    let Some(resolved) = violations::resolve(
                        &mut tx,
                        tenant,
                        violation.id,
                        value.as_ref(),
                        *state_version,
                    )
                    .await?
                    else {
                        continue;
                    };
                    (EventType::POLICY_RECOVERED, resolved, Some(*reason))
                }
            };
            let data = event_body(&violation, reason);
            let event =
                events::append(&mut tx, tenant, &EventType::platform(event_type), &data).await?;
            wake = wake.and(notify(&mut tx, tenant, &violation, &event).await?);
            appended.push(event);
        }
        tx.commit().await.map_err(DbError::from)?;
        wake.after_commit(&ctx.db);
        ctx.events.committed(&appended).await;
        Ok(json!({
            "rules_checked": changes.rules_checked,
            "opened": changes.changes.iter().filter(|c| matches!(c, Change::Open { .. })).count(),
            "resolved": changes.changes.iter().filter(|c| matches!(c, Change::Resolve { .. })).count(),
            "open": changes.still_open,
        }))
    }
}

/// The event a violation's opening or resolution appends (and its notifications carry).
fn event_body(v: &Violation, reason: Option<&str>) -> Value {
    let rule = &v.rule;
    let message = rule
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "S{} {} {} {}",
                v.system,
                rule.get("path").and_then(Value::as_str).unwrap_or_default(),
                rule.get("op").and_then(Value::as_str).unwrap_or_default(),
                rule.get("threshold")
                    .map(Value::to_string)
                    .unwrap_or_default()
            )
            .trim_end()
            .to_owned()
        });
    let mut body = json!({
        "violation_id": v.id,
        "policy_id": v.policy_id,
        "policy_name": v.policy_name,
        "policy_version": v.policy_version,
        "rule_index": v.rule_index,
        "system": v.system,
        "path": rule.get("path"),
        "op": rule.get("op"),
        "threshold": rule.get("threshold"),
        "severity": v.severity,
        "message": message,
        "value": v.value,
        "state_version": v.state_version,
        "opened_at": v.opened_at,
    });
    if let (Some(resolved_at), Value::Object(map)) = (v.resolved_at, &mut body) {
        map.insert("resolved_at".into(), json!(resolved_at));
        map.insert("resolved_value".into(), json!(v.resolved_value));
        map.insert(
            "resolved_state_version".into(),
            json!(v.resolved_state_version),
        );
        map.insert("reason".into(), json!(reason));
    }
    body
}

/// Enqueues the event's delivery to each channel that takes the violation's severity; returns
/// the queues to wake after the commit.
async fn notify(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    violation: &Violation,
    event: &events::Event,
) -> Result<Wake, JobError> {
    let mut wake = Wake::default();
    let severity = Severity::parse("severity", &violation.severity)
        .map_err(|e| JobError::permanent(e.to_string()))?;
    for channel in crate::db::channels::accepting(conn, tenant, severity).await? {
        let key = format!("notify:{channel}:{}", event.id);
        let job = Notification::Channel {
            channel_id: channel,
            event: event.clone(),
        };
        let how = Enqueue {
            idempotency_key: Some(&key),
            ..Enqueue::default()
        };
        wake = wake.and(enqueue(conn, tenant, &job, how).await?.wake);
    }
    Ok(wake)
}

struct Check<'p> {
    policy: &'p Policy,
    index: i32,
    rule: Rule,
    value: Option<Value>,
    state_version: Option<i64>,
}

enum Change<'p> {
    Open {
        check: Check<'p>,
    },
    Resolve {
        violation: Violation,
        value: Option<Value>,
        state_version: Option<i64>,
        /// `recovered`, `rule_changed`, `rule_removed`, `policy_inactive` or `policy_deleted`.
        reason: &'static str,
    },
}

struct Evaluation<'p> {
    rules_checked: usize,
    changes: Vec<Change<'p>>,
    still_open: usize,
}

/// What has to change: violations to open for rules that hold without one, and open violations to
/// resolve. Pure, so the rules of alerting are in one place.
fn evaluate<'p>(
    states: &[SystemState],
    active: &'p [Policy],
    open: Vec<Violation>,
) -> Evaluation<'p> {
    let mut open: Vec<Option<Violation>> = open.into_iter().map(Some).collect();
    let mut changes = Vec::new();
    let mut rules_checked = 0;
    let mut still_open = 0;
    for policy in active {
        let rules: Vec<Value> = match &policy.rules {
            Value::Array(rules) => rules.clone(),
            _ => Vec::new(),
        };
        for (index, raw) in rules.into_iter().enumerate() {
            let Ok(rule) = serde_json::from_value::<Rule>(raw.clone()) else {
                tracing::warn!(policy_id = %policy.id, index, "stored rule does not decode; skipped");
                continue;
            };
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            rules_checked += 1;
            let state = states.iter().find(|s| s.system == rule.system);
            let (holds, value) = rule.check(state.map(|s| &s.state));
            let state_version = state.map(|s| s.version);
            let existing = open.iter_mut().find(|v| {
                v.as_ref()
                    .is_some_and(|v| v.policy_id == Some(policy.id) && v.rule_index == index)
            });
            // The same rule as when the violation opened (a policy update may have changed it).
            let same_rule = |v: &Violation| v.rule == raw;
            match (holds, existing) {
                (true, Some(slot)) if slot.as_ref().is_some_and(same_rule) => {
                    *slot = None;
                    still_open += 1;
                }
                (true, slot) => {
                    if let Some(stale) = slot.and_then(Option::take) {
                        changes.push(Change::Resolve {
                            violation: stale,
                            value: value.clone(),
                            state_version,
                            reason: "rule_changed",
                        });
                    }
                    changes.push(Change::Open {
                        check: Check {
                            policy,
                            index,
                            rule,
                            value,
                            state_version,
                        },
                    });
                    still_open += 1;
                }
                (false, Some(slot)) => {
                    if let Some(v) = slot.take() {
                        let reason = if same_rule(&v) {
                            "recovered"
                        } else {
                            "rule_changed"
                        };
                        changes.push(Change::Resolve {
                            violation: v,
                            value,
                            state_version,
                            reason,
                        });
                    }
                }
                (false, None) => {}
            }
        }
    }
    // Open violations no active rule accounts for: their policy lost that rule, was deactivated
    // or was deleted.
    for v in open.into_iter().flatten() {
        let reason = match v.policy_id {
            None => "policy_deleted",
            Some(id) if active.iter().any(|p| p.id == id) => "rule_removed",
            Some(_) => "policy_inactive",
        };
        changes.push(Change::Resolve {
            value: None,
            state_version: None,
            reason,
            violation: v,
        });
    }
    Evaluation {
        rules_checked,
        changes,
        still_open,
    }
}
