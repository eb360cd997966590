//! SSE load generator for scripts/bench/sse.sh: holds N event-stream connections (raw TCP, one
//! small task each), publishes timestamped events at a fixed rate, and reports publish->receive
//! latency, deliveries per second, and the server's memory and CPU. It speaks to Cybernetic
//! (`--target cybernetic`: POST /v1/events, GET /v1/events?topics=) and to Nchan (`--target
//! nchan`: POST /v1/publish?topic=, GET /v1/events?topics=) so both run the same scenarios.
//!
//!   cargo run --release --example sse-load -- --target cybernetic --addr 127.0.0.1:18081 \
//!     --token cyb_... --connections 10000 --topics 100 --rate 100 --seconds 20 --pids 1234
//!   (add --storm 20 for the reconnect storm: everyone resumes 20 events back)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::sync::Mutex;

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Cybernetic,
    Nchan,
}

struct Args {
    target: Target,
    addr: SocketAddr,
    token: String,
    connections: usize,
    topics: usize,
    /// Events published per second, spread over the topics.
    rate: u64,
    seconds: u64,
    /// Server processes whose memory and CPU are reported (nginx master and workers, say).
    pids: Vec<u32>,
    /// Source addresses 127.0.0.1 .. 127.0.0.N, so many connections never exhaust one pair's ports.
    sources: u8,
    /// Reconnect storm: publish a marker and this many events first, then connect everyone
    /// with the marker's id as Last-Event-ID and time until each has replayed them all.
    storm: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        target: Target::Cybernetic,
        addr: "127.0.0.1:18081".parse().expect("default address"),
        token: String::new(),
        connections: 1000,
        topics: 1,
        rate: 10,
        seconds: 10,
        pids: Vec::new(),
        sources: 4,
        storm: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => {
                args.target = match value().as_str() {
                    "cybernetic" => Target::Cybernetic,
                    "nchan" => Target::Nchan,
                    other => panic!("unknown target {other}"),
                }
            }
            "--addr" => args.addr = value().parse().expect("--addr host:port"),
            "--token" => args.token = value(),
            "--connections" => args.connections = value().parse().expect("--connections"),
            "--topics" => args.topics = value().parse().expect("--topics"),
            "--rate" => args.rate = value().parse().expect("--rate"),
            "--seconds" => args.seconds = value().parse().expect("--seconds"),
            "--pids" => {
                args.pids = value()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|p| p.parse().expect("pid"))
                    .collect()
            }
            "--sources" => args.sources = value().parse().expect("--sources"),
            "--storm" => args.storm = value().parse().expect("--storm"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn topic(target: Target, k: usize) -> String {
    match target {
        Target::Cybernetic => format!("bench.t{k}"),
        Target::Nchan => format!("t{k}"),
    }
}

struct Shared {
    latencies: Mutex<Vec<u32>>,
    delivered: AtomicU64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    replayed: AtomicU64,
}

/// One subscriber: connect, send the request, read frames, record the latency of every `data:`
/// line that carries a publish timestamp.
async fn subscribe(
    args: Arc<Args>,
    shared: Arc<Shared>,
    index: usize,
    measure_from: Arc<AtomicU64>,
    last_event_id: Option<Arc<str>>,
) {
    let source = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (index % args.sources.max(1) as usize) as u8,
    ));
    let socket = match TcpSocket::new_v4() {
        Ok(s) => s,
        Err(_) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if socket.bind(SocketAddr::new(source, 0)).is_err() {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Ok(mut stream) = socket.connect(args.addr).await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let topic = topic(args.target, index % args.topics.max(1));
    let mut request = format!(
        "GET /v1/events?topics={topic} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
        args.addr
    );
    if args.target == Target::Cybernetic {
        request.push_str(&format!("Authorization: Bearer {}\r\n", args.token));
    }
    if let Some(id) = &last_event_id {
        request.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    request.push_str("\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut reader = BufReader::with_capacity(2048, stream);
    let mut line = String::new();
    // Status line and headers.
    match reader.read_line(&mut line).await {
        Ok(n) if n > 0 && line.contains(" 200 ") => {}
        _ => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut replayed = 0u64;
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some(at) = line.find("\"t\":") else {
            continue;
        };
        let digits: String = line[at + 4..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let Ok(sent) = digits.parse::<u64>() else {
            continue;
        };
        if sent < measure_from.load(Ordering::Relaxed) {
            replayed += 1;
            if replayed == args.storm {
                shared.replayed.fetch_add(replayed, Ordering::Relaxed);
            }
            continue;
        }
        let latency = now_us().saturating_sub(sent).min(u32::MAX as u64) as u32;
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        shared.latencies.lock().await.push(latency);
    }
}

/// Publishes one event to topic 0 and returns its id as the server reports it.
async fn publish_one(client: &reqwest::Client, args: &Args) -> String {
    let topic = topic(args.target, 0);
    let payload = format!(r#"{{"t":{}}}"#, now_us());
    let response = match args.target {
        Target::Cybernetic => client
            .post(format!("http://{}/v1/events", args.addr))
            .bearer_auth(&args.token)
            .header("content-type", "application/json")
            .body(format!(r#"{{"type":"{topic}","data":{payload}}}"#)),
        Target::Nchan => client
            .post(format!("http://{}/v1/publish?topic={topic}", args.addr))
            .header("accept", "text/json")
            .body(payload),
    }
    .send()
    .await
    .expect("publish");
    let body: serde_json::Value = response.json().await.expect("publish response");
    match args.target {
        Target::Cybernetic => body["id"].to_string(),
        Target::Nchan => body["last_message_id"]
            .as_str()
            .expect("nchan message id")
            .to_owned(),
    }
}

/// Publishes at the fixed rate until `stop`; records how long each publish took to be
/// acknowledged (`acks`, microseconds): for Cybernetic the commit to the log, for Nchan the
/// in-memory store (answered once most deliveries are written).
async fn publisher(
    args: Arc<Args>,
    stop: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    acks: Arc<Mutex<Vec<u32>>>,
) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut k = 0usize;
    while stop.load(Ordering::Relaxed) == 0 {
        tick.tick().await;
        let topic = topic(args.target, k % args.topics.max(1));
        k += 1;
        let client = client.clone();
        let args = args.clone();
        let published = published.clone();
        let acks = acks.clone();
        tokio::spawn(async move {
            let started = now_us();
            let payload = format!(r#"{{"t":{started}}}"#);
            let sent = match args.target {
                Target::Cybernetic => {
                    client
                        .post(format!("http://{}/v1/events", args.addr))
                        .bearer_auth(&args.token)
                        .header("content-type", "application/json")
                        .body(format!(r#"{{"type":"{topic}","data":{payload}}}"#))
                        .send()
                        .await
                }
                Target::Nchan => {
                    client
                        .post(format!("http://{}/v1/publish?topic={topic}", args.addr))
                        .body(payload)
                        .send()
                        .await
                }
            };
            if matches!(sent, Ok(r) if r.status().is_success()) {
                let ack = now_us().saturating_sub(started).min(u32::MAX as u64) as u32;
                acks.lock().await.push(ack);
                published.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn own_cpu_ticks() -> u64 {
    cpu_ticks(std::process::id())
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Arc::new(parse_args());
    let shared = Arc::new(Shared {
        latencies: Mutex::new(Vec::with_capacity(1 << 20)),
        delivered: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        replayed: AtomicU64::new(0),
    });
    let rss_before: u64 = args.pids.iter().map(|p| rss_kib(*p)).sum();
    // Storm: a marker, then the events every client must replay; their timestamps predate
    // `measure_from`, so they are counted as replay rather than timed.
    let mut last_event_id: Option<Arc<str>> = None;
    if args.storm > 0 {
        let client = reqwest::Client::new();
        last_event_id = Some(publish_one(&client, &args).await.into());
        for _ in 0..args.storm {
            publish_one(&client, &args).await;
        }
    }
    let measure_from = Arc::new(AtomicU64::new(now_us()));

    let connect_started = Instant::now();
    for i in 0..args.connections {
        tokio::spawn(subscribe(
            args.clone(),
            shared.clone(),
            i,
            measure_from.clone(),
            last_event_id.clone(),
        ));
        if i % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)
        < args.connections
        && Instant::now() < deadline
    {
        if args.storm > 0
            && shared.replayed.load(Ordering::Relaxed) >= args.storm * args.connections as u64
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    if args.storm > 0 {
        // Storm: wait until every connection has its replay, then report how long that took.
        while shared.replayed.load(Ordering::Relaxed) < args.storm * args.connections as u64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let storm_seconds = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = shared.connected.load(Ordering::Relaxed);
    let rss_idle: u64 = args.pids.iter().map(|p| rss_kib(*p)).sum();

    let cpu_start: u64 = args.pids.iter().map(|p| cpu_ticks(*p)).sum();
    let own_cpu_start = own_cpu_ticks();
    let stop = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let delivered_start = shared.delivered.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut publishing = Duration::ZERO;
    if args.rate > 0 && args.seconds > 0 {
        tokio::spawn(publisher(
            args.clone(),
            stop.clone(),
            published.clone(),
            acks.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        stop.store(1, Ordering::Relaxed);
        publishing = started.elapsed();
        // Let in-flight deliveries land before counting: they belong to events published above.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Deliveries per second of publishing: the rate the server sustained for the offered load.
    let elapsed = publishing.as_secs_f64().max(1e-9);
    let delivered = shared.delivered.load(Ordering::Relaxed) - delivered_start;
    let ticks = 100.0; // USER_HZ on Linux
    let server_cpu =
        (args.pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() - cpu_start) as f64 / ticks;
    let own_cpu = (own_cpu_ticks() - own_cpu_start) as f64 / ticks;
    let mut latencies = std::mem::take(&mut *shared.latencies.lock().await);
    latencies.sort_unstable();
    let mut acks = std::mem::take(&mut *acks.lock().await);
    acks.sort_unstable();
    let per_conn = if connected > 0 {
        (rss_idle.saturating_sub(rss_before)) as f64 / connected as f64
    } else {
        f64::NAN
    };
    println!(
        "{{\"connected\":{connected},\"failed\":{},\"connect_s\":{connect_seconds:.2},\"storm_s\":{storm_seconds:.2},\"replayed\":{},\
         \"rss_before_kib\":{rss_before},\"rss_idle_kib\":{rss_idle},\"kib_per_conn\":{per_conn:.2},\
         \"published\":{},\"delivered\":{delivered},\"deliveries_per_s\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2},\"ack_p50_ms\":{:.2},\"ack_p99_ms\":{:.2},\
         \"server_cpu_s\":{server_cpu:.2},\"loadgen_cpu_s\":{own_cpu:.2},\"seconds\":{elapsed:.2}}}",
        shared.failed.load(Ordering::Relaxed),
        shared.replayed.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
        delivered as f64 / elapsed,
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&latencies, 0.999),
        pct(&acks, 0.5),
        pct(&acks, 0.99),
    );
}
