-- Per-tenant event positions: contiguous (1, 2, 3, ...) and committed in order.
--
-- Appending an event increments the tenant's row in event_heads; the row lock is held until the
-- appending transaction ends, so a tenant's appends are serialised for that final stretch and
-- positions become visible strictly in order, with no holes (an aborted append gives its
-- position back). A reader that has seen position p has therefore seen every event before it,
-- and a missing event is detected by counting. SSE ids and history cursors are positions.

-- The owner backfills existing rows; FORCE is lifted for the duration (it binds the owner too).
alter table events no force row level security;
alter table events add column position bigint;
update events e set position = r.n
  from (select id, row_number() over (partition by tenant_id order by id) as n from events) r
 where r.id = e.id;
alter table events alter column position set not null;
alter table events add constraint events_position_positive check (position > 0);
alter table events force row level security;

drop index events_tenant_position_idx;
create unique index events_tenant_position_key on events (tenant_id, position);

create table event_heads (
    tenant_id  uuid primary key references tenants (id) on delete cascade,
    position   bigint not null check (position > 0)
);
alter table event_heads enable row level security;
alter table event_heads force row level security;
create policy tenant_isolation on event_heads for all
    using (tenant_id = (select nullif(current_setting('app.tenant_id', true), ''))::uuid)
    with check (tenant_id = (select nullif(current_setting('app.tenant_id', true), ''))::uuid);

alter table event_heads no force row level security;
insert into event_heads (tenant_id, position)
select tenant_id, max(position) from events group by tenant_id;
alter table event_heads force row level security;

grant select, insert, update on event_heads to cybernetic_app;

-- Each server's event hub follows every tenant that has subscribers; this returns just their
-- head positions (nothing else crosses tenants), so a lost broker message is noticed within a
-- poll interval.
create policy event_heads_hub_lookup on event_heads for select to current_user using (true);

create function event_head_positions(p_tenants uuid[])
returns table (head_tenant_id uuid, head_position bigint)
language sql stable security definer
set search_path = pg_catalog, public
as $$
    select h.tenant_id, h.position from public.event_heads h where h.tenant_id = any(p_tenants)
$$;
revoke all on function event_head_positions(uuid[]) from public;
grant execute on function event_head_positions(uuid[]) to cybernetic_app;

-- Retention: deletes one batch of events older than the cutoff, across tenants, and returns how
-- many it deleted. Short statements (one batch each) keep locks brief; the caller loops.
create policy events_retention_select on events for select to current_user using (true);
create policy events_retention_delete on events for delete to current_user using (true);

create function prune_events(p_cutoff timestamptz, p_batch integer)
returns integer
language sql security definer
set search_path = pg_catalog, public
as $$
    with doomed as (
        select id from public.events where occurred_at < p_cutoff order by occurred_at limit p_batch
    ), gone as (
        delete from public.events e using doomed where e.id = doomed.id returning 1
    )
    select count(*)::integer from gone
$$;
revoke all on function prune_events(timestamptz, integer) from public;
grant execute on function prune_events(timestamptz, integer) to cybernetic_app;
