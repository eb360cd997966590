-- Telegram: chats linked to tenants through one-time codes, their event subscriptions, the
-- per-chat command rate limit, and the record of messages the platform sends (replies and alerts),
-- which tenants query as delivery confirmations.
--
-- Updates arrive before anyone knows their tenant, so the intake enqueues each one as a platform
-- job keyed by its update_id (a redelivered update adds nothing, across every replica), and the
-- job finds the chat's tenant through the narrow security-definer functions below. Everything a
-- command reads or writes afterwards goes through the tenant's own transaction, under row-level
-- security as everywhere else.

-- One-time codes a tenant admin creates to link a chat: stored as SHA-256 of the code, single use.
create table telegram_link_codes (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    code_hash text not null unique,
    created_by uuid,
    expires_at timestamptz not null,
    used_at timestamptz,
    used_by_chat bigint,
    created_at timestamptz not null default now()
);
create index telegram_link_codes_tenant_idx on telegram_link_codes (tenant_id, created_at desc);

-- A chat belongs to one tenant at a time (chat_id is unique across tenants).
create table telegram_chats (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    chat_id bigint not null unique,
    chat_type text not null,
    title text,
    linked_by bigint,
    active boolean not null default true,
    deactivated_reason text,
    muted_until timestamptz,
    created_at timestamptz not null default now()
);
create index telegram_chats_tenant_idx on telegram_chats (tenant_id, created_at desc, id desc);

-- Topic patterns a chat follows (`policy.violated`, `episode.*`, `*`); matching events are pushed
-- to the chat as they are appended (trigger below).
create table telegram_subscriptions (
    tenant_id uuid not null references tenants (id) on delete cascade,
    chat_id bigint not null references telegram_chats (chat_id) on delete cascade,
    pattern text not null check (char_length(pattern) between 1 and 102),
    created_at timestamptz not null default now(),
    primary key (tenant_id, chat_id, pattern)
);

-- What the platform sent or is sending to a tenant's chats. message_ids holds the Telegram ids of
-- the parts delivered so far (a long message goes in several), so a retry resumes after them.
create table notifications (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    channel text not null check (channel in ('telegram')),
    chat_id bigint not null,
    purpose text not null check (purpose in ('reply', 'alert')),
    event_position bigint,
    event_type text,
    job_id uuid,
    status text not null default 'pending' check (status in ('pending', 'delivered', 'failed')),
    attempts integer not null default 0,
    message_ids bigint[] not null default '{}',
    last_error text,
    created_at timestamptz not null default now(),
    delivered_at timestamptz
);
create index notifications_tenant_created_idx on notifications (tenant_id, created_at desc, id desc);

do $$
declare
    t text;
begin
    foreach t in array array['telegram_link_codes', 'telegram_chats', 'telegram_subscriptions',
                             'notifications']
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

-- The owner (and so only the two lookup functions below) reads chats and codes across tenants.
create policy telegram_lookup on telegram_chats for select to current_user using (true);
create policy telegram_lookup on telegram_link_codes for select to current_user using (true);

grant select, insert, update on telegram_link_codes to cybernetic_app;
grant select, insert, update, delete on telegram_chats to cybernetic_app;
grant select, insert, delete on telegram_subscriptions to cybernetic_app;
grant select, insert, update on notifications to cybernetic_app;

-- The per-chat command limit (a generic cell rate: `tat` is when the chat's bucket is empty again).
-- Keyed by chat, before any tenant is known, and holding nothing of a tenant's: no row security.
create table telegram_chat_limits (
    chat_id bigint primary key,
    tat timestamptz not null,
    throttled boolean not null default false
);
grant select, insert, update, delete on telegram_chat_limits to cybernetic_app;

-- Takes one command from the chat's allowance: `p_interval` per command, at most `p_burst` at
-- once. Returns 'allowed'; 'throttled' the first time a chat goes over (it gets one notice); and
-- 'silent' while it stays over.
create function telegram_take_token(p_chat bigint, p_interval interval, p_burst integer)
returns text
language plpgsql
set search_path = pg_catalog, public
as $$
declare
    v_tat timestamptz;
    v_throttled boolean;
    v_next timestamptz;
begin
    insert into public.telegram_chat_limits (chat_id, tat) values (p_chat, now())
    on conflict (chat_id) do nothing;
    select l.tat, l.throttled into v_tat, v_throttled
      from public.telegram_chat_limits l where l.chat_id = p_chat for update;
    v_next := greatest(v_tat, now()) + p_interval;
    if v_next - now() <= p_interval * p_burst then
        update public.telegram_chat_limits set tat = v_next, throttled = false
         where chat_id = p_chat;
        return 'allowed';
    end if;
    if v_throttled then
        return 'silent';
    end if;
    update public.telegram_chat_limits set throttled = true where chat_id = p_chat;
    return 'throttled';
end
$$;
revoke all on function telegram_take_token(bigint, interval, integer) from public;
grant execute on function telegram_take_token(bigint, interval, integer) to cybernetic_app;

-- The tenant a chat is linked to (and whether it is active), for an update whose tenant is not
-- known yet.
create function telegram_chat_tenant(p_chat bigint)
returns table (tenant_id uuid, active boolean)
language sql
stable
security definer
set search_path = pg_catalog, public
as $$
    select c.tenant_id, c.active from public.telegram_chats c where c.chat_id = p_chat
$$;
revoke all on function telegram_chat_tenant(bigint) from public;
grant execute on function telegram_chat_tenant(bigint) to cybernetic_app;

-- The tenant a link code belongs to, if any; using it happens in that tenant's transaction.
create function telegram_link_code_tenant(p_code_hash text)
returns uuid
language sql
stable
security definer
set search_path = pg_catalog, public
as $$
    select c.tenant_id from public.telegram_link_codes c where c.code_hash = p_code_hash
$$;
revoke all on function telegram_link_code_tenant(text) from public;
grant execute on function telegram_link_code_tenant(text) to cybernetic_app;

-- Enqueues platform jobs (ones that belong to no tenant) of the kinds that need them, a batch in
-- one statement: updates whose chat is not known yet (the webhook intake gathers concurrent
-- updates into one call, so a burst costs one commit instead of one per update), and replies to
-- chats no tenant has linked. Each job's key makes a second enqueue a no-op (Telegram redelivers
-- updates). Returns a row per key: the job's id and whether this call created it.
-- It sends no NOTIFY: PostgreSQL serialises the commits of notifying transactions (fsync and
-- all), which would cap the intake at one commit at a time. The caller wakes the pools once the
-- batch is committed (src/db/waker.rs).
create function enqueue_platform_jobs(p_ids uuid[], p_kind text, p_queue text, p_args jsonb[],
                                      p_max_attempts integer, p_keys text[])
