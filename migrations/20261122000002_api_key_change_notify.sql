-- Every change that can end a key's validity (revocation, deletion, including the cascade from a
-- deleted tenant, or a changed role or secret) is announced on cybernetic_api_key_revoked with
-- the key's id, from the database itself, so no code path can forget it. Servers that cache key
-- lookups drop the key when the changing transaction commits (src/db/key_cache.rs).
create function notify_api_key_change() returns trigger
language plpgsql
set search_path = pg_catalog, public
as $$
begin
    if tg_op = 'DELETE' then
        perform pg_notify('cybernetic_api_key_revoked', old.id::text);
        return old;
    end if;
    if new.revoked_at is distinct from old.revoked_at
       or new.role is distinct from old.role
       or new.secret_hash is distinct from old.secret_hash
       or new.tenant_id is distinct from old.tenant_id then
        perform pg_notify('cybernetic_api_key_revoked', new.id::text);
    end if;
    return new;
end
$$;

create trigger api_keys_change_notify
    after update or delete on api_keys
    for each row execute function notify_api_key_change();
