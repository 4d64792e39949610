//! Scale benchmark: the real controller, in-process, against the fake API server and the fake AWS
//! of the test harness (tests/support), with compressed use-by windows.
//!
//! ```text
//! cargo bench --bench scale                       # default: burst 1,000; steady and restart 2,000
//! cargo bench --bench scale -- --quick            # smoke run, about a minute
//! cargo bench --bench scale -- --full             # burst 1,000 and 10,000; steady and restart 10,000
//! cargo bench --bench scale -- --help             # every option
//! ```
//!
//! Scenarios:
//! - burst: N requests created at once; time until every Secret is written and per-request time
//!   to the first Secret, against the lower bound N / R, R = min(AWS TPS, concurrency / latency).
//! - steady: N requests held for several windows; refresh lateness, slack left on the old URL when
//!   the new one is written, Secrets that ever held an expired URL, AWS calls, API writes and CPU
//!   per refresh, memory.
//! - restart: the operator is stopped and started again mid-run; AWS calls in the first window
//!   after the restart (each must have been due) and lapses.
//!
//! Three tokio runtimes keep the costs apart: the operator runs on threads named `op-rt`, the fake
//! API server (and wiremock's thread) on `fake-rt`, the driver and the samplers on the main thread.
//! The in-process kube client hands every request to the fake's runtime and streams the answer
//! back, so per-thread CPU times (from /proc/self/task) separate the operator from the stand-ins.
//! Memory cannot be split by thread; the operator's heap is measured as the live heap that goes
//! away when the operator is stopped (a counting global allocator keeps the live total).

// `cargo check --benches` / `clippy --all-targets` set cfg(test) without the test harness, so the
// stand-ins' own #[cfg(test)] tests are dropped and their imports look unused.
#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

#[path = "common/mod.rs"]
mod common;

use common::{duration, machine, number, options_or_help, stat_cpu};
use embed_url_operator::controller::{self, ControllerConfig};
use embed_url_operator::crd::EmbedUrlRequest;
use embed_url_operator::identity::AwsClients;
use embed_url_operator::policy::PolicyMode;
use embed_url_operator::reconciler::Settings;
use embed_url_operator::telemetry::Metrics;
use embed_url_operator::validation::UseByWindows;
use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use support::fake_aws::{Call, FakeAws};
use support::fake_kube::FakeApiServer;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;

const NS: &str = support::NS;

// ---- live heap -----------------------------------------------------------------------------

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE_HEAP: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_HEAP.fetch_add(new_size, Ordering::Relaxed);
            LIVE_HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_heap() -> usize {
    LIVE_HEAP.load(Ordering::Relaxed)
}

// ---- options -------------------------------------------------------------------------------

const HELP: &str = "\
scale benchmark: the real controller in-process against the test stand-ins

usage: cargo bench --bench scale -- [--quick | --full] [options]

presets (later options override them):
  --quick                 burst 200; steady/restart 200, 6s windows (about a minute)
  (default)               burst 1000; steady/restart 2000, 30s windows (about 5 minutes)
  --full                  burst 1000,10000; steady/restart 10000, 120s windows (about 17 minutes)

options:
  --scenarios LIST        burst,steady,restart (default all)
  --burst-n LIST          burst sizes, e.g. 1000,10000
  --burst-window D        use-by window during bursts (default 300s: no refresh mid-burst)
  --n N                   requests held in steady and restart
  --window D              use-by window in steady and restart (refreshBefore is half of it)
  --windows X             steady measurement length, in windows (default 5)
  --aws-latency D         fake AWS answer delay (default 50ms)
  --aws-tps X             fake AWS calls per second before it throttles (default 0: no limit)
  --concurrency N         operator --concurrency (default 16, the chart's)
  --operator-threads N    tokio workers of the operator (default 1, as --worker-threads in production)
  --stand-in-threads N    tokio workers of the fake API server (default 2)
  --restart-gap D         how long the operator is down in the restart scenario (default window/10)
  --sample-every D        lapse sampler period (default 200ms)
  --history-limit N       watch history the fake API server keeps (default 5000 changes)
  --no-logs               do not format the operator's info logs (default: formatted, discarded)
  --operator-process      run the real operator binary as a child process, talking HTTP to the
                          stand-ins, and measure its own CPU and RSS (default: in-process)
  --operator-binary PATH  run this build of the operator instead of the one cargo built, to
                          compare two builds against the same stand-ins (implies --operator-process)
";

#[derive(Clone, Debug)]
struct Options {
    preset: &'static str,
    burst: bool,
    steady: bool,
    restart: bool,
    burst_sizes: Vec<usize>,
    burst_window: Duration,
    n: usize,
    window: Duration,
    windows: f64,
    latency: Duration,
    tps: Option<f64>,
    concurrency: u16,
    operator_threads: usize,
    stand_in_threads: usize,
    restart_gap: Option<Duration>,
    sample_every: Duration,
    history_limit: usize,
    logs: bool,
    /// Run the real binary as a child process (over HTTP) instead of in-process.
    process: bool,
    /// The operator binary to run as a child process (default: the one cargo built).
    binary: std::path::PathBuf,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut o = Options {
            preset: "default",
            burst: true,
            steady: true,
            restart: true,
            burst_sizes: vec![1000],
            burst_window: Duration::from_secs(300),
            n: 2000,
            window: Duration::from_secs(30),
            windows: 5.0,
            latency: Duration::from_millis(50),
            tps: None,
            concurrency: 16,
            operator_threads: 1,
            stand_in_threads: 2,
            restart_gap: None,
            sample_every: Duration::from_millis(200),
            history_limit: 5_000,
            logs: true,
            process: false,
            binary: env!("CARGO_BIN_EXE_embed-url-operator").into(),
        };
        if args.iter().any(|a| a == "--quick") {
            o.preset = "quick";
            o.burst_sizes = vec![200];
            o.burst_window = Duration::from_secs(60);
            o.n = 200;
            o.window = Duration::from_secs(6);
        }
        if args.iter().any(|a| a == "--full") {
            o.preset = "full";
            o.burst_sizes = vec![1000, 10_000];
            o.n = 10_000;
            o.window = Duration::from_secs(120);
        }
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or(format!("{name} needs a value"))
            };
            match name.as_str() {
                // `cargo bench` passes --bench to harness=false targets.
                "--quick" | "--full" | "--bench" => {}
                "--help" | "-h" => return Err(String::new()),
                "--scenarios" => {
                    let list = value()?;
                    o.burst = list.split(',').any(|s| s == "burst");
                    o.steady = list.split(',').any(|s| s == "steady");
                    o.restart = list.split(',').any(|s| s == "restart");
                }
                "--burst-n" => {
                    o.burst_sizes = value()?
                        .split(',')
                        .map(|n| n.parse().map_err(|_| format!("bad --burst-n {n}")))
                        .collect::<Result<_, _>>()?
                }
                "--burst-window" => o.burst_window = duration(&value()?)?,
                "--n" => o.n = number(&value()?)?,
                "--window" => o.window = duration(&value()?)?,
                "--windows" => o.windows = number(&value()?)?,
                "--aws-latency" => o.latency = duration(&value()?)?,
                "--aws-tps" => o.tps = Some(number::<f64>(&value()?)?).filter(|t| *t > 0.0),
                "--concurrency" => o.concurrency = number(&value()?)?,
                "--operator-threads" => o.operator_threads = number(&value()?)?,
                "--stand-in-threads" => o.stand_in_threads = number(&value()?)?,
                "--restart-gap" => o.restart_gap = Some(duration(&value()?)?),
                "--sample-every" => o.sample_every = duration(&value()?)?,
                "--history-limit" => o.history_limit = number(&value()?)?,
                "--no-logs" => o.logs = false,
                "--operator-process" => o.process = true,
                "--operator-binary" => {
                    o.binary = value()?.into();
                    o.process = true;
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }

    /// Most mints per second the operator can reach: concurrency / latency, capped by AWS TPS.
    fn rate_bound(&self) -> f64 {
        let by_concurrency = f64::from(self.concurrency) / self.latency.as_secs_f64().max(1e-3);
        self.tps.map_or(by_concurrency, |t| t.min(by_concurrency))
    }

    /// Refreshes a second in steady state: each URL is replaced after the window minus
    /// refreshBefore (half the window) and half the largest jitter (5 % of refreshBefore).
    fn steady_rate(&self) -> f64 {
        self.n as f64 / (self.window.as_secs_f64() * (1.0 - 0.5 * 1.05))
    }

    fn restart_gap(&self) -> Duration {
        self.restart_gap.unwrap_or(self.window / 10)
    }
}

// ---- the process: CPU and memory -----------------------------------------------------------

/// CPU time used so far, by the whole process and by thread group.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    process: Duration,
    /// Threads of the fake API server's runtime and wiremock's thread.
    stand_ins: Duration,
    /// The main thread: driver, samplers, bookkeeping.
    driver: Duration,
    /// Threads of the operator's runtime that are alive now.
    operator_threads: Duration,
    /// The operator process, when it runs as one (--operator-process).
    operator_process: Option<Duration>,
}

