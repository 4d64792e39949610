//! The `embed-url-operator` binary: parses flags and wires the modules together.

/// jemalloc rather than glibc's malloc: in the scale benchmark (10,000 requests, the real
/// binary) it held the operator's RSS 11 MiB lower and used a quarter less CPU per refresh; the
/// operator's many small, long-lived objects (one set per request) fragment glibc's heap.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use aws_config::Region;
use clap::{Args, Parser, Subcommand};
use embed_url_operator::clients;
use embed_url_operator::controller::{self, ControllerConfig};
use embed_url_operator::http::{self, ReadyFlag};
use embed_url_operator::identity::AwsClients;
use embed_url_operator::leader::{self, LeaseConfig};
use embed_url_operator::policy::PolicyMode;
use embed_url_operator::reconciler::Settings;
use embed_url_operator::telemetry::{self, LogFormat, Metrics};
use embed_url_operator::validation::{UseByWindows, parse_duration};
use embed_url_operator::work_queue::Liveness;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info};

/// Keeps short-lived AWS sign-in URLs (QuickSight, Amazon Q Business, Managed Flink) fresh in
/// Kubernetes Secrets.
#[derive(Parser, Debug)]
// A flag given twice takes its last value: the chart sets several flags itself and appends
// `extraArgs`, so `extraArgs: ["--aws-qps=50"]` overrides rather than stopping the pod.
#[command(
    version,
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
// Parsed once at start and matched at once: the size of a variant costs nothing here.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the operator against the in-cluster config or the current kubeconfig (the default).
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Print the CustomResourceDefinitions (what `crds/` holds), or write one file per kind.
    Crd {
        /// Write one file per kind (`embedurlrequest.yaml`, `embedurlpolicy.yaml`) into this
        /// directory instead of printing.
        #[arg(long)]
        output_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Namespace to watch; repeat for several. Default: all namespaces.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,

    /// Most reconciles, and AWS calls, in flight at once; the others wait, the request whose URL
    /// stops working first going first. A request waiting for the AWS rate limit does not count.
    #[arg(long, env = "EMBEDURL_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,

    /// Threads that run the operator's async work. The work is waiting on the API server and
    /// AWS: one thread served 10,000 requests in the scale benchmark, and each extra thread
    /// costs CPU in cross-thread wake-ups.
    #[arg(long, env = "EMBEDURL_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,

    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "EMBEDURL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,

    /// `enforce`: serve only requests an EmbedUrlPolicy allows. `permissive`: also serve requests
    /// that no policy selects, with the operator's own AWS identity (single-tenant clusters).
    #[arg(long, env = "EMBEDURL_POLICY_MODE", value_enum, default_value_t = PolicyMode::Enforce)]
    policy_mode: PolicyMode,

    /// Client-side limit on mint calls per second, per (service, region, identity); 0 disables it.
    /// When calls queue, the URL that expires first goes first.
    #[arg(long, env = "EMBEDURL_AWS_QPS", default_value_t = 10.0, value_parser = aws_qps_arg)]
    aws_qps: f64,

    /// Mint calls allowed at once above --aws-qps.
    #[arg(long, env = "EMBEDURL_AWS_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    aws_burst: u32,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter, in RUST_LOG syntax.
    #[arg(long = "log-level", env = "RUST_LOG", default_value = "info")]
    log_filter: String,

    /// Elect one active replica through a coordination.k8s.io Lease; the others stand by.
    #[arg(long, env = "EMBEDURL_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "EMBEDURL_LEASE_NAME",
        default_value = "embed-url-operator"
    )]
    lease_name: String,

    /// Namespace of the leader-election Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,

    /// How long a leader's Lease lasts without renewal, e.g. `15s`.
    #[arg(long, env = "EMBEDURL_LEASE_DURATION", default_value = "15s", value_parser = lease_duration_arg)]
    lease_duration: Duration,

    /// Longest wait for the Kubernetes API server to start answering a request, e.g. `70s`. A
    /// connection whose peer vanished without closing it (an API server replaced mid-upgrade)
    /// would otherwise hold a reconcile slot for as long as TCP takes to notice. The default is
    /// above the API server's own limit on a request (60 s), so it never cuts off one the server
    /// would still complete (a slow page of a large list). Watches are answered at once and then
    /// stream; kube-runtime bounds their silences itself.
    #[arg(long, env = "EMBEDURL_API_TIMEOUT", default_value = "70s", value_parser = duration_arg)]
    api_timeout: Duration,

    /// Longest silence while reading from a connection to the API server, e.g. `300s`. It ends
    /// a list or read whose answer stops halfway (the peer vanished mid-body): `--api-timeout`
    /// only bounds the wait for an answer to start, and without this the caches could wait for
    /// ever. It must outlast a healthy watch's silences (the API server sends a bookmark every
    /// minute and ends a watch after 290 s), so it is not a setting to turn down; tests shorten
    /// it together with the stand-in's bookmark interval.
    #[arg(long, env = "EMBEDURL_READ_TIMEOUT", default_value = "300s", value_parser = duration_arg, hide = true)]
    read_timeout: Duration,

    /// On SIGTERM, how long in-flight reconciles may take to finish before they are dropped,
    /// e.g. `15s`. Keep it well below the pod's terminationGracePeriodSeconds (30 s in the
    /// chart): a leader may still be in a Lease renewal (up to a sixth of the lease duration)
    /// and then releases its Lease (two calls of up to a third of it each).
    #[arg(long, env = "EMBEDURL_DRAIN_TIMEOUT", default_value = "15s", value_parser = duration_arg)]
    drain_timeout: Duration,

    /// `/healthz` fails (so that Kubernetes restarts the operator) when reconciles make no
    /// progress for this long although there is work: a request overdue while reconcile slots
    /// are free, or every slot held and no reconcile ending. Either is a bug; this is the way
    /// out of it. Keep it above the longest a healthy reconcile can take: a few API calls of
    /// up to --api-timeout each until the answer starts (and 5 minutes of silence within an
    /// answer), retried, and an AWS call. `0s` turns the check off.
    #[arg(long, env = "EMBEDURL_STALL_TIMEOUT", default_value = "15m", value_parser = duration_arg)]
    stall_timeout: Duration,

    /// This replica's name, for events and the Lease (the pod name on Kubernetes).
    #[arg(long, env = "POD_NAME", hide = true)]
    instance: Option<String>,

    /// Pretend every service's URL is usable for this long instead of the documented window.
    /// For tests and benchmarks that compress time; never set it in production.
    #[arg(long, env = "EMBEDURL_USE_BY_WINDOW_OVERRIDE", hide = true, value_parser = duration_arg)]
    use_by_window_override: Option<Duration>,
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration such as 15s or 2m"))
}

