//! Floor benchmark: what the required crates alone cost per refresh, with no operator logic.
//!
//! ```text
//! cargo bench --bench floor                                  # scale's default steady shape
//! cargo bench --bench floor -- --n 3000 --window 40s --windows 2
//! cargo bench --bench floor -- --help
//! ```
//!
//! Every refresh, whatever operator makes it, has to make one `aws-sdk-quicksight` call, two
//! server-side applies through a `kube` client (the Secret, then the request's status) and read
//! the two watch events those writes cause. This benchmark does exactly that and nothing else,
//! on the operator's schedule (all N due at once, then each again when the operator's
//! `schedule::planned_refresh` says, in whole seconds) and concurrency, as the scale benchmark's steady scenario for the same N and window,
//! against the same stand-ins over HTTP on loopback, on one thread running a current-thread
//! tokio runtime, with jemalloc, as the operator binary runs. It has no schedule, cache, rate
//! limit, metrics, policy or status logic, and parses no write answer. It makes the AWS call
//! through the operator's QuickSight provider (the SDK client, cached, one attempt per call) and
//! renders the Secret with the operator's own function, so that the calls and the bytes on the
//! wire are the operator's. What that thread uses per refresh is a lower bound for the scale
//! benchmark's "CPU per refresh: operator process" on the same machine at the same time.
//!
//! The stand-ins run in this process on their own runtime (threads `fake-rt`); this process
//! uses jemalloc for them too, so their CPU is not comparable with the scale benchmark's.

// `cargo check --benches` / `clippy --all-targets` set cfg(test) without the test harness, so the
// stand-ins' own #[cfg(test)] tests are dropped and their imports look unused.
#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

#[path = "common/mod.rs"]
mod common;

/// As the operator binary (src/main.rs): the floor is measured with the same allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use common::{duration, machine, number, options_or_help, stat_cpu};
use embed_url_operator::clients;
use embed_url_operator::crd::{CachedRequest, EmbedUrlRequest, SecretTemplate};
use embed_url_operator::lean::Lean;
use embed_url_operator::providers::quicksight::QuickSightProvider;
use embed_url_operator::providers::{Target, UrlProvider};
use embed_url_operator::schedule;
use embed_url_operator::secret::{self, SecretContent};
use futures::{StreamExt, stream};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::fake_aws::FakeAws;
use support::fake_kube::FakeApiServer;

const NS: &str = support::NS;
const FIELD_MANAGER: &str = "embed-url-operator";
const REGION: &str = "us-east-1";
/// The operator's Secret label selector.
const MANAGED_SECRETS: &str = "app.kubernetes.io/managed-by=embed-url-operator";

const HELP: &str = "\
floor benchmark: the required crates' own work per refresh, no operator

usage: cargo bench --bench floor -- [options]

