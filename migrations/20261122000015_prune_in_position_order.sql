-- Retention deletes each tenant's events oldest position first.
--
-- prune_events (migration 000003) took a batch "order by occurred_at limit n". Events appended
-- together share one occurred_at, so at a batch's edge it could delete any subset of them and
-- leave a hole in the middle of a tenant's log until the next batch. A stream catching up checks
-- the oldest retained position to see whether events after its cursor are gone; that check is
-- only sound when what is gone is always a prefix of the log. A tenant's occurred_at never
-- decreases with its position (append_events), so ordering ties by tenant and position makes
-- every batch delete a prefix of each tenant's log. The occurred_at index still drives the scan;
-- only ties are sorted.

create or replace function prune_events(p_cutoff timestamptz, p_batch integer)
returns integer
language sql security definer
set search_path = pg_catalog, public
as $$
    with doomed as (
        select id from public.events
         where occurred_at < p_cutoff
         order by occurred_at, tenant_id, position
         limit p_batch
    ), gone as (
        delete from public.events e using doomed where e.id = doomed.id returning 1
    )
    select count(*)::integer from gone
$$;