/// A Lease stores whole seconds, and renewing takes round trips: below a second a leader could
/// never renew in time.
fn lease_duration_arg(text: &str) -> Result<Duration, String> {
    let duration = duration_arg(text)?;
    if duration < Duration::from_secs(1) {
        return Err(format!("{text:?} is shorter than a second; use e.g. 15s"));
    }
    Ok(duration)
}

/// 0 turns the limit off; anything else must be a rate a token bucket can keep (a token every
/// 1,000 s at the slowest), not NaN, infinity or a negative number.
fn aws_qps_arg(text: &str) -> Result<f64, String> {
    let qps: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number; use e.g. 10 or 0.5"))?;
    if qps == 0.0 || (0.001..=1_000_000.0).contains(&qps) {
        Ok(qps)
    } else {
        Err(format!(
            "{text:?} is out of range: use 0 (no limit) or a rate from 0.001 to 1000000 calls per second"
        ))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd { output_dir }) => print_crds(output_dir.as_deref()),
        Some(Command::Run(args)) => run_blocking(args),
        None => run_blocking(cli.run),
    }
}

fn print_crds(output_dir: Option<&std::path::Path>) -> ExitCode {
    let files = match embed_url_operator::crd::crd_files() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("could not render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (file, yaml) in files {
        match output_dir {
            Some(dir) => {
                if let Err(e) = std::fs::write(dir.join(file), yaml) {
                    eprintln!("could not write {}: {e}", dir.join(file).display());
                    return ExitCode::FAILURE;
                }
            }
            None => print!("{yaml}"),
        }
    }
    ExitCode::SUCCESS
}

/// Settings that are each valid but do not fit together, refused before anything starts.
fn check_settings(args: &RunArgs) -> Result<(), String> {
    // A reconcile makes a few API calls in a row (read, Secret, status), each allowed up to
    // --api-timeout before its answer starts.
    let slowest_healthy_reconcile = args.api_timeout.saturating_mul(3);
    if !args.stall_timeout.is_zero() && args.stall_timeout <= slowest_healthy_reconcile {
        return Err(format!(
            "--stall-timeout ({:?}) must be longer than three times --api-timeout ({:?}): a \
             reconcile waiting on a few slow but healthy API calls would count as a stall and \
             restart the operator; use e.g. 15m, or 0s to turn the check off",
            args.stall_timeout, args.api_timeout
        ));
    }
    Ok(())
}

