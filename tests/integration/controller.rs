//! The real controller against the fake API server and the fake AWS endpoint.

use crate::support::fake_aws::{FakeAws, Fault, TEST_ACCESS_KEY};
use crate::support::{Harness, NS, eventually};
use crate::{flink, q_business, quick_sight};
use embed_url_operator::crd::EmbedUrlRequest;
use embed_url_operator::providers::Service;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const LONG_WINDOW: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(10);

async fn minted_url(h: &Harness, secret: &str) -> String {
    eventually(&format!("a URL in Secret {secret}"), WAIT, || {
        h.secret_value(secret, "url")
    })
    .await
}

async fn patch_spec(h: &Harness, name: &str, spec: serde_json::Value) {
    h.requests()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .expect("patch spec");
}

/// The value of the per-request series `family` of request `name`, as the operator exports it.
fn request_metric(h: &Harness, family: &str, name: &str) -> Option<String> {
    let prefix = format!("embedurl_{family}{{namespace=\"{NS}\",name=\"{name}\",");
    let text = h.metrics().encode();
    let line = text.lines().find(|line| line.starts_with(&prefix))?;
    line.rsplit_once(' ').map(|(_, value)| value.to_string())
}

/// Makes the operator reconcile `name` once more, without asking for anything (an annotation
/// under its prefix that it does not use), and waits until a reconcile has started.
async fn reconcile_once_more(h: &Harness, name: &str) {
    let before = h.reconciles();
    h.requests()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"embedurl.io/note": before.to_string()}}}),
            ),
        )
        .await
        .unwrap();
    h.reconciled_since(before).await;
}

#[tokio::test]
async fn each_service_mints_into_its_secret() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;
    let mut eu_flink = flink();
    eu_flink.region = Some("eu-west-1".into());
    eu_flink.secret_name = Some("flink-dashboard".into());
    h.create("dashboard", eu_flink).await;

    let urls = [
        ("console", "console", "https://quicksight.fake.test/"),
        ("chat", "chat", "https://qbusiness.fake.test/"),
        ("dashboard", "flink-dashboard", "https://flink.fake.test/"),
    ];
    for (request, secret, prefix) in urls {
        let url = minted_url(&h, secret).await;
        assert!(url.starts_with(prefix), "{secret}: {url}");
        let status = eventually("Ready", WAIT, || {
            let s = h.status(request);
            s.ready().filter(|c| c.status == "True").map(|_| s.clone())
        })
        .await;
        assert_eq!(status.ready().unwrap().reason, "UrlReady");
        assert_eq!(status.secret_name.as_deref(), Some(secret));
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.consecutive_failures, Some(0));
        assert_eq!(
            status.url_expires_at.as_deref(),
            h.secret_value(secret, "expiresAt").as_deref()
        );
        assert_eq!(
            status.session_expires_at.as_deref(),
            h.secret_value(secret, "sessionExpiresAt").as_deref()
        );
        // The URL is a bearer credential: never in the status.
        assert!(!serde_json::to_string(&status).unwrap().contains(&url));

        let stored = h.secret(secret).unwrap();
        assert_eq!(stored.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            stored.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "embed-url-operator"
        );
        let owner = &stored.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("EmbedUrlRequest", request, Some(true))
        );
    }
    assert_eq!(h.status("console").service.as_deref(), Some("QuickSight"));
    assert_eq!(h.status("chat").service.as_deref(), Some("QBusiness"));
    assert_eq!(h.status("dashboard").service.as_deref(), Some("Flink"));

    // One call each, with the spec's inputs on the wire, signed with the operator's credentials
    // for the request's region.
    let calls = h.aws.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    let qs = calls
        .iter()
        .find(|c| c.service == Service::QuickSight)
        .unwrap();
    assert_eq!(qs.inputs["AwsAccountId"], "111122223333");
    assert_eq!(qs.inputs["entry-point"], "/start/dashboards");
    assert_eq!(qs.inputs["session-lifetime"], "120");
    assert_eq!(
        qs.inputs["user-arn"],
        "arn:aws:quicksight:us-east-1:111122223333:user/default/alice"
    );
    assert_eq!(qs.region.as_deref(), Some("us-east-1"));
    let qb = calls
        .iter()
        .find(|c| c.service == Service::QBusiness)
        .unwrap();
    assert_eq!(qb.inputs["applicationId"], crate::ID36);
    assert_eq!(qb.inputs["sessionDurationInMinutes"], 30);
    let fl = calls.iter().find(|c| c.service == Service::Flink).unwrap();
    assert_eq!(fl.inputs["ApplicationName"], "orders");
    assert_eq!(fl.inputs["UrlType"], "FLINK_DASHBOARD_URL");
    assert_eq!(fl.inputs["SessionExpirationDurationInSeconds"], 3600);
    assert_eq!(fl.region.as_deref(), Some("eu-west-1"));
    assert!(
        calls
            .iter()
            .all(|c| c.access_key.as_deref() == Some(TEST_ACCESS_KEY))
    );

    // Events mark the transition to Ready, and carry no URL either.
    let events = h.kube.list("events.k8s.io/v1", "events");
    assert!(!events.is_empty());
    for (_, secret, _) in urls {
        let url = h.secret_value(secret, "url").unwrap();
        assert!(!serde_json::to_string(&events).unwrap().contains(&url));
    }

    let metrics = h.metrics().encode();
    assert!(
        metrics.contains(r#"embedurl_aws_calls_total{service="QuickSight",operation="GetSessionEmbedUrl",outcome="Success"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"embedurl_ready{namespace="analytics",name="console",service="QuickSight",reason="UrlReady"} 1"#
    ));
}

