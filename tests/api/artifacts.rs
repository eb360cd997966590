//! The artifact API over HTTP: streamed uploads and downloads with metadata, tags, ranges and
//! conditional requests, listing, roles, tenant isolation, refused keys, the size limit, and
//! uploads cut off by the client on the local and S3 backends.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Options, TestApp, eventually, expect_json, expect_problem};

/// A server on the local backend, with its root in a fresh temp directory named after `name`.
async fn on_local_disk(name: &str) -> (TestApp, std::path::PathBuf) {
    let root = std::env::temp_dir().join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    let app = TestApp::spawn_with(
        Options::default()
            .env("STORAGE_BACKEND", "local")
            .env("STORAGE_LOCAL_ROOT", root.to_str().expect("utf-8 path")),
    )
    .await;
    (app, root)
}

fn pattern(total: usize) -> Vec<u8> {
    (0..total).map(|i| (i % 251) as u8).collect()
}

async fn put(app: &TestApp, token: &str, key: &str, body: Vec<u8>) -> reqwest::Response {
    app.client
        .put(app.url(&format!("/v1/artifacts/{key}")))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .expect("request")
}

/// An answer read off a raw connection.
struct RawAnswer {
    status: u16,
    /// Names in lowercase.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The status and the headers (names in lowercase) of an answer's head, without its blank line.
fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

/// Sends `head` (which must ask for `Connection: close`) and then `body` on a raw connection, so
/// the path reaches the server exactly as written (reqwest would normalise `..` and re-encode),
/// and reads the whole answer.
async fn exchange(app: &TestApp, head: &str, body: &[u8]) -> RawAnswer {
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    conn.write_all(head.as_bytes()).await.expect("write head");
    conn.write_all(body).await.expect("write body");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("the whole answer within 10s")
        .expect("read");
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&answer)));
    let (status, headers) = parse_head(&answer[..end]);
    let mut body = answer[end + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    RawAnswer {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn artifacts_stream_in_and_out_with_metadata_ranges_and_conditions() {
    let app = TestApp::spawn().await;
    let t = app.tenant("files").await;
    let data = pattern(300_000);
    let res = app
        .client
        .put(app.url("/v1/artifacts/reports/2026/q3.csv"))
        .bearer_auth(&t.operator)
        .header("content-type", "text/csv")
        .header("x-artifact-meta-owner", "S3 team")
        .header("x-artifact-tags", "kind=report&quarter=q3")
        .body(data.clone())
        .send()
        .await
        .expect("put");
    let stored = expect_json(res, StatusCode::CREATED).await;
    assert_eq!(stored["key"], "reports/2026/q3.csv");
    assert_eq!(stored["size"], 300_000);
    assert_eq!(stored["content_type"], "text/csv");
    assert_eq!(stored["metadata"]["owner"], "S3 team");
    assert_eq!(stored["tags"]["quarter"], "q3");
    let sha = stored["sha256"].as_str().expect("sha").to_owned();
    use sha2::Digest;
    assert_eq!(sha, hex::encode(sha2::Sha256::digest(&data)));
    assert!(stored.get("storage_path").is_none(), "{stored}");

    let got = app
        .get("/v1/artifacts/reports/2026/q3.csv", &t.viewer)
        .await;
    assert_eq!(got.status(), StatusCode::OK);
    let h = got.headers().clone();
    assert_eq!(h["content-type"], "text/csv");
    assert_eq!(h["content-length"], "300000");
    assert_eq!(h["etag"].to_str().unwrap(), format!("\"{sha}\""));
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["x-artifact-meta-owner"], "S3 team");
    assert_eq!(h["x-artifact-tags"], "kind=report&quarter=q3");
    assert_eq!(got.bytes().await.expect("body").as_ref(), &data[..]);

    let head = app
        .send(
            Method::HEAD,
            "/v1/artifacts/reports/2026/q3.csv",
            Some(&t.viewer),
            None,
        )
        .await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "300000");

    // Conditional and ranged reads.
    let cached = app
        .client
        .get(app.url("/v1/artifacts/reports/2026/q3.csv"))
        .bearer_auth(&t.viewer)
        .header("if-none-match", format!("\"{sha}\""))
        .send()
        .await
        .expect("get");
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let ranged = |range: &'static str| {
        app.client
            .get(app.url("/v1/artifacts/reports/2026/q3.csv"))
            .bearer_auth(&t.viewer)
            .header("range", range)
            .send()
    };
    let part = ranged("bytes=100-199").await.expect("get");
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], "bytes 100-199/300000");
    assert_eq!(part.bytes().await.expect("body").as_ref(), &data[100..200]);
    let tail = ranged("bytes=-10").await.expect("get");
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.bytes().await.expect("body").as_ref(), &data[299_990..]);
    let beyond = ranged("bytes=300000-").await.expect("get");
    assert_eq!(beyond.headers()["content-range"], "bytes */300000");
    expect_problem(
        beyond,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
    )
    .await;

    // Replacing, and refusing to replace.
    let replaced = expect_json(
        put(&app, &t.operator, "reports/2026/q3.csv", b"v2".to_vec()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(replaced["size"], 2);
    assert_eq!(replaced["content_type"], "application/octet-stream");
    let refused = app
        .client
        .put(app.url("/v1/artifacts/reports/2026/q3.csv"))
        .bearer_auth(&t.operator)
        .header("if-none-match", "*")
        .body("v3")
        .send()
        .await
        .expect("put");
    expect_problem(
        refused,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    )
    .await;
    let now = app
        .get("/v1/artifacts/reports/2026/q3.csv", &t.viewer)
        .await;
    assert_eq!(now.bytes().await.expect("body").as_ref(), b"v2");

    // Listing by prefix, in pages.
    for key in ["reports/2026/q4.csv", "reports/2025/q1.csv", "notes/a.txt"] {
        expect_json(
            put(&app, &t.operator, key, b"x".to_vec()).await,
            StatusCode::CREATED,
        )
        .await;
    }
    let page = expect_json(
        app.get("/v1/artifacts?prefix=reports/&limit=2", &t.viewer)
            .await,
        StatusCode::OK,
    )
    .await;
    let keys: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["key"].as_str())
        .collect();
    assert_eq!(keys, ["reports/2025/q1.csv", "reports/2026/q3.csv"]);
    let cursor = page["next_cursor"].as_str().expect("more");
    let rest = expect_json(
        app.get(
            &format!("/v1/artifacts?prefix=reports/&limit=2&cursor={cursor}"),
            &t.viewer,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(rest["items"][0]["key"], "reports/2026/q4.csv");
    assert_eq!(rest["next_cursor"], Value::Null);

    // Deleting.
    let gone = app
        .delete("/v1/artifacts/reports/2026/q3.csv", &t.operator)
        .await;
    assert_eq!(gone.status(), StatusCode::NO_CONTENT);
    expect_problem(
        app.get("/v1/artifacts/reports/2026/q3.csv", &t.viewer)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        app.delete("/v1/artifacts/reports/2026/q3.csv", &t.operator)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let events = expect_json(
        app.get("/v1/events/history?topics=artifact.*&limit=100", &t.viewer)
            .await,
        StatusCode::OK,
    )
    .await;
    let types: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "artifact.stored",
            "artifact.stored",
            "artifact.stored",
            "artifact.stored",
            "artifact.stored",
            "artifact.deleted"
        ]
    );
}

/// Reads one answer off `conn` (framed by its `Content-Length`; none for a `304`), keeping what
/// was read past it in `buf` for the next.
async fn next_answer(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> RawAnswer {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut fill = async |conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>| {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("more of the answer within 10s")
            .expect("read");
        assert!(n > 0, "the connection closed mid-answer");
        buf.extend_from_slice(&chunk[..n]);
    };
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        fill(conn, buf).await;
    };
    let (status, headers) = parse_head(&buf[..end]);
    let len = if status == 304 {
        0
    } else {
        headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no content-length in {headers:?}"))
    };
    buf.drain(..end + 4);
    while buf.len() < len {
        fill(conn, buf).await;
    }
    let body = buf.drain(..len).collect();
    RawAnswer {
        status,
        headers,
        body,
    }
}

/// True once the server has closed `conn` (nothing more after what was read).
async fn closed(conn: &mut tokio::net::TcpStream) -> bool {
    let mut rest = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), conn.read(&mut rest)).await,
        Ok(Ok(0))
    )
}

