-- Artifacts: the metadata rows of the objects tenants store (migration 000001 made the table).
--
-- Each upload is written to its own storage path (tenants/<tenant>/<upload id>), never over
-- another object, and the row is pointed at it only once the bytes are stored. So a row always
-- names a complete object: replacing an artifact moves the row to the new upload and deletes the
-- old one after the commit; deleting one removes the row first and the bytes after. What a crash
-- between the two steps leaves is an object no row names, which reconciliation removes.

alter table artifacts add column storage_path text;
update artifacts set storage_path = 'tenants/' || tenant_id || '/' || key where storage_path is null;
alter table artifacts alter column storage_path set not null;
alter table artifacts add constraint artifacts_storage_path_key unique (storage_path);
alter table artifacts
    add column tags jsonb not null default '{}'::jsonb check (jsonb_typeof(tags) = 'object'),
    -- set by the artifact_processing job: when it re-read the bytes and found the stored
    -- checksum right, and the content type the bytes themselves show
    add column checksum_verified_at timestamptz,
    add column detected_content_type text;