#[tokio::test]
async fn settled_requests_make_no_aws_calls_and_no_writes() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;
    eventually("Ready", WAIT, || {
        h.ready_reason("console").filter(|(s, _)| s == "True")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let calls = h.aws.calls().len();
    let secret_writes = h.kube.effective_write_count("secrets");
    let request_writes = h.kube.effective_write_count("embedurlrequests");
    assert_eq!(calls, 1);
    assert_eq!(secret_writes, 1, "one Secret write per mint");
    // create + one status write: the echoes of the operator's own writes change nothing.
    assert_eq!(request_writes, 2);

    // Every watch ends and resumes: nothing to do.
    h.kube.end_all_watches();
    // An annotation under the operator's prefix that asks for nothing triggers a reconcile
    // (the operator reacts to its own annotations), which finds nothing to do.
    reconcile_once_more(&h, "console").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.aws.calls().len(), calls);
    assert_eq!(h.kube.effective_write_count("secrets"), secret_writes);
    assert_eq!(
        h.kube.effective_write_count("embedurlrequests"),
        request_writes + 1
    );
}

#[tokio::test]
async fn urls_are_replaced_before_their_use_by_time() {
    // A 3 s window: the default refreshBefore is 1.5 s.
    let h = Harness::start(Duration::from_secs(3)).await;
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;

    let mut seen = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        let url = h.secret_value("console", "url").unwrap();
        let expires: Timestamp = h
            .secret_value("console", "expiresAt")
            .unwrap()
            .parse()
            .unwrap();
        let slack = expires.duration_since(Timestamp::now());
        // Whatever a pod reads is still usable, with most of refreshBefore to spare.
        assert!(
            slack.as_millis() > 500,
            "URL in the Secret has only {slack:?} left"
        );
        seen.insert(url);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 4, "only {} URLs in 7 s", seen.len());
    // One AWS call per URL: no duplicate mints from the echoes of our own writes.
    assert!(
        h.aws.calls().len() <= seen.len() + 1,
        "{} calls for {} URLs",
        h.aws.calls().len(),
        seen.len()
    );
    // Events mark transitions only, not every refresh.
    let events = h.kube.list("events.k8s.io/v1", "events");
    assert_eq!(events.len(), 1, "{events:?}");
    let metrics = h.metrics().encode();
    assert!(
        metrics.contains("embedurl_refresh_lateness_seconds_count"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_with_the_longest_name_gets_its_secret_and_event() {
    // 253 characters, the most the API server allows; the Secret takes the same name. kube's own
    // event recorder appends a 17-character suffix to it, which the API server refuses.
    let name = format!("{}.{}", "a".repeat(200), "b".repeat(52));
    assert_eq!(name.len(), 253);
    let h = Harness::start(LONG_WINDOW).await;
    h.create(&name, quick_sight()).await;
    minted_url(&h, &name).await;
    let events = h.kube.list("events.k8s.io/v1", "events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["regarding"]["name"], json!(name));
    assert_eq!(events[0]["reason"], json!("UrlReady"));
}

#[tokio::test]
async fn spec_change_mints_a_new_url() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    let first = minted_url(&h, "console").await;
    patch_spec(
        &h,
        "console",
        json!({"quickSight": {"entryPoint": "/start/analyses"}}),
    )
    .await;
    let second = eventually("a new URL", WAIT, || {
        h.secret_value("console", "url").filter(|u| *u != first)
    })
    .await;
    assert_ne!(first, second);
    eventually("generation 2 observed", WAIT, || {
        (h.status("console").observed_generation == Some(2)).then_some(())
    })
    .await;
    let calls = h.aws.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].inputs["entry-point"], "/start/analyses");
}

#[tokio::test]
async fn deleted_or_edited_secret_is_restored() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    let first = minted_url(&h, "console").await;

    h.secrets()
        .delete("console", &DeleteParams::default())
        .await
        .unwrap();
    let second = eventually("Secret restored", WAIT, || {
        h.secret_value("console", "url").filter(|u| *u != first)
    })
    .await;

    // An edited URL cannot be vouched for: it is replaced with a freshly minted one.
    h.secrets()
        .patch(
            "console",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"url": "https://attacker.test/"}, "data": {"url": "aHR0cHM6Ly9hdHRhY2tlci50ZXN0Lw=="}})),
        )
        .await
        .unwrap();
    let third = eventually("edited URL replaced", WAIT, || {
        h.secret_value("console", "url")
            .filter(|u| *u != second && !u.contains("attacker"))
    })
    .await;
    assert!(third.starts_with("https://quicksight.fake.test/"));
    let calls_after_edit = h.aws.calls().len();
    assert_eq!(calls_after_edit, 3);

    // Labels removed by hand are restored without a new mint; so is a data key removed with
    // them, rebuilt from the URL's use-by time.
    let session_expires = h.secret_value("console", "sessionExpiresAt");
    h.secrets()
        .patch(
            "console",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"labels": {"app.kubernetes.io/managed-by": null}},
                "data": {"sessionExpiresAt": null}
            })),
        )
        .await
        .unwrap();
    eventually("label restored", WAIT, || {
        h.secret("console")
            .and_then(|s| s.metadata.labels)
            .filter(|l| {
                l.get("app.kubernetes.io/managed-by").map(String::as_str)
                    == Some("embed-url-operator")
            })
    })
    .await;
    assert_eq!(
        h.secret_value("console", "url").as_deref(),
        Some(third.as_str())
    );
    assert_eq!(
        h.secret_value("console", "sessionExpiresAt"),
        session_expires
    );
    assert_eq!(h.aws.calls().len(), calls_after_edit);
}

