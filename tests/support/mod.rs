//! Test stand-ins and the harness that runs the real controller against them.
//!
//! `fake_kube` is an in-memory Kubernetes API server, `fake_aws` a wiremock server speaking the
//! three AWS operations. [`Harness`] runs the operator's real controller in-process against both.
//! What the stand-ins cannot do is listed in tests/README.md.

#![allow(dead_code)]

pub mod fake_aws;
pub mod fake_kube;

use embed_url_operator::controller::{self, ControllerConfig};
use embed_url_operator::crd::{
    EmbedUrlRequest, EmbedUrlRequestSpec, EmbedUrlRequestStatus, QuickSightSpec,
};
use embed_url_operator::identity::AwsClients;
use embed_url_operator::policy::PolicyMode;
use embed_url_operator::reconciler::Settings;
use embed_url_operator::telemetry::Metrics;
use embed_url_operator::validation::UseByWindows;
use fake_aws::FakeAws;
use fake_kube::FakeApiServer;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use kube::client::retry::RetryPolicy;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const NS: &str = "analytics";

/// A running in-process operator.
pub struct Operator {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pub metrics: Arc<Metrics>,
}

pub struct Harness {
    pub kube: FakeApiServer,
    pub aws: FakeAws,
    pub client: kube::Client,
    /// The compressed use-by window every service gets in this test.
    pub window: Duration,
    /// Permissive unless a test is about policies: most tests are about minting.
    pub policy_mode: PolicyMode,
    /// Client-side AWS calls per second; 0 (the default) = unlimited.
    pub aws_rate: f64,
    /// `--namespace` values; empty (the default) = every namespace.
    pub watch_namespaces: Vec<String>,
    pub operator: Option<Operator>,
}

impl Harness {
    /// Starts both stand-ins and the operator, with every use-by window compressed to `window`,
    /// in permissive policy mode.
    pub async fn start(window: Duration) -> Self {
        Self::start_with(window, PolicyMode::Permissive).await
    }

    pub async fn start_with(window: Duration, policy_mode: PolicyMode) -> Self {
        let mut harness = Self::new_without_operator(window).await;
        harness.policy_mode = policy_mode;
        harness.start_operator().await;
        harness
    }

    /// Starts both stand-ins but not the operator (permissive policy mode, no rate limit), so a
    /// test can prepare objects or inject failures that the operator's first list and watch must
    /// meet; then [`Harness::start_operator`].
    pub async fn new_without_operator(window: Duration) -> Self {
        let kube = FakeApiServer::new();
        let aws = FakeAws::start().await;
        let client = retrying_client(&kube);
        Harness {
            kube,
            aws,
            client,
            window,
            policy_mode: PolicyMode::Permissive,
            aws_rate: 0.0,
            watch_namespaces: vec![],
            operator: None,
        }
    }

    pub async fn start_operator(&mut self) {
        assert!(self.operator.is_none(), "operator already running");
        let metrics = Arc::new(Metrics::new());
        let (stop, stop_rx) = watch::channel(false);
        let config = ControllerConfig {
            namespaces: self.watch_namespaces.clone(),
            concurrency: 4,
            settings: Settings {
                windows: UseByWindows::uniform(self.window),
                default_region: Some("us-east-1".to_string()),
                policy_mode: self.policy_mode,
            },
            instance: Some("test".to_string()),
            aws_rate: self.aws_rate,
            aws_burst: 1,
            liveness: Default::default(),
        };
        let aws = Arc::new(AwsClients::new(self.aws.sdk_config()));
        let (readiness, controllers) =
            controller::run(self.client.clone(), aws, config, metrics.clone(), stop_rx);
        let task = tokio::spawn(controllers);
        tokio::time::timeout(Duration::from_secs(5), readiness.wait_synced())
            .await
            .expect("controller caches synced");
        self.operator = Some(Operator {
            stop,
            task,
            metrics,
        });
    }

    /// Stops the operator gracefully and waits for it to drain.
    pub async fn stop_operator(&mut self) {
        if let Some(operator) = self.operator.take() {
            let _ = operator.stop.send(true);
            tokio::time::timeout(Duration::from_secs(10), operator.task)
                .await
                .expect("operator drained")
                .expect("operator task");
        }
    }

    /// Kills the operator at once, as a crash or SIGKILL would.
    pub fn kill_operator(&mut self) {
        if let Some(operator) = self.operator.take() {
            operator.task.abort();
        }
    }

    /// Whether the operator's task is still running (it ends early only if something panicked).
    pub fn operator_running(&self) -> bool {
        self.operator
            .as_ref()
            .is_some_and(|operator| !operator.task.is_finished())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.operator
            .as_ref()
            .expect("operator running")
            .metrics
            .clone()
    }