options (defaults as in the scale benchmark's default preset):
  --n N             requests, each refreshed on the operator's schedule (default 2000)
  --window D        use-by window (default 30s)
  --windows X       measurement length, in windows, after one window of warm-up (default 5)
  --aws-latency D   fake AWS answer delay (default 50ms)
  --concurrency N   refreshes in flight at most (default 16)
  --operator-clients  build the AWS configuration and the Kubernetes client as the operator
                    does (src/clients.rs: the default credential chain from the environment,
                    operation and attempt timeouts, read timeouts, a timeout per API request)
                    instead of the test harness's plain ones
";

struct Options {
    n: usize,
    window: Duration,
    windows: f64,
    latency: Duration,
    concurrency: usize,
    operator_clients: bool,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut o = Options {
            n: 2000,
            window: Duration::from_secs(30),
            windows: 5.0,
            latency: Duration::from_millis(50),
            concurrency: 16,
            operator_clients: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                // `cargo bench` passes --bench to harness=false targets.
                "--bench" => {}
                "--help" | "-h" => return Err(String::new()),
                "--n" => o.n = number(&value()?)?,
                "--window" => o.window = duration(&value()?)?,
                "--windows" => o.windows = number(&value()?)?,
                "--aws-latency" => o.latency = duration(&value()?)?,
                "--concurrency" => o.concurrency = number(&value()?)?,
                "--operator-clients" => o.operator_clients = true,
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }

    /// The scale benchmark's steady rate (`Options::steady_rate` there): each URL is replaced
    /// after the window minus refreshBefore (half the window) and half the largest jitter.
    fn rate(&self) -> f64 {
        self.n as f64 / (self.window.as_secs_f64() * (1.0 - 0.5 * 1.05))
    }
}

/// What the floor thread measured.
struct Measured {
    refreshes: usize,
    failed: usize,
    cpu: Duration,
    /// The stand-ins' CPU time over the same interval.
    stand_ins: Duration,
    elapsed: Duration,
}

fn main() {
    let Some(opts) = options_or_help(Options::parse(), HELP) else {
        return;
    };
    if opts.operator_clients {
        // As the scale benchmark gives them to the operator process. Set while this process
        // has one thread: nothing reads the environment concurrently.
        for (name, value) in [
            ("AWS_ACCESS_KEY_ID", support::fake_aws::TEST_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", "fake-secret"),
            ("AWS_REGION", REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials",
            ),
        ] {
            // SAFETY: no other thread exists yet (the stand-ins' runtime starts below).
            unsafe { std::env::set_var(name, value) };
        }
    }
    let stand_ins = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fake-rt")
        .enable_all()
        .build()
        .expect("stand-ins runtime");
    let header = format!(
        "{}\nfloor: N={} refreshed on the operator's schedule with {}s windows (~{:.0}/s), {} \
         windows measured after one of warm-up; AWS latency {} ms, concurrency {}; one thread, \
         current-thread runtime, jemalloc; stand-ins on 2 threads of this process; clients \
         built {}",
        machine(),
        opts.n,
        opts.window.as_secs_f64(),
        opts.rate(),
        opts.windows,
        opts.latency.as_millis(),
        opts.concurrency,
        if opts.operator_clients {
            "as the operator builds them (src/clients.rs)"
        } else {
            "as the test harness builds them"
        }
    );
    eprintln!("{header}");
    let (kube, aws, address) = stand_ins.block_on(async {
        let kube = FakeApiServer::new();
        // The scale benchmark's default: watches more than this many changes behind are cut off.
        kube.set_history_limit(5_000);
        let aws = FakeAws::start().await;
        aws.set_latency(opts.latency);
        let address = kube.serve_http().await;
        (kube, aws, address)
    });
    // The requests, created before the measurement: their uids own the Secrets.
    let requests: Vec<EmbedUrlRequest> = stand_ins.block_on(async {
        let api: Api<EmbedUrlRequest> = Api::namespaced(kube.client(), NS);
        stream::iter(0..opts.n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(
                        &PostParams::default(),
                        &EmbedUrlRequest::new(&format!("r{i:05}"), support::quick_sight()),
                    )
                    .await
                    .expect("create request")
                }
            })
            .buffered(64)
            .collect()
            .await
    });

    let sdk_config = if opts.operator_clients {
        stand_ins.block_on(clients::aws_config_loader().endpoint_url(aws.uri()).load())
    } else {
        aws.sdk_config()
    };
    let (window, windows, concurrency) = (opts.window, opts.windows, opts.concurrency);
    let operator_clients = opts.operator_clients;
    let measured = std::thread::Builder::new()
        .name("floor-rt".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("floor runtime")
                .block_on(refresh_all(
                    address,
                    sdk_config,
                    requests,
                    window,
                    windows,
                    concurrency,
                    operator_clients,
                ))
        })
        .expect("floor thread")
        .join()
        .expect("floor thread ran");

    let per = |d: Duration| d.as_secs_f64() * 1e3 / measured.refreshes.max(1) as f64;
    println!("\n{header}\n");
    println!(
        "refreshes: {} in {:.2} s ({:.0}/s), failed {}",
        measured.refreshes,
        measured.elapsed.as_secs_f64(),
        measured.refreshes as f64 / measured.elapsed.as_secs_f64(),
        measured.failed
    );
    println!(
        "CPU per refresh, required crates alone: {:.3} ms ({:.2} s in all)",
        per(measured.cpu),
        measured.cpu.as_secs_f64()
    );
    println!(
        "CPU per refresh, stand-ins (jemalloc, not comparable with scale's): {:.3} ms",
        per(measured.stand_ins)
    );
    stand_ins.shutdown_background();
}

/// CPU time of this process's stand-in threads (named `fake-rt`, wiremock's among them).
fn stand_in_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let path = format!(
                "/proc/self/task/{}/stat",
                task.file_name().to_string_lossy()
            );
            stat_cpu(&path)
        })
        .filter(|(name, _)| name.starts_with("fake-rt"))
        .map(|(_, used)| used)
        .sum()
}

