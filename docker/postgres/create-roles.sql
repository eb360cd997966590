-- Creates (or brings up to date) the two database roles and the database, idempotently.
--   OWNER_PASSWORD=... APP_PASSWORD=... psql -v database=cybernetic -f create-roles.sql
-- The passwords are read from the environment (\getenv), so they never appear in a process list.
-- Run as a superuser. cybernetic_owner owns the schema and runs migrations; cybernetic_app is what
-- the server logs in as: no superuser, no BYPASSRLS, owns nothing, so row-level security binds it.
\set ON_ERROR_STOP on
\getenv owner_password OWNER_PASSWORD
\getenv app_password APP_PASSWORD

select 'create role cybernetic_owner login'
 where not exists (select from pg_roles where rolname = 'cybernetic_owner') \gexec
select 'create role cybernetic_app login'
 where not exists (select from pg_roles where rolname = 'cybernetic_app') \gexec

select format('alter role cybernetic_owner with login nosuperuser nobypassrls nocreaterole nocreatedb password %L',
              :'owner_password') \gexec
select format('alter role cybernetic_app with login nosuperuser nobypassrls nocreaterole nocreatedb noinherit password %L',
              :'app_password') \gexec

-- A runaway statement is cut after 30 s. Set on the role rather than per connection so it also
-- holds behind PgBouncer, which refuses per-connection startup options.
alter role cybernetic_app set statement_timeout = '30s';

select format('create database %I owner cybernetic_owner', :'database')
 where not exists (select from pg_database where datname = :'database') \gexec
