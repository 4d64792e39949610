//! End to end: the real binary, spawned with a kubeconfig pointing at the fake API server served
//! over HTTP, and the standard `AWS_ENDPOINT_URL_*` variables pointing at the fake AWS.

use crate::support::fake_aws::{FakeAws, TEST_ACCESS_KEY};
use crate::support::fake_kube::FakeApiServer;
use crate::support::{NS, eventually};
use crate::{flink, q_business, quick_sight};
use embed_url_operator::crd::EmbedUrlRequest;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

struct Cluster {
    kube: FakeApiServer,
    aws: FakeAws,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Cluster {
    async fn start() -> Self {
        let kube = FakeApiServer::new();
        let addr = kube.serve_http().await;
        let aws = FakeAws::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, FakeApiServer::kubeconfig_yaml(addr)).unwrap();
        Cluster {
            kube,
            aws,
            dir,
            kubeconfig,
        }
    }

    fn secret_value(&self, name: &str, key: &str) -> Option<String> {
        let secret: Secret =
            serde_json::from_value(self.kube.get("v1", "secrets", Some(NS), name)?).ok()?;
        String::from_utf8(secret.data?.get(key)?.0.clone()).ok()
    }

    async fn create(&self, name: &str, spec: embed_url_operator::crd::EmbedUrlRequestSpec) {
        self.create_in(NS, name, spec).await;
    }

    async fn create_in(
        &self,
        namespace: &str,
        name: &str,
        spec: embed_url_operator::crd::EmbedUrlRequestSpec,
    ) {
        let api: Api<EmbedUrlRequest> = Api::namespaced(self.kube.client(), namespace);
        api.create(&PostParams::default(), &EmbedUrlRequest::new(name, spec))
            .await
            .unwrap();
    }

    /// Spawns the operator binary. Logs go to a file so the test can check them.
    fn spawn(&self, instance: &str, window: &str, extra_args: &[&str]) -> OperatorProcess {
        self.spawn_adjusted(instance, window, extra_args, |_| {})
    }

    /// Spawns the operator binary with its environment changed by `adjust` last.
    fn spawn_adjusted(
        &self,
        instance: &str,
        window: &str,
        extra_args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> OperatorProcess {
        let http = free_port();
        let log = self.dir.path().join(format!("{instance}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_embed-url-operator"));
        command
            .arg("run")
            .args(extra_args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("AWS_ENDPOINT_URL_QUICKSIGHT", self.aws.uri())
            .env("AWS_ENDPOINT_URL_QBUSINESS", self.aws.uri())
            .env("AWS_ENDPOINT_URL_KINESIS_ANALYTICS_V2", self.aws.uri())
            .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", "fake-secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", self.dir.path().join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.dir.path().join("no-aws-credentials"),
            )
            .env("EMBEDURL_HTTP_ADDR", http.to_string())
            .env("EMBEDURL_USE_BY_WINDOW_OVERRIDE", window)
            .env("POD_NAME", instance)
            .env("POD_NAMESPACE", "operators")
            .env("EMBEDURL_POLICY_MODE", "permissive")
            // Debug everywhere, and trace where URLs pass through (the AWS SDK's deserializers
            // and the operator itself): no log line may carry a URL at any level.
            .env(
                "RUST_LOG",
                "debug,aws_smithy_runtime=trace,aws_smithy_runtime_api=trace,aws_sdk_quicksight=trace,\
                 aws_sdk_qbusiness=trace,aws_sdk_kinesisanalyticsv2=trace,embed_url_operator=trace",
            )
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        adjust(&mut command);
        let child = command.spawn().expect("spawn the operator binary");
        OperatorProcess { child, http, log }
    }
}

struct OperatorProcess {
    child: Child,
    http: SocketAddr,
    log: PathBuf,
}

impl OperatorProcess {
    /// A plain HTTP/1.0 GET against the operator's own endpoints.
    async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let mut stream = tokio::net::TcpStream::connect(self.http)
            .await
            .map_err(|e| format!("connect {}: {e}", self.http))?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("send GET {path}: {e}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| format!("read GET {path}: {e}"))?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("GET {path}: no status line in {response:?}"))?;
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok((status, body))
    }

