-- The pool's batch statements, claim_jobs and finish_jobs (migration 000006) and rescue_jobs
-- (000005), with their rows found by primary key whatever the table's statistics say, and the
-- jobs table's name checks without regular expressions. Same arguments, same results, same
-- locking.
--
-- claim_jobs joined the rows it picked back to `jobs` on id; estimating a tenth of the due jobs
-- picked, the planner hashed the picked ids and scanned the whole table for them: every claim
-- cost a sequential scan of every job kept (completed ones included, up to JOB_RETENTION). The
-- update now takes the picked ids as an array, which only the primary key answers. rescue_jobs
-- had the same join and gets the same change.
--
-- finish_jobs joined the outcomes to `jobs` on id and also asked for `state = 'running'`, which
-- the partial lease index (state = 'running') answers; with statistics taken while few jobs were
-- running, the planner walked that index and compared every running job with every outcome (a
-- nested loop with a join filter): 500 outcomes against 500 running jobs took 100 ms, quadratic
-- in the batch. The state and worker are now checked on the row found by id, in a form no index
-- answers, so each outcome is one primary-key lookup (500 in about 12 ms).
--
-- extend_job_leases (the heartbeat) and finish_jobs both lock a worker's running jobs, and in
-- different orders they could wait for each other (PostgreSQL then aborts one after its deadlock
-- timeout: a second's stall, or a missed lease renewal). The heartbeat now locks its jobs in id
-- order, the order in which the pool hands finish_jobs its outcomes (src/jobs/pool.rs).
--
-- PostgreSQL checks every CHECK constraint of a row on each update, and the regular expressions
-- on kind and queue were a fifth of what an update of a job cost. The same rule (1 to 64
-- characters, each a lowercase ASCII letter, a digit or `_`) is now checked by trimming those
-- characters away. Adding the checks reads the jobs table once, under this migration's lock.

alter table jobs drop constraint jobs_kind_check, drop constraint jobs_queue_check;
alter table jobs
    add constraint jobs_kind_check check (
        char_length(kind) between 1 and 64
        and ltrim(kind, 'abcdefghijklmnopqrstuvwxyz0123456789_') = ''),
    add constraint jobs_queue_check check (
        char_length(queue) between 1 and 64
        and ltrim(queue, 'abcdefghijklmnopqrstuvwxyz0123456789_') = '');

create or replace function claim_jobs(p_queue text, p_kinds text[], p_limit integer, p_worker text,
                           p_lease interval)
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
           and j.kind = any(p_kinds)
         order by j.priority desc, j.run_at, j.id
         limit p_limit
           for update skip locked
    )
    update public.jobs j
       set state = 'running', attempts = j.attempts + 1, locked_by = p_worker,
           locked_until = now() + p_lease, started_at = now()
     -- By primary key: see above.
     where j.id = any(array(select picked.id from picked))
    returning j.id, j.tenant_id, j.kind, j.args, j.priority, j.attempts, j.max_attempts, j.run_at, now()
$$;

create or replace function finish_jobs(p_worker text, p_ids uuid[], p_states text[], p_results jsonb[],
                                       p_errors text[], p_retry_at timestamptz[])
returns table (out_tenant_id uuid, out_position bigint, out_type text,
               out_occurred_at timestamptz, out_data jsonb)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    v_tenants uuid[];
    v_types text[];
    v_data jsonb[];
    v_count integer;
    v_from integer := 1;
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
         where j.id = o.id
           -- Not `j.state = 'running' and ...`: see above.
           and case when j.state = 'running' then j.locked_by = p_worker else false end
        returning j.id, j.tenant_id, j.kind, j.queue, j.state, j.attempts, j.max_attempts, j.run_at,
                  j.last_error
    )
    select array_agg(d.tenant_id order by d.tenant_id, d.id),
           array_agg(case d.state
                         when 'completed' then 'job.completed'
                         when 'retrying' then 'job.retrying'
                         when 'dead' then 'job.failed'
                         else 'job.' || d.state
                     end order by d.tenant_id, d.id),
           array_agg(jsonb_strip_nulls(jsonb_build_object(
               'job_id', d.id, 'kind', d.kind, 'queue', d.queue, 'state', d.state,
               'attempts', d.attempts, 'max_attempts', d.max_attempts,
               'retry_at', case when d.state = 'retrying' then d.run_at end,
               'error', case when d.state in ('retrying', 'dead') then d.last_error end
           )) order by d.tenant_id, d.id)
      into v_tenants, v_types, v_data
      from done d
     where d.tenant_id is not null;
    v_count := coalesce(cardinality(v_tenants), 0);
    for i in 1 .. v_count loop
        -- One append per tenant: the rows from v_from to i are that tenant's.
        if i = v_count or v_tenants[i + 1] <> v_tenants[i] then
            return query
                with appended as (
                    select a.event_position, a.event_occurred_at, a.event_data
                      from public.append_events(v_tenants[i], v_types[v_from:i], v_data[v_from:i]) a
                )
                select v_tenants[i], x.event_position,
                       v_types[v_from + (x.event_position - (select min(y.event_position) from appended y))::integer],
                       x.event_occurred_at, x.event_data
                  from appended x;
            v_from := i + 1;
        end if;
    end loop;
end
$$;

create or replace function rescue_jobs(p_limit integer)
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
         -- By primary key, as in claim_jobs.
         where j.id = any(array(select lost.id from lost))
        returning j.id
    )
    select array_agg(rescued.id) into v_ids from rescued;
    if v_ids is not null then
        return query select * from append_job_events(v_ids);
    end if;
end
$$;

create or replace function extend_job_leases(p_worker text, p_ids uuid[], p_lease interval)
returns setof uuid
language sql
security definer
set search_path = pg_catalog, public
as $$
    with held as (
        select j.id from public.jobs j
         where j.id = any(p_ids) and j.state = 'running' and j.locked_by = p_worker
         order by j.id
           for update
    )
    update public.jobs j set locked_until = now() + p_lease
     -- By primary key, as in claim_jobs; the rows are already locked, in id order.
     where j.id = any(array(select held.id from held))
    returning j.id
$$;
