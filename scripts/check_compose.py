#!/usr/bin/env python3
"""Static checks of the Compose deployment (run by scripts/check-compose.sh; see
docs/deployment.md#the-static-check).

1. Each Compose file is valid against the Compose specification's JSON schema
   (docker/compose-spec.json: compose-spec/compose-go v2.9.1 schema/compose-spec.json, the one
   built into Docker Compose v2.40.3) and has no obsolete `version:` key.
2. Docker Compose itself (`docker-compose config`, given with --compose) interpolates and merges
   the three combinations we ship: base, base+dev, base+prod. The merged result is validated
   against the schema again.
3. Our rules, on each merged result (one line per violation, then exit status 1):
   - only HAProxy publishes ports (80/443); with the dev overlay other ports may be published,
     but only on 127.0.0.1
   - every service has a health check, `restart: unless-stopped`, json-file logging with
     rotation, and CPU and memory limits; the one-shot services (ONE_SHOT) instead have
     `restart: "no"` and may switch the health check off, as a process that exits has nothing to
     probe
   - no secret is written inline: a variable whose name looks secret (PASSWORD, SECRET, TOKEN,
     KEY, ...) or that holds a credential-bearing URL has to be a *_FILE variable pointing at a
     /run/secrets/ file of a secret the service mounts; no value anywhere embeds user:password@
   - every top-level secret is a file under ./secrets/
   - the backend network is internal, HAProxy is on `edge` only, only HAProxy and the app are on
     `edge`, the data services are on `backend` only (plus `dev-ports` in dev)
   - app and worker wait for `migrate` to complete and stop within a grace period longer than
     SHUTDOWN_READINESS_DELAY + SHUTDOWN_TIMEOUT
   - images carry an explicit tag other than `latest`
   - prod: every long-running service has a read-only root filesystem
4. Every variable the Compose files interpolate is documented in .env.example, and the Dockerfile
   and .dockerignore keep the shape docs/deployment.md describes.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import jsonschema
import yaml

BASE = "docker-compose.yml"
DEV = "docker-compose.dev.yml"
PROD = "docker-compose.prod.yml"
COMBINATIONS = {
    "base": [BASE],
    "base+dev": [BASE, DEV],
    "base+prod": [BASE, PROD],
}

ONE_SHOT = {"migrate", "minio-init"}
DATA_SERVICES = {"postgres", "valkey", "rabbitmq", "minio"}
EDGE_MEMBERS = {"haproxy", "app"}
LOOPBACK = {"127.0.0.1", "::1"}
HAPROXY_PUBLIC_PORTS = {80, 443}

# Names that look like they hold a secret, and the app's secrets whose names do not say so.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASS\b|_PASS_|SECRET|TOKEN|KEY|CREDENTIAL", re.I)
SECRET_VARS = {
    "DATABASE_URL",
    "MIGRATION_DATABASE_URL",
    "DATABASE_REPLICA_URL",
    "AMQP_URL",
    "MINIO_ROOT_USER",
}
# scheme://user:password@ anywhere in a value.
URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")


class Report:
    def __init__(self):
        self.problems = []

    def fail(self, where, message):
        self.problems.append(f"[{where}] {message}")


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def schema_errors(schema, document):
    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        yield f"{path}: {error.message}"


def render(compose_bin, project, files, workdir):
    """Interpolated and merged configuration, as Docker Compose computes it. The operator's own
    .env and environment are left out so the result depends on the repository only."""
    empty_env = os.path.join(workdir, "empty.env")
    open(empty_env, "w").close()
    args = [compose_bin, "--project-directory", project, "--env-file", empty_env]
    for f in files:
        args += ["-f", os.path.join(project, f)]
    args += ["config", "--format", "json"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir}
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None, result.stderr.strip() or result.stdout.strip()
    return json.loads(result.stdout), None


GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def seconds(text):
    """Seconds in a duration such as 45s, 1m30s, 5s or 1h 30m; None when it is not one."""
    text = str(text).replace(" ", "")
    if not text or GO_DURATION.sub("", text):
        return None
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in GO_DURATION.findall(text))


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


def check_ports(r, combo, name, svc):
    for port in svc.get("ports") or []:
        target = int(port.get("target", 0))
        host_ip = port.get("host_ip") or ""
        published = port.get("published", "")
        label = f"{host_ip or '*'}:{published}->{target}"
        if name == "haproxy" and target in HAPROXY_PUBLIC_PORTS:
            continue
        if combo == "base+dev":
            if host_ip not in LOOPBACK:
                r.fail(combo, f"service {name}: port {label} must be bound to 127.0.0.1 in the dev overlay")
        elif name == "haproxy":
            r.fail(combo, f"service haproxy: only ports 80 and 443 may be published, not {label}")
        else:
            r.fail(combo, f"service {name}: publishes port {label}; only haproxy publishes ports")


def check_service_basics(r, combo, name, svc):
    one_shot = name in ONE_SHOT
    hc = svc.get("healthcheck")
    if not hc:
        r.fail(combo, f"service {name}: no healthcheck")
    elif hc.get("disable"):
        if not one_shot:
            r.fail(combo, f"service {name}: healthcheck disabled (allowed only for one-shot services {sorted(ONE_SHOT)})")
    elif not hc.get("test") or hc.get("test") == ["NONE"]:
        r.fail(combo, f"service {name}: healthcheck has no test")

    restart = svc.get("restart")
    wanted = "no" if one_shot else "unless-stopped"
    if restart != wanted:
        r.fail(combo, f"service {name}: restart is {restart!r}, expected {wanted!r}")

    logging = svc.get("logging") or {}
    options = logging.get("options") or {}
    if logging.get("driver") != "json-file" or not options.get("max-size") or not options.get("max-file"):
        r.fail(combo, f"service {name}: logging must be json-file with max-size and max-file")

    limits = ((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}
    for key in ("cpus", "memory"):
        if not limits.get(key):
            r.fail(combo, f"service {name}: deploy.resources.limits.{key} is not set")

    if svc.get("network_mode"):
        r.fail(combo, f"service {name}: network_mode {svc['network_mode']!r} bypasses the stack's networks")
    if svc.get("privileged"):
        r.fail(combo, f"service {name}: privileged")

    image = svc.get("image") or ""
    last = image.rsplit("/", 1)[-1]
    if not image or ":" not in last or last.endswith(":latest"):
        r.fail(combo, f"service {name}: image {image!r} needs an explicit tag other than latest")


def check_secrets_use(r, combo, name, svc):
    mounted = set()
    for s in svc.get("secrets") or []:
        target = s.get("target") or s.get("source") or ""
        mounted.add(target if target.startswith("/") else "/run/secrets/" + target)
    environment = svc.get("environment") or {}
    for var, value in environment.items():
        value = "" if value is None else str(value)
        base = var[: -len("_FILE")] if var.endswith("_FILE") else var
        secret_like = bool(SECRET_NAME.search(base)) or base in SECRET_VARS
        if var.endswith("_FILE") and (secret_like or value.startswith("/run/secrets/")):
            if value == "":
                continue  # unset on purpose (an empty value counts as not set)
            if not value.startswith("/run/secrets/"):
                r.fail(combo, f"service {name}: {var} must point at /run/secrets/<name>, not {value!r}")
                continue
            if value not in mounted:
                r.fail(combo, f"service {name}: {var} names {value}, a secret the service does not mount")
        elif secret_like and value != "":
            r.fail(combo, f"service {name}: {var} has an inline value; use {var}_FILE=/run/secrets/<name> and a Compose secret")
    for text in strings_in({k: v for k, v in svc.items() if k != "secrets"}):
        found = URL_CREDENTIALS.search(text)
        if found:
            shown = found.group(0).rsplit(":", 1)[0]  # scheme://user, never the password
            r.fail(combo, f"service {name}: a value embeds credentials ({shown}:…@)")


def check_networks(r, combo, name, svc):
    networks = set((svc.get("networks") or {}).keys())
    if not networks:
        r.fail(combo, f"service {name}: attached to no network of the stack (default network)")
    if name == "haproxy" and networks != {"edge"}:
        r.fail(combo, f"service haproxy: must be on network edge only, is on {sorted(networks)}")
    if "edge" in networks and name not in EDGE_MEMBERS:
        r.fail(combo, f"service {name}: on network edge, which is for {sorted(EDGE_MEMBERS)} only")
    if name in DATA_SERVICES:
        allowed = {"backend", "dev-ports"} if combo == "base+dev" else {"backend"}
        if not networks <= allowed:
            r.fail(combo, f"service {name}: data services belong on backend only, is on {sorted(networks)}")
    if "dev-ports" in networks and combo != "base+dev":
        r.fail(combo, f"service {name}: network dev-ports outside the dev overlay")


def check_drain(r, combo, name, svc):
    env = svc.get("environment") or {}
    grace = seconds(svc.get("stop_grace_period") or "10s")
    delay = seconds(env.get("SHUTDOWN_READINESS_DELAY") or "0s")
    timeout = seconds(env.get("SHUTDOWN_TIMEOUT") or "25s")
    if None in (grace, delay, timeout):
        r.fail(combo, f"service {name}: cannot read stop_grace_period/SHUTDOWN_* durations")
    elif grace <= delay + timeout:
        r.fail(combo, f"service {name}: stop_grace_period {grace:g}s must exceed SHUTDOWN_READINESS_DELAY + SHUTDOWN_TIMEOUT ({delay + timeout:g}s)")
    depends = svc.get("depends_on") or {}
    if (depends.get("migrate") or {}).get("condition") != "service_completed_successfully":
        r.fail(combo, f"service {name}: must depend on migrate with condition service_completed_successfully")


def check_merged(r, combo, config, project):
    services = config.get("services") or {}
    for required in ("haproxy", "app", "worker", "migrate", "postgres", "valkey", "rabbitmq", "minio", "minio-init", "prometheus"):
        if required not in services:
            r.fail(combo, f"service {required} is missing")
    for name, svc in sorted(services.items()):
        check_ports(r, combo, name, svc)
        check_service_basics(r, combo, name, svc)
        check_secrets_use(r, combo, name, svc)
        check_networks(r, combo, name, svc)
        if combo == "base+prod" and name not in ONE_SHOT and svc.get("read_only") is not True:
            r.fail(combo, f"service {name}: read_only must be true in prod")
    for name in ("app", "worker"):
        if name in services:
            check_drain(r, combo, name, services[name])
    app = services.get("app") or {}
    replicas = (app.get("deploy") or {}).get("replicas")
    if replicas is not None and int(replicas) < 2:
        r.fail(combo, f"service app: {replicas} replica(s); at least 2 behind HAProxy")

    networks = config.get("networks") or {}
    if (networks.get("backend") or {}).get("internal") is not True:
        r.fail(combo, "network backend must be internal: true")

    secrets_dir = os.path.realpath(os.path.join(project, "secrets"))
    for name, secret in sorted((config.get("secrets") or {}).items()):
        path = secret.get("file")
        if not path:
            r.fail(combo, f"secret {name}: must be a file under ./secrets/ (not environment, content or external)")
            continue
        real = os.path.realpath(os.path.join(project, path))
        if os.path.dirname(real) != secrets_dir:
            r.fail(combo, f"secret {name}: file {path} is not directly under ./secrets/")


def check_source_file(r, schema, project, filename):
    path = os.path.join(project, filename)
    try:
        document = load_yaml(path)
    except (OSError, yaml.YAMLError) as e:
        r.fail(filename, f"cannot read: {e}")
        return set()
    if not isinstance(document, dict):
        r.fail(filename, "not a mapping")
        return set()
    if "version" in document:
        r.fail(filename, "has a `version:` key; the Compose specification has none")
    for message in schema_errors(schema, document):
        r.fail(filename, f"schema: {message}")
    with open(path, encoding="utf-8") as f:
        return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", f.read()))


def check_env_example(r, project, used):
    path = os.path.join(project, ".env.example")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        r.fail(".env.example", f"cannot read: {e}")
        return
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    for var in sorted(used - documented):
        r.fail(".env.example", f"{var} is used by the Compose files but not documented")
    for var in sorted(documented - used):
        r.fail(".env.example", f"{var} is documented but no Compose file uses it")
    for line in text.splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m and SECRET_NAME.search(m.group(1)) and not m.group(1).endswith("_FILE") and m.group(2).strip():
            r.fail(".env.example", f"{m.group(1)} looks like a secret with a value")
        if URL_CREDENTIALS.search(line):
            r.fail(".env.example", "a line embeds credentials (user:password@)")


def check_dockerfile(r, project):
    try:
        with open(os.path.join(project, "Dockerfile"), encoding="utf-8") as f:
            text = f.read()
        with open(os.path.join(project, ".dockerignore"), encoding="utf-8") as f:
            ignore = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    except OSError as e:
        r.fail("Dockerfile", f"cannot read: {e}")
        return
    wanted = {
        "a rust:1.95-bookworm build stage": r"rust:1\.95-bookworm",
        "a debian:bookworm-slim runtime": r"debian:bookworm-slim",
        "SQLX_OFFLINE=true": r"SQLX_OFFLINE=true",
        "cargo build --release --locked --bin cybernetic": r"cargo build --release --locked --bin cybernetic",
        "a numeric non-root USER": r"(?m)^USER\s+[1-9][0-9]*(:[0-9]+)?\s*$",
        "EXPOSE 8080": r"(?m)^EXPOSE\s+8080\s*$",
        'HEALTHCHECK ... CMD ["cybernetic", "healthcheck"]': r'CMD \["cybernetic", "healthcheck"\]',
        'ENTRYPOINT ["cybernetic"]': r'(?m)^ENTRYPOINT \["cybernetic"\]\s*$',
        'CMD ["serve"]': r'(?m)^CMD \["serve"\]\s*$',
    }
    for what, pattern in wanted.items():
        if not re.search(pattern, text):
            r.fail("Dockerfile", f"missing {what}")
    for entry in ("target/", ".git/", "secrets/", "data/"):
        if entry not in ignore:
            r.fail(".dockerignore", f"does not exclude {entry}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compose", required=True, help="the docker-compose (v2) binary")
    parser.add_argument("--project", default=os.getcwd(), help="directory holding the Compose files")
    parser.add_argument("--schema", help="Compose JSON schema (default: PROJECT/docker/compose-spec.json)")
    args = parser.parse_args()
    project = os.path.realpath(args.project)
    schema = load_yaml(args.schema or os.path.join(project, "docker", "compose-spec.json"))

    r = Report()
    used = set()
    for filename in (BASE, DEV, PROD):
        used |= check_source_file(r, schema, project, filename)
    check_env_example(r, project, used)
    check_dockerfile(r, project)

    with tempfile.TemporaryDirectory() as workdir:
        for combo, files in COMBINATIONS.items():
            config, error = render(args.compose, project, files, workdir)
            if error:
                r.fail(combo, f"docker compose config failed:\n{error}")
                continue
            for message in schema_errors(schema, config):
                r.fail(combo, f"merged configuration, schema: {message}")
            check_merged(r, combo, config, project)

    if r.problems:
        print(f"check-compose: {len(r.problems)} problem(s) in {project}:", file=sys.stderr)
        for problem in r.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
