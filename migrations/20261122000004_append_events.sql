-- Appending events as one statement.
--
-- append_events sets the tenant for the statement's transaction (as db::tenant::begin does for an
-- explicit one) and appends the events as the tenant's next positions, under row-level security
-- as usual (invoker's rights: it can do nothing the app role cannot do itself). Inside an explicit
-- transaction it is one more statement; on its own it is a whole transaction, commit included, in
-- one round trip: what a batch of published events costs (src/events/batch.rs). The head row's
-- lock is then held for the statement and its commit only.
--
-- occurred_at is the moment the event entered the log, taken while the head row is locked and
-- never earlier than the tenant's previous event (event_heads.last_at), so it never decreases
-- along a tenant's positions. (The column default, now(), is the start of the appending
-- transaction: a transaction that started earlier but appended later got an older time than its
-- predecessor, and pruning by age could remove position p + 1 while keeping p.) The data comes back
-- as stored (jsonb's normal form, e.g. 1e2 as 100), so what live subscribers receive is
-- byte-for-byte what a replay from the log sends.

alter table event_heads add column last_at timestamptz not null default '-infinity';

create function append_events(p_tenant uuid, p_types text[], p_data jsonb[])
returns table (event_position bigint, event_occurred_at timestamptz, event_data jsonb)
language plpgsql
security invoker
set search_path = pg_catalog, public
as $$
declare
    v_count bigint := coalesce(cardinality(p_types), 0);
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
end
$$;
revoke all on function append_events(uuid, text[], jsonb[]) from public;
grant execute on function append_events(uuid, text[], jsonb[]) to cybernetic_app;