#[tokio::test]
async fn a_foreign_secret_is_never_overwritten() {
    let h = Harness::start(LONG_WINDOW).await;
    let foreign = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("taken".into()),
            // Copied from one of the operator's Secrets, label included: still not its own.
            labels: Some(BTreeMap::from([(
                embed_url_operator::secret::MANAGED_BY_LABEL.to_string(),
                embed_url_operator::secret::MANAGED_BY_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "password".to_string(),
            "hunter2".to_string(),
        )])),
        ..Default::default()
    };
    h.secrets()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let mut spec = quick_sight();
    spec.secret_name = Some("taken".into());
    h.create("console", spec).await;

    let (status, reason) = eventually("SecretConflict", WAIT, || {
        h.ready_reason("console")
            .filter(|(_, r)| r == "SecretConflict")
    })
    .await;
    assert_eq!(status, "False");
    let message = h.status("console").ready().unwrap().message.clone();
    assert!(
        message.contains("\"taken\"") && message.contains("spec.secretName"),
        "{message}"
    );
    assert_eq!(reason, "SecretConflict");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.aws.calls().len(),
        0,
        "no AWS call for a request that cannot write its Secret"
    );
    assert_eq!(
        h.secret_value("taken", "password").as_deref(),
        Some("hunter2")
    );
    assert_eq!(h.secret_value("taken", "url"), None);
    // Someone else's Secret is never read whole: its metadata said whose it is. And the
    // operator's watch of Secrets sees only the labelled ones, and only their metadata.
    let reads = h.kube.reads();
    let secret_reads: Vec<_> = reads.iter().filter(|r| r.resource == "secrets").collect();
    assert!(
        secret_reads.iter().all(|r| r.metadata_only),
        "{secret_reads:?}"
    );
    assert!(
        secret_reads.iter().any(|r| r.verb == "get"),
        "{secret_reads:?}"
    );
    let selector = format!(
        "{}={}",
        embed_url_operator::secret::MANAGED_BY_LABEL,
        embed_url_operator::secret::MANAGED_BY_VALUE
    );
    for read in secret_reads.iter().filter(|r| r.verb != "get") {
        assert_eq!(
            read.label_selector.as_deref(),
            Some(selector.as_str()),
            "{read:?}"
        );
    }
    assert!(
        secret_reads.iter().any(|r| r.verb == "watch"),
        "{secret_reads:?}"
    );
}