/// On the floor thread: watches both kinds as the operator does, then refreshes every request
/// on the operator's schedule, at most `concurrency` at a time, and measures `windows` windows
/// after one window of warm-up (as the scale benchmark's steady scenario).
async fn refresh_all(
    address: std::net::SocketAddr,
    sdk_config: aws_config::SdkConfig,
    requests: Vec<EmbedUrlRequest>,
    window: Duration,
    windows: f64,
    concurrency: usize,
    operator_clients: bool,
) -> Measured {
    let mut config = kube::Config::new(
        format!("http://{address}")
            .parse()
            .expect("the fake API server's URL"),
    );
    config.default_namespace = NS.to_string();
    let client = if operator_clients {
        // The operator's defaults (--api-timeout, --read-timeout).
        clients::kube_client(config, Duration::from_secs(70), Duration::from_secs(300))
            .expect("kube client")
    } else {
        kube::Client::try_from(config).expect("kube client")
    };
    // The operator's own QuickSight client: one per region, one HTTP attempt per call.
    let aws = QuickSightProvider::new(sdk_config);

    // The two watches, with the types and selector the operator uses; events are only read.
    let secrets: Api<Lean<PartialObjectMeta<Secret>>> = Api::namespaced(client.clone(), NS);
    tokio::spawn(
        watcher(secrets, watcher::Config::default().labels(MANAGED_SECRETS)).for_each(|_| async {}),
    );
    let watched: Api<CachedRequest> = Api::namespaced(client.clone(), NS);
    tokio::spawn(watcher(watched, watcher::Config::default()).for_each(|_| async {}));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every request is due at once (all were just created), then again as the operator plans it
    // after each mint (src/schedule.rs, the default refreshBefore of half the window). The
    // concurrency limit and the whole-second plan make the same waves as in the operator.
    let aws = Arc::new(aws);
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut refreshers = tokio::task::JoinSet::new();
    for request in requests {
        let (aws, client, slots, done, failed) = (
            aws.clone(),
            client.clone(),
            slots.clone(),
            done.clone(),
            failed.clone(),
        );
        refreshers.spawn(async move {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
            let statuses: Api<EmbedUrlRequest> = Api::namespaced(client.clone(), NS);
            loop {
                let Ok(slot) = slots.acquire().await else {
                    return;
                };
                let minted = Timestamp::now();
                if !refresh_one(&aws, &client, &secrets, &statuses, &request).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                drop(slot);
                done.fetch_add(1, Ordering::Relaxed);
                // The operator's plan: whole seconds, refreshBefore half the window, its jitter.
                let expires = schedule::url_expires_at(minted, window);
                let next = schedule::planned_refresh(expires, window / 2, window, rand::random());
                let wait = Duration::try_from(next.duration_since(Timestamp::now()))
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(wait).await;
            }
        });
    }
    while done.load(Ordering::Relaxed) < refreshers.len() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(window).await;
    let (started, done_before, failed_before, cpu_before, stand_ins_before) = (
        Instant::now(),
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        thread_cpu(),
        stand_in_cpu(),
    );
    tokio::time::sleep(window.mul_f64(windows)).await;
    let measured = Measured {
        refreshes: done.load(Ordering::Relaxed) - done_before,
        failed: failed.load(Ordering::Relaxed) - failed_before,
        cpu: thread_cpu().saturating_sub(cpu_before),
        stand_ins: stand_in_cpu().saturating_sub(stand_ins_before),
        elapsed: started.elapsed(),
    };
    refreshers.abort_all();
    measured
}

/// One refresh: mint, write the Secret, write the status. False if any step failed.
async fn refresh_one(
    aws: &QuickSightProvider,
    client: &kube::Client,
    secrets: &Api<Secret>,
    statuses: &Api<EmbedUrlRequest>,
    request: &EmbedUrlRequest,
) -> bool {
    let Some(spec) = request.spec.quick_sight.as_deref() else {
        return false;
    };
    let target = Target::QuickSight(spec.clone());
    let Ok(url) = aws.mint(&target, REGION).await else {
        return false;
    };
    let now = Timestamp::now();
    let expires = now + SignedDuration::from_secs(300);
    let session_expires = now + SignedDuration::from_secs(7200);
    let name = request.name_any();
    let body = secret::render(
        request,
        &SecretContent {
            name: &name,
            url: &url,
            url_expires_at: expires,
            session_expires_at: session_expires,
            generation: request.metadata.generation,
            template: &SecretTemplate::default(),
        },
    );
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let secret_written = send_ignoring_answer(
        client,
        kube::core::Request::new(secrets.resource_url()).patch(&name, &apply, &Patch::Apply(&body)),
    )
    .await;
    let status = serde_json::json!({
        "apiVersion": "embedurl.io/v1alpha1",
        "kind": "EmbedUrlRequest",
        "status": {
            "service": "QuickSight",
            "secretName": name,
            "urlExpiresAt": expires.to_string(),
            "sessionExpiresAt": session_expires.to_string(),
            "lastRefreshTime": now.to_string(),
            "nextRefreshTime": (now + SignedDuration::from_secs(150)).to_string(),
            "observedGeneration": request.metadata.generation,
            "consecutiveFailures": 0,
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "UrlReady",
                "message": "a fresh URL is in the Secret",
                "observedGeneration": request.metadata.generation,
                "lastTransitionTime": now.to_string(),
            }],
        },
    });
    let status_written = send_ignoring_answer(
        client,
        kube::core::Request::new(statuses.resource_url()).patch_subresource(
            "status",
            &name,
            &apply,
            &Patch::Apply(&status),
        ),
    )
    .await;
    secret_written && status_written
}

/// Sends a write and reads its answer to the end without parsing it, as the operator's status
/// write does.
async fn send_ignoring_answer(
    client: &kube::Client,
    request: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
) -> bool {
    match request {
        Ok(request) => client.request_text(request).await.is_ok(),
        Err(_) => false,
    }
}

/// CPU time (user + system) of the calling thread so far.
fn thread_cpu() -> Duration {
    stat_cpu("/proc/thread-self/stat").map_or(Duration::ZERO, |(_, used)| used)
}
