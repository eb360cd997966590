-- What the platform's own jobs write: policy violations, notification channels and reflections,
-- each isolated per tenant by row-level security like every tenant table; and how the cron
-- scheduler enqueues a tick's job for every tenant at once.

-- A violation is opened when a rule of an active policy holds against the latest state of its
-- system and resolved when it stops holding (or its policy stops asking for it). At most one is
-- open per policy rule, so a violation that persists is alerted once.
create table policy_violations (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    -- null once the policy is deleted; the next evaluation then resolves the violation
    policy_id uuid references policies (id) on delete set null,
    policy_name text not null,
    policy_version integer not null,
    rule_index integer not null check (rule_index >= 0),
    rule jsonb not null check (jsonb_typeof(rule) = 'object'),
    system smallint not null check (system between 1 and 5),
    severity text not null check (severity in ('info', 'warning', 'critical')),
    -- the value at the rule's path that opened it (null when absent) and the state's version
    value jsonb,
    state_version bigint,
    opened_at timestamptz not null default now(),
    resolved_at timestamptz,
    resolved_value jsonb,
    resolved_state_version bigint
);
create unique index policy_violations_open_idx on policy_violations (tenant_id, policy_id, rule_index)
    where resolved_at is null;
create index policy_violations_tenant_idx on policy_violations (tenant_id, opened_at desc, id desc);

-- Where a tenant's alerts go. A webhook's `secret` signs each delivery (HMAC-SHA256); it is kept
-- because signing needs it, and shown to the tenant only when the channel is created.
create table notification_channels (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    name text not null check (char_length(name) between 1 and 200),
    kind text not null check (kind in ('webhook', 'telegram')),
    config jsonb not null check (jsonb_typeof(config) = 'object'),
    secret text,
    min_severity text not null default 'info' check (min_severity in ('info', 'warning', 'critical')),
    active boolean not null default true,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (tenant_id, name)
);
create index notification_channels_tenant_created_idx
    on notification_channels (tenant_id, created_at desc, id desc);

-- Daily reflections and weekly reviews: a summary of one period of a tenant's activity.
create table reflections (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    kind text not null check (kind in ('daily', 'weekly')),
    period_start timestamptz not null,
    period_end timestamptz not null check (period_end > period_start),
    timezone text not null,
    summary jsonb not null check (jsonb_typeof(summary) = 'object'),
    created_at timestamptz not null default now(),
    unique (tenant_id, kind, period_start)
);
create index reflections_tenant_created_idx on reflections (tenant_id, created_at desc, id desc);

do $$
declare
    t text;
begin
    foreach t in array array['policy_violations', 'notification_channels', 'reflections']
    loop
        execute format('alter table %I enable row level security', t);
        execute format('alter table %I force row level security', t);
        execute format(
            'create policy tenant_isolation on %I for all '
            'using (tenant_id = (select nullif(current_setting(''app.tenant_id'', true), ''''))::uuid) '
            'with check (tenant_id = (select nullif(current_setting(''app.tenant_id'', true), ''''))::uuid)',
            t);
    end loop;
end
$$;

grant select, insert, update on policy_violations to cybernetic_app;
grant select, insert, update, delete on notification_channels to cybernetic_app;
grant select, insert on reflections to cybernetic_app;

-- The scheduler reads the tenant registry across tenants only through the function below.
create policy tenants_scheduler on tenants for select to current_user using (true);

-- Enqueues one cron tick's job for every tenant (p_timezone null) or for the tenants whose
-- settings name that timezone (tenants without one count as UTC). The key is the tick's, so a
-- tick enqueued again, by another replica or after a restart, adds nothing: each tenant gets one
-- job per tick. Returns how many jobs this call created.
create function enqueue_tick_jobs(p_kind text, p_queue text, p_args jsonb, p_max_attempts integer,
                                  p_key text, p_timezone text)
returns integer
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    v_created integer;
begin
    insert into public.jobs (id, tenant_id, kind, queue, args, max_attempts, idempotency_key)
    select gen_random_uuid(), t.id, p_kind, p_queue, p_args, p_max_attempts, p_key
      from public.tenants t
     where p_timezone is null
        or coalesce(nullif(t.settings ->> 'timezone', ''), 'UTC') = p_timezone
    on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing;
    get diagnostics v_created = row_count;
    if v_created > 0 then
        perform pg_notify('cybernetic_jobs', p_queue);
    end if;
    return v_created;
end
$$;
revoke all on function enqueue_tick_jobs(text, text, jsonb, integer, text, text) from public;
grant execute on function enqueue_tick_jobs(text, text, jsonb, integer, text, text) to cybernetic_app;

-- The timezones tenants' settings name, for the scheduler (UTC for tenants without one).
create function tenant_timezones()
returns setof text
language sql stable
security definer
set search_path = pg_catalog, public
as $$
    select distinct coalesce(nullif(t.settings ->> 'timezone', ''), 'UTC') from public.tenants t
$$;
revoke all on function tenant_timezones() from public;
grant execute on function tenant_timezones() to cybernetic_app;

-- A pool claims only the kinds it runs: during a rolling upgrade an older worker leaves a kind it
-- does not know to the workers that do, instead of failing its attempts.
drop function claim_jobs(text, integer, text, interval);
create function claim_jobs(p_queue text, p_kinds text[], p_limit integer, p_worker text,
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
      from picked
     where j.id = picked.id
    returning j.id, j.tenant_id, j.kind, j.args, j.priority, j.attempts, j.max_attempts, j.run_at, now()
$$;
revoke all on function claim_jobs(text, text[], integer, text, interval) from public;
grant execute on function claim_jobs(text, text[], integer, text, interval) to cybernetic_app;

-- Enqueues one job of one tenant in a statement of its own, for a job that belongs to no other
-- write: run outside a transaction, it commits by itself, so an enqueue is one round trip instead
-- of three (begin with the tenant, insert, commit). Not a security definer: the insert runs as the
-- caller under the tenant's row-level security, exactly as in a tenant transaction, and the tenant
-- setting is put back before the function returns.
create function enqueue_job(p_tenant uuid, p_id uuid, p_kind text, p_queue text, p_priority smallint,
                            p_args jsonb, p_max_attempts integer, p_run_at timestamptz, p_key text)
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
    if found then
        perform pg_notify('cybernetic_jobs', p_queue) where coalesce(p_run_at, now()) <= now();
    else
        return query
            select j.id, false from public.jobs j
             where j.tenant_id = p_tenant and j.idempotency_key = p_key;
    end if;
    perform set_config('app.tenant_id', coalesce(v_previous, ''), true);
end
$$;
revoke all on function enqueue_job(uuid, uuid, text, text, smallint, jsonb, integer, timestamptz, text) from public;
grant execute on function enqueue_job(uuid, uuid, text, text, smallint, jsonb, integer, timestamptz, text) to cybernetic_app;

-- finish_jobs again, with the events built from the rows the update returns instead of reading
-- the finished jobs a second time: the finish of a batch is one pass over its rows. Same
-- arguments, same result, same locking (tenants appended in id order).
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
         where j.id = o.id and j.state = 'running' and j.locked_by = p_worker
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