impl Cpu {
    fn now() -> Cpu {
        let mut cpu = Cpu {
            process: stat_cpu("/proc/self/stat").map_or(Duration::ZERO, |(_, d)| d),
            ..Cpu::default()
        };
        let pid = std::process::id().to_string();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let tid = task.file_name().to_string_lossy().to_string();
                let Some((name, used)) = stat_cpu(&format!("/proc/self/task/{tid}/stat")) else {
                    continue;
                };
                if tid == pid {
                    cpu.driver += used;
                } else if name.starts_with("fake-rt") {
                    cpu.stand_ins += used;
                } else if name.starts_with("op-rt") {
                    cpu.operator_threads += used;
                }
            }
        }
        cpu
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            process: self.process.saturating_sub(earlier.process),
            stand_ins: self.stand_ins.saturating_sub(earlier.stand_ins),
            driver: self.driver.saturating_sub(earlier.driver),
            operator_threads: self
                .operator_threads
                .saturating_sub(earlier.operator_threads),
            operator_process: match (self.operator_process, earlier.operator_process) {
                (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                (now, _) => now,
            },
        }
    }

    /// What the operator used: the process minus the stand-ins and the driver (this also counts
    /// any operator thread that has exited since).
    fn operator(&self) -> Duration {
        self.operator_process.unwrap_or_else(|| {
            self.process
                .saturating_sub(self.stand_ins)
                .saturating_sub(self.driver)
        })
    }

    /// Everything: this process, and the operator's when it runs as one.
    fn total(&self) -> Duration {
        self.process + self.operator_process.unwrap_or_default()
    }
}

/// A `VmRSS`-style field of /proc/self/status, in bytes.
fn proc_status(field: &str) -> usize {
    proc_status_of("/proc/self/status", field)
}

fn proc_status_of(path: &str, field: &str) -> usize {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn rss() -> usize {
    proc_status("VmRSS:")
}

fn peak_rss() -> usize {
    proc_status("VmHWM:")
}

/// Resets VmHWM to the current RSS.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---- the in-process API server on its own runtime -------------------------------------------

/// The fake API server's router as a kube client transport, run on the stand-ins' runtime: each
/// request is handled there and its answer (including endless watch streams) streamed back, so
/// that the operator's threads only do the operator's work.
#[derive(Clone)]
struct OnRuntime {
    router: axum::Router,
    handle: Handle,
}

type Chunk = Result<bytes::Bytes, axum::Error>;

impl tower::Service<http::Request<kube::client::Body>> for OnRuntime {
    type Response = http::Response<axum::body::Body>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        use tower::ServiceExt;
        let router = self.router.clone();
        let handle = self.handle.clone();
        Box::pin(async move {
            let (head_tx, head_rx) = tokio::sync::oneshot::channel();
            let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Chunk>(64);
            handle.spawn(async move {
                let response = match router.oneshot(request.map(axum::body::Body::new)).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                let (parts, body) = response.into_parts();
                if head_tx.send(parts).is_err() {
                    return;
                }
                let mut chunks = body.into_data_stream();
                loop {
                    tokio::select! {
                        chunk = chunks.next() => match chunk {
                            Some(chunk) => {
                                if body_tx.send(chunk).await.is_err() {
                                    return;
                                }
                            }
                            None => return,
                        },
                        () = body_tx.closed() => return,
                    }
                }
            });
            let parts = head_rx
                .await
                .map_err(|_| std::io::Error::other("the fake API server dropped a request"))?;
            let chunks = stream::unfold(body_rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            });
            Ok(http::Response::from_parts(
                parts,
                axum::body::Body::from_stream(chunks),
            ))
        })
    }
}

// ---- what happened to every Secret: recorded from the fake's store as it commits -------------

#[derive(Clone, Copy, Debug)]
struct Replacement {
    request: usize,
    /// When the new Secret was stored.
    at: Instant,
    wall: Timestamp,
    /// `expiresAt` of the URL replaced; `None` for a request's first Secret.
    old_expires: Option<Timestamp>,
    /// `expiresAt` of the new URL.
    new_expires: Option<Timestamp>,
    /// Serial numbers the fake AWS gave the old and the new URL.
    old_url: Option<u64>,
    new_url: Option<u64>,
    /// The request's `status.nextRefreshTime` when the new Secret was stored.
    planned: Option<Timestamp>,
}

#[derive(Default)]
struct Tracker {
    /// Per request: `expiresAt` of the URL its Secret holds now.
    expires: Vec<Option<Timestamp>>,
    /// Per request: `status.nextRefreshTime`.
    planned: Vec<Option<Timestamp>>,
    created: Vec<Option<Instant>>,
    first_secret: Vec<Option<Instant>>,
    first_secrets: usize,
    replacements: Vec<Replacement>,
    /// (request, when) for every sample that found a Secret past its `expiresAt`.
    expired_samples: Vec<(usize, Instant)>,
}

