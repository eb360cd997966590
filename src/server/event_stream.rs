//! Event-stream connections, written straight to the socket.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the whole life of a connection,
//! with no setting to shrink them. An event stream lives for hours and mostly idles, so those
//! buffers would be most of what each subscriber costs. A connection whose first request is
//! `GET /v1/events` is therefore served here: its request head is read and parsed, the request
//! goes through the same router (every middleware layer, the same handler and errors), and the
//! response is written to the socket frame by frame with nothing buffered in between. The stream
//! is the connection's last request: it closes when the stream ends. Everything else, including
//! an event stream requested later on a kept-alive connection, is served by hyper.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, StatusCode, Version, header};
use axum::response::IntoResponse;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::http::error::ApiError;

/// The request line start that selects this path: the stream route, with or without a query.
pub(super) const PREFIX: &[u8] = b"GET /v1/events";
/// Largest request head read here (hyper's limit for other routes is `MAX_BUFFER`).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Largest non-stream answer (an error) collected before writing.
const MAX_ANSWER: usize = 64 * 1024;
/// Frames already waiting are gathered into one write up to about this size.
const COALESCE: usize = 16 * 1024;
/// Bytes a client may send after its request (they are never answered) before it is cut off.
const MAX_IGNORED: usize = 64 * 1024;
/// After a refusal, how long the client's remaining bytes are read and dropped before closing, so
/// the close does not reset the connection (losing the answer) while the client is still sending.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one event-stream request on `stream`, then closes it. The request head must be in by
/// `deadline` (counted from the connection's accept, as for hyper's connections).
pub(super) async fn serve(
    mut stream: TcpStream,
    router: Router,
    deadline: Instant,
    closing: &CancellationToken,
) {
    // Boxed, like the router call below: these futures are large but short-lived, and the
    // connection task keeps only the streaming state for its whole life.
    let head = tokio::select! {
        () = closing.cancelled() => return,
        head = Box::pin(tokio::time::timeout_at(deadline, read_head(&mut stream))) => head,
    };
    // Bytes after the head are never answered: the stream is the connection's last request.
    let request = match head {
        Ok(Ok((Head::Request(request), _, _))) => request,
        Ok(Ok((Head::Refused(answer), _, _))) => {
            let _ = Box::pin(answer_once(&mut stream, answer)).await;
            return;
        }
        Ok(Err(_)) | Err(_) => return,
    };
    let version = request.version();
    let response = match Box::pin(router.oneshot(request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming || !response.status().is_success() {
        let _ = Box::pin(answer_once(&mut stream, response)).await;
        return;
    }
    let chunked = version == Version::HTTP_11;
    let (parts, body) = response.into_parts();
    let head = response_head(parts.status, &parts.headers, None, chunked, false);
    if stream.write_all(&head).await.is_err() {
        return;
    }
    drop(head);
    let mut frames = body.into_data_stream();
    let mut probe = [0u8; 512];
    let mut ignored = 0usize;
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(data)) => {
                    // Frames that are ready at once (a replay, a burst) leave in one write.
                    let mut out = Vec::with_capacity(data.len() + 16);
                    frame_into(&mut out, &data, chunked);
                    // `Some(true)`: the body ended; `Some(false)`: it failed.
                    let mut ended = None;
                    while out.len() < COALESCE {
                        match frames.next().now_or_never() {
                            Some(Some(Ok(more))) => frame_into(&mut out, &more, chunked),
                            Some(None) => {
                                ended = Some(true);
                                break;
                            }
                            Some(Some(Err(_))) => {
                                ended = Some(false);
                                break;
                            }
                            None => break,
                        }
                    }
                    if ended == Some(true) && chunked {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    match ended {
                        Some(true) => {
                            let _ = stream.shutdown().await;
                            return;
                        }
                        Some(false) => return,
                        None => {}
                    }
                }
                // The stream ended: finish the response and close.
                None => {
                    if chunked {
                        let _ = stream.write_all(b"0\r\n\r\n").await;
                    }
                    let _ = stream.shutdown().await;
                    return;
                }
                // Cut short; the client sees an unfinished response and reconnects.
                Some(Err(_)) => return,
            },
            // Nothing is expected from the client any more; reading tells when it has gone.
            readable = stream.readable() => {
                if readable.is_err() {
                    return;
                }
                match stream.try_read(&mut probe) {
                    Ok(0) => return,
                    // Bytes after the request (a pipelined request, which this connection never
                    // answers) are dropped, up to a point: a client that keeps sending is cut off.
                    Ok(n) => {
                        ignored += n;
                        if ignored > MAX_IGNORED {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
}

pub(super) enum Head {
    Request(Request<Body>),
    /// The head is not taken here: the event-stream path answers this and closes; the download
    /// path hands the connection to hyper.
    Refused(Response<Body>),
}

/// Reads and parses the request head. Also returns every byte read, and how many of them the head
/// took (0 when it was refused): what follows is the start of a pipelined request, unparsed.
pub(super) async fn read_head(stream: &mut TcpStream) -> io::Result<(Head, Vec<u8>, usize)> {
    let mut buf = Vec::with_capacity(1024);
    let mut read = [0u8; 1024];
    loop {
        let n = stream.read(&mut read).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&read[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let head = to_request(&parsed);
                let len = if matches!(head, Head::Request(_)) {
                    len
                } else {
                    0
                };
                return Ok((head, buf, len));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                let refused = Head::Refused(refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request_head_too_large",
                    "the request head is larger than this server accepts",
                ));
                return Ok((refused, buf, 0));
            }
            Err(_) => return Ok((Head::Refused(bad_request()), buf, 0)),
        }
    }
}

fn bad_request() -> Response<Body> {
    refuse(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "the request head is not valid HTTP/1.1",
    )
}

fn to_request(parsed: &httparse::Request<'_, '_>) -> Head {
    let bad = || Head::Refused(bad_request());
    let (Some(method), Some(path), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return bad();
    };
    // No body on the routes served outside hyper (GETs): a request that announces one is not
    // taken here (the event-stream path refuses it, as hyper would refuse an ambiguous one; the
    // download path hands it to hyper), so the paths agree whatever follows the head.
    let announces_body = parsed.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    });
    if announces_body {
        return Head::Refused(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "an event-stream request has no body",
        ));
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .version(if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    match builder.body(Body::empty()) {
        Ok(request) => Head::Request(request),
        Err(_) => bad(),
    }
}

fn refuse(status: StatusCode, code: &'static str, detail: &'static str) -> Response<Body> {
    ApiError::new(status, code, detail).into_response()
}

/// Writes a complete (non-stream) answer with its length, and closes.
pub(super) async fn answer_once(
    stream: &mut TcpStream,
    response: Response<Body>,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_ANSWER)
        .await
        .unwrap_or_else(|_| Bytes::new());
    let mut out = response_head(
        parts.status,
        &parts.headers,
        Some(body.len() as u64),
        false,
        false,
    );
    out.extend_from_slice(&body);
    stream.write_all(&out).await?;
    close_after_answer(stream).await
}

/// Ends the connection after a complete answer: the write side closes at once, and the client's
/// remaining bytes are read and dropped for a moment, so the close does not reset the connection
/// (losing the answer) while the client is still sending.
pub(super) async fn close_after_answer(stream: &mut TcpStream) -> io::Result<()> {
    stream.shutdown().await?;
    let mut rest = [0u8; 1024];
    let mut drained = 0usize;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < MAX_IGNORED {
            match stream.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// Status line and headers. Framing headers are ours to set; the connection closes after the
/// response unless `keep_alive`.
pub(super) fn response_head(
    status: StatusCode,
    headers: &axum::http::HeaderMap,
    length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if matches!(
            *name,
            header::CONNECTION | header::CONTENT_LENGTH | header::TRANSFER_ENCODING
        ) || name.as_str() == "keep-alive"
        {
            continue;
        }
        line(&mut out, name.as_str(), value);
    }
    if !headers.contains_key(header::DATE) {
        let now = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        if let Ok(value) = HeaderValue::from_str(&now) {
            line(&mut out, "date", &value);
        }
    }
    if let Some(length) = length {
        out.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn line(out: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one frame: as an HTTP/1.1 chunk, or as is when the close delimits the body.
pub(super) fn frame_into(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if data.is_empty() {
        // An empty chunk would end the body.
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    }
    out.extend_from_slice(data);
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_framed() {
        let mut out = Vec::new();
        frame_into(&mut out, b"data: x\n\n", true);
        frame_into(&mut out, b"", true);
        frame_into(&mut out, &[b'a'; 26], true);
        let mut expected = b"9\r\ndata: x\n\n\r\n1a\r\n".to_vec();
        expected.extend_from_slice(&[b'a'; 26]);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(out, expected);

        let mut plain = Vec::new();
        frame_into(&mut plain, b"data: x\n\n", false);
        assert_eq!(plain, b"data: x\n\n".to_vec());
    }
}
