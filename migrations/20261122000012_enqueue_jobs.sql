-- Standalone enqueues committed together. Jobs without an idempotency key enqueued on their own
-- (`jobs::enqueue_alone`, no other write to belong to) by concurrent callers of one process are
-- gathered and inserted by one call of this function, which commits once for all of them
-- (src/db/enqueuer.rs): eight producers cost one statement and one flush instead of eight of each.
-- A job with a key still goes through enqueue_job (migration 000010) on its own: a key can make
-- its insert wait for another transaction holding the same key, which must not hold up others.
--
-- Row i of every array is one job. Each tenant's jobs are inserted under that tenant's row-level
-- security, exactly as enqueue_job does for one (not a security definer; the tenant setting is
-- put back before the function returns). Returns how many jobs it inserted.
create function enqueue_jobs(p_tenants uuid[], p_ids uuid[], p_kinds text[], p_queues text[],
                             p_priorities smallint[], p_args jsonb[], p_max_attempts integer[],
                             p_run_at timestamptz[])
returns integer
language plpgsql
set search_path = pg_catalog, public
as $$
declare
    v_previous text := current_setting('app.tenant_id', true);
    v_tenant uuid;
    v_count integer;
    v_total integer := 0;
begin
    for v_tenant in select distinct t from unnest(p_tenants) as u(t) order by 1 loop
        perform set_config('app.tenant_id', v_tenant::text, true);
        insert into public.jobs (id, tenant_id, kind, queue, priority, args, max_attempts, run_at)
        select u.id, u.tenant, u.kind, u.queue, u.priority, u.args, u.max_attempts,
               coalesce(u.run_at, now())
          from unnest(p_tenants, p_ids, p_kinds, p_queues, p_priorities, p_args, p_max_attempts,
                      p_run_at)
                   as u(tenant, id, kind, queue, priority, args, max_attempts, run_at)
         where u.tenant = v_tenant;
        get diagnostics v_count = row_count;
        v_total := v_total + v_count;
    end loop;
    perform set_config('app.tenant_id', coalesce(v_previous, ''), true);
    return v_total;
end
$$;
revoke all on function enqueue_jobs(uuid[], uuid[], text[], text[], smallint[], jsonb[], integer[],
                                    timestamptz[]) from public;
grant execute on function enqueue_jobs(uuid[], uuid[], text[], text[], smallint[], jsonb[],
                                       integer[], timestamptz[]) to cybernetic_app;
