"""End-to-end checks of the local stack through real HAProxy (run by scripts/test-e2e.sh).

1. A tenant and an API key are created through HAProxy over TLS.
2. An SSE client connected through HAProxy receives events written directly to either replica.
3. The replica holding the stream is killed (SIGKILL) while events keep being written to the
   other: the client reconnects through HAProxy with Last-Event-ID and misses nothing, and HAProxy
   marks the dead replica down within 10 s.
4. (after the replica is back) a replica is drained with SIGTERM under a steady load through
   HAProxy: no request fails.

Arguments: the stack's directory (pids, admin token), HAProxy's HTTPS and stats ports, the two
replicas' ports. Exits 1 with a message on the first failed check.
"""

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

STACK_DIR, HTTPS_PORT, STATS_PORT, APP1_PORT, APP2_PORT = sys.argv[1:6]
TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


def fail(message):
    print(f"e2e: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def request(method, path, token, body=None, port=None, timeout=10):
    """One request through HAProxy (TLS), or straight to a replica's port when given."""
    if port is None:
        conn = http.client.HTTPSConnection("127.0.0.1", int(HTTPS_PORT), context=TLS, timeout=timeout)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        res = conn.getresponse()
        payload = res.read()
        return res.status, (json.loads(payload) if payload.startswith(b"{") else payload)
    finally:
        conn.close()


def backend_states():
    with urllib.request.urlopen(f"http://127.0.0.1:{STATS_PORT}/stats;csv", timeout=2) as res:
        rows = res.read().decode().splitlines()
    header = rows[0].lstrip("# ").split(",")
    states = {}
    for row in rows[1:]:
        cols = dict(zip(header, row.split(",")))
        if cols.get("pxname") == "app" and cols.get("svname") not in ("BACKEND", "FRONTEND"):
            states[cols["svname"]] = (cols["status"], int(cols["scur"] or 0))
    return states


class Stream(threading.Thread):
    """An SSE client that reconnects through HAProxy with Last-Event-ID, as EventSource does."""

    def __init__(self, token):
        super().__init__(daemon=True)
        self.token = token
        self.ids = []
        self.connects = 0
        self.stop = threading.Event()
        self.connected = threading.Event()

    def run(self):
        last = None
        while not self.stop.is_set():
            conn = http.client.HTTPSConnection("127.0.0.1", int(HTTPS_PORT), context=TLS, timeout=30)
            headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                conn.request("GET", "/v1/events?topics=e2e.*", headers=headers)
                res = conn.getresponse()
                if res.status != 200:
                    time.sleep(0.2)
                    continue
                self.connects += 1
                self.connected.set()
                # As EventSource does: an `id:` line sets the last event id; a frame is an event
                # only when it carries data.
                event_id, has_data = None, False
                while not self.stop.is_set():
                    line = res.fp.readline()
                    if not line:
                        break  # the replica went away: reconnect
                    line = line.decode().rstrip("\r\n")
                    if line.startswith("id:"):
                        event_id = int(line[3:].strip())
                    elif line.startswith("data:"):
                        has_data = True
                    elif line == "":
                        if event_id is not None:
                            last = event_id
                            if has_data:
                                self.ids.append(event_id)
                        event_id, has_data = None, False
            except (OSError, http.client.HTTPException):
                time.sleep(0.2)
            finally:
                conn.close()


def main():
    admin = open(os.path.join(STACK_DIR, "secrets", "admin-token")).read().strip()

    # 1. A tenant and a key, through HAProxy over TLS.
    status, tenant = request("POST", "/v1/tenants", admin, {"name": "E2E", "slug": f"e2e-{os.getpid()}"})
    if status != 201:
        fail(f"creating a tenant through HAProxy answered {status}: {tenant}")
    status, key = request("POST", f"/v1/tenants/{tenant['id']}/api-keys", admin, {"name": "e2e", "role": "admin"})
    if status != 201:
        fail(f"creating a key answered {status}: {key}")
    token = key["key"]

    # 2. A stream through HAProxy; events written straight to each replica.
    stream = Stream(token)
    stream.start()
    if not stream.connected.wait(10):
        fail("the event stream did not connect through HAProxy")
    published = []

    def publish(n, port):
        status, event = request("POST", "/v1/events", token, {"type": "e2e.tick", "data": {"n": n}}, port=port)
        if status not in (200, 201, 202):
            fail(f"publishing to 127.0.0.1:{port} answered {status}: {event}")
        published.append(event["id"])

    for n in range(10):
        publish(n, APP1_PORT if n % 2 == 0 else APP2_PORT)

    # 3. Kill the replica that holds the stream, keep writing to the other.
    deadline = time.time() + 10
    holder = None
    while time.time() < deadline and holder is None:
        for name, (_, sessions) in backend_states().items():
            if sessions > 0:
                holder = name
        time.sleep(0.1)
    if holder is None:
        fail("HAProxy shows no replica holding the stream")
    survivor_port = APP2_PORT if holder == "app1" else APP1_PORT
    pid = int(open(os.path.join(STACK_DIR, f"{holder}.pid")).read())
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    for n in range(10, 40):
        publish(n, survivor_port)
        time.sleep(0.02)
    down_after = None
    while time.time() - killed_at < 15:
        if backend_states().get(holder, ("?",))[0].startswith("DOWN"):
            down_after = time.time() - killed_at
            break
        time.sleep(0.1)
    if down_after is None or down_after > 10:
        fail(f"HAProxy did not mark {holder} down within 10 s (after {down_after})")
    deadline = time.time() + 30
    while time.time() < deadline and len(stream.ids) < len(published):
        time.sleep(0.1)
    stream.stop.set()
    if stream.ids != sorted(published):
        missing = sorted(set(published) - set(stream.ids))
        extra = len(stream.ids) - len(set(stream.ids))
        fail(f"the stream lost or repeated events: {len(stream.ids)} received of {len(published)}, missing {missing[:10]}, {extra} repeated; received {stream.ids}, published {sorted(published)}")
    if stream.connects < 2:
        fail("the stream never reconnected, so the kill did not reach it")
    print(f"e2e: {len(published)} events, none lost across the kill of {holder} "
          f"({stream.connects} connections); {holder} marked down after {down_after:.1f} s")
    print(holder)  # the caller restarts it


def drain():
    """4. SIGTERM to one replica under load through HAProxy: no request may fail."""
    admin = open(os.path.join(STACK_DIR, "secrets", "admin-token")).read().strip()
    errors, done = [], [0]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                status, body = request("GET", "/v1/tenants", admin, timeout=10)
                if status != 200:
                    errors.append(f"{status} {body}")
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
            done[0] += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    pid = int(open(os.path.join(STACK_DIR, "app1.pid")).read())
    os.kill(pid, signal.SIGTERM)
    before = done[0]
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        while subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0:
            time.sleep(0.1)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        fail(f"{len(errors)} of {done[0]} requests failed during the drain: {errors[:5]}")
    if done[0] - before < 20:
        fail(f"only {done[0] - before} requests ran during the drain")
    print(f"e2e: drained app1 with SIGTERM under load: {done[0]} requests, none failed")


if __name__ == "__main__":
    if len(sys.argv) > 6 and sys.argv[6] == "drain":
        drain()
    else:
        main()
