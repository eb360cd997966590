-- Standalone enqueues committed together. Jobs enqueued on their own (`jobs::enqueue_alone`, no
-- other write to belong to) by concurrent callers of one process are gathered and inserted by one
-- call of this function, which commits once for all of them (src/db/enqueuer.rs): eight producers
-- cost one statement and one flush instead of eight of each.
--
-- Row i of every array is one job. Each tenant's jobs are inserted under that tenant's row-level
-- security, exactly as enqueue_job does for one (not a security definer; the tenant setting is
-- put back before the function returns). A job whose idempotency key its tenant already used,
-- earlier in the same call included, is not inserted: its row comes back with the existing job's
-- id and `job_created` false. Returns one row per input row, `job_index` counting from 1.
-- enqueue_job (one job) stays for processes of the previous release during a rolling upgrade.
create function enqueue_jobs(p_tenants uuid[], p_ids uuid[], p_kinds text[], p_queues text[],
                             p_priorities smallint[], p_args jsonb[], p_max_attempts integer[],
                             p_run_at timestamptz[], p_keys text[])
returns table (job_index integer, job_id uuid, job_created boolean)
language plpgsql
set search_path = pg_catalog, public
as $$
declare
    v_previous text := current_setting('app.tenant_id', true);
    v_tenant uuid;
    v_created uuid[];
begin
    for v_tenant in select distinct t from unnest(p_tenants) as u(t) order by 1 loop
        perform set_config('app.tenant_id', v_tenant::text, true);
        with inserted as (
            insert into public.jobs (id, tenant_id, kind, queue, priority, args, max_attempts,
                                     run_at, idempotency_key)
            select u.id, u.tenant, u.kind, u.queue, u.priority, u.args, u.max_attempts,
                   coalesce(u.run_at, now()), u.key
              from unnest(p_tenants, p_ids, p_kinds, p_queues, p_priorities, p_args,
                          p_max_attempts, p_run_at, p_keys)
                       with ordinality as u(tenant, id, kind, queue, priority, args, max_attempts,
                                            run_at, key, n)
             where u.tenant = v_tenant
             order by u.n
            on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
            returning jobs.id
        )
        select coalesce(array_agg(inserted.id), '{}') into v_created from inserted;
        -- A statement of its own, so the jobs another transaction committed with the same key
        -- while this insert waited for it are seen.
        return query
            select u.n::integer,
                   case when u.id = any(v_created) then u.id
                        else (select j.id from public.jobs j
                               where j.tenant_id = v_tenant and j.idempotency_key = u.key)
                   end,
                   u.id = any(v_created)
              from unnest(p_tenants, p_ids, p_keys) with ordinality as u(tenant, id, key, n)
             where u.tenant = v_tenant;
    end loop;
    perform set_config('app.tenant_id', coalesce(v_previous, ''), true);
end
$$;
revoke all on function enqueue_jobs(uuid[], uuid[], text[], text[], smallint[], jsonb[], integer[],
                                    timestamptz[], text[]) from public;
grant execute on function enqueue_jobs(uuid[], uuid[], text[], text[], smallint[], jsonb[],
                                       integer[], timestamptz[], text[]) to cybernetic_app;