    /// Reconciles the running operator has started (`embedurl_reconciles_total`).
    pub fn reconciles(&self) -> u64 {
        self.metrics()
            .encode()
            .lines()
            .find_map(|line| line.strip_prefix("embedurl_reconciles_total "))
            .and_then(|n| n.trim().parse().ok())
            .expect("embedurl_reconciles_total")
    }

    /// The exported need for AWS calls of QuickSight requests, once it has been computed (it is
    /// 0 until the caches have synced).
    pub async fn quick_sight_need(&self) -> f64 {
        let exported = eventually("the need exported", Duration::from_secs(10), || {
            self.metrics()
                .encode()
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "embedurl_aws_required_calls_per_second{service=\"QuickSight\"} ",
                    )
                    .map(str::to_owned)
                })
                .filter(|v| v != "0.0")
        })
        .await;
        exported.parse().expect("a number")
    }

    /// Waits until the operator has started more than `before` reconciles.
    pub async fn reconciled_since(&self, before: u64) {
        eventually("a reconcile", Duration::from_secs(10), || {
            (self.reconciles() > before).then_some(())
        })
        .await;
    }

    pub fn requests(&self) -> Api<EmbedUrlRequest> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Creates the Namespace object of the requests' namespace (the stand-in serves objects in
    /// namespaces that do not exist, so only tests of namespace labels or deletion need it), and
    /// returns the API of Namespaces.
    pub async fn create_namespace(&self) -> Api<Namespace> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))
                .expect("a Namespace");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create the namespace");
        namespaces
    }

    pub async fn create(&self, name: &str, spec: EmbedUrlRequestSpec) -> EmbedUrlRequest {
        self.requests()
            .create(&PostParams::default(), &EmbedUrlRequest::new(name, spec))
            .await
            .expect("create request")
    }

    /// Sets the `embedurl.io/refresh-requested-at` annotation, as a user asking for a refresh.
    pub async fn request_refresh(&self, name: &str, value: &str) {
        self.requests()
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({
                    "metadata": {"annotations": {"embedurl.io/refresh-requested-at": value}}
                })),
            )
            .await
            .expect("annotate request");
    }

    /// The Secret as stored by the fake API server.
    pub fn secret(&self, name: &str) -> Option<Secret> {
        self.kube
            .get("v1", "secrets", Some(NS), name)
            .map(|v| serde_json::from_value(v).expect("stored Secret parses"))
    }

    pub fn secret_value(&self, name: &str, key: &str) -> Option<String> {
        let secret = self.secret(name)?;
        let bytes = secret.data?.get(key)?.0.clone();
        Some(String::from_utf8(bytes).expect("utf-8 value"))
    }

    pub fn status(&self, name: &str) -> EmbedUrlRequestStatus {
        self.kube
            .get("embedurl.io/v1alpha1", "embedurlrequests", Some(NS), name)
            .and_then(|v| v.get("status").cloned())
            .map(|s| serde_json::from_value(s).expect("status parses"))
            .unwrap_or_default()
    }

    pub fn ready_reason(&self, name: &str) -> Option<(String, String)> {
        self.status(name)
            .ready()
            .map(|c| (c.status.to_string(), c.reason.to_string()))
    }
}

/// A client for the in-process fake API server with the retry layer the operator's production
/// client has: `kube_client` (src/main.rs) builds its client from an inferred `Config`, whose
/// `default_retry` is on, which retries 429, 503 and 504 answers honouring `Retry-After` (the
/// binary tests check that of the real client).
/// `FakeApiServer::client()` plugs the router in directly, without that layer, so injected 429s
/// would reach the operator in tests but not in production.
fn retrying_client(kube: &FakeApiServer) -> kube::Client {
    let service = tower::ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(RetryPolicy::server_retry()))
        .map_err(tower::BoxError::from)
        .service(kube.router());
    kube::Client::new(service, "default")
}

/// Polls `check` every 20 ms until it returns `Some`, or fails the test after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A valid QuickSight console request: the spec most tests and the benchmark use.
pub fn quick_sight() -> EmbedUrlRequestSpec {
    EmbedUrlRequestSpec {
        quick_sight: Some(Box::new(QuickSightSpec {
            aws_account_id: "111122223333".into(),
            entry_point: Some("/start/dashboards".into()),
            session_lifetime_in_minutes: Some(120),
            user_arn: Some("arn:aws:quicksight:us-east-1:111122223333:user/default/alice".into()),
        })),
        ..Default::default()
    }
}
