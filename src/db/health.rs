//! A tenant's health at a glance: what the hourly `health_snapshot` job records.

use serde_json::Value;
use sqlx::PgConnection;

use crate::domain::tenant::TenantId;

use super::DbResult;

/// The latest state of each system with its age, open violations by severity, jobs waiting or
/// retrying, and jobs that died in the last day, as one JSON object.
#[tracing::instrument(skip_all)]
pub async fn snapshot(conn: &mut PgConnection, tenant: TenantId) -> DbResult<Value> {
    Ok(sqlx::query_scalar(
        "select jsonb_build_object(
             'systems', (
                 select coalesce(jsonb_agg(jsonb_build_object(
                            'system', sys.n, 'version', s.version,
                            'recorded_at', to_char(s.recorded_at at time zone 'UTC',
                                                   'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                            'age_seconds', floor(extract(epoch from now() - s.recorded_at)))
                          order by sys.n), '[]')
                   from unnest('{1,2,3,4,5}'::smallint[]) as sys(n)
                   left join lateral (
                        select version, recorded_at from system_states
                         where tenant_id = $1 and system = sys.n
                         order by version desc limit 1) s on true),
             'open_violations', (
                 select coalesce(jsonb_object_agg(severity, n), '{}')
                   from (select severity, count(*) as n from policy_violations
                          where tenant_id = $1 and resolved_at is null group by severity) v),
             'jobs', (
                 select coalesce(jsonb_object_agg(state, n), '{}')
                   from (select state, count(*) as n from jobs
                          where tenant_id = $1
                            and (state in ('available', 'retrying')
                                 or (state = 'dead' and finished_at > now() - interval '1 day'))
                          group by state) j))",
    )
    .bind(tenant.as_uuid())
    .fetch_one(conn)
    .await?)
}
