-- enqueue_job (migration 000006) without its NOTIFY. PostgreSQL lets one notifying transaction
-- commit at a time and holds that turn through the commit's flush to disk, so concurrent
-- producers queued up behind one another's fsync. The statement now only inserts (concurrent
-- commits share flushes again); the caller wakes the pools after the commit, with one NOTIFY per
-- queue for all the jobs committed meanwhile, in a transaction that has nothing to flush
-- (src/db/waker.rs). Enqueues inside a caller's transaction (jobs::insert) still notify at commit.
create or replace function enqueue_job(p_tenant uuid, p_id uuid, p_kind text, p_queue text,
                                       p_priority smallint, p_args jsonb, p_max_attempts integer,
                                       p_run_at timestamptz, p_key text)
returns table (job_id uuid, job_created boolean)
language plpgsql
set search_path = pg_catalog, public
as $$
declare
    v_previous text := current_setting('app.tenant_id', true);
begin
    perform set_config('app.tenant_id', p_tenant::text, true);
    return query
        insert into public.jobs (id, tenant_id, kind, queue, priority, args, max_attempts, run_at,
                                 idempotency_key)
        values (p_id, p_tenant, p_kind, p_queue, p_priority, p_args, p_max_attempts,
                coalesce(p_run_at, now()), p_key)
        on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
        returning jobs.id, true;
    if not found then
        return query
            select j.id, false from public.jobs j
             where j.tenant_id = p_tenant and j.idempotency_key = p_key;
    end if;
    perform set_config('app.tenant_id', coalesce(v_previous, ''), true);
end
$$;
