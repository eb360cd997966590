-- Inbound webhooks: sources that other systems (n8n flows, CI, monitoring) sign their requests
-- for, the receipts that make an exact replay harmless, and the one lookup that happens before the
-- tenant is known.

-- A source belongs to one tenant; its id is the path of its URL (`/v1/webhooks/<id>`). `secret`
-- verifies signatures (HMAC-SHA256), so it is kept in clear like a notification channel's and
-- shown to the tenant only when created or rotated. After a rotation the previous secret keeps
-- verifying until `previous_secret_expires_at`.
create table webhook_sources (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    name text not null check (name ~ '^[a-z0-9_]{1,64}$'),
    target text not null default 'event' check (target in ('event', 'episode')),
    active boolean not null default true,
    secret text not null,
    previous_secret text,
    previous_secret_expires_at timestamptz,
    rotated_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (tenant_id, name),
    check ((previous_secret is null) = (previous_secret_expires_at is null))
);
create index webhook_sources_tenant_created_idx
    on webhook_sources (tenant_id, created_at desc, id desc);

-- One row per accepted request while its timestamp is inside the replay window: the SHA-256 of
-- its signature header, and what it produced (an event position or an episode id), so an exact
-- repeat answers with the original instead of storing anything again.
create table webhook_receipts (
    source_id uuid not null references webhook_sources (id) on delete cascade,
    signature_sha256 bytea not null check (octet_length(signature_sha256) = 32),
    tenant_id uuid not null references tenants (id) on delete cascade,
    event_position bigint,
    episode_id uuid,
    expires_at timestamptz not null,
    primary key (source_id, signature_sha256)
);
create index webhook_receipts_tenant_expires_idx on webhook_receipts (tenant_id, expires_at);

do $$
declare
    t text;
begin
    foreach t in array array['webhook_sources', 'webhook_receipts']
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

grant select, insert, update, delete on webhook_sources to cybernetic_app;
grant select, insert, update, delete on webhook_receipts to cybernetic_app;

-- The receiving route knows only the source id from the path: it finds the tenant, and what
-- verifying needs, through the function below and nothing else.
create policy webhook_sources_verification on webhook_sources for select to current_user using (true);

-- What verifying a request to source `p_source` needs. The previous secret is returned only while
-- its overlap lasts, so an expired one never leaves the database.
create function webhook_source_for_verification(p_source uuid)
returns table (source_id uuid, source_tenant_id uuid, source_name text, source_target text,
               source_active boolean, source_secret text, source_previous_secret text,
               source_previous_secret_expires_at timestamptz)
language sql stable
security definer
set search_path = pg_catalog, public
as $$
    select s.id, s.tenant_id, s.name, s.target, s.active, s.secret,
           case when s.previous_secret_expires_at > now() then s.previous_secret end,
           case when s.previous_secret_expires_at > now() then s.previous_secret_expires_at end
      from public.webhook_sources s
     where s.id = p_source
$$;
revoke all on function webhook_source_for_verification(uuid) from public;
grant execute on function webhook_source_for_verification(uuid) to cybernetic_app;
