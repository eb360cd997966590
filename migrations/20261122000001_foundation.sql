-- Foundation schema: tenants, API keys, VSM system states, episodes, policies, artifact metadata and
-- the event log. Runs as the owner role (cybernetic_owner); the server logs in as cybernetic_app,
-- which gets only the grants below. Every tenant-scoped table is isolated by row-level security on
-- the transaction-local setting app.tenant_id (see src/db/tenant.rs). The sub-select around
-- current_setting makes PostgreSQL evaluate it once per statement, not once per row.

-- Tenants are the platform's registry. A tenant transaction sees its own row; the platform scope
-- (app.scope = 'platform', set only by db::tenant::begin_platform) sees and creates all of them.
create table tenants (
    id          uuid primary key,
    name        text not null check (char_length(name) between 1 and 200),
    slug        text not null unique check (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    settings    jsonb not null default '{}'::jsonb check (jsonb_typeof(settings) = 'object'),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);
create index tenants_created_idx on tenants (created_at, id);

alter table tenants enable row level security;
alter table tenants force row level security;
create policy tenants_self on tenants for select
    using (id = (select nullif(current_setting('app.tenant_id', true), ''))::uuid);
create policy tenants_platform on tenants for all
    using ((select current_setting('app.scope', true)) = 'platform')
    with check ((select current_setting('app.scope', true)) = 'platform');

-- API keys: only the SHA-256 of the secret is stored; `prefix` is the non-secret head shown in
-- lists so people can tell keys apart.
create table api_keys (
    id            uuid primary key,
    tenant_id     uuid not null references tenants (id) on delete cascade,
    name          text not null check (char_length(name) between 1 and 200),
    role          text not null check (role in ('viewer', 'operator', 'admin')),
    prefix        text not null,
    secret_hash   bytea not null unique check (octet_length(secret_hash) = 32),
    created_at    timestamptz not null default now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
create index api_keys_tenant_created_idx on api_keys (tenant_id, created_at desc, id desc);

-- Append-only: the app role may insert and read, never update or delete.
create table system_states (
    id           uuid primary key,
    tenant_id    uuid not null references tenants (id) on delete cascade,
    system       smallint not null check (system between 1 and 5),
    version      bigint not null check (version > 0),
    state        jsonb not null check (jsonb_typeof(state) = 'object'),
    recorded_at  timestamptz not null default now(),
    unique (tenant_id, system, version)
);
create index system_states_recorded_idx on system_states (tenant_id, system, recorded_at desc);

create table episodes (
    id          uuid primary key,
    tenant_id   uuid not null references tenants (id) on delete cascade,
    title       text not null check (char_length(title) between 1 and 500),
    content     text not null,
    analysis    jsonb,
    created_at  timestamptz not null default now()
);
create index episodes_tenant_created_idx on episodes (tenant_id, created_at desc, id desc);

create table policies (
    id          uuid primary key,
    tenant_id   uuid not null references tenants (id) on delete cascade,
    name        text not null check (char_length(name) between 1 and 200),
    rules       jsonb not null check (jsonb_typeof(rules) = 'array'),
    active      boolean not null default true,
    version     integer not null default 1 check (version > 0),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    unique (tenant_id, name)
);
create index policies_tenant_created_idx on policies (tenant_id, created_at desc, id desc);

-- Artifact metadata; the bytes live in the storage backend.
create table artifacts (
    id            uuid primary key,
    tenant_id     uuid not null references tenants (id) on delete cascade,
    key           text not null check (octet_length(key) between 1 and 1024),
    content_type  text not null,
    size          bigint not null check (size >= 0),
    sha256        text not null check (sha256 ~ '^[0-9a-f]{64}$'),
    metadata      jsonb not null default '{}'::jsonb check (jsonb_typeof(metadata) = 'object'),
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    unique (tenant_id, key)
);

-- The event log. `id` is the event's position: SSE ids and history cursors are positions.
create table events (
    id           bigint generated always as identity primary key,
    tenant_id    uuid not null references tenants (id) on delete cascade,
    type         text not null check (type ~ '^[a-z0-9_]+(\.[a-z0-9_]+)*$' and char_length(type) <= 100),
    occurred_at  timestamptz not null default now(),
    data         jsonb not null
);
create index events_tenant_position_idx on events (tenant_id, id);
create index events_occurred_idx on events (occurred_at);

do $$
declare
    t text;
begin
    foreach t in array array['api_keys', 'system_states', 'episodes', 'policies', 'artifacts', 'events']
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

-- Authentication happens before the tenant is known. This narrow function runs as the owner,
-- returns only what auth needs, and records last use at most once a minute so a busy key does not
-- turn every request into a write. The two policies below let only the owner (and so only this
-- function) read and touch keys across tenants.
create policy api_keys_auth_lookup on api_keys for select to current_user using (true);
create policy api_keys_auth_touch on api_keys for update to current_user using (true) with check (true);

create function authenticate_api_key(p_secret_hash bytea)
returns table (key_id uuid, key_tenant_id uuid, key_role text)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    k record;
begin
    select a.id, a.tenant_id, a.role, a.last_used_at
      into k
      from public.api_keys a
     where a.secret_hash = p_secret_hash
       and a.revoked_at is null;
    if not found then
        return;
    end if;
    if k.last_used_at is null or k.last_used_at < now() - interval '60 seconds' then
        update public.api_keys a set last_used_at = now() where a.id = k.id;
    end if;
    key_id := k.id;
    key_tenant_id := k.tenant_id;
    key_role := k.role;
    return next;
end
$$;
revoke all on function authenticate_api_key(bytea) from public;
grant execute on function authenticate_api_key(bytea) to cybernetic_app;

grant usage on schema public to cybernetic_app;
grant select, insert, update on tenants to cybernetic_app;
grant select, insert, update on api_keys to cybernetic_app;
grant select, insert on system_states to cybernetic_app;
grant select, insert, update on episodes to cybernetic_app;
grant select, insert, update, delete on policies to cybernetic_app;
grant select, insert, update, delete on artifacts to cybernetic_app;
grant select, insert on events to cybernetic_app;