returns table (job_key text, job_id uuid, job_created boolean)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    v_created integer;
begin
    if p_kind not in ('telegram_update', 'notification') then
        raise exception 'kind % is not a platform kind', p_kind using errcode = '22023';
    end if;
    return query
        insert into public.jobs (id, tenant_id, kind, queue, args, max_attempts, idempotency_key)
        select i.id, null, p_kind, p_queue, i.args, p_max_attempts, i.key
          from unnest(p_ids, p_args, p_keys) as i(id, args, key)
        on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
        returning jobs.idempotency_key, jobs.id, true;
    get diagnostics v_created = row_count;
    if v_created = cardinality(p_keys) then
        return;
    end if;
    -- The keys that were taken already (a new snapshot: it sees what other transactions
    -- committed while the insert waited on them). Only looked up when there are some.
    return query
        select j.idempotency_key, j.id, false
          from public.jobs j
         where j.tenant_id is null and j.idempotency_key = any(p_keys) and j.id <> all(p_ids);
end
$$;
revoke all on function enqueue_platform_jobs(uuid[], text, text, jsonb[], integer, text[]) from public;
grant execute on function enqueue_platform_jobs(uuid[], text, text, jsonb[], integer, text[]) to cybernetic_app;

-- Alerts: every statement that appends events enqueues, in its own transaction, one notification
-- per (event, subscribed chat) whose pattern matches, skipping muted and inactive chats. Job
-- events of the notification kind itself are never pushed (an alert's own completion would
-- otherwise alert again). Runs as the appending role under the tenant's row security
-- (append_events sets the tenant); the key makes a repeat impossible.
create function telegram_alerts_enqueue()
returns trigger
language plpgsql
set search_path = pg_catalog, public
as $$
declare
    v_count integer;
begin
    with due as (
        select e.tenant_id, e.position, e.type, c.chat_id,
               gen_random_uuid() as notification_id, gen_random_uuid() as job_id
          from appended e
          join public.telegram_subscriptions s on s.tenant_id = e.tenant_id
          join public.telegram_chats c on c.chat_id = s.chat_id and c.tenant_id = s.tenant_id
         where c.active
           and (c.muted_until is null or c.muted_until <= now())
           and not (starts_with(e.type, 'job.')
                    and coalesce(e.data ->> 'kind', '') = 'notification')
           and (s.pattern = '*' or s.pattern = e.type
                or (right(s.pattern, 2) = '.*' and starts_with(e.type, left(s.pattern, -1))))
         group by e.tenant_id, e.position, e.type, c.chat_id
    ), recorded as (
        insert into public.notifications (id, tenant_id, channel, chat_id, purpose, event_position,
                                          event_type, job_id)
        select notification_id, tenant_id, 'telegram', chat_id, 'alert', position, type, job_id
          from due
    ), queued as (
        insert into public.jobs (id, tenant_id, kind, queue, args, max_attempts, idempotency_key)
        select job_id, tenant_id, 'notification', 'notifications',
               jsonb_build_object('notification_id', notification_id, 'chat_id', chat_id,
                                  'event_position', position),
               12, 'telegram:alert:' || chat_id || ':' || position
          from due
        on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
        returning 1
    )
    select count(*) into v_count from queued;
    if v_count > 0 then
        perform pg_notify('cybernetic_jobs', 'notifications');
    end if;
    return null;
end
$$;
create trigger telegram_alerts after insert on events
    referencing new table as appended
    for each statement execute function telegram_alerts_enqueue();
