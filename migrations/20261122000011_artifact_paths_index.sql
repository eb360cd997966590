-- Storage reconciliation walks a tenant's artifact rows in byte order of storage_path, a page at
-- a time (`storage_path > $after collate "C"`), beside the backend's listing in the same order.
-- The unique index on storage_path uses the database's collation, which the planner cannot use
-- for a "C" range; this one serves it, so each page reads only its own rows.
create index artifacts_tenant_storage_path_c_idx
    on artifacts (tenant_id, storage_path collate "C");