/// A download on a connection's first request is sent from the object's file by the kernel; the
/// answers are the same as hyper's (full, ranged, `304`, errors), a slow reader gets every byte,
/// the connection carries on with the requests that follow (pipelined or not), and the bytes are
/// counted.
#[tokio::test]
async fn downloads_that_open_a_connection_are_whole_and_the_connection_carries_on() {
    let (app, root) = on_local_disk("cyb-download").await;
    let t = app.tenant("downloads").await;
    // Over one burst of the sender (16 MiB), so a download takes more than one.
    let data = pattern(20 * 1024 * 1024 + 12_345);
    let stored = expect_json(
        put(&app, &t.operator, "big.bin", data.clone()).await,
        StatusCode::CREATED,
    )
    .await;
    let etag = format!("\"{}\"", stored["sha256"].as_str().expect("sha"));
    let bytes_out = |text: &str| {
        crate::metrics::sample(
            text,
            "storage_bytes_total",
            &[("backend", "local"), ("direction", "out")],
        )
        .unwrap_or(0.0)
    };
    let before = bytes_out(&crate::metrics::scrape_text(&app).await);
    let request = |extra: &str| {
        format!(
            "GET /v1/artifacts/big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{extra}\r\n",
            t.viewer
        )
    };

    // A reader with a small receive window, so the server finds the socket full again and again;
    // three more requests pipelined behind the download, answered on the same connection.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut conn = socket.connect(app.addr).await.expect("connect");
    let missing = format!(
        "GET /v1/artifacts/missing.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        t.viewer
    );
    let pipelined = [
        request(""),
        request("Range: bytes=1000-1999\r\n"),
        request(&format!("If-None-Match: {etag}\r\n")),
        missing,
    ]
    .concat();
    conn.write_all(pipelined.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let whole = next_answer(&mut conn, &mut buf).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("content-length"), Some("20983865"));
    assert_eq!(whole.header("etag"), Some(etag.as_str()));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(whole.header("connection").is_none(), "{:?}", whole.headers);
    assert!(whole.body == data, "the downloaded bytes are the object's");
    let ranged = next_answer(&mut conn, &mut buf).await;
    assert_eq!(ranged.status, 206);
    assert_eq!(
        ranged.header("content-range"),
        Some("bytes 1000-1999/20983865")
    );
    assert_eq!(ranged.body, &data[1000..2000]);
    let unchanged = next_answer(&mut conn, &mut buf).await;
    assert_eq!(unchanged.status, 304);
    let gone = next_answer(&mut conn, &mut buf).await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.header("content-type"),
        Some("application/problem+json")
    );
    assert!(buf.is_empty(), "nothing after the last answer: {buf:?}");
    assert!(closed(&mut conn).await, "closed as the last request asked");

    // A ranged download opening a connection that asks to close.
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let range = request("Range: bytes=17000000-\r\nConnection: close\r\n");
    conn.write_all(range.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let tail = next_answer(&mut conn, &mut buf).await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.header("connection"), Some("close"));
    assert_eq!(
        tail.header("content-range"),
        Some("bytes 17000000-20983864/20983865")
    );
    assert!(tail.body == data[17_000_000..], "the tail's bytes");
    assert!(closed(&mut conn).await);

    // A 304 and a refusal (no credentials) opening connections, each followed by a download on
    // the same connection.
    for (first, status) in [
        (request(&format!("If-None-Match: {etag}\r\n")), 304),
        (
            "GET /v1/artifacts/big.bin HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
            401,
        ),
    ] {
        let mut conn = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        conn.write_all(first.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let answer = next_answer(&mut conn, &mut buf).await;
        assert_eq!(answer.status, status);
        if status == 401 {
            let problem: Value = serde_json::from_slice(&answer.body).expect("problem json");
            assert_eq!(problem["status"], 401, "{problem}");
        }
        let then = request("Range: bytes=0-9\r\n");
        conn.write_all(then.as_bytes()).await.expect("write");
        let next = next_answer(&mut conn, &mut buf).await;
        assert_eq!(
            next.status, 206,
            "the connection carried on after {}",
            answer.status
        );
        assert_eq!(next.body, &data[..10]);
    }

    // Heads this path leaves to hyper, answered as on any connection: one larger than the path
    // reads itself (16 KiB) and a GET announcing a body.
    for extra in [
        format!("X-Filler: {}\r\n", "f".repeat(20_000)),
        "Content-Length: 5\r\n".to_owned(),
    ] {
        let mut conn = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        let mut ask = request(&format!("Range: bytes=0-9\r\n{extra}")).into_bytes();
        if extra.starts_with("Content-Length") {
            ask.extend_from_slice(b"hello");
        }
        conn.write_all(&ask).await.expect("write");
        let mut buf = Vec::new();
        let answer = next_answer(&mut conn, &mut buf).await;
        assert_eq!(answer.status, 206, "{}", &extra[..extra.len().min(20)]);
        assert_eq!(answer.body, &data[..10]);
        conn.write_all(request("Range: bytes=10-19\r\n").as_bytes())
            .await
            .expect("write");
        let next = next_answer(&mut conn, &mut buf).await;
        assert_eq!(next.status, 206);
        assert_eq!(next.body, &data[10..20]);
    }

    // HTTP/1.0: the answer ends with the connection.
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let old = format!(
        "GET /v1/artifacts/big.bin HTTP/1.0\r\nAuthorization: Bearer {}\r\nRange: bytes=5-9\r\n\r\n",
        t.viewer
    );
    conn.write_all(old.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let answer = next_answer(&mut conn, &mut buf).await;
    assert_eq!(answer.status, 206);
    assert_eq!(answer.body, &data[5..10]);
    assert!(closed(&mut conn).await);

    // A reader that goes away part-way: the server carries on serving.
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    conn.write_all(request("").as_bytes()).await.expect("write");
    let mut some = vec![0u8; 64 * 1024];
    conn.read_exact(&mut some)
        .await
        .expect("the download starts");
    drop(conn);
    let again = app.get("/v1/artifacts/big.bin", &t.viewer).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert!(again.bytes().await.expect("body").as_ref() == &data[..]);

    // Every byte sent is counted: the whole object three times (once cut short, so at least
    // twice), and the ranges.
    let sent = bytes_out(&crate::metrics::scrape_text(&app).await) - before;
    let whole = data.len() as f64;
    let ranges = (1000 + (data.len() - 17_000_000) + 10 + 10 + 4 * 10 + 5) as f64;
    assert!(
        sent >= 2.0 * whole + ranges && sent <= 3.0 * whole + ranges,
        "bytes out: {sent}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn artifacts_are_the_tenants_own() {
    let app = TestApp::spawn().await;
    let a = app.tenant("owner").await;
    let b = app.tenant("other").await;
    expect_json(
        put(&app, &a.operator, "secret.txt", b"a's".to_vec()).await,
        StatusCode::CREATED,
    )
    .await;
    expect_problem(
        put(&app, &a.viewer, "secret.txt", b"no".to_vec()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    for method in [Method::GET, Method::DELETE] {
        let res = app
            .send(method, "/v1/artifacts/secret.txt", Some(&b.admin), None)
            .await;
        expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    }
    let head = app
        .send(
            Method::HEAD,
            "/v1/artifacts/secret.txt",
            Some(&b.admin),
            None,
        )
        .await;
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    let listed = expect_json(app.get("/v1/artifacts", &b.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(0));
    // B's upload under the same key is B's own artifact; A's is untouched.
    expect_json(
        put(&app, &b.operator, "secret.txt", b"b's".to_vec()).await,
        StatusCode::CREATED,
    )
    .await;
    let mine = app.get("/v1/artifacts/secret.txt", &a.viewer).await;
    assert_eq!(mine.bytes().await.expect("body").as_ref(), b"a's");
}

#[tokio::test]
async fn traversal_and_malformed_keys_are_refused() {
    let app = TestApp::spawn().await;
    let t = app.tenant("keys").await;
    let long = "k".repeat(1025);
    let cases = [
        "/v1/artifacts/a/../b",
        "/v1/artifacts/a/./b",
        "/v1/artifacts/..",
        "/v1/artifacts/%2e%2e/x",
        "/v1/artifacts/%2E%2E%2Fx",
        "/v1/artifacts/a%2f..%2fb",
        "/v1/artifacts/%252e%252e/x",
        "/v1/artifacts//etc/passwd",
        "/v1/artifacts/a//b",
        "/v1/artifacts/trailing/",
        "/v1/artifacts/back%5Cslash",
        "/v1/artifacts/nul%00byte",
        "/v1/artifacts/line%0Abreak",
        // Control characters: DEL, a tab, and U+0080 (a C1 control, two bytes in UTF-8).
        "/v1/artifacts/del%7Fchar",
        "/v1/artifacts/tab%09here",
        "/v1/artifacts/c1%C2%80control",
        &format!("/v1/artifacts/{long}"),
    ];
    for path in cases {
        for (method, token, body) in [
            ("PUT", &t.operator, &b"no"[..]),
            ("GET", &t.viewer, &b""[..]),
            ("HEAD", &t.viewer, &b""[..]),
            ("DELETE", &t.operator, &b""[..]),
        ] {
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let answer = exchange(&app, &head, body).await;
            let what = format!("{method} {path}");
            assert_eq!(answer.status, 400, "{what}");
            assert_eq!(
                answer.header("content-type"),
                Some("application/problem+json"),
                "{what}"
            );
            if method == "HEAD" {
                assert!(answer.body.is_empty(), "{what}: a HEAD answer has no body");
                continue;
            }
            let problem: Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
                panic!(
                    "{what}: body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&answer.body)
                )
            });
            assert_eq!(
                problem["code"], "invalid_path_parameter",
                "{what}: {problem}"
            );
            assert_eq!(problem["status"], 400, "{what}: {problem}");
            assert_eq!(
                problem["type"], "urn:cybernetic:problem:invalid_path_parameter",
                "{what}: {problem}"
            );
            assert!(problem["detail"].is_string(), "{what}: {problem}");
        }
    }
    // The same raw request with a key the rules accept (non-ASCII, percent-encoded once) stores
    // it: the refusals above are the key's, not the way the requests are sent.
    let head = format!(
        "PUT /v1/artifacts/caf%C3%A9%C2%A0menu.txt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
        t.operator
    );
    let answer = exchange(&app, &head, b"ok").await;
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let listed = expect_json(app.get("/v1/artifacts", &t.viewer).await, StatusCode::OK).await;
    let keys: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|a| a["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["caf\u{e9}\u{a0}menu.txt"],
        "only the accepted key is stored"
    );
    expect_json(
        app.get("/v1/artifacts?prefix=.", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    expect_problem(
        app.get("/v1/artifacts?prefix=../", &t.viewer).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    for (name, value) in [
        ("x-artifact-meta-Bad_Name", "v"),
        ("x-artifact-meta-cyb-sha256", "forged"),
        ("x-artifact-tags", "k=a<b"),
        ("x-artifact-tags", "=novalue"),
        ("if-none-match", "\"abc\""),
        ("content-type", "nonsense"),
    ] {
        let res = app
            .client
            .put(app.url("/v1/artifacts/ok.txt"))
            .bearer_auth(&t.operator)
            .header(name, value)
            .body("x")
            .send()
            .await
            .expect("put");
        expect_problem(res, StatusCode::BAD_REQUEST, "invalid_header").await;
    }
}

#[tokio::test]
async fn uploads_over_the_limit_are_refused_while_streaming() {
    let app = TestApp::spawn_with(Options::default().env("STORAGE_MAX_BYTES", "1000")).await;
    let t = app.tenant("limits").await;
    expect_problem(
        put(&app, &t.operator, "big.bin", pattern(2000)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // No length announced: the limit is found while the body streams.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(pattern(500))).collect();
    let res = app
        .client
        .put(app.url("/v1/artifacts/streamed.bin"))
        .bearer_auth(&t.operator)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("put");
    expect_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let listed = expect_json(app.get("/v1/artifacts", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"], serde_json::json!([]));
    expect_json(
        put(&app, &t.operator, "fits.bin", pattern(1000)).await,
        StatusCode::CREATED,
    )
    .await;
}

#[tokio::test]
async fn an_upload_the_client_abandons_leaves_nothing_on_the_local_backend() {
    let (app, root) = on_local_disk("cyb-artifacts").await;
    let t = app.tenant("abandon").await;
    let tmp = root.join(".tmp");
    assert!(
        uploads_in(&tmp).is_empty(),
        "no upload under way yet: {:?}",
        uploads_in(&tmp)
    );
    let head = format!(
        "PUT /v1/artifacts/half.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\n",
        t.operator
    );
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    conn.write_all(head.as_bytes()).await.expect("write head");
    conn.write_all(&pattern(300_000)).await.expect("write body");
    // The upload is under way (its temp file exists) before the client goes away with most of
    // the body unsent.
    eventually(
        Duration::from_secs(10),
        "the upload's temp file to appear",
        || async { uploads_in(&tmp).len() == 1 },
    )
    .await;
    drop(conn);
    eventually(
        Duration::from_secs(10),
        "the abandoned upload's temp file removed",
        || async { uploads_in(&tmp).is_empty() },
    )
    .await;
    let listed = expect_json(app.get("/v1/artifacts", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"], serde_json::json!([]), "no row for it");
    expect_problem(
        app.get("/v1/artifacts/half.bin", &t.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let files = walk(&root.join("objects"));
    assert!(files.is_empty(), "no object stored: {files:?}");
    // A complete upload then lands as one file.
    expect_json(
        put(&app, &t.operator, "whole.bin", pattern(10)).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(walk(&root.join("objects")).len(), 1);
    assert!(uploads_in(&tmp).is_empty(), "{:?}", uploads_in(&tmp));
    let listed = expect_json(app.get("/v1/artifacts", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"][0]["key"], "whole.bin", "{listed}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Uploads' temp files (`*.upload`) anywhere under `dir`, at any depth: directly in `.tmp/` or in
/// a process's own directory below it.
fn uploads_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "upload"))
        .collect()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn an_upload_the_client_abandons_leaves_no_parts_on_s3() {
    let endpoint =
        std::env::var("TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned());
    let bucket = format!("cyb-http-{}", uuid::Uuid::new_v4().simple());
    let app = TestApp::spawn_with(
        Options::default()
            .env("STORAGE_BACKEND", "s3")
            .env("S3_BUCKET", &bucket)
            .env("S3_ENDPOINT", &endpoint)
            .env("S3_FORCE_PATH_STYLE", "true")
            .env("S3_ACCESS_KEY_ID", "test")
            .env("S3_SECRET_ACCESS_KEY", "test")
            .env("S3_PART_SIZE", "5242880"),
    )
    .await;
    let admin = cybernetic::storage::s3::S3Storage::new(&cybernetic::storage::s3::S3Config {
        bucket: bucket.clone(),
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        force_path_style: true,
        access_key_id: Some(cybernetic::config::Secret::new("test")),
        secret_access_key: Some(cybernetic::config::Secret::new("test")),
        part_size: 5 << 20,
        parts_in_flight: 1,
    })
    .await;
    admin
        .client()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("bucket");
    let uploads = || async {
        admin
            .client()
            .list_multipart_uploads()
            .bucket(&bucket)
            .send()
            .await
            .expect("uploads")
            .uploads()
            .len()
    };
    let t = app.tenant("abandon-s3").await;
    // Big enough for a multipart upload, then the client goes away with most of it unsent.
    let head = format!(
        "PUT /v1/artifacts/half.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 20000000\r\n\r\n",
        t.operator
    );
    let mut conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    conn.write_all(head.as_bytes()).await.expect("head");
    conn.write_all(&pattern(6 << 20)).await.expect("body");
    eventually(
        Duration::from_secs(20),
        "a multipart upload under way",
        || async { uploads().await == 1 },
    )
    .await;
    drop(conn);
    eventually(
        Duration::from_secs(20),
        "the abandoned upload aborted",
        || async { uploads().await == 0 },
    )
    .await;
    expect_problem(
        app.get("/v1/artifacts/half.bin", &t.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // And a whole one goes through, in parts, and reads back.
    let data = pattern((5 << 20) * 2 + 123);
    expect_json(
        put(&app, &t.operator, "whole.bin", data.clone()).await,
        StatusCode::CREATED,
    )
    .await;
    let got = app.get("/v1/artifacts/whole.bin", &t.viewer).await;
    assert_eq!(got.bytes().await.expect("body").as_ref(), &data[..]);
}

/// The first bytes of a PNG image: what content detection recognises.
fn png() -> Vec<u8> {
    let mut bytes = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    bytes.extend(pattern(5000));
    bytes
}

#[tokio::test]
async fn stored_artifacts_are_verified_and_their_type_detected_in_the_background() {
    let app = TestApp::spawn_with(Options::default().workers()).await;
    let t = app.tenant("processed").await;
    let res = app
        .client
        .put(app.url("/v1/artifacts/images/logo"))
        .bearer_auth(&t.operator)
        .header("content-type", "application/octet-stream")
        .body(png())
        .send()
        .await
        .expect("put");
    let stored = expect_json(res, StatusCode::CREATED).await;
    assert_eq!(stored["checksum_verified_at"], Value::Null);
    eventually(
        Duration::from_secs(15),
        "the artifact processed",
        || async {
            let listed = expect_json(
                app.get("/v1/artifacts?prefix=images/", &t.viewer).await,
                StatusCode::OK,
            )
            .await;
            let a = &listed["items"][0];
            a["detected_content_type"] == "image/png" && a["checksum_verified_at"].is_string()
        },
    )
    .await;
}

#[tokio::test]
async fn a_corrupted_object_fails_its_verification_for_good() {
    let (app, root) = on_local_disk("cyb-verify").await;
    let t = app.tenant("corrupt").await;
    expect_json(
        put(&app, &t.operator, "data.bin", pattern(4096)).await,
        StatusCode::CREATED,
    )
    .await;
    // Flip one byte of the stored object, in place (its trailer stays intact).
    let files = walk(&root.join("objects"));
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).expect("read");
    bytes[100] ^= 0xff;
    std::fs::write(&files[0], bytes).expect("write");

    let storage = cybernetic::storage::local::LocalStorage::open(&root)
        .await
        .expect("open");
    let registry = cybernetic::jobs::Registry::new()
        .register::<cybernetic::jobs::artifact_processing::ArtifactProcessing>()
        .with_storage(std::sync::Arc::new(storage));
    let (pool, _) = crate::jobs::pool_running(&app.db_name, registry, crate::jobs::config());
    let ran = pool
        .run_due(cybernetic::domain::job::Queue::Analysis, 10)
        .await
        .expect("run");
    assert_eq!(ran.len(), 1);
    let dead = expect_json(
        app.get("/v1/jobs?state=dead&kind=artifact_processing", &t.viewer)
            .await,
        StatusCode::OK,
    )
    .await;
    let job = &dead["items"][0];
    assert!(
        job["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("checksum mismatch")),
        "{job}"
    );
    assert_eq!(job["attempts"], 1, "a mismatch is not retried");
    let listed = expect_json(app.get("/v1/artifacts", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"][0]["checksum_verified_at"], Value::Null);
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs one `storage_reconciliation` for `tenant` against `root`, deleting orphans older than
/// `grace`, and returns the job as `GET /v1/jobs` shows it.
async fn reconcile(
    app: &TestApp,
    root: &std::path::Path,
    tenant: &crate::helpers::Tenant,
    grace: Duration,
) -> Value {
    use cybernetic::jobs::storage_reconciliation::StorageReconciliation;
    let storage = cybernetic::storage::local::LocalStorage::open(root)
        .await
        .expect("open");
    let registry = cybernetic::jobs::Registry::new()
        .register::<StorageReconciliation>()
        .with_services(cybernetic::jobs::Services {
            orphan_grace: grace,
            ..Default::default()
        })
        .with_storage(std::sync::Arc::new(storage));
    let (pool, db) = crate::jobs::pool_running(&app.db_name, registry, crate::jobs::config());
    let tenant_id =
        cybernetic::domain::tenant::TenantId::from_uuid(tenant.id.parse().expect("tenant id"));
    let job = StorageReconciliation(cybernetic::jobs::cron::Tick {
        at: chrono::Utc::now(),
        timezone: "UTC".into(),
    });
    let enqueued = cybernetic::jobs::enqueue_alone(&db, tenant_id, &job, Default::default())
        .await
        .expect("enqueue");
    let ran = pool
        .run_due(cybernetic::domain::job::Queue::Default, 10)
        .await
        .expect("run");
    assert_eq!(ran.len(), 1);
    expect_json(
        app.get(&format!("/v1/jobs/{}", enqueued.id), &tenant.viewer)
            .await,
        StatusCode::OK,
    )
    .await
}

#[tokio::test]
async fn reconciliation_deletes_old_unreferenced_objects_and_reports_missing_ones() {
    use cybernetic::storage::{Storage, StorageError, StoragePath, body_from};
    let (app, root) = on_local_disk("cyb-reconcile").await;
    let a = app.tenant("reconcile-a").await;
    let b = app.tenant("reconcile-b").await;
    for (t, key) in [(&a, "kept.bin"), (&b, "theirs.bin")] {
        expect_json(
            put(&app, &t.operator, key, pattern(2048)).await,
            StatusCode::CREATED,
        )
        .await;
    }
    // What a crash between an upload and its commit leaves: objects no row names, one per tenant.
    let storage = cybernetic::storage::local::LocalStorage::open(&root)
        .await
        .expect("open");
    let orphan = |t: &crate::helpers::Tenant| {
        StoragePath::raw(&format!(
            "tenants/{}/{}",
            t.id,
            uuid::Uuid::now_v7().simple()
        ))
    };
    let (orphan_a, orphan_b) = (orphan(&a), orphan(&b));
    for path in [&orphan_a, &orphan_b] {
        storage
            .put(path, body_from(pattern(100)), Default::default())
            .await
            .expect("put orphan");
    }

    // Within the grace period an orphan may be an upload about to be committed: kept.
    let job = reconcile(&app, &root, &a, Duration::from_secs(3600)).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["result"]["objects_checked"], 2, "{job}");
    assert_eq!(job["result"]["orphans_in_grace"], 1, "{job}");
    assert_eq!(job["result"]["orphans_deleted"], 0, "{job}");
    storage.head(&orphan_a).await.expect("orphan kept in grace");

    // Past the grace period it goes; the artifact and the other tenant's objects stay.
    let job = reconcile(&app, &root, &a, Duration::ZERO).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["result"]["orphans_deleted"], 1, "{job}");
    assert!(matches!(
        storage.head(&orphan_a).await,
        Err(StorageError::NotFound)
    ));
    storage
        .head(&orphan_b)
        .await
        .expect("another tenant's object untouched");
    let res = app.get("/v1/artifacts/kept.bin", &a.viewer).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.bytes().await.expect("body").to_vec(), pattern(2048));

    // An object deleted behind the platform's back: its artifact is reported, not deleted.
    let prefix = StoragePath::raw(&format!("tenants/{}/", a.id));
    let listed = storage.list(&prefix, None, 10).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    storage
        .delete(&StoragePath::raw(&listed.items[0].path))
        .await
        .expect("delete");
    let job = reconcile(&app, &root, &a, Duration::ZERO).await;
    assert_eq!(job["state"], "dead", "{job}");
    assert!(
        job["last_error"].as_str().is_some_and(
            |e| e.starts_with("1 artifact(s) have no object") && e.contains("kept.bin")
        ),
        "{job}"
    );
    let listed = expect_json(app.get("/v1/artifacts", &a.viewer).await, StatusCode::OK).await;
    assert_eq!(
        listed["items"][0]["key"], "kept.bin",
        "the row is kept for the operator"
    );
    let _ = std::fs::remove_dir_all(&root);
}