impl Tracker {
    fn new(n: usize) -> Self {
        Tracker {
            expires: vec![None; n],
            planned: vec![None; n],
            created: vec![None; n],
            first_secret: vec![None; n],
            ..Tracker::default()
        }
    }
}

fn request_name(i: usize) -> String {
    format!("r{i:05}")
}

fn request_index(object: &Value) -> Option<usize> {
    object["metadata"]["name"]
        .as_str()?
        .strip_prefix('r')?
        .parse()
        .ok()
}

fn decoded(value: &Value) -> Option<String> {
    let bytes = ByteString::deserialize(value).ok()?;
    String::from_utf8(bytes.0).ok()
}

/// The serial number in a fake URL: `https://quicksight.fake.test/sign-in/{n}?code=...`.
fn url_serial(url: &str) -> Option<u64> {
    url.split("/sign-in/")
        .nth(1)?
        .split('?')
        .next()?
        .parse()
        .ok()
}

fn watch_store(kube: &FakeApiServer, tracker: Arc<Mutex<Tracker>>) {
    kube.observe(move |change| {
        let plural = change.kind.plural;
        if plural != "secrets" && plural != "embedurlrequests" {
            return;
        }
        let Some(i) = change.after.or(change.before).and_then(request_index) else {
            return;
        };
        let mut t = tracker.lock().unwrap();
        if i >= t.expires.len() {
            return;
        }
        if plural == "embedurlrequests" {
            if change.before.is_none() {
                t.created[i] = Some(Instant::now());
            }
            t.planned[i] = change
                .after
                .and_then(|a| a["status"]["nextRefreshTime"].as_str())
                .and_then(|s| s.parse().ok());
            return;
        }
        let Some(after) = change.after else {
            t.expires[i] = None;
            return;
        };
        let new_expires = decoded(&after["data"]["expiresAt"]).and_then(|s| s.parse().ok());
        let old_url = change.before.map(|b| &b["data"]["url"]);
        if old_url != Some(&after["data"]["url"]) {
            let at = Instant::now();
            let replacement = Replacement {
                request: i,
                at,
                wall: Timestamp::now(),
                old_expires: t.expires[i],
                new_expires,
                old_url: old_url.and_then(decoded).as_deref().and_then(url_serial),
                new_url: decoded(&after["data"]["url"])
                    .as_deref()
                    .and_then(url_serial),
                planned: t.planned[i],
            };
            t.replacements.push(replacement);
            if t.first_secret[i].is_none() {
                t.first_secret[i] = Some(at);
                t.first_secrets += 1;
            }
        }
        t.expires[i] = new_expires;
    });
}

/// Every `every`, notes each Secret whose `expiresAt` has passed.
async fn sample_lapses(
    tracker: Arc<Mutex<Tracker>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = Timestamp::now();
        let at = Instant::now();
        let mut t = tracker.lock().unwrap();
        let expired: Vec<usize> = t
            .expires
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some_and(|e| e <= now))
            .map(|(i, _)| i)
            .collect();
        t.expired_samples
            .extend(expired.into_iter().map(|i| (i, at)));
    }
}

// ---- a world: stand-ins, a driver client, and the operator -----------------------------------

struct Runtimes {
    stand_ins: Runtime,
    operator: Runtime,
}

enum RunningOperator {
    InProcess {
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        metrics: Arc<Metrics>,
    },
    /// The real binary; `http` serves its probes and metrics.
    Process {
        child: std::process::Child,
        http: std::net::SocketAddr,
    },
}