#[tokio::test]
async fn deleting_the_request_garbage_collects_the_secret() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;
    eventually("series published", WAIT, || {
        (request_metric(&h, "ready", "console").as_deref() == Some("1")).then_some(())
    })
    .await;
    h.requests()
        .delete("console", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Secret collected", WAIT, || {
        h.secret("console").is_none().then_some(())
    })
    .await;
    eventually("metrics forgotten", WAIT, || {
        (!h.metrics().encode().contains("name=\"console\"")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_request_being_deleted_is_not_refreshed() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;
    eventually("series published", WAIT, || {
        (request_metric(&h, "ready", "console").as_deref() == Some("1")).then_some(())
    })
    .await;
    // A finalizer keeps the deleted request visible, as foreground deletion (`kubectl delete
    // --cascade=foreground`, Argo CD's foreground prune) does while the garbage collector
    // removes the request's Secret.
    h.requests()
        .patch(
            "console",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold"]}})),
        )
        .await
        .unwrap();
    h.requests()
        .delete("console", &DeleteParams::default())
        .await
        .unwrap();
    // Its series go when the operator sees the deletion start, which is also when it must
    // stop refreshing.
    eventually("series dropped", WAIT, || {
        request_metric(&h, "ready", "console")
            .is_none()
            .then_some(())
    })
    .await;
    h.secrets()
        .delete("console", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        h.secret("console").is_none(),
        "a Secret was re-created for a request that is going away"
    );
    assert_eq!(h.aws.calls().len(), 1, "no URL is minted for it");
}

#[tokio::test]
async fn a_deletion_the_watch_missed_drops_the_requests_series_at_the_relist() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;
    minted_url(&h, "console").await;
    minted_url(&h, "chat").await;
    eventually("series published", WAIT, || {
        request_metric(&h, "ready", "console")
            .filter(|_| request_metric(&h, "ready", "chat").is_some())
    })
    .await;
    // Every watch down for a while (two failed re-watches each), a request deleted meanwhile,
    // and the history compacted: the watches come back only through a relist, which never
    // reports the deletion.
    for plural in ["embedurlrequests", "secrets"] {
        h.kube.inject_failure("watch", plural, 500, 2);
    }
    h.kube.end_all_watches();
    h.requests()
        .delete("console", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.kube.compact_history();
    eventually(
        "the deleted request's series dropped",
        Duration::from_secs(20),
        || {
            request_metric(&h, "ready", "console")
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        request_metric(&h, "ready", "chat").is_some(),
        "the others stay"
    );
}

#[tokio::test]
async fn throttling_keeps_the_old_url_then_recovers() {
    let h = Harness::start(Duration::from_secs(6)).await;
    h.create("chat", q_business()).await;
    let first = minted_url(&h, "chat").await;
    let first_expiry = h.secret_value("chat", "expiresAt").unwrap();
    h.aws.fail_always(Service::QBusiness, Fault::Throttle);

    // The refresh (3 s in) is throttled: the condition says so, the old URL stays.
    let (ready, _) = eventually("AwsThrottled", WAIT, || {
        h.ready_reason("chat").filter(|(_, r)| r == "AwsThrottled")
    })
    .await;
    assert_eq!(ready, "True", "the old URL is still usable");
    assert_eq!(
        h.secret_value("chat", "url").as_deref(),
        Some(first.as_str())
    );
    let status = h.status("chat");
    assert!(status.consecutive_failures.unwrap() >= 1);
    let message = &status.ready().unwrap().message;
    assert!(message.contains("ThrottlingException"), "{message}");
    assert!(message.contains(&first_expiry), "{message}");

    // Throttled for longer than the window: backoff, not a hot loop. About 7 s in: the first
    // mint, then one HTTP call per attempt (the SDK does not retry on its own, outside the rate
    // limit) at 3 s, ~4 s and the last chance: 4, and 5 if the seconds round against us.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let throttled_calls = h.aws.call_count(Service::QBusiness);
    assert!(
        throttled_calls <= 6,
        "{throttled_calls} calls while throttled"
    );
    // The old URL has lapsed: the next retry after its use-by time marks the request not ready.
    let expiry: jiff::Timestamp = first_expiry.parse().unwrap();
    eventually("Ready=False after the old URL lapsed", WAIT, || {
        h.ready_reason("chat").filter(|(s, _)| s == "False")
    })
    .await;
    assert!(jiff::Timestamp::now() > expiry);

    h.aws.clear_faults();
    let recovered = eventually("recovery", Duration::from_secs(15), || {
        h.secret_value("chat", "url").filter(|u| *u != first)
    })
    .await;
    assert!(recovered.starts_with("https://qbusiness.fake.test/"));
    eventually("UrlReady", WAIT, || {
        h.ready_reason("chat")
            .filter(|(s, r)| s == "True" && r == "UrlReady")
    })
    .await;
    assert_eq!(h.status("chat").consecutive_failures, Some(0));
    assert!(h.metrics().encode().contains(r#"outcome="Throttled""#));
}

#[tokio::test]
async fn server_errors_are_retried() {
    let h = Harness::start(LONG_WINDOW).await;
    // Two 500s: the operator retries after its own backoff (the SDK makes one attempt per mint),
    // and the third call succeeds.
    h.aws.fail_next(Service::Flink, Fault::ServerError, 2);
    h.create("dashboard", flink()).await;
    eventually("AwsUnavailable", WAIT, || {
        h.ready_reason("dashboard")
            .filter(|(_, r)| r == "AwsUnavailable")
    })
    .await;
    // Reported after one call: the operator's retry comes a second later, and the SDK made no
    // retry of its own.
    assert_eq!(h.aws.call_count(Service::Flink), 1);
    minted_url(&h, "dashboard").await;
    assert_eq!(h.aws.call_count(Service::Flink), 3);
}

#[tokio::test]
async fn an_aws_call_that_times_out_is_retried_and_the_old_url_kept() {
    // An 8 s window: the refresh comes about 4 s after the mint.
    let h = Harness::start(Duration::from_secs(8)).await;
    h.create("chat", q_business()).await;
    let first = minted_url(&h, "chat").await;
    let calls = h.aws.call_count(Service::QBusiness);
    // AWS answers later than the SDK waits.
    h.aws
        .set_latency(FakeAws::ATTEMPT_TIMEOUT + Duration::from_secs(1));
    let (ready, _) = eventually("AwsUnavailable", WAIT, || {
        h.ready_reason("chat")
            .filter(|(_, r)| r == "AwsUnavailable")
    })
    .await;
    assert_eq!(ready, "True", "the old URL is still usable");
    let message = h.status("chat").ready().unwrap().message.clone();
    assert!(message.contains("Timeout"), "{message}");
    assert_eq!(h.secret_value("chat", "url"), Some(first.clone()));
    assert_eq!(
        h.aws.call_count(Service::QBusiness),
        calls + 1,
        "one attempt"
    );

    // AWS answers in time again: the retry, before the old URL's use-by time, replaces it.
    h.aws.set_latency(Duration::ZERO);
    let expiry: jiff::Timestamp = h
        .secret_value("chat", "expiresAt")
        .unwrap()
        .parse()
        .unwrap();
    eventually("a new URL", WAIT, || {
        h.secret_value("chat", "url").filter(|url| *url != first)
    })
    .await;
    assert!(
        jiff::Timestamp::now() < expiry,
        "replaced before the old URL lapsed"
    );
    eventually("UrlReady", WAIT, || {
        h.ready_reason("chat")
            .filter(|(s, r)| s == "True" && r == "UrlReady")
    })
    .await;
    assert!(h.metrics().encode().contains(r#"outcome="Unavailable""#));
}

#[tokio::test]
async fn a_rejected_request_reports_and_backs_off() {
    let h = Harness::start(Duration::from_secs(3)).await;
    h.aws.fail_always(Service::QuickSight, Fault::Reject);
    h.create("console", quick_sight()).await;
    let (ready, _) = eventually("AwsRejected", WAIT, || {
        h.ready_reason("console")
            .filter(|(_, r)| r == "AwsRejected")
    })
    .await;
    assert_eq!(ready, "False");
    let message = h.status("console").ready().unwrap().message.clone();
    assert!(message.contains("AccessDeniedException"), "{message}");
    // Several windows later: still exactly one call, no hot loop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.aws.call_count(Service::QuickSight), 1);
    assert_eq!(h.status("console").consecutive_failures, Some(1));
    assert!(h.secret("console").is_none());
}

#[tokio::test]
async fn a_restarted_operator_does_not_mint_fresh_urls_again() {
    let mut h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;
    h.create("dashboard", flink()).await;
    for secret in ["console", "chat", "dashboard"] {
        minted_url(&h, secret).await;
    }
    eventually("all ready", WAIT, || {
        ["console", "chat", "dashboard"]
            .iter()
            .all(|r| h.ready_reason(r).is_some_and(|(s, _)| s == "True"))
            .then_some(())
    })
    .await;
    let calls = h.aws.calls().len();
    let writes =
        h.kube.effective_write_count("secrets") + h.kube.effective_write_count("embedurlrequests");

    h.stop_operator().await;
    h.start_operator().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        h.aws.calls().len(),
        calls,
        "a restart must not mint URLs that are still fresh"
    );
    assert_eq!(
        h.kube.effective_write_count("secrets") + h.kube.effective_write_count("embedurlrequests"),
        writes
    );
    // The new process exports every request's schedule although it has minted nothing, so an
    // alert on the use-by time keeps working across restarts.
    for request in ["console", "chat", "dashboard"] {
        let status = h.status(request);
        let expiry: Timestamp = status.url_expires_at.as_deref().unwrap().parse().unwrap();
        let exported: f64 = eventually("the use-by time exported", WAIT, || {
            request_metric(&h, "url_expiry_timestamp_seconds", request)
        })
        .await
        .parse()
        .unwrap();
        assert_eq!(exported, expiry.as_millisecond() as f64 / 1000.0);
        assert!(request_metric(&h, "next_refresh_timestamp_seconds", request).is_some());
        assert_eq!(
            request_metric(&h, "ready", request).as_deref(),
            Some("1"),
            "{request}"
        );
    }
}

#[tokio::test]
async fn a_crash_between_secret_and_status_writes_does_not_mint_twice() {
    let h = Harness::start(LONG_WINDOW).await;
    // The status write after the first mint fails, as if the operator died right after the
    // Secret write: the next reconcile must trust the Secret instead of minting again.
    h.kube
        .inject_failure("patch", "embedurlrequests/status", 500, 1);
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;
    let expires = h.secret_value("console", "expiresAt");
    eventually(
        "status repaired from the Secret",
        Duration::from_secs(15),
        || (h.status("console").url_expires_at.as_deref() == expires.as_deref()).then_some(()),
    )
    .await;
    assert_eq!(h.aws.calls().len(), 1);
    assert_eq!(h.ready_reason("console").unwrap().0, "True");
}

#[tokio::test]
async fn the_refresh_annotation_mints_once() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    let first = minted_url(&h, "console").await;
    h.request_refresh("console", "2026-11-22T10:00:00Z").await;
    let second = eventually("refreshed URL", WAIT, || {
        h.secret_value("console", "url").filter(|u| *u != first)
    })
    .await;
    eventually("handled value recorded", WAIT, || {
        (h.status("console").last_handled_refresh_request.as_deref()
            == Some("2026-11-22T10:00:00Z"))
        .then_some(())
    })
    .await;
    assert_eq!(h.aws.calls().len(), 2);
    // Touching the object again with the same value does nothing, even when a reconcile (here
    // for another of the operator's annotations) finds the value still there.
    h.request_refresh("console", "2026-11-22T10:00:00Z").await;
    reconcile_once_more(&h, "console").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.aws.calls().len(), 2);
    assert_eq!(
        h.secret_value("console", "url").as_deref(),
        Some(second.as_str())
    );
    h.request_refresh("console", "second").await;
    eventually("second refresh", WAIT, || {
        (h.aws.calls().len() == 3).then_some(())
    })
    .await;
}

#[tokio::test]
async fn suspend_stops_refreshing() {
    let h = Harness::start(Duration::from_secs(2)).await;
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;
    patch_spec(&h, "console", json!({"suspend": true})).await;
    eventually("Suspended", WAIT, || {
        h.ready_reason("console").filter(|(_, r)| r == "Suspended")
    })
    .await;
    let calls = h.aws.calls().len();
    let url = h.secret_value("console", "url");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        h.aws.calls().len(),
        calls,
        "a suspended request is not refreshed"
    );
    assert_eq!(
        h.secret_value("console", "url"),
        url,
        "the Secret stays as it is"
    );
    assert!(h.status("console").next_refresh_time.is_none());
    // The metrics follow: not ready (on purpose, as the reason says, so that an alert can leave
    // it out), nothing planned; the last URL's use-by time stays.
    assert_eq!(request_metric(&h, "ready", "console").as_deref(), Some("0"));
    assert!(
        h.metrics().encode().contains(&format!(
            r#"embedurl_ready{{namespace="{NS}",name="console",service="QuickSight",reason="Suspended"}} 0"#
        )),
        "{}",
        h.metrics().encode()
    );
    assert_eq!(
        request_metric(&h, "next_refresh_timestamp_seconds", "console"),
        None
    );
    assert!(request_metric(&h, "url_expiry_timestamp_seconds", "console").is_some());

    patch_spec(&h, "console", json!({"suspend": false})).await;
    eventually("refreshing again", WAIT, || {
        h.secret_value("console", "url")
            .filter(|u| Some(u) != url.as_ref())
    })
    .await;
}

#[tokio::test]
async fn specs_that_bypassed_the_schema_get_invalid_spec_and_no_call() {
    let h = Harness::start(LONG_WINDOW).await;
    // The fake API server has no schema validation, like a cluster with an older CRD.
    let mut bad = quick_sight();
    bad.quick_sight
        .as_mut()
        .unwrap()
        .session_lifetime_in_minutes = Some(5);
    h.create("too-short", bad).await;

    let resource = ApiResource::erase::<EmbedUrlRequest>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(h.client.clone(), NS, &resource);
    let wrong_type: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "embedurl.io/v1alpha1",
        "kind": "EmbedUrlRequest",
        "metadata": {"name": "wrong-type"},
        "spec": {"quickSight": {"awsAccountId": "111122223333", "sessionLifetimeInMinutes": "ten"}, "surprise": "x".repeat(100_000)}
    }))
    .unwrap();
    raw.create(&PostParams::default(), &wrong_type)
        .await
        .unwrap();
    h.create("fine", q_business()).await;

    for (name, field) in [
        ("too-short", "spec.quickSight.sessionLifetimeInMinutes"),
        ("wrong-type", "spec.quickSight.sessionLifetimeInMinutes"),
    ] {
        let message = eventually(&format!("InvalidSpec on {name}"), WAIT, || {
            h.status(name)
                .ready()
                .filter(|c| c.reason == "InvalidSpec" && c.status == "False")
                .map(|c| c.message.clone())
        })
        .await;
        assert!(message.starts_with(field), "{name}: {message}");
    }
    // The valid request next to them is served; the invalid ones cost no AWS call.
    minted_url(&h, "fine").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.aws.call_count(Service::QuickSight), 0);
    assert_eq!(h.aws.call_count(Service::QBusiness), 1);

    // Fixing the spec makes it mint.
    patch_spec(
        &h,
        "too-short",
        json!({"quickSight": {"sessionLifetimeInMinutes": 15}}),
    )
    .await;
    minted_url(&h, "too-short").await;
}

