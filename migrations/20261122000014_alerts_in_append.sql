-- Telegram alerts enqueued by append_events instead of a statement trigger.
--
-- Migration 000008 enqueued alerts from an AFTER INSERT statement trigger on events with a
-- transition table. Every append paid for it (the queued trigger, the transition table, the alert
-- query planned and run) whether or not the tenant had any chat subscribed: about 0.2 ms of a
-- paced publish's 1.2-1.5 ms commit. append_events is the only writer of events, so it now runs
-- the same enqueue itself, in the same transaction, and only when the tenant has a subscription.
-- What is enqueued, and when, is unchanged.

drop trigger telegram_alerts on events;
drop function telegram_alerts_enqueue();

-- One notification per (event, subscribed chat) whose pattern matches, for the tenant's events at
-- positions p_first..p_last, skipping muted and inactive chats. Job events of the notification
-- kind itself are never pushed (an alert's own completion would otherwise alert again). Runs as
-- the appending role under the tenant's row security (append_events sets the tenant). The job's
-- key makes a repeat impossible: an event already alerted to a chat gets neither a second job nor
-- a second notifications row. (Unlike the trigger, whose notifications insert did not depend on
-- the job's, this function can be called directly.)
create function telegram_alerts_enqueue(p_tenant uuid, p_first bigint, p_last bigint)
returns void
language plpgsql
security invoker
set search_path = pg_catalog, public
as $$
declare
    v_count integer;
begin
    with due as (
        select e.tenant_id, e.position, e.type, c.chat_id,
               gen_random_uuid() as notification_id, gen_random_uuid() as job_id
          from public.events e
          join public.telegram_subscriptions s on s.tenant_id = e.tenant_id
          join public.telegram_chats c on c.chat_id = s.chat_id and c.tenant_id = s.tenant_id
         where e.tenant_id = p_tenant
           and e.position between p_first and p_last
           and c.active
           and (c.muted_until is null or c.muted_until <= now())
           and not (starts_with(e.type, 'job.')
                    and coalesce(e.data ->> 'kind', '') = 'notification')
           and (s.pattern = '*' or s.pattern = e.type
                or (right(s.pattern, 2) = '.*' and starts_with(e.type, left(s.pattern, -1))))
         group by e.tenant_id, e.position, e.type, c.chat_id
    ), queued as (
        insert into public.jobs (id, tenant_id, kind, queue, args, max_attempts, idempotency_key)
        select job_id, tenant_id, 'notification', 'notifications',
               jsonb_build_object('notification_id', notification_id, 'chat_id', chat_id,
                                  'event_position', position),
               12, 'telegram:alert:' || chat_id || ':' || position
          from due
        on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
        returning id
    ), recorded as (
        -- Only for the jobs inserted now: a repeated call records nothing twice.
        insert into public.notifications (id, tenant_id, channel, chat_id, purpose, event_position,
                                          event_type, job_id)
        select d.notification_id, d.tenant_id, 'telegram', d.chat_id, 'alert', d.position, d.type,
               d.job_id
          from due d
          join queued q on q.id = d.job_id
        returning 1
    )
    select count(*) into v_count from recorded;
    if v_count > 0 then
        perform pg_notify('cybernetic_jobs', 'notifications');
    end if;
end
$$;
revoke all on function telegram_alerts_enqueue(uuid, bigint, bigint) from public;
grant execute on function telegram_alerts_enqueue(uuid, bigint, bigint) to cybernetic_app;

create or replace function append_events(p_tenant uuid, p_types text[], p_data jsonb[])
returns table (event_position bigint, event_occurred_at timestamptz, event_data jsonb)
language plpgsql
security invoker
set search_path = pg_catalog, public
as $$
declare
    v_count bigint := coalesce(cardinality(p_types), 0);
    v_head bigint;
begin
    if v_count = 0 or v_count <> coalesce(cardinality(p_data), 0) then
        raise exception 'append_events needs as many data as types (got % and %)',
            cardinality(p_types), cardinality(p_data)
            using errcode = '22023';
    end if;
    perform set_config('app.tenant_id', p_tenant::text, true);
    return query
        with head as (
            insert into public.event_heads as h (tenant_id, position, last_at)
            values (p_tenant, v_count, clock_timestamp())
            on conflict (tenant_id) do update
                set position = h.position + v_count,
                    last_at = greatest(clock_timestamp(), h.last_at)
            returning h.position, h.last_at
        )
        insert into public.events as e (tenant_id, position, type, data, occurred_at)
        select p_tenant, head.position - v_count + item.ord, item.type, item.data, head.last_at
          from head, unnest(p_types, p_data) with ordinality as item(type, data, ord)
        returning e.position, e.occurred_at, e.data;
    -- The events just appended end at the head, whose row this transaction holds locked.
    if exists (select from public.telegram_subscriptions s where s.tenant_id = p_tenant) then
        select h.position into v_head from public.event_heads h where h.tenant_id = p_tenant;
        perform public.telegram_alerts_enqueue(p_tenant, v_head - v_count + 1, v_head);
    end if;
end
$$;
