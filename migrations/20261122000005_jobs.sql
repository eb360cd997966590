-- Background jobs.
--
-- One table is both the queue the job pool claims from and what a tenant sees of its jobs, so every
-- state change (attempts, progress, result, error) is visible the moment it is made; there is no
-- second copy to keep in step. Tenants read and act on their own rows under row-level security as
-- everywhere else. The pool works across tenants only through the security-definer functions
-- below, each one statement: claim a batch, finish a batch (appending the tenant's events in the
-- same transaction), extend leases, rescue jobs whose worker vanished, release, prune, count.
--
-- States: available (due at run_at; shown as "scheduled" while run_at is in the future), running
-- (claimed by the worker in locked_by until locked_until), retrying (an attempt failed; due again at
-- run_at), completed, dead (attempts exhausted or a permanent failure; kept and retryable by hand),
-- cancelled. attempts counts attempts begun, written when a job is claimed.

create table jobs (
    id uuid primary key,
    -- null: a platform job that belongs to no tenant (never visible through the API)
    tenant_id uuid references tenants (id) on delete cascade,
    kind text not null check (kind ~ '^[a-z0-9_]{1,64}$'),
    queue text not null check (queue ~ '^[a-z0-9_]{1,64}$'),
    priority smallint not null default 0,
    args jsonb not null,
    state text not null default 'available'
        check (state in ('available', 'running', 'retrying', 'completed', 'dead', 'cancelled')),
    attempts integer not null default 0 check (attempts >= 0),
    max_attempts integer not null check (max_attempts between 1 and 100),
    run_at timestamptz not null default now(),
    idempotency_key text check (length(idempotency_key) between 1 and 200),
    locked_by text,
    locked_until timestamptz,
    progress_percent smallint check (progress_percent between 0 and 100),
    progress_message text,
    result jsonb,
    last_error text,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz
);

-- A second enqueue with the same key (per tenant; platform jobs share one space) is a no-op.
create unique index jobs_idempotency_idx on jobs (tenant_id, idempotency_key) nulls not distinct
    where idempotency_key is not null;
-- What claim_jobs walks: due jobs of one queue, highest priority first, then oldest.
create index jobs_due_idx on jobs (queue, priority desc, run_at, id)
    where state in ('available', 'retrying');
create index jobs_lease_idx on jobs (locked_until) where state = 'running';
create index jobs_tenant_idx on jobs (tenant_id, created_at desc, id desc);
create index jobs_finished_idx on jobs (finished_at) where state in ('completed', 'dead', 'cancelled');

alter table jobs enable row level security;
alter table jobs force row level security;
create policy tenant_isolation on jobs for all
    using (tenant_id = (select nullif(current_setting('app.tenant_id', true), ''))::uuid)
    with check (tenant_id = (select nullif(current_setting('app.tenant_id', true), ''))::uuid);
-- Only the owner, and so only the functions below, works across tenants.
create policy jobs_engine on jobs for all to current_user using (true) with check (true);

grant select, insert, update on jobs to cybernetic_app;