#[tokio::test]
async fn the_client_side_rate_limit_paces_mints() {
    let mut h = Harness::start(LONG_WINDOW).await;
    h.stop_operator().await;
    h.aws_rate = 4.0;
    h.start_operator().await;
    for i in 0..6 {
        h.create(&format!("console-{i}"), quick_sight()).await;
    }
    eventually("all minted", WAIT, || {
        (0..6)
            .all(|i| h.secret_value(&format!("console-{i}"), "url").is_some())
            .then_some(())
    })
    .await;
    // Burst of one, then one call every 250 ms: six calls take at least 1.25 s.
    let calls = h.aws.calls();
    assert_eq!(calls.len(), 6);
    let spread = calls[5].at.duration_since(calls[0].at);
    assert!(
        spread >= Duration::from_millis(1200),
        "six calls in {spread:?}"
    );
    for pair in calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(200), "calls {gap:?} apart");
    }
    let metrics = h.metrics().encode();
    assert!(
        metrics.contains("embedurl_aws_rate_limit_wait_seconds_count{service=\"QuickSight\"} 6"),
        "{metrics}"
    );
}

#[tokio::test]
async fn when_calls_queue_the_url_that_stops_working_first_goes_first() {
    let mut h = Harness::start(LONG_WINDOW).await;
    h.stop_operator().await;
    // One call a second: eight requests due at once queue in the rate limit, and beyond its
    // line (as long as the four slots), in the work queue.
    h.aws_rate = 1.0;
    // The status of each says when its current URL stops working: created in another order.
    let order = [5, 2, 7, 0, 3, 6, 1, 4];
    let now = jiff::Timestamp::now();
    for k in order {
        let mut spec = quick_sight();
        spec.quick_sight.as_mut().unwrap().user_arn = Some(format!(
            "arn:aws:quicksight:us-east-1:111122223333:user/default/viewer-{k}"
        ));
        // Names in the reverse order of urgency: the API server lists by name.
        let name = format!("console-{}", 7 - k);
        h.create(&name, spec).await;
        let expires = now + jiff::SignedDuration::from_secs(60 + 10 * k);
        h.requests()
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "urlExpiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                }})),
            )
            .await
            .unwrap();
    }
    h.start_operator().await;
    eventually("all minted", Duration::from_secs(15), || {
        (h.aws.calls().len() == 8).then_some(())
    })
    .await;
    let minted: Vec<String> = h
        .aws
        .calls()
        .iter()
        .map(|c| {
            c.inputs["user-arn"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    // The first to arrive takes the one token there is, before the others are even known;
    // every one after that waited, and went in order of urgency.
    let mut waited = minted[1..].to_vec();
    let in_order = {
        let mut sorted = waited.clone();
        sorted.sort();
        sorted
    };
    assert_eq!(waited, in_order, "minted in order of urgency: {minted:?}");
    waited.push(minted[0].clone());
    waited.sort();
    let everyone: Vec<String> = (0..8).map(|k| format!("viewer-{k}")).collect();
    assert_eq!(waited, everyone);
}

#[tokio::test]
async fn no_more_aws_calls_are_in_flight_than_the_concurrency() {
    // The harness runs four reconcile slots, without a rate limit.
    let h = Harness::start(LONG_WINDOW).await;
    let latency = Duration::from_millis(300);
    h.aws.set_latency(latency);
    let names: Vec<String> = (0..20).map(|i| format!("console-{i}")).collect();
    for name in &names {
        h.create(name, quick_sight()).await;
    }
    eventually("all minted", Duration::from_secs(15), || {
        names
            .iter()
            .all(|name| h.secret_value(name, "url").is_some())
            .then_some(())
    })
    .await;
    // Each call is answered `latency` after it arrived, and a slot is free only after that:
    // no window shorter than the latency sees more than four arrivals, and some see four.
    let arrivals: Vec<_> = h.aws.calls().iter().map(|c| c.at).collect();
    assert_eq!(arrivals.len(), 20);
    let window = latency - Duration::from_millis(30);
    let most = arrivals
        .iter()
        .map(|start| {
            arrivals
                .iter()
                .filter(|at| **at >= *start && at.duration_since(*start) < window)
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(most, 4, "calls in flight at once");
}

#[tokio::test]
async fn the_need_for_aws_calls_is_exported_for_the_busiest_bucket() {
    let mut h = Harness::start(Duration::from_secs(10)).await;
    h.stop_operator().await;
    h.aws_rate = 1.0;
    // Nine requests in us-east-1 refreshing every 4.5 s at the most (10 s window, refreshBefore
    // 5 s plus its 10 % of jitter): 2 calls/s; one in eu-west-1; one suspended, which needs none.
    for i in 0..9 {
        h.create(&format!("east-{i}"), quick_sight()).await;
    }
    let mut west = quick_sight();
    west.region = Some("eu-west-1".into());
    h.create("west", west).await;
    let mut paused = quick_sight();
    paused.suspend = Some(true);
    h.create("paused", paused).await;
    h.start_operator().await;
    let need = h.quick_sight_need().await;
    assert!((need - 2.0).abs() < 1e-6, "{need}");
    assert!(
        h.metrics()
            .encode()
            .contains("embedurl_aws_rate_limit_calls_per_second 1.0"),
        "{}",
        h.metrics().encode()
    );
}

#[tokio::test]
async fn one_buckets_backlog_does_not_hold_up_another_bucket() {
    let mut h = Harness::start(LONG_WINDOW).await;
    h.stop_operator().await;
    // One call a second per (service, region, identity), 4 reconcile slots.
    h.aws_rate = 1.0;
    h.start_operator().await;
    // Twelve requests of one bucket: twelve seconds of tokens, three times the slots.
    let east: Vec<String> = (0..12).map(|i| format!("east-{i}")).collect();
    for name in &east {
        h.create(name, quick_sight()).await;
    }
    eventually("the backlog under way", WAIT, || {
        (h.aws.calls().len() >= 2).then_some(())
    })
    .await;
    // A request of another bucket, whose tokens are all there: served at once, not after the
    // backlog (whose waiters used to hold every slot).
    let mut west = quick_sight();
    west.region = Some("eu-west-1".into());
    let created = std::time::Instant::now();
    h.create("west", west).await;
    eventually("the other bucket's URL", WAIT, || {
        h.secret_value("west", "url")
    })
    .await;
    assert!(
        created.elapsed() < Duration::from_millis(1500),
        "waited {:?} behind another bucket",
        created.elapsed()
    );
    // The backlog is served in turn, every request once.
    eventually("the whole backlog", Duration::from_secs(20), || {
        east.iter()
            .all(|name| h.secret_value(name, "url").is_some())
            .then_some(())
    })
    .await;
    assert_eq!(h.aws.calls().len(), 13, "{:?}", h.aws.calls());
    let calls = h.aws.calls();
    let east_calls: Vec<_> = calls
        .iter()
        .filter(|c| c.region.as_deref() == Some("us-east-1"))
        .collect();
    for pair in east_calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(900), "calls {gap:?} apart");
    }
    // Requests that waited well past their creation for a token say so.
    assert!(
        east.iter().any(|name| h
            .status(name)
            .condition("RateLimited")
            .is_some_and(|c| c.status == "True")),
        "no request reported RateLimited"
    );
    assert!(h.status("west").condition("RateLimited").is_none());
}

#[tokio::test]
async fn refreshes_delayed_by_the_rate_limit_are_reported_on_the_request() {
    let mut h = Harness::start(LONG_WINDOW).await;
    h.stop_operator().await;
    h.aws_rate = 1.0;
    h.start_operator().await;
    // refreshBefore 3 s: a wait of a second or more is more than the schedule's jitter allows.
    let spec = || {
        let mut spec = quick_sight();
        spec.refresh_before = Some("3s".into());
        spec
    };
    for i in 0..4 {
        h.create(&format!("console-{i}"), spec()).await;
    }
    // One call per second: the last of four waits about three seconds for its token.
    let delayed = eventually("a request reports RateLimited=True", WAIT, || {
        (0..4).map(|i| format!("console-{i}")).find(|name| {
            h.status(name)
                .condition("RateLimited")
                .is_some_and(|c| c.status == "True" && c.reason == "DemandExceedsRateLimit")
        })
    })
    .await;
    let status = h.status(&delayed);
    let message = &status.condition("RateLimited").unwrap().message;
    assert!(
        message.contains("1 calls/s") && message.contains("--aws-qps"),
        "{message}"
    );
    assert_eq!(
        status.ready().unwrap().reason,
        "UrlReady",
        "the URL was still minted"
    );
    // The first request got its token at once: no condition at all.
    assert!(h.status("console-0").condition("RateLimited").is_none());
    // URLs never appear in the condition.
    assert!(!message.contains("https://"), "{message}");

    // Demand drops: the next refresh goes out at once and the condition says so.
    let calls = h.aws.calls().len();
    assert!(
        calls < 4,
        "someone must still be waiting in line: {calls} calls"
    );
    for i in 0..4 {
        let name = format!("console-{i}");
        if name != delayed {
            h.requests()
                .delete(&name, &DeleteParams::default())
                .await
                .expect("delete");
        }
    }
    // Those still waiting in line when deleted mint nothing when their turn comes, and give
    // their token back; a second later one is there for the next refresh.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.aws.calls().len(), calls, "no URL for a deleted request");
    h.request_refresh(&delayed, "once").await;
    eventually("RateLimited=False", WAIT, || {
        h.status(&delayed)
            .condition("RateLimited")
            .filter(|c| c.status == "False" && c.reason == "WithinRateLimit")
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_lasting_backlog_serves_every_request_in_turn() {
    let mut h = Harness::start(Duration::from_secs(6)).await;
    h.stop_operator().await;
    h.aws_rate = 4.0;
    h.start_operator().await;
    // Sixteen requests refreshing every 3 s (half of the 6 s window) need 5.3 calls/s, more than
    // the 4 allowed: the backlog lasts as long as the test. Taken in any order but urgency,
    // some requests are served again and again and others never.
    let names: Vec<String> = (0..16).map(|i| format!("console-{i}")).collect();
    for name in &names {
        h.create(name, quick_sight()).await;
    }
    let mut urls: BTreeMap<&str, std::collections::HashSet<String>> = BTreeMap::new();
    let mut most_due = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        for name in &names {
            if let Some(url) = h.secret_value(name, "url") {
                urls.entry(name).or_default().insert(url);
            }
        }
        let metrics = h.metrics().encode();
        let due = metrics
            .lines()
            .find_map(|l| l.strip_prefix("embedurl_reconciles_due "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("the backlog gauge");
        most_due = most_due.max(due);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The backlog shows: requests due and waiting for one of the four slots.
    assert!(most_due >= 4, "at most {most_due} requests due at once");
    // About 60 mints in 15 s for 16 requests: in turn, three or four each.
    let mints: Vec<usize> = names
        .iter()
        .map(|name| urls.get(name.as_str()).map_or(0, |seen| seen.len()))
        .collect();
    assert!(
        mints.iter().all(|&n| n >= 2),
        "URLs minted per request: {mints:?}"
    );
}

#[tokio::test]
async fn a_refresh_costs_one_reconcile_not_one_per_echo_of_its_own_writes() {
    let h = Harness::start(Duration::from_secs(6)).await;
    h.create("console", quick_sight()).await;
    minted_url(&h, "console").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (reconciles_before, calls_before) = (h.reconciles(), h.aws.calls().len());
    // Refreshes every 2.7-3 s (refreshBefore 3 s, minus jitter): three in 9 s.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let refreshes = h.aws.calls().len() - calls_before;
    let reconciled = h.reconciles() - reconciles_before;
    assert!(refreshes >= 2, "{refreshes} refreshes");
    // Each refresh writes the Secret and the status; the watch events of both writes come back.
    // Reconciling them would double the operator's CPU per refresh and find nothing to do.
    assert!(
        reconciled <= refreshes as u64 + 1,
        "{reconciled} reconciles for {refreshes} refreshes"
    );
}