    async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = self.get("/readyz").await {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "operator never became ready: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Sends SIGTERM and waits for the exit without blocking the test's runtime: the fake API
    /// server runs on it, and the operator's last requests must still be answered while it drains.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM; last log lines:\n{}",
                self.logs()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn the_binary_mints_serves_metrics_and_shuts_down_on_sigterm() {
    let cluster = Cluster::start().await;
    // Watch two namespaces: a request elsewhere is none of this operator's business.
    let mut operator = cluster.spawn("solo", "60s", &["--namespace", NS, "--namespace", "other"]);
    operator.wait_ready().await;
    assert_eq!(operator.get("/healthz").await.map(|r| r.0), Ok(200));

    cluster
        .create_in("unwatched", "ignored", quick_sight())
        .await;
    cluster.create("console", quick_sight()).await;
    cluster.create("dashboard", flink()).await;
    // The second watched namespace has a controller of its own, fed by the same work queue.
    cluster.create_in("other", "second", q_business()).await;
    let url = eventually("URL in the Secret", WAIT, || {
        cluster.secret_value("console", "url")
    })
    .await;
    eventually("a URL in the other watched namespace", WAIT, || {
        let secret = cluster.kube.get("v1", "secrets", Some("other"), "second")?;
        secret["data"]["url"].as_str().map(str::to_owned)
    })
    .await;
    eventually("flink URL", WAIT, || {
        cluster.secret_value("dashboard", "url")
    })
    .await;
    let status = eventually("Ready status", WAIT, || {
        let object = cluster.kube.get(
            "embedurl.io/v1alpha1",
            "embedurlrequests",
            Some(NS),
            "console",
        )?;
        let ready = object["status"]["conditions"][0]["status"].as_str()? == "True";
        ready.then(|| object["status"].clone())
    })
    .await;
    assert_eq!(status["service"], "QuickSight");
    let expires: Timestamp = status["urlExpiresAt"].as_str().unwrap().parse().unwrap();
    assert!(expires > Timestamp::now());

    // The gauges are set right after the status write: poll rather than race it.
    let metrics = {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (code, metrics) = operator
                .get("/metrics")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(code, 200);
            if metrics.contains(
                "embedurl_url_expiry_timestamp_seconds{namespace=\"analytics\",name=\"console\"",
            ) {
                break metrics;
            }
            assert!(std::time::Instant::now() < deadline, "{metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(metrics.contains("embedurl_reconciles_total"), "{metrics}");
    assert!(
        metrics.contains(r#"embedurl_aws_calls_total{service="QuickSight",operation="GetSessionEmbedUrl",outcome="Success"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(&url));

    // The request in the unwatched namespace was never touched.
    assert!(
        cluster
            .kube
            .get("v1", "secrets", Some("unwatched"), "ignored")
            .is_none()
    );
    let ignored = cluster
        .kube
        .get(
            "embedurl.io/v1alpha1",
            "embedurlrequests",
            Some("unwatched"),
            "ignored",
        )
        .unwrap();
    assert!(
        ignored.get("status").is_none_or(|s| s.is_null()),
        "{ignored}"
    );

    let exit = operator.terminate().await;
    assert!(
        exit.success(),
        "exit after SIGTERM: {exit:?}\n{}",
        operator.logs()
    );
    let logs = operator.logs();
    assert!(logs.contains("minted URL"), "{logs}");
    // Written to a file, not a terminal: plain text, no colour escape codes.
    assert!(
        !logs.contains('\u{1b}'),
        "escape codes in the logs:\n{logs}"
    );
    // At debug, what the AWS SDK logs during a reconcile names the request it works for.
    assert!(
        logs.lines().any(|line| {
            line.contains(r#"request{namespace="analytics" name="console"}"#)
                && line.contains(r#"rpc.method="GetSessionEmbedUrl""#)
        }),
        "no AWS SDK line names the request:\n{logs}"
    );
    let leaks: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains(&url) || line.contains("fake.test/sign-in"))
        .collect();
    assert!(
        leaks.is_empty(),
        "URLs leaked into the logs:\n{}",
        leaks.join("\n")
    );
}

#[tokio::test]
async fn one_leader_mints_and_a_standby_takes_over_without_a_lapse() {
    let cluster = Cluster::start().await;
    let election = ["--leader-election", "--lease-duration=2s"];
    let mut first = cluster.spawn("first", "10s", &election);
    first.wait_ready().await;
    let second = cluster.spawn("second", "10s", &election);
    second.wait_ready().await;

    cluster.create("console", quick_sight()).await;
    eventually("URL in the Secret", WAIT, || {
        cluster.secret_value("console", "url")
    })
    .await;
    let holder = || -> Option<String> {
        cluster.kube.get(
            "coordination.k8s.io/v1",
            "leases",
            Some("operators"),
            "embed-url-operator",
        )?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(holder().as_deref(), Some("first"));

    // Watch the Secret for a while with both replicas up, then kill the leader without warning:
    // the standby must take over within the lease duration, and the URL must never lapse.
    let mut urls = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(14) {
        if !killed && started.elapsed() > Duration::from_secs(4) {
            first.child.kill().unwrap();
            first.child.wait().unwrap();
            killed = true;
        }
        let expires: Timestamp = cluster
            .secret_value("console", "expiresAt")
            .unwrap()
            .parse()
            .unwrap();
        assert!(expires > Timestamp::now(), "the URL lapsed");
        urls.insert(cluster.secret_value("console", "url").unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder().as_deref(), Some("second"));
    assert!(urls.len() >= 3, "{} URLs", urls.len());
    // Exactly one replica acted at a time: consecutive mints are a refresh period apart (10 s
    // window, 5 s refreshBefore), never two at once. A call whose URL the killed leader could not
    // write any more is possible, so calls may exceed the URLs seen by one.
    let calls = cluster.aws.calls();
    assert!(
        calls.len() <= urls.len() + 1,
        "{} calls for {} URLs",
        calls.len(),
        urls.len()
    );
    for pair in calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap > Duration::from_secs(2),
            "two mints {gap:?} apart: both replicas acted"
        );
    }
    assert!(first.logs().contains("became leader"));
    assert!(second.logs().contains("became leader"));
    let second_logs = second.logs();
    let before_takeover = second_logs.split("became leader").next().unwrap();
    assert!(
        !before_takeover.contains("minted URL"),
        "the standby minted before it led"
    );
}

#[tokio::test]
async fn the_binary_gives_up_on_an_unanswered_api_call_and_bounds_its_drain() {
    let cluster = Cluster::start().await;
    // The first Secret write reaches the API server and is never answered.
    cluster.kube.inject_stall("patch", "secrets", 1);
    let mut operator = cluster.spawn(
        "operator",
        "10s",
        &["--api-timeout=1s", "--drain-timeout=1s"],
    );
    operator.wait_ready().await;
    cluster.create("console", quick_sight()).await;
    // That write times out after a second, the reconcile is retried, and the Secret written.
    eventually("URL in the Secret after an unanswered write", WAIT, || {
        cluster.secret_value("console", "url")
    })
    .await;
    assert!(cluster.kube.request_count("patch", "secrets") >= 2);

    // A refresh whose AWS call takes a minute is in flight when SIGTERM comes: the operator
    // waits for it only as long as --drain-timeout, then exits cleanly.
    cluster.aws.set_latency(Duration::from_secs(60));
    let api: Api<EmbedUrlRequest> = Api::namespaced(cluster.kube.client(), NS);
    api.patch(
        "console",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({
            "metadata": {"annotations": {"embedurl.io/refresh-requested-at": "now"}}
        })),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let began = std::time::Instant::now();
    let exit = operator.terminate().await;
    assert!(exit.success(), "{exit:?}\n{}", operator.logs());
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?} to exit",
        began.elapsed()
    );
    let logs = operator.logs();
    assert!(
        logs.contains("in-flight reconciles did not finish in time"),
        "{logs}"
    );
}

#[tokio::test]
async fn the_binarys_api_client_waits_out_throttling_instead_of_failing_the_write() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn("solo", "60s", &[]);
    operator.wait_ready().await;
    // The API server's priority and fairness answers two Secret writes with 429 and a
    // Retry-After: the operator's client (kube's retry layer, as main.rs builds it) waits and
    // sends them again. Failing the reconcile instead would lose the URL just minted.
    cluster.kube.inject_failure("patch", "secrets", 429, 2);
    cluster.create("console", quick_sight()).await;
    eventually("URL in the Secret", WAIT, || {
        cluster.secret_value("console", "url")
    })
    .await;
    assert_eq!(cluster.kube.request_count("patch", "secrets"), 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.aws.calls().len(), 1, "{:?}", cluster.aws.calls());
}

fn refused_arguments(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_embed-url-operator"))
        .args(args)
        .env_clear()
        .output()
        .expect("run the operator binary");
    assert!(!output.status.success(), "{args:?} accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_binary_refuses_a_lease_shorter_than_a_second() {
    let stderr = refused_arguments(&["run", "--leader-election", "--lease-duration", "500ms"]);
    assert!(
        stderr.contains("--lease-duration") && stderr.contains("shorter than a second"),
        "{stderr}"
    );
    // A flag given twice takes its last value (the chart's `extraArgs` come after the flags it
    // sets itself), with or without the `run` subcommand.
    for prefix in [&["run"][..], &[][..]] {
        let args = [
            prefix,
            &["--leader-election", "--lease-duration", "15s"],
            &["--leader-election", "--lease-duration", "500ms"],
        ]
        .concat();
        let stderr = refused_arguments(&args);
        assert!(stderr.contains("shorter than a second"), "{stderr}");
    }
}

#[test]
fn the_binary_refuses_a_stall_timeout_a_healthy_api_call_could_reach() {
    for args in [
        &["run", "--stall-timeout=30s"][..],
        // Longer than one API call may take, but not than the few calls of one reconcile.
        &["--api-timeout=2m", "--stall-timeout=5m"][..],
    ] {
        let stderr = refused_arguments(args);
        assert!(
            stderr.contains("--stall-timeout") && stderr.contains("--api-timeout"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn the_binary_refuses_a_rate_limit_it_cannot_keep() {
    for qps in ["1e-20", "NaN", "inf", "-1"] {
        let stderr = refused_arguments(&["run", &format!("--aws-qps={qps}")]);
        assert!(
            stderr.contains("--aws-qps") && stderr.contains("0 (no limit)"),
            "{qps}: {stderr}"
        );
    }
    // Too large to mean anything, though the CRD's pattern allows it: refused, not a panic.
    let stderr = refused_arguments(&["run", "--drain-timeout", "99999999999999999h"]);
    assert!(stderr.contains("--drain-timeout"), "{stderr}");
}

#[tokio::test]
async fn the_binary_takes_credentials_from_a_profiles_credential_process() {
    let cluster = Cluster::start().await;
    // A profile whose credentials come from a program, as aws-vault or granted set up.
    let program = cluster.dir.path().join("credentials.sh");
    std::fs::write(
        &program,
        "#!/bin/sh\necho '{\"Version\": 1, \"AccessKeyId\": \"AKIDFROMPROCESS\", \"SecretAccessKey\": \"from-process\"}'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = cluster.dir.path().join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile dev]\ncredential_process = {}\n",
            program.display()
        ),
    )
    .unwrap();
    let mut operator = cluster.spawn_adjusted("process", "60s", &[], |command| {
        command
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_PROFILE", "dev");
    });
    operator.wait_ready().await;
    cluster.create("console", quick_sight()).await;
    eventually("URL in the Secret", WAIT, || {
        cluster.secret_value("console", "url")
    })
    .await;
    let calls = cluster.aws.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].access_key.as_deref(), Some("AKIDFROMPROCESS"));
    operator.terminate().await;
}

#[tokio::test]
async fn the_binary_recovers_from_a_list_whose_answer_stops_halfway() {
    let cluster = Cluster::start().await;
    // The read timeout must outlast a healthy watch's silences, which bookmarks end: here a
    // bookmark every half second against a 3 s read timeout (production: a minute against 300 s).
    cluster
        .kube
        .set_bookmark_interval(Duration::from_millis(500));
    cluster.create("console", quick_sight()).await;
    // The first list of requests sends half its answer, then nothing, as when an API server
    // vanishes mid-body. A timeout on the answer's start cannot see it.
    cluster
        .kube
        .inject_stall_mid_answer("list", "embedurlrequests", 1);
    let mut operator = cluster.spawn_adjusted("solo", "60s", &[], |command| {
        command.env("EMBEDURL_READ_TIMEOUT", "3s");
    });
    eventually("URL in the Secret", Duration::from_secs(20), || {
        cluster.secret_value("console", "url")
    })
    .await;
    assert!(cluster.kube.request_count("list", "embedurlrequests") >= 2);
    operator.terminate().await;
}