impl RunningOperator {
    async fn reconciles(&self) -> u64 {
        let text = match self {
            RunningOperator::InProcess { metrics, .. } => metrics.encode(),
            RunningOperator::Process { http, .. } => http_get(*http, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default(),
        };
        text.lines()
            .find_map(|l| l.strip_prefix("embedurl_reconciles_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn pid(&self) -> Option<u32> {
        match self {
            RunningOperator::InProcess { .. } => None,
            RunningOperator::Process { child, .. } => Some(child.id()),
        }
    }
}

/// A plain HTTP/1.0 GET: status and body.
async fn http_get(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

struct World<'a> {
    rts: &'a Runtimes,
    opts: &'a Options,
    kube: FakeApiServer,
    aws: FakeAws,
    client: kube::Client,
    tracker: Arc<Mutex<Tracker>>,
    n: usize,
    window: Duration,
    /// Instant and wall clock read together, to turn fake AWS call instants into times.
    epoch: (Instant, Timestamp),
    operator: Option<RunningOperator>,
    sampler: watch::Sender<bool>,
    /// With --operator-process: the kubeconfig for the fake API server served over HTTP.
    kubeconfig: Option<(tempfile::TempDir, std::path::PathBuf)>,
    /// With --operator-process: its RSS right after it first started, with no requests.
    baseline_rss: usize,
}

impl<'a> World<'a> {
    async fn start(rts: &'a Runtimes, opts: &'a Options, n: usize, window: Duration) -> World<'a> {
        let kube = FakeApiServer::new();
        kube.set_history_limit(opts.history_limit);
        let tracker = Arc::new(Mutex::new(Tracker::new(n)));
        watch_store(&kube, tracker.clone());
        // Started from a stand-in thread, so that wiremock's server thread inherits its name.
        let aws = rts
            .stand_ins
            .spawn(FakeAws::start())
            .await
            .expect("fake AWS started");
        aws.set_latency(opts.latency);
        aws.set_rate_limit(opts.tps.map(|tps| (tps, (tps / 10.0).max(1.0))));
        let client = kube::Client::new(
            OnRuntime {
                router: kube.router(),
                handle: rts.stand_ins.handle().clone(),
            },
            "default",
        );
        let (sampler, stop) = watch::channel(false);
        tokio::spawn(sample_lapses(tracker.clone(), opts.sample_every, stop));
        let kubeconfig = if opts.process {
            let server = kube.clone();
            let address = rts
                .stand_ins
                .spawn(async move { server.serve_http().await })
                .await
                .expect("fake API server on HTTP");
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("kubeconfig");
            std::fs::write(&path, FakeApiServer::kubeconfig_yaml(address)).expect("kubeconfig");
            Some((dir, path))
        } else {
            None
        };
        let mut world = World {
            rts,
            opts,
            kube,
            aws,
            client,
            tracker,
            n,
            window,
            epoch: (Instant::now(), Timestamp::now()),
            operator: None,
            sampler,
            kubeconfig,
            baseline_rss: 0,
        };
        world.start_operator().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        world.baseline_rss = world.operator_rss().map_or(0, |(rss, _)| rss);
        world
    }

    fn wall(&self, at: Instant) -> Timestamp {
        let (i0, w0) = self.epoch;
        let offset = jiff::SignedDuration::try_from(at.saturating_duration_since(i0))
            .unwrap_or_default()
            - jiff::SignedDuration::try_from(i0.saturating_duration_since(at)).unwrap_or_default();
        w0 + offset
    }

    /// Starts the operator on its runtime, as `main.rs` wires it; returns how long until its caches
    /// had synced.
    async fn start_operator(&mut self) -> Duration {
        assert!(self.operator.is_none());
        if self.opts.process {
            return self.start_operator_process().await;
        }
        let started = Instant::now();
        let _entered = self.rts.operator.enter();
        let client = kube::Client::new(
            OnRuntime {
                router: self.kube.router(),
                handle: self.rts.stand_ins.handle().clone(),
            },
            "default",
        );
        let metrics = Arc::new(Metrics::new());
        let (stop, stop_rx) = watch::channel(false);
        let config = ControllerConfig {
            namespaces: vec![],
            concurrency: self.opts.concurrency,
            settings: Settings {
                windows: UseByWindows::uniform(self.window),
                default_region: Some("us-east-1".to_string()),
                policy_mode: PolicyMode::Permissive,
            },
            instance: Some("bench".to_string()),
            // The operator's own client-side limit is off: the fake AWS's TPS cap is the limit
            // under test, as in the lower bound N / R.
            aws_rate: 0.0,
            aws_burst: 1,
            liveness: Default::default(),
        };
        let aws = Arc::new(AwsClients::new(self.aws.sdk_config()));
        let (readiness, controllers) =
            controller::run(client, aws, config, metrics.clone(), stop_rx);
        let task = self.rts.operator.spawn(controllers);
        drop(_entered);
        tokio::time::timeout(Duration::from_secs(120), readiness.wait_synced())
            .await
            .expect("operator caches synced");
        self.operator = Some(RunningOperator::InProcess {
            stop,
            task,
            metrics,
        });
        started.elapsed()
    }

    /// Spawns the real binary, configured as the end-to-end tests do, and waits until ready.
    async fn start_operator_process(&mut self) -> Duration {
        let started = Instant::now();
        let (dir, kubeconfig) = self.kubeconfig.as_ref().expect("served over HTTP");
        let http = free_port();
        let child = std::process::Command::new(&self.opts.binary)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ENDPOINT_URL_QUICKSIGHT", self.aws.uri())
            .env("AWS_ENDPOINT_URL_QBUSINESS", self.aws.uri())
            .env("AWS_ENDPOINT_URL_KINESIS_ANALYTICS_V2", self.aws.uri())
            .env("AWS_ACCESS_KEY_ID", support::fake_aws::TEST_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", "fake-secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("no-aws-credentials"),
            )
            .env("EMBEDURL_HTTP_ADDR", http.to_string())
            .env(
                "EMBEDURL_USE_BY_WINDOW_OVERRIDE",
                format!("{}ms", self.window.as_millis()),
            )
            .env("EMBEDURL_CONCURRENCY", self.opts.concurrency.to_string())
            // As in-process: the fake AWS's TPS cap, not the operator's pacing, is the limit.
            .env("EMBEDURL_AWS_QPS", "0")
            .env(
                "EMBEDURL_WORKER_THREADS",
                self.opts.operator_threads.to_string(),
            )
            .env("EMBEDURL_POLICY_MODE", "permissive")
            .env("POD_NAME", "bench")
            .env("RUST_LOG", if self.opts.logs { "info" } else { "off" })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the operator binary");
        let operator = RunningOperator::Process { child, http };
        let deadline = Instant::now() + Duration::from_secs(120);
        while http_get(http, "/readyz").await.map(|(status, _)| status) != Some(200) {
            assert!(Instant::now() < deadline, "operator binary ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.operator = Some(operator);
        started.elapsed()
    }

    /// Stops the operator gracefully; returns its reconcile count.
    async fn stop_operator(&mut self) -> u64 {
        let operator = self.operator.take().expect("operator running");
        let reconciles = operator.reconciles().await;
        match operator {
            RunningOperator::InProcess { stop, task, .. } => {
                let _ = stop.send(true);
                tokio::time::timeout(Duration::from_secs(60), task)
                    .await
                    .expect("operator drained")
                    .expect("operator task");
            }
            RunningOperator::Process { mut child, .. } => {
                // SIGTERM: the operator drains and exits.
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(60);
                while child.try_wait().ok().flatten().is_none() {
                    assert!(Instant::now() < deadline, "operator binary exited");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        reconciles
    }

    async fn reconciles(&self) -> u64 {
        match &self.operator {
            Some(operator) => operator.reconciles().await,
            None => 0,
        }
    }

    /// CPU so far, including the operator process's own when it runs as one.
    fn cpu(&self) -> Cpu {
        let mut cpu = Cpu::now();
        if let Some(pid) = self.operator.as_ref().and_then(RunningOperator::pid) {
            cpu.operator_process = stat_cpu(&format!("/proc/{pid}/stat")).map(|(_, used)| used);
        }
        cpu
    }

    /// RSS and peak RSS of the operator process, when it runs as one.
    fn operator_rss(&self) -> Option<(usize, usize)> {
        let pid = self.operator.as_ref()?.pid()?;
        let status = format!("/proc/{pid}/status");
        Some((
            proc_status_of(&status, "VmRSS:"),
            proc_status_of(&status, "VmHWM:"),
        ))
    }

    fn reset_operator_peak_rss(&self) {
        if let Some(pid) = self.operator.as_ref().and_then(RunningOperator::pid) {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
    }

    /// Creates requests `0..n` with up to 64 creations in flight.
    async fn create_all(&self) {
        let api: Api<EmbedUrlRequest> = Api::namespaced(self.client.clone(), NS);
        stream::iter(0..self.n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(
                        &PostParams::default(),
                        &EmbedUrlRequest::new(&request_name(i), support::quick_sight()),
                    )
                    .await
                    .expect("create request");
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<()>>()
            .await;
    }

    async fn wait_all_secrets(&self, timeout: Duration) -> bool {
        let started = Instant::now();
        let mut report = started + Duration::from_secs(10);
        while started.elapsed() < timeout {
            let written = self.tracker.lock().unwrap().first_secrets;
            if written >= self.n {
                return true;
            }
            if Instant::now() >= report {
                report += Duration::from_secs(10);
                let api = self.writes();
                eprintln!(
                    "   {:.0} s: {written}/{} Secrets written; AWS calls {}, watches {}, lists {}, gets {}",
                    started.elapsed().as_secs_f64(),
                    self.n,
                    self.aws.calls().len(),
                    api.watches,
                    api.lists,
                    api.gets
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn writes(&self) -> Writes {
        Writes {
            secrets: self.kube.effective_write_count("secrets"),
            requests: self.kube.effective_write_count("embedurlrequests"),
            events: self.kube.effective_write_count("events"),
            gets: ["secrets", "embedurlrequests"]
                .iter()
                .map(|r| self.kube.request_count("get", r))
                .sum(),
            lists: ["secrets", "embedurlrequests"]
                .iter()
                .map(|r| self.kube.request_count("list", r))
                .sum(),
            watches: ["secrets", "embedurlrequests"]
                .iter()
                .map(|r| self.kube.request_count("watch", r))
                .sum(),
        }
    }

    /// Measures the operator's memory, then stops it. In-process: its heap, as the live heap that
    /// goes away when it stops (median of a few samples before). As a process: its RSS.
    async fn operator_memory_then_stop(&mut self) -> (Memory, u64) {
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples.push(self.operator_rss().map_or_else(live_heap, |(rss, _)| rss));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        samples.sort_unstable();
        let median = samples[samples.len() / 2];
        let peak = self.operator_rss().map(|(_, peak)| peak);
        let reconciles = self.stop_operator().await;
        if let Some(peak) = peak {
            return (
                Memory::Rss {
                    rss: median,
                    peak,
                    baseline: self.baseline_rss,
                },
                reconciles,
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rest = live_heap();
        (
            Memory::Heap {
                operator: median.saturating_sub(rest),
                rest,
            },
            reconciles,
        )
    }

    /// Fake AWS calls received in `[from, to)`.
    fn calls_between(&self, calls: &[Call], from: Instant, to: Instant) -> (usize, usize) {
        let within = calls.iter().filter(|c| c.at >= from && c.at < to);
        within.fold((0, 0), |(all, failed), c| {
            (all + 1, failed + usize::from(!c.succeeded))
        })
    }

    /// When the fake AWS handed out each URL, by serial number.
    fn issued(&self, calls: &[Call]) -> HashMap<u64, Timestamp> {
        calls
            .iter()
            .filter_map(|c| Some((url_serial(c.url.as_deref()?)?, self.wall(c.at))))
            .collect()
    }

    async fn shut_down(mut self) {
        if self.operator.is_some() {
            self.stop_operator().await;
        }
        let _ = self.sampler.send(true);
    }
}

/// The operator's memory, as far as it can be told apart.
#[derive(Clone, Copy, Debug)]
enum Memory {
    /// In-process: the live heap freed when the operator stopped, and what stayed (stand-ins,
    /// bookkeeping).
    Heap { operator: usize, rest: usize },
    /// The operator process: RSS now, peak since the last reset, and right after it started.
    Rss {
        rss: usize,
        peak: usize,
        baseline: usize,
    },
}

impl Memory {
    fn operator(&self) -> usize {
        match *self {
            Memory::Heap { operator, .. } => operator,
            Memory::Rss { rss, .. } => rss,
        }
    }

    /// What the operator holds with no requests (known only for a process).
    fn baseline(&self) -> usize {
        match *self {
            Memory::Heap { .. } => 0,
            Memory::Rss { baseline, .. } => baseline,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Memory::Heap { .. } => "operator heap",
            Memory::Rss { .. } => "operator RSS",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Writes {
    secrets: usize,
    requests: usize,
    events: usize,
    /// Reads, lists and watches of Secrets and requests (not writes, but the same bookkeeping).
    gets: usize,
    lists: usize,
    watches: usize,
}

impl Writes {
    fn since(self, earlier: Writes) -> Writes {
        Writes {
            secrets: self.secrets - earlier.secrets,
            requests: self.requests - earlier.requests,
            events: self.events - earlier.events,
            gets: self.gets - earlier.gets,
            lists: self.lists - earlier.lists,
            watches: self.watches - earlier.watches,
        }
    }
}

// ---- statistics and the table ----------------------------------------------------------------

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Seconds, signed, to three decimals.
fn s3(v: f64) -> String {
    format!("{v:+.3} s")
}

struct Row {
    scenario: String,
    metric: String,
    value: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Table {
    fn row(
        &mut self,
        scenario: &str,
        metric: &str,
        value: String,
        target: &str,
        met: Option<bool>,
    ) {
        self.rows.push(Row {
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            value,
            target: target.to_string(),
            met,
        });
    }

    fn render(&self) -> String {
        let header = ["scenario", "metric", "value", "target", "met"];
        let cells: Vec<[String; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.scenario.clone(),
                    r.metric.clone(),
                    r.value.clone(),
                    r.target.clone(),
                    match r.met {
                        Some(true) => "yes".to_string(),
                        Some(false) => "NO".to_string(),
                        None => String::new(),
                    },
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: &[String]| {
            let mut s = String::from("|");
            for (c, w) in cols.iter().zip(widths) {
                let _ = write!(s, " {c}{} |", " ".repeat(w - c.chars().count()));
            }
            s
        };
        let mut out = String::new();
        out.push_str(&line(&header.map(String::from)));
        out.push('\n');
        out.push('|');
        for w in widths {
            out.push_str(&"-".repeat(w + 2));
            out.push('|');
        }
        out.push('\n');
        for row in &cells {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

// ---- scenarios -------------------------------------------------------------------------------

struct HeapPoint {
    n: usize,
    memory: Memory,
}

async fn burst(
    rts: &Runtimes,
    opts: &Options,
    n: usize,
    table: &mut Table,
    heaps: &mut Vec<HeapPoint>,
) {
    let name = format!("burst N={n}");
    eprintln!("== {name}: creating {n} requests at once");
    let mut world = World::start(rts, opts, n, opts.burst_window).await;
    let (cpu0, writes0) = (world.cpu(), world.writes());
    let t0 = Instant::now();
    world.create_all().await;
    let created_in = t0.elapsed();
    let done = world
        .wait_all_secrets(Duration::from_secs(60) + opts.burst_window)
        .await;
    let all_written = {
        let t = world.tracker.lock().unwrap();
        t.first_secret.iter().flatten().max().map(|last| *last - t0)
    };
    let (cpu, writes) = (world.cpu().since(cpu0), world.writes().since(writes0));
    let first: Vec<f64> = {
        let t = world.tracker.lock().unwrap();
        t.created
            .iter()
            .zip(&t.first_secret)
            .filter_map(|(c, f)| Some(f.as_ref()?.duration_since(*c.as_ref()?).as_secs_f64()))
            .collect()
    };
    let first = sorted(first);
    if std::env::var_os("SCALE_DEBUG").is_some() {
        let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
        for event in world.kube.list("events.k8s.io/v1", "events") {
            let note: String = event["note"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(60)
                .filter(|c| !c.is_ascii_digit())
                .collect();
            *reasons
                .entry(format!("{} {} {note}", event["type"], event["reason"]))
                .or_default() += 1;
        }
        eprintln!("event reasons: {reasons:#?}");
    }
    let calls = world.aws.calls();
    let throttled = calls.iter().filter(|c| !c.succeeded).count();
    let bound = n as f64 / opts.rate_bound();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (memory, reconciles) = world.operator_memory_then_stop().await;
    heaps.push(HeapPoint { n, memory });
    world.shut_down().await;

    match (done, all_written) {
        (true, Some(all)) => {
            let ratio = all.as_secs_f64() / bound;
            table.row(
                &name,
                "all Secrets written (from first create)",
                format!("{} = {ratio:.2} x N/R ({bound:.2} s)", secs(all)),
                "<= 1.25 x N/R",
                Some(ratio <= 1.25),
            );
        }
        _ => table.row(
            &name,
            "all Secrets written",
            format!("only {}/{n} after the timeout", first.len()),
            "<= 1.25 x N/R",
            Some(false),
        ),
    }
    table.row(
        &name,
        "time to first Secret p50 / p99 / max",
        format!(
            "{:.2} / {:.2} / {:.2} s",
            percentile(&first, 50.0),
            percentile(&first, 99.0),
            first.last().copied().unwrap_or(f64::NAN)
        ),
        "",
        None,
    );
    table.row(
        &name,
        "AWS calls (throttled) / API writes per Secret",
        format!(
            "{:.2} ({throttled}) / {:.2} (+{} events)",
            calls.len() as f64 / n as f64,
            (writes.secrets + writes.requests - n) as f64 / n as f64,
            writes.events
        ),
        "",
        None,
    );
    table.row(
        &name,
        "CPU per Secret: operator / whole process",
        format!(
            "{} / {} (reconciles {:.1} per Secret)",
            ms(cpu.operator() / n as u32),
            ms(cpu.total() / n as u32),
            reconciles as f64 / n as f64
        ),
        "",
        None,
    );
    table.notes.push(format!(
        "{name}: creating the {n} requests took {}; R = {:.0}/s; API reads {}, watch (re)starts {}, lists {}",
        secs(created_in),
        opts.rate_bound(),
        writes.gets,
        writes.watches,
        writes.lists
    ));
}

/// Creates the population and waits until every request has been refreshed at least once.
async fn populate(world: &World<'_>) -> Instant {
    eprintln!(
        "== populating {} requests, {}s windows",
        world.n,
        world.window.as_secs_f64()
    );
    world.create_all().await;
    assert!(
        world.wait_all_secrets(Duration::from_secs(600)).await,
        "every request got its Secret"
    );
    // Let the creation burst pass: one window, so every request has refreshed once.
    tokio::time::sleep(world.window).await;
    Instant::now()
}

async fn steady(world: &mut World<'_>, table: &mut Table, rss_before: usize) {
    let opts = world.opts;
    let name = format!("steady N={}", world.n);
    let length = world.window.mul_f64(opts.windows);
    eprintln!("== {name}: measuring for {}", secs(length));
    let start = Instant::now();
    let (cpu0, writes0, reconciles0) = (world.cpu(), world.writes(), world.reconciles().await);
    let operator_peak_before = world.operator_rss().map(|(_, peak)| peak);
    reset_peak_rss();
    world.reset_operator_peak_rss();
    let mut rss_samples = Vec::new();
    let mut heap_samples = Vec::new();
    while start.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_samples.push(rss());
        heap_samples.push(live_heap());
    }
    let end = Instant::now();
    let (cpu, writes, reconciles) = (
        world.cpu().since(cpu0),
        world.writes().since(writes0),
        world.reconciles().await - reconciles0,
    );
    let peak = peak_rss();
    let rss_steady = {
        let mut s = rss_samples.clone();
        s.sort_unstable();
        s[s.len() / 2]
    };
    if std::env::var_os("SCALE_DEBUG").is_some() {
        for (api_version, plural) in [
            ("v1", "secrets"),
            ("embedurl.io/v1alpha1", "embedurlrequests"),
            ("events.k8s.io/v1", "events"),
        ] {
            let objects = world.kube.list(api_version, plural);
            let bytes: usize = objects.iter().map(|o| o.to_string().len()).sum();
            eprintln!(
                "{plural}: {} objects, {} JSON bytes each on average; first: {}",
                objects.len(),
                bytes / objects.len().max(1),
                objects.first().map(|o| o.to_string()).unwrap_or_default()
            );
        }
    }
    let (memory, _) = world.operator_memory_then_stop().await;
    let calls = world.aws.calls();
    let issued = world.issued(&calls);
    let (aws_calls, aws_failed) = world.calls_between(&calls, start, end);
    let t = world.tracker.lock().unwrap();
    let refreshes: Vec<&Replacement> = t
        .replacements
        .iter()
        .filter(|r| r.at >= start && r.at < end && r.old_expires.is_some())
        .collect();
    let count = refreshes.len().max(1);
    let slack = sorted(
        refreshes
            .iter()
            .filter_map(|r| Some(r.old_expires?.duration_since(r.wall).as_secs_f64()))
            .collect(),
    );
    let aws_slack = sorted(
        refreshes
            .iter()
            .filter_map(|r| {
                let issued = *issued.get(&r.old_url?)?;
                let use_by = issued + jiff::SignedDuration::try_from(world.window).ok()?;
                Some(use_by.duration_since(r.wall).as_secs_f64())
            })
            .collect(),
    );
    let lateness = sorted(
        refreshes
            .iter()
            .filter_map(|r| {
                let minted = *issued.get(&r.new_url?)?;
                Some(minted.duration_since(r.planned?).as_secs_f64())
            })
            .collect(),
    );
    let mut lapsed: Vec<usize> = refreshes
        .iter()
        .filter(|r| r.old_expires.is_some_and(|e| e <= r.wall))
        .map(|r| r.request)
        .chain(
            t.expired_samples
                .iter()
                .filter(|(_, at)| *at >= start && *at <= end)
                .map(|(i, _)| *i),
        )
        .collect();
    lapsed.sort_unstable();
    lapsed.dedup();
    let aws_lapsed = aws_slack.iter().filter(|s| **s <= 0.0).count();
    // How much later than the AWS-side use-by time the Secret says its URL works.
    let overstated = sorted(
        refreshes
            .iter()
            .filter_map(|r| {
                let issued = *issued.get(&r.new_url?)?;
                let use_by = issued + jiff::SignedDuration::try_from(world.window).ok()?;
                Some(r.new_expires?.duration_since(use_by).as_secs_f64())
            })
            .collect(),
    );
    drop(t);

    let n = world.n;
    let per_refresh = |d: Duration| d / count as u32;
    let rate = count as f64 / (end - start).as_secs_f64();
    table.row(
        &name,
        "refreshes measured (rate)",
        format!(
            "{count} in {} ({rate:.0}/s; 10k at the real 300 s window: ~70/s)",
            secs(end - start)
        ),
        "",
        None,
    );
    if std::env::var_os("SCALE_DEBUG").is_some() {
        let qs: [f64; 9] = [0.0, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 100.0];
        eprintln!(
            "lateness quantiles {:?}",
            qs.map(|q| (q, (percentile(&lateness, q.max(0.001)) * 1000.0).round()))
        );
    }
    table.row(
        &name,
        "refresh lateness p50 / p99 / max",
        format!(
            "{} / {} / {}",
            s3(percentile(&lateness, 50.0)),
            s3(percentile(&lateness, 99.0)),
            s3(lateness.last().copied().unwrap_or(f64::NAN))
        ),
        "",
        None,
    );
    table.row(
        &name,
        "slack at replacement, Secret expiresAt: min / p1 / p50",
        format!(
            "{} / {} / {}",
            s3(slack.first().copied().unwrap_or(f64::NAN)),
            s3(percentile(&slack, 1.0)),
            s3(percentile(&slack, 50.0))
        ),
        "> 0",
        Some(slack.first().is_some_and(|s| *s > 0.0)),
    );
    table.row(
        &name,
        "slack at replacement, AWS issue + window: min / p1 / p50",
        format!(
            "{} / {} / {}",
            s3(aws_slack.first().copied().unwrap_or(f64::NAN)),
            s3(percentile(&aws_slack, 1.0)),
            s3(percentile(&aws_slack, 50.0))
        ),
        "> 0",
        Some(aws_slack.first().is_some_and(|s| *s > 0.0)),
    );
    table.row(
        &name,
        "Secret expiresAt minus AWS issue + window: p50 / max",
        format!(
            "{} / {}",
            s3(percentile(&overstated, 50.0)),
            s3(overstated.last().copied().unwrap_or(f64::NAN))
        ),
        "<= 0",
        Some(overstated.last().is_some_and(|o| *o <= 0.0)),
    );
    table.row(
        &name,
        "Secrets that ever held an expired URL",
        format!("{} (by AWS issue time: {aws_lapsed})", lapsed.len()),
        "0",
        Some(lapsed.is_empty() && aws_lapsed == 0),
    );
    // Calls in the phase against the refreshes those calls produced, so that a refresh whose
    // call came just before the phase started does not count.
    let produced = {
        let (from, to) = (world.wall(start), world.wall(end));
        let t = world.tracker.lock().unwrap();
        t.replacements
            .iter()
            .filter(|r| {
                r.old_expires.is_some()
                    && r.new_url
                        .and_then(|u| issued.get(&u))
                        .is_some_and(|m| *m >= from && *m < to)
            })
            .count()
    };
    let calls_per = aws_calls as f64 / produced.max(1) as f64;
    table.row(
        &name,
        "AWS calls per refresh (failed)",
        format!("{calls_per:.3} = {aws_calls} / {produced} (failed {aws_failed})"),
        "1",
        Some((calls_per - 1.0).abs() < 0.005 && aws_failed == 0),
    );
    let writes_per = (writes.secrets + writes.requests) as f64 / count as f64;
    table.row(
        &name,
        "API writes per refresh: Secret + status (events)",
        format!(
            "{writes_per:.3} = {:.3} + {:.3} ({})",
            writes.secrets as f64 / count as f64,
            writes.requests as f64 / count as f64,
            writes.events
        ),
        "<= 2",
        Some(writes_per <= 2.0),
    );
    table.row(
        &name,
        "reconciles per refresh",
        format!("{:.2}", reconciles as f64 / count as f64),
        "",
        None,
    );
    let operator_cpu = per_refresh(cpu.operator());
    let in_process = matches!(memory, Memory::Heap { .. });
    table.row(
        &name,
        if in_process {
            "CPU per refresh: operator threads"
        } else {
            "CPU per refresh: operator process"
        },
        ms(operator_cpu),
        "<= 0.3 ms",
        Some(operator_cpu <= Duration::from_micros(300)),
    );
    table.row(
        &name,
        "CPU per refresh: all (stand-ins / driver)",
        format!(
            "{} ({} / {})",
            ms(per_refresh(cpu.total())),
            ms(per_refresh(cpu.stand_ins)),
            ms(per_refresh(cpu.driver))
        ),
        "",
        None,
    );
    let target = 50 * 1024 * 1024;
    match memory {
        Memory::Heap { operator, rest } => {
            table.row(
                &name,
                "bench process RSS: peak / steady (stand-ins included)",
                format!("{:.1} / {:.1} MiB", mib(peak), mib(rss_steady)),
                "",
                None,
            );
            table.row(
                &name,
                "operator heap (freed when it stops): total / per request",
                format!(
                    "{:.1} MiB / {:.2} KiB",
                    mib(operator),
                    operator as f64 / 1024.0 / n as f64
                ),
                "RSS: --operator-process",
                None,
            );
            table.notes.push(format!(
                "{name}: bench process RSS grew {:.1} KiB per request (stand-ins included); live heap \
                 with the operator {:.1} MiB (median over the phase {:.1} MiB), of which stand-ins \
                 and bookkeeping {:.1} MiB",
                (rss_steady.saturating_sub(rss_before)) as f64 / 1024.0 / n as f64,
                mib(operator + rest),
                mib({
                    let mut h = heap_samples.clone();
                    h.sort_unstable();
                    h[h.len() / 2]
                }),
                mib(rest)
            ));
        }
        Memory::Rss {
            rss,
            peak,
            baseline,
        } => {
            table.row(
                &name,
                "operator RSS: peak / steady",
                format!(
                    "{:.1} / {:.1} MiB (peak while populating {:.1} MiB)",
                    mib(peak),
                    mib(rss),
                    mib(operator_peak_before.unwrap_or_default())
                ),
                "<= 50 MiB",
                Some(peak <= target),
            );
            table.row(
                &name,
                "operator RSS per request, marginal",
                format!(
                    "{:.2} KiB (over {:.1} MiB with no requests)",
                    rss.saturating_sub(baseline) as f64 / 1024.0 / n as f64,
                    mib(baseline)
                ),
                "",
                None,
            );
        }
    }
    table.notes.push(format!(
        "{name}: API reads per refresh {:.3}; watch (re)starts {}, lists {} (a watch more than 1024 \
         changes behind is cut off and resumes; beyond the fake's history it relists)",
        writes.gets as f64 / count as f64,
        writes.watches,
        writes.lists
    ));
    table.notes.push(format!(
        "{name}: CPU over {}: all {}, operator {} (alive op-rt threads {}), stand-ins {}, driver {}",
        secs(end - start),
        secs(cpu.total()),
        secs(cpu.operator()),
        secs(cpu.operator_threads),
        secs(cpu.stand_ins),
        secs(cpu.driver)
    ));
}

async fn restart(world: &mut World<'_>, table: &mut Table) {
    let opts = world.opts;
    let name = format!("restart N={}", world.n);
    let gap = opts.restart_gap();
    eprintln!("== {name}: operator down for {}", secs(gap));
    if world.operator.is_some() {
        world.stop_operator().await;
    }
    let stopped = Instant::now();
    tokio::time::sleep(gap).await;
    let restarted = Instant::now();
    let restarted_wall = Timestamp::now();
    let overdue: Vec<usize> = {
        let t = world.tracker.lock().unwrap();
        (0..world.n)
            .filter(|i| t.planned[*i].is_some_and(|p| p <= restarted_wall))
            .collect()
    };
    let sync = world.start_operator().await;
    tokio::time::sleep(world.window.saturating_sub(restarted.elapsed())).await;
    let window_end = restarted + world.window;
    // Watch one more half window for lapses caused by the restart.
    tokio::time::sleep(world.window / 2).await;
    let end = Instant::now();
    let calls = world.aws.calls();
    let issued = world.issued(&calls);
    let (aws_calls, aws_failed) = world.calls_between(&calls, restarted, window_end);
    let t = world.tracker.lock().unwrap();
    let in_window: Vec<&Replacement> = t
        .replacements
        .iter()
        .filter(|r| {
            r.new_url
                .and_then(|u| issued.get(&u))
                .is_some_and(|minted| {
                    *minted >= world.wall(restarted) && *minted < world.wall(window_end)
                })
        })
        .collect();
    // Due: the request's planned refresh (status, whole seconds) had come, give or take the
    // rounding of that time to the second.
    let tolerance = jiff::SignedDuration::from_millis(1000);
    let due = in_window
        .iter()
        .filter(|r| {
            let minted = issued[&r.new_url.unwrap_or_default()];
            r.planned.is_some_and(|p| p <= minted + tolerance)
        })
        .count();
    let catch_up = {
        let last = overdue
            .iter()
            .filter_map(|i| {
                t.replacements
                    .iter()
                    .filter(|r| r.request == *i && r.at >= restarted)
                    .map(|r| r.at)
                    .min()
            })
            .max();
        last.map(|l| l - restarted)
    };
    let replaced_around: Vec<&Replacement> = t
        .replacements
        .iter()
        .filter(|r| r.at >= stopped && r.at < end && r.old_expires.is_some())
        .collect();
    let mut lapsed: Vec<usize> = replaced_around
        .iter()
        .filter(|r| r.old_expires.is_some_and(|e| e <= r.wall))
        .map(|r| r.request)
        .chain(
            t.expired_samples
                .iter()
                .filter(|(_, at)| *at >= stopped && *at <= end)
                .map(|(i, _)| *i),
        )
        .collect();
    lapsed.sort_unstable();
    lapsed.dedup();
    let min_slack = replaced_around
        .iter()
        .filter_map(|r| Some(r.old_expires?.duration_since(r.wall).as_secs_f64()))
        .min_by(f64::total_cmp);
    let written = in_window.len();
    drop(t);
    let unwritten = (aws_calls - aws_failed).saturating_sub(written);
    table.row(
        &name,
        "AWS calls in first window after restart: all / due",
        format!(
            "{aws_calls} / {due} (failed {aws_failed}, URL never written {unwritten}; {} overdue at restart, caught up in {})",
            overdue.len(),
            catch_up.map_or("-".to_string(), secs)
        ),
        "all due",
        Some(aws_calls == due && aws_failed == 0),
    );
    table.row(
        &name,
        "Secrets that held an expired URL (min slack)",
        format!(
            "{} ({})",
            lapsed.len(),
            min_slack.map_or("-".to_string(), s3)
        ),
        "0",
        Some(lapsed.is_empty()),
    );
    table.notes.push(format!(
        "{name}: operator stopped for {}, caches synced {} after the start",
        secs(gap),
        secs(sync)
    ));
}

// ---- main ------------------------------------------------------------------------------------

fn main() {
    let Some(opts) = options_or_help(Options::parse(), HELP) else {
        return;
    };
    if let Ok(filter) = std::env::var("SCALE_LOG") {
        // Debugging aid: the operator's logs on stderr.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    } else if opts.logs {
        // As in production (info level), formatted but thrown away.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_target(false)
            .with_writer(std::io::sink)
            .try_init();
    }
    let rts = Runtimes {
        stand_ins: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.stand_in_threads)
            .thread_name("fake-rt")
            .enable_all()
            .build()
            .expect("stand-ins runtime"),
        operator: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.operator_threads)
            .thread_name("op-rt")
            .enable_all()
            .build()
            .expect("operator runtime"),
    };
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("driver runtime");

    let header = format!(
        "{}\noperator: {}\nparameters ({} preset): burst N={:?} with {}s windows; steady/restart N={} with {}s windows \
         (refreshBefore {}s), {} windows measured; AWS latency {}, AWS TPS {}, concurrency {}, \
         operator threads {}, stand-in threads {}; R = min(TPS, concurrency/latency) = {:.0}/s; \
         steady refreshes ~{:.0}/s = {:.0}% of R",
        machine(),
        if opts.process {
            format!(
                "the real binary ({}) as a child process, over HTTP (loopback) to the stand-ins",
                opts.binary.display()
            )
        } else {
            "in-process, on its own tokio runtime (threads op-rt), stand-ins on another (fake-rt)"
                .to_string()
        },
        opts.preset,
        opts.burst_sizes,
        opts.burst_window.as_secs_f64(),
        opts.n,
        opts.window.as_secs_f64(),
        opts.window.as_secs_f64() / 2.0,
        opts.windows,
        ms(opts.latency),
        opts.tps.map_or("unlimited".to_string(), |t| format!("{t}")),
        opts.concurrency,
        opts.operator_threads,
        opts.stand_in_threads,
        opts.rate_bound(),
        opts.steady_rate(),
        100.0 * opts.steady_rate() / opts.rate_bound()
    );
    eprintln!("{header}");
    let started = Instant::now();
    let mut table = Table::default();
    let mut heaps = Vec::new();
    driver.block_on(async {
        if opts.burst {
            for &n in &opts.burst_sizes {
                burst(&rts, &opts, n, &mut table, &mut heaps).await;
            }
        }
        if opts.steady || opts.restart {
            let rss_before = rss();
            let mut world = World::start(&rts, &opts, opts.n, opts.window).await;
            populate(&world).await;
            if opts.steady {
                steady(&mut world, &mut table, rss_before).await;
            }
            if opts.restart {
                restart(&mut world, &mut table).await;
            }
            world.shut_down().await;
        }
    });
    if let (Some(a), Some(b)) = (heaps.first(), heaps.last()) {
        let what = a.memory.what();
        let points: Vec<String> = heaps
            .iter()
            .map(|h| format!("{:.1} MiB at N={}", mib(h.memory.operator()), h.n))
            .collect();
        let marginal = if b.n > a.n {
            (b.memory.operator() as f64 - a.memory.operator() as f64) / 1024.0 / (b.n - a.n) as f64
        } else {
            a.memory.operator().saturating_sub(a.memory.baseline()) as f64 / 1024.0 / a.n as f64
        };
        table.notes.push(format!(
            "{what} at the end of each burst: {}; {marginal:.2} KiB per request",
            points.join(", ")
        ));
    }
    println!("\n{header}\n");
    print!("{}", table.render());
    println!();
    for note in &table.notes {
        println!("- {note}");
    }
    println!("- total run time {}", secs(started.elapsed()));
    rts.operator.shutdown_background();
    rts.stand_ins.shutdown_background();
}