fn run_blocking(args: RunArgs) -> ExitCode {
    if let Err(e) = check_settings(&args) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = telemetry::init_logging(args.log_format, &args.log_filter) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    // One thread: everything on the main thread, with no cross-thread wake-ups and one heap
    // arena. (A multi-thread runtime with one worker still has two threads: the worker runs the
    // tasks, the main thread the runtime's main future.)
    let mut builder = if args.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(args.worker_threads));
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "operator stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = kube_client(args.api_timeout, args.read_timeout).await?;

    let aws = clients::aws_config_loader().load().await;
    let default_region = aws.region().map(Region::to_string);
    if default_region.is_none() {
        info!(
            "no default AWS region (AWS_REGION): every request must set spec.region or be served by a policy with aws.region"
        );
    }
    let windows = args
        .use_by_window_override
        .map(UseByWindows::uniform)
        .unwrap_or_else(UseByWindows::documented);
    let config = ControllerConfig {
        namespaces: args.namespaces.clone(),
        concurrency: args.concurrency,
        settings: Settings {
            windows,
            default_region,
            policy_mode: args.policy_mode,
        },
        instance: args.instance.clone(),
        aws_rate: args.aws_qps,
        aws_burst: args.aws_burst,
        liveness: Liveness::new(args.stall_timeout),
    };

    let metrics = Arc::new(Metrics::new());
    let ready = ReadyFlag::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (http_addr, http_task) = http::serve(
        args.http_addr,
        metrics.clone(),
        ready.clone(),
        config.liveness.clone(),
        stop_rx.clone(),
    )
    .await
    .map_err(|e| format!("could not listen on {}: {e}", args.http_addr))?;
    info!(
        http = %http_addr,
        namespaces = ?args.namespaces,
        concurrency = args.concurrency,
        leader_election = args.leader_election,
        policy_mode = ?args.policy_mode,
        "embed-url-operator starting"
    );

    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received, draining");
        let _ = stop_tx.send(true);
    });

    if args.policy_mode == PolicyMode::Permissive {
        info!(
            "policy mode is permissive: requests that no EmbedUrlPolicy selects are served with the operator's own AWS identity"
        );
    } else {
        info!("policy mode is enforce: only requests an EmbedUrlPolicy allows are served");
    }
    let aws = Arc::new(AwsClients::new(aws));
    if args.leader_election {
        let lease_namespace = args
            .lease_namespace
            .clone()
            .ok_or("--leader-election needs --lease-namespace (or POD_NAMESPACE)")?;
        let identity = args
            .instance
            .clone()
            .unwrap_or_else(|| format!("{}-{}", controller::CONTROLLER_NAME, std::process::id()));
        let lease = LeaseConfig {
            namespace: lease_namespace,
            name: args.lease_name.clone(),
            identity,
            duration: args.lease_duration,
        };
        let drain_limit = args.drain_timeout;
        leader::run_while_leading(
            client,
            lease,
            ready,
            stop_rx,
            drain_limit,
            move |client, stop| {
                controller::run(client, aws.clone(), config.clone(), metrics.clone(), stop)
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    } else {
        let mut stopping = stop_rx.clone();
        let (readiness, controllers) = controller::run(client, aws, config, metrics, stop_rx);
        let ready_flag = ready.clone();
        tokio::spawn(async move {
            readiness.wait_synced().await;
            ready_flag.set(true);
            info!("watches synced, ready");
        });
        // A task, not the runtime's main future: on the one-thread runtime every wake of the
        // main future goes through the I/O driver (an eventfd write and one more epoll round),
        // and the controllers are woken several times per refresh; a task woken on its own
        // thread is just queued.
        let mut controllers = tokio::spawn(controllers);
        let ended = tokio::select! {
            ended = &mut controllers => Some(ended),
            _ = stopping.wait_for(|stop| *stop) => None,
        };
        match ended {
            Some(ended) => {
                controller::reraise_panic(ended);
            }
            None => controller::drain(controllers, args.drain_timeout).await,
        }
    }
    let _ = http_task.await;
    info!("stopped");
    Ok(())
}

/// The Kubernetes client (in-cluster or kubeconfig), as [`clients::kube_client`] configures it.
async fn kube_client(timeout: Duration, read_timeout: Duration) -> Result<kube::Client, String> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"))?;
    clients::kube_client(config, timeout, read_timeout)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