-- The events a batch of state changes gives, appended to each tenant's log in the same transaction
-- (tenants in id order, so two batches never wait on each other's heads in a cycle). Returns what
-- the caller hands to the bus after commit. Positions come back consecutive in input order, so a
-- row's type is found by its offset from the batch's first position.
create function append_job_events(p_ids uuid[])
returns table (out_tenant_id uuid, out_position bigint, out_type text,
               out_occurred_at timestamptz, out_data jsonb)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    t record;
begin
    for t in
        select j.tenant_id,
               array_agg(case j.state
                             when 'completed' then 'job.completed'
                             when 'retrying' then 'job.retrying'
                             when 'dead' then 'job.failed'
                             else 'job.' || j.state
                         end order by j.id) as types,
               array_agg(jsonb_strip_nulls(jsonb_build_object(
                   'job_id', j.id, 'kind', j.kind, 'queue', j.queue, 'state', j.state,
                   'attempts', j.attempts, 'max_attempts', j.max_attempts,
                   'retry_at', case when j.state = 'retrying' then j.run_at end,
                   'error', case when j.state in ('retrying', 'dead') then j.last_error end
               )) order by j.id) as data
          from public.jobs j
         where j.id = any(p_ids) and j.tenant_id is not null
         group by j.tenant_id
         order by j.tenant_id
    loop
        return query
            with appended as (
                select a.event_position, a.event_occurred_at, a.event_data
                  from public.append_events(t.tenant_id, t.types, t.data) a
            )
            select t.tenant_id, x.event_position,
                   t.types[(x.event_position - (select min(y.event_position) from appended y) + 1)::integer],
                   x.event_occurred_at, x.event_data
              from appended x;
    end loop;
end
$$;
revoke all on function append_job_events(uuid[]) from public;

-- Claims up to p_limit due jobs of a queue for a worker: highest priority first, then oldest. The
-- attempt is counted here, so it is visible while the job runs and survives a crash.
create function claim_jobs(p_queue text, p_limit integer, p_worker text, p_lease interval)
returns table (job_id uuid, job_tenant_id uuid, job_kind text, job_args jsonb, job_priority smallint,
               job_attempts integer, job_max_attempts integer, job_run_at timestamptz,
               job_claimed_at timestamptz)
language sql
security definer
set search_path = pg_catalog, public
as $$
    with picked as (
        select j.id from public.jobs j
         where j.queue = p_queue and j.state in ('available', 'retrying') and j.run_at <= now()
         order by j.priority desc, j.run_at, j.id
         limit p_limit
           for update skip locked
    )
    update public.jobs j
       set state = 'running', attempts = j.attempts + 1, locked_by = p_worker,
           locked_until = now() + p_lease, started_at = now()
      from picked
     where j.id = picked.id
    returning j.id, j.tenant_id, j.kind, j.args, j.priority, j.attempts, j.max_attempts, j.run_at, now()
$$;
revoke all on function claim_jobs(text, integer, text, interval) from public;
grant execute on function claim_jobs(text, integer, text, interval) to cybernetic_app;

-- Records the outcome of a batch of attempts run by p_worker: completed (with its result),
-- retrying (due again at the given time) or dead, each with its error. A job no longer running
-- under this worker (cancelled meanwhile, or rescued after its lease expired) is left as it is.
-- The state changes and their events commit together.
create function finish_jobs(p_worker text, p_ids uuid[], p_states text[], p_results jsonb[],
                            p_errors text[], p_retry_at timestamptz[])
returns table (out_tenant_id uuid, out_position bigint, out_type text,
               out_occurred_at timestamptz, out_data jsonb)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    v_ids uuid[];
begin
    with outcome as (
        select * from unnest(p_ids, p_states, p_results, p_errors, p_retry_at)
            as o(id, state, result, error, retry_at)
         where o.state in ('completed', 'retrying', 'dead')
    ), done as (
        update public.jobs j
           set state = o.state,
               result = case when o.state = 'completed' then o.result else j.result end,
               last_error = coalesce(o.error, j.last_error),
               run_at = case when o.state = 'retrying' then o.retry_at else j.run_at end,
               progress_percent = case when o.state = 'completed' then 100 else j.progress_percent end,
               finished_at = case when o.state in ('completed', 'dead') then now() end,
               locked_by = null, locked_until = null
          from outcome o
         where j.id = o.id and j.state = 'running' and j.locked_by = p_worker
        returning j.id
    )
    select array_agg(done.id) into v_ids from done;
    if v_ids is not null then
        return query select * from append_job_events(v_ids);
    end if;
end
$$;
revoke all on function finish_jobs(text, uuid[], text[], jsonb[], text[], timestamptz[]) from public;
grant execute on function finish_jobs(text, uuid[], text[], jsonb[], text[], timestamptz[]) to cybernetic_app;

-- A worker's heartbeat: extends the leases of the jobs it holds and returns those it still holds;
-- the others were cancelled (or rescued) meanwhile and the worker stops them.
create function extend_job_leases(p_worker text, p_ids uuid[], p_lease interval)
returns setof uuid
language sql
security definer
set search_path = pg_catalog, public
as $$
    update public.jobs j set locked_until = now() + p_lease
     where j.id = any(p_ids) and j.state = 'running' and j.locked_by = p_worker
    returning j.id
$$;
revoke all on function extend_job_leases(text, uuid[], interval) from public;
grant execute on function extend_job_leases(text, uuid[], interval) to cybernetic_app;

-- Jobs whose lease ran out (their worker was killed or cut off): each is due again at once, or dead
-- when that was its last attempt. Any pool may run this; a batch at a time.
create function rescue_jobs(p_limit integer)
returns table (out_tenant_id uuid, out_position bigint, out_type text,
               out_occurred_at timestamptz, out_data jsonb)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    v_ids uuid[];
begin
    with lost as (
        select j.id from public.jobs j
         where j.state = 'running' and j.locked_until < now()
         order by j.locked_until
         limit p_limit
           for update skip locked
    ), rescued as (
        update public.jobs j
           set state = case when j.attempts >= j.max_attempts then 'dead' else 'retrying' end,
               run_at = now(),
               last_error = 'the worker running this attempt stopped (' || coalesce(j.locked_by, '?')
                            || '); its lease expired',
               finished_at = case when j.attempts >= j.max_attempts then now() end,
               locked_by = null, locked_until = null
          from lost
         where j.id = lost.id
        returning j.id
    )
    select array_agg(rescued.id) into v_ids from rescued;
    if v_ids is not null then
        return query select * from append_job_events(v_ids);
    end if;
end
$$;
revoke all on function rescue_jobs(integer) from public;
grant execute on function rescue_jobs(integer) to cybernetic_app;

-- Hands back jobs a stopping worker claimed but did not finish: the attempt is not counted.
create function release_jobs(p_worker text, p_ids uuid[])
returns integer
language sql
security definer
set search_path = pg_catalog, public
as $$
    with released as (
        update public.jobs j
           set state = case when j.attempts > 1 then 'retrying' else 'available' end,
               attempts = j.attempts - 1, locked_by = null, locked_until = null, started_at = null
         where j.id = any(p_ids) and j.state = 'running' and j.locked_by = p_worker
        returning 1
    )
    select count(*)::integer from released
$$;
revoke all on function release_jobs(text, uuid[]) from public;
grant execute on function release_jobs(text, uuid[]) to cybernetic_app;

-- Deletes one batch of finished jobs: completed before p_completed, dead or cancelled before
-- p_failed. Returns how many; the caller loops.
create function prune_jobs(p_completed timestamptz, p_failed timestamptz, p_batch integer)
returns integer
language sql
security definer
set search_path = pg_catalog, public
as $$
    with doomed as (
        select j.id from public.jobs j
         where j.state in ('completed', 'dead', 'cancelled')
           and j.finished_at < greatest(p_completed, p_failed)
           and j.finished_at < case when j.state = 'completed' then p_completed else p_failed end
         limit p_batch
    ), gone as (
        delete from public.jobs j using doomed where j.id = doomed.id returning 1
    )
    select count(*)::integer from gone
$$;
revoke all on function prune_jobs(timestamptz, timestamptz, integer) from public;
grant execute on function prune_jobs(timestamptz, timestamptz, integer) to cybernetic_app;

-- Unfinished and dead jobs by queue and state, for the jobs gauge (finished ones are not counted:
-- they only grow until pruned). Available jobs not yet due count as scheduled.
create function job_counts()
returns table (count_queue text, count_state text, count_jobs bigint)
language sql stable
security definer
set search_path = pg_catalog, public
as $$
    select j.queue,
           case when j.state = 'available' and j.run_at > now() then 'scheduled' else j.state end,
           count(*)
      from public.jobs j
     where j.state in ('available', 'running', 'retrying', 'dead')
     group by 1, 2
$$;
revoke all on function job_counts() from public;
grant execute on function job_counts() to cybernetic_app;
