//! Fault injection ("Scale and faults"): the real controller and AWS SDK clients against stand-ins
//! that fail on purpose. Kubernetes API errors (409, 429 with Retry-After, 500, 503), watches that
//! end or can only resume through 410 Gone, an operator killed mid-mint, AWS throttling and 5xx
//! for longer than a use-by window, and objects written around the CRD schema.
//!
//! Timing facts the assertions rely on (see src/reconciler.rs, src/schedule.rs, src/error.rs):
//! - a reconcile that fails on a Kubernetes API call is retried after 5-6 s (`retry_after_failure`),
//!   or at once when a watch event for the request or its Secret arrives;
//! - the harness client retries 429/503/504 itself, after `Retry-After` (1 s from the fake) when
//!   given, like the production client;
//! - a failed AWS attempt is retried after 1 s, 2 s, 4 s, 8 s... (up to 20 % shorter), pulled
//!   forward to a tenth of the window before the current URL's use-by time while it is usable,
//!   never sooner than 0.5 s; the mint clients make one HTTP attempt per operator attempt, as in
//!   production (`providers::clients::mint_retry_config`).

use crate::support::fake_aws::Fault;
use crate::support::{Harness, NS, eventually};
use crate::{flink, q_business, quick_sight};
use embed_url_operator::crd::{EmbedUrlRequest, EmbedUrlRequestSpec, EmbedUrlRequestStatus};
use embed_url_operator::policy::EmbedUrlPolicy;
use embed_url_operator::providers::Service;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const LONG_WINDOW: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(10);

/// Waits until `request` is Ready=True UrlReady and its status describes exactly the URL record
/// in `secret` (use-by and session times), with no failure pending. Returns that status.
async fn converged(
    h: &Harness,
    request: &str,
    secret: &str,
    timeout: Duration,
) -> EmbedUrlRequestStatus {
    eventually(
        &format!("{request} Ready with a status matching Secret {secret}"),
        timeout,
        || {
            let status = h.status(request);
            let ready = status.ready()?;
            let expires = h.secret_value(secret, "expiresAt")?;
            h.secret_value(secret, "url")?;
            (ready.status == "True"
                && ready.reason == "UrlReady"
                && status.url_expires_at.as_deref() == Some(expires.as_str())
                && status.session_expires_at.as_deref()
                    == h.secret_value(secret, "sessionExpiresAt").as_deref()
                && status.consecutive_failures == Some(0))
            .then_some(status)
        },
    )
    .await
}

/// Asserts the URL count stays at `calls` for a while: nothing else is due.
async fn assert_no_more_calls(h: &Harness, calls: usize, why: &str) {
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.aws.calls().len(), calls, "{why}: {:?}", h.aws.calls());
}

fn writes(h: &Harness) -> usize {
    h.kube.effective_write_count("secrets") + h.kube.effective_write_count("embedurlrequests")
}

fn raw_requests(h: &Harness) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<EmbedUrlRequest>(&());
    Api::namespaced_with(h.client.clone(), NS, &resource)
}

async fn create_raw(h: &Harness, name: &str, body: Value) {
    let mut object = json!({
        "apiVersion": "embedurl.io/v1alpha1",
        "kind": "EmbedUrlRequest",
        "metadata": {"name": name},
    });
    object
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    raw_requests(h)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

fn viewer_arn(i: usize) -> String {
    format!("arn:aws:quicksight:us-east-1:111122223333:user/default/viewer-{i}")
}

fn quick_sight_for(i: usize) -> EmbedUrlRequestSpec {
    let mut spec = quick_sight();
    spec.quick_sight.as_mut().unwrap().user_arn = Some(viewer_arn(i));
    spec
}

/// Calls made for the QuickSight request of `viewer_arn(i)`, split into (throttled, succeeded).
fn viewer_calls(h: &Harness, i: usize) -> (usize, usize) {
    let arn = viewer_arn(i);
    let calls: Vec<_> = h
        .aws
        .calls()
        .into_iter()
        .filter(|c| c.inputs.get("user-arn").and_then(Value::as_str) == Some(arn.as_str()))
        .collect();
    let ok = calls.iter().filter(|c| c.succeeded).count();
    (calls.len() - ok, ok)
}

// ---- 1. API server conflicts on writes ----------------------------------------------------------

#[tokio::test]
async fn secret_write_conflicts_cost_one_mint_each_and_status_conflicts_none() {
    let h = Harness::start(LONG_WINDOW).await;
    h.kube.inject_failure("patch", "secrets", 409, 2);
    h.kube
        .inject_failure("patch", "embedurlrequests/status", 409, 1);
    h.create("console", quick_sight()).await;

    // Two failed Secret writes, 5-6 s apart, then the write that lands and a refused status
    // write, repaired 5-6 s later (the echo of the operator's own Secret write triggers nothing).
    converged(&h, "console", "console", Duration::from_secs(22)).await;
    // The bound: a Secret write that fails loses the URL minted just before it (a single-use
    // URL cannot be kept anywhere else), so each of the 2 refused Secret writes forces exactly
    // one more mint: 1 + 2 = 3. The refused status write forces none: the Secret already holds
    // the URL and the next reconcile repairs the status from it.
    assert_eq!(h.kube.request_count("patch", "secrets"), 3);
    assert_eq!(h.aws.calls().len(), 3, "{:?}", h.aws.calls());
    assert_no_more_calls(&h, 3, "converged").await;
}

#[tokio::test]
async fn a_request_deleted_and_created_again_takes_its_predecessors_secret_over() {
    let h = Harness::start(LONG_WINDOW).await;
    // A garbage collector with a backlog: the old Secret outlives its request by seconds.
    h.kube.set_gc_delay(Duration::from_secs(2));
    h.create("console", quick_sight()).await;
    converged(&h, "console", "console", WAIT).await;
    let first = h.secret_value("console", "url").unwrap();
    // `kubectl replace --force`: delete, create again at once (a new uid).
    h.requests()
        .delete("console", &DeleteParams::default())
        .await
        .unwrap();
    let again = h.create("console", quick_sight()).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let reason = h.ready_reason("console").map(|(_, reason)| reason);
        assert_ne!(
            reason.as_deref(),
            Some("SecretConflict"),
            "its own Secret, not another's"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new URL, written over the old Secret with the new request as owner, so the collector
    // (past its delay now) left it alone.
    let status = converged(&h, "console", "console", WAIT).await;
    assert_eq!(status.ready().unwrap().reason, "UrlReady");
    let secret = h
        .secret("console")
        .expect("the Secret survived the garbage collector");
    let owners = secret.metadata.owner_references.unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(Some(&owners[0].uid), again.metadata.uid.as_ref());
    assert_ne!(h.secret_value("console", "url"), Some(first));
    assert_eq!(h.aws.calls().len(), 2, "{:?}", h.aws.calls());
    let events = h.kube.list("events.k8s.io/v1", "events");
    assert!(
        events.iter().all(|e| e["reason"] != "SecretConflict"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_request_in_a_namespace_being_deleted_mints_nothing() {
    let h = Harness::start(LONG_WINDOW).await;
    // The namespace controller deletes one resource type at a time, Secrets first, requests
    // last: this far apart, the operator sees the Secret go well before its request does.
    h.kube.set_gc_delay(Duration::from_millis(300));
    let namespaces = h.create_namespace().await;
    h.create("console", quick_sight()).await;
    converged(&h, "console", "console", WAIT).await;
    namespaces
        .delete(NS, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Secret deleted", WAIT, || {
        h.secret("console").is_none().then_some(())
    })
    .await;
    assert!(
        h.kube
            .get(
                "embedurl.io/v1alpha1",
                "embedurlrequests",
                Some(NS),
                "console"
            )
            .is_some(),
        "the request went first"
    );
    eventually("the namespace gone", WAIT, || {
        h.kube
            .get("v1", "namespaces", None, NS)
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        h.aws.calls().len(),
        1,
        "no URL minted into a namespace going away"
    );
    assert!(h.secret("console").is_none());
}

#[tokio::test]
async fn a_namespace_deletion_seen_after_its_secret_went_mints_nothing() {
    // The operator asks the API server about the namespace rather than mint once more for a
    // Secret the API server would refuse: only the first mint.
    namespace_deleted_with_its_watch_behind(ReadOfTheNamespace::Answered, 1).await;
}

#[tokio::test]
async fn a_secret_refused_in_a_namespace_going_away_ends_the_request_quietly() {
    // When that read fails, the operator mints and the API server refuses the new Secret (403
    // with the NamespaceTerminating cause): one more mint, but no failure reported.
    namespace_deleted_with_its_watch_behind(ReadOfTheNamespace::Fails, 2).await;
}

enum ReadOfTheNamespace {
    Answered,
    Fails,
}

/// Deletes the namespace of a converged request while the namespace watch lags behind the
/// Secret watch, as one watch cache of a busy API server can behind another: the operator sees
/// its Secret deleted before it sees the namespace Terminating. Checks the AWS calls made in all
/// and that the request never reported `SecretWriteFailed`.
async fn namespace_deleted_with_its_watch_behind(read: ReadOfTheNamespace, aws_calls: usize) {
    let mut h = Harness::new_without_operator(LONG_WINDOW).await;
    // The Secret goes 1.5 s after the namespace is marked (the requests a kind or more later):
    // time for the reconcile that sees it missing to act on a slow machine, while the namespace
    // watch shows nothing yet.
    h.kube
        .set_watch_delay_of("namespaces", Duration::from_secs(5));
    h.kube.set_gc_delay(Duration::from_millis(1500));
    h.start_operator().await;
    let namespaces = h.create_namespace().await;
    h.create("console", quick_sight()).await;
    converged(&h, "console", "console", WAIT).await;
    // Every Ready reason the request's stored status has from now on.
    let reasons = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = reasons.clone();
    h.kube.observe(move |change| {
        if change.kind.plural != "embedurlrequests" {
            return;
        }
        let ready = change
            .after
            .and_then(|object| object["status"]["conditions"].as_array())
            .and_then(|conditions| conditions.iter().find(|c| c["type"] == "Ready"))
            .and_then(|ready| ready["reason"].as_str());
        if let Some(reason) = ready {
            seen.lock().unwrap().push(reason.to_owned());
        }
    });
    let lists_before = h.kube.request_count("list", "namespaces");
    if let ReadOfTheNamespace::Fails = read {
        // The namespace watch is not listing (it resumes from its resourceVersion), so the
        // only list of namespaces is the operator's read for the missing Secret.
        h.kube.inject_failure("list", "namespaces", 500, 1);
    }
    namespaces
        .delete(NS, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the namespace gone", Duration::from_secs(30), || {
        h.kube
            .get("v1", "namespaces", None, NS)
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(h.aws.calls().len(), aws_calls, "{:?}", h.aws.calls());
    assert_eq!(
        h.kube.request_count("list", "namespaces") - lists_before,
        1,
        "one read of the namespace, for the missing Secret"
    );
    let reasons = reasons.lock().unwrap().clone();
    assert!(
        reasons.iter().all(|reason| reason != "SecretWriteFailed"),
        "a request in a namespace going away reported a failed Secret write: {reasons:?}"
    );
    assert!(h.operator_running());
}

#[tokio::test]
async fn a_failed_refresh_write_is_retried_before_the_current_url_lapses() {
    // A 12 s window with refreshBefore 4 s: a retry 5-6 s after a failed write would come after
    // the current URL's use-by time.
    let h = Harness::start(Duration::from_secs(12)).await;
    let mut spec = quick_sight();
    spec.refresh_before = Some("4s".into());
    h.create("console", spec).await;
    converged(&h, "console", "console", WAIT).await;
    let first = h.secret_value("console", "url").unwrap();
    // The refresh's Secret write fails with a 500 (retryable, not retried by the client).
    h.kube.inject_failure("patch", "secrets", 500, 1);
    let started = std::time::Instant::now();
    let mut replaced = false;
    while started.elapsed() < Duration::from_secs(14) && !replaced {
        let expires: jiff::Timestamp = h
            .secret_value("console", "expiresAt")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            expires > jiff::Timestamp::now(),
            "the Secret holds a URL past its use-by time"
        );
        replaced = h.secret_value("console", "url").as_deref() != Some(first.as_str());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replaced, "the refresh was never written");
    // The failed write's URL was lost (it cannot be kept anywhere else): one more mint.
    assert_eq!(h.aws.calls().len(), 3, "{:?}", h.aws.calls());
}

#[tokio::test]
async fn a_refused_secret_write_is_reported_and_backs_off_instead_of_minting_again() {
    let h = Harness::start(LONG_WINDOW).await;
    // RBAC or an admission policy refuses the Secret: 403 is not worth retrying soon, and each
    // retry would mint (and lose) another URL.
    h.kube.inject_failure("patch", "secrets", 403, 1);
    h.create("console", quick_sight()).await;
    let status = eventually("SecretWriteFailed", WAIT, || {
        let status = h.status("console");
        let ready = status.ready()?;
        (ready.reason == "SecretWriteFailed").then(|| status.clone())
    })
    .await;
    let ready = status.ready().unwrap();
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains("403 Forbidden"), "{}", ready.message);
    assert_eq!(status.consecutive_failures, Some(1));
    assert!(
        h.metrics()
            .encode()
            .contains(r#"embedurl_reconcile_errors_total{reason="secret_refused"} 1"#)
    );
    // The next attempt is minutes away (like a request AWS rejected), not 5-60 s.
    let retry: jiff::Timestamp = status
        .next_refresh_time
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry.duration_since(jiff::Timestamp::now()).as_secs_f64() > 200.0);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_no_more_calls(&h, 1, "the refusal is not retried with another mint").await;
    assert!(h.secret("console").is_none());

    // Once the cause is fixed, a spec change retries at once.
    h.requests()
        .patch(
            "console",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refreshBefore": "60s"}})),
        )
        .await
        .unwrap();
    converged(&h, "console", "console", WAIT).await;
    assert_eq!(h.aws.calls().len(), 2);
}

#[tokio::test]
async fn status_write_conflicts_are_repaired_from_the_secret_without_a_mint() {
    let h = Harness::start(LONG_WINDOW).await;
    // The status write after the mint and the first repair are both refused.
    h.kube
        .inject_failure("patch", "embedurlrequests/status", 409, 2);
    h.create("console", quick_sight()).await;
    let url = eventually("a URL", WAIT, || h.secret_value("console", "url")).await;

    let status = converged(&h, "console", "console", Duration::from_secs(12)).await;
    assert_eq!(status.observed_generation, Some(1));
    assert!(
        h.kube.request_count("patch", "embedurlrequests/status") >= 3,
        "two refused status writes, then the repair"
    );
    // The bound: a status write that fails loses nothing (the Secret holds the URL, and the
    // status is repaired from it), so the one mint stays the only one.
    assert_eq!(h.aws.calls().len(), 1, "{:?}", h.aws.calls());
    assert_eq!(
        h.secret_value("console", "url").as_deref(),
        Some(url.as_str())
    );
    assert_eq!(h.kube.effective_write_count("secrets"), 1);
    assert_no_more_calls(&h, 1, "converged").await;
}

// ---- 2. Throttling (429 + Retry-After) and server errors on reads and writes ------------------

#[tokio::test]
async fn throttled_and_failing_lists_at_startup_are_retried() {
    let mut h = Harness::new_without_operator(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;
    // The operator's first list of requests is throttled twice (429, Retry-After: 1), its first
    // list of Secrets fails (500): the client waits out Retry-After, the Secret watcher backs off.
    h.kube.inject_failure("list", "embedurlrequests", 429, 2);
    h.kube.inject_failure("list", "secrets", 500, 1);
    let started = Instant::now();
    h.start_operator().await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "throttled lists retried at once, not after Retry-After (1 s each): synced after {:?}",
        started.elapsed()
    );
    assert_eq!(h.kube.request_count("list", "embedurlrequests"), 3);
    assert_eq!(h.kube.request_count("list", "secrets"), 2);

    converged(&h, "console", "console", WAIT).await;
    converged(&h, "chat", "chat", WAIT).await;
    assert_eq!(h.aws.calls().len(), 2, "one mint per request");
    assert_no_more_calls(&h, 2, "converged").await;
}

#[tokio::test]
async fn errors_on_reads_and_writes_are_retried_without_extra_mints() {
    let h = Harness::start(LONG_WINDOW).await;
    // The first two requests on Secrets fail with 500: they are the two requests' first reads of
    // their Secret (the cache has none), before any AWS call. The reconciles are retried 5-6 s
    // later.
    h.kube.inject_failure("*", "secrets", 500, 2);
    // Then the Secret writes are throttled: the client retries them after Retry-After, so the
    // URL just minted is not lost.
    h.kube.inject_failure("patch", "secrets", 429, 2);
    // One status write fails with 500, and the re-read of the request that the repair makes
    // answers 503 once (retried by the client).
    h.kube
        .inject_failure("patch", "embedurlrequests/status", 500, 1);
    h.kube.inject_failure("get", "embedurlrequests", 503, 1);
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;

    converged(&h, "console", "console", Duration::from_secs(15)).await;
    converged(&h, "chat", "chat", Duration::from_secs(15)).await;
    assert!(h.kube.request_count("get", "secrets") >= 2);
    assert!(h.kube.request_count("patch", "secrets") >= 4);
    assert!(h.kube.request_count("get", "embedurlrequests") >= 2);
    // The bound: the failed reads come before any AWS call, the throttled Secret writes are
    // retried by the client with the same URL, and a failed status write is repaired from the
    // Secret: one mint per request.
    assert_eq!(h.aws.calls().len(), 2, "{:?}", h.aws.calls());
    assert_eq!(h.kube.effective_write_count("secrets"), 2);
    assert_no_more_calls(&h, 2, "converged").await;
}

// ---- 3. Watches that end, and 410 Gone -------------------------------------------------------

#[tokio::test]
async fn ended_and_expired_watches_relist_without_minting_fresh_urls() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;
    converged(&h, "console", "console", WAIT).await;
    converged(&h, "chat", "chat", WAIT).await;
    let urls = (
        h.secret_value("console", "url"),
        h.secret_value("chat", "url"),
    );
    let writes_before = writes(&h);
    let count = |verb: &str| {
        (
            h.kube.request_count(verb, "embedurlrequests"),
            h.kube.request_count(verb, "secrets"),
        )
    };
    let (lists, watches) = (count("list"), count("watch"));

    // Watches that end are resumed from their resourceVersion: no relist, nothing minted.
    h.kube.end_all_watches();
    eventually("both watches resumed", WAIT, || {
        let now = count("watch");
        (now.0 > watches.0 && now.1 > watches.1).then_some(())
    })
    .await;
    assert_no_more_calls(&h, 2, "a resumed watch").await;
    assert_eq!(count("list"), lists, "resumed without a relist");
    assert_eq!(writes(&h), writes_before);

    // A write neither watch sees (a Secret the operator does not own), then the history is
    // compacted: both watches can only resume through 410 Gone and a relist. The relists find
    // what was known: nothing is reconciled, minted or written. (At 10,000 requests a relist
    // that reconciled everything queued 10,000 reconciles ahead of the due refreshes.)
    let unrelated = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("unrelated".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..Default::default()
    };
    h.secrets()
        .create(&PostParams::default(), &unrelated)
        .await
        .unwrap();
    let reconciled = h.reconciles();
    h.kube.compact_history();
    h.kube.end_all_watches();
    eventually("both watches relisted", WAIT, || {
        let now = count("list");
        (now.0 > lists.0 && now.1 > lists.1).then_some(())
    })
    .await;
    assert_no_more_calls(&h, 2, "a relist of fresh URLs").await;
    assert_eq!(
        h.reconciles(),
        reconciled,
        "a relist that finds what was known"
    );
    assert_eq!(writes(&h), writes_before + 1, "only the unrelated Secret");
    assert_eq!(
        (
            h.secret_value("console", "url"),
            h.secret_value("chat", "url")
        ),
        urls
    );
    converged(&h, "console", "console", WAIT).await;
    converged(&h, "chat", "chat", WAIT).await;
}

#[tokio::test]
async fn a_secret_deleted_during_a_watch_gap_is_restored_after_the_relist() {
    let h = Harness::start(LONG_WINDOW).await;
    h.create("console", quick_sight()).await;
    h.create("chat", q_business()).await;
    converged(&h, "console", "console", WAIT).await;
    converged(&h, "chat", "chat", WAIT).await;
    let console_url = h.secret_value("console", "url");
    let chat_url = h.secret_value("chat", "url").unwrap();
    let watches = h.kube.request_count("watch", "secrets");

    // The Secret watch ends and cannot be reopened at once (500): the watcher backs off for at
    // least 0.8 s. The request watch stays open: nothing tells the operator about chat again.
    h.kube.inject_failure("watch", "secrets", 500, 1);
    h.kube.end_watches("secrets");
    eventually("Secret watch refused", WAIT, || {
        (h.kube.request_count("watch", "secrets") > watches).then_some(())
    })
    .await;
    // While it is down, chat's Secret is deleted, and the history that would tell the watch so
    // is compacted away: the Secret watch resumes through 410 Gone and a relist, which shows the
    // Secret missing but reports no deletion event.
    let lists = h.kube.request_count("list", "secrets");
    h.secrets()
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    h.kube.compact_history();

    let restored = eventually("chat's Secret restored", WAIT, || {
        h.secret_value("chat", "url")
    })
    .await;
    assert_ne!(restored, chat_url);
    assert!(h.kube.request_count("list", "secrets") > lists, "relisted");
    assert_eq!(
        h.kube.request_count("list", "embedurlrequests"),
        1,
        "no relist of requests"
    );
    converged(&h, "chat", "chat", WAIT).await;
    // One mint for the restored Secret; the fresh URL of the other request is left alone.
    assert_eq!(h.aws.calls().len(), 3, "{:?}", h.aws.calls());
    assert_eq!(h.secret_value("console", "url"), console_url);
    assert_no_more_calls(&h, 3, "converged").await;
}

#[tokio::test]
async fn a_lagging_watch_cache_costs_no_extra_mint_or_write() {
    // 8 s windows: each request refreshes 1.6-4 s after its last mint (refreshBefore 4 s, its
    // jitter, and the status's whole-second times, each rounded down, make it vary).
    let mut h = Harness::new_without_operator(Duration::from_secs(8)).await;
    // Watches show every change 400 ms after it is stored, as a loaded API server's watch
    // cache does: the operator's own writes come back after it has moved on, and a reconcile
    // may find a cache that does not show its last write yet.
    h.kube.set_watch_delay(Duration::from_millis(400));
    h.start_operator().await;
    const REQUESTS: usize = 3;
    for i in 0..REQUESTS {
        h.create(&format!("viewer-{i}"), quick_sight_for(i)).await;
    }
    for i in 0..REQUESTS {
        let name = format!("viewer-{i}");
        converged(&h, &name, &name, WAIT).await;
    }
    let calls_before = h.aws.calls().len();
    let secret_writes = h.kube.effective_write_count("secrets");
    let request_writes = h.kube.effective_write_count("embedurlrequests");
    // Meanwhile, policy edits re-evaluate every request every 300 ms, so that reconciles run
    // while the cache still shows a request without its last status write.
    let policies: Api<EmbedUrlPolicy> = Api::all(h.client.clone());
    let reconciles = h.reconciles();
    let started = Instant::now();
    let mut edits = 0;
    while started.elapsed() < Duration::from_secs(9) {
        edits += 1;
        let policy = json!({
            "apiVersion": "embedurl.io/v1alpha1",
            "kind": "EmbedUrlPolicy",
            "metadata": {"name": "unrelated", "labels": {"edit": edits.to_string()}},
            "spec": {"namespaces": ["elsewhere"]},
        });
        policies
            .patch(
                "unrelated",
                &PatchParams::apply("test"),
                &Patch::Apply(&policy),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let calls = h.aws.calls().len() - calls_before;
    let reconciled = h.reconciles() - reconciles;
    assert!(
        reconciled >= (edits * REQUESTS / 2) as u64,
        "{reconciled} reconciles for {edits} policy edits"
    );
    assert!(calls >= 2 * REQUESTS, "{calls} refreshes");
    assert!(h.aws.calls().iter().all(|c| c.succeeded));
    // One Secret write and one status write per refresh, whatever the watch shows when.
    let tolerance = REQUESTS; // a refresh in flight at either end of the interval
    let secret_writes = h.kube.effective_write_count("secrets") - secret_writes;
    let status_writes = h.kube.effective_write_count("embedurlrequests") - request_writes;
    assert!(
        secret_writes.abs_diff(calls) <= tolerance,
        "{secret_writes} Secret writes, {calls} mints"
    );
    assert!(
        status_writes.abs_diff(calls) <= tolerance,
        "{status_writes} status writes, {calls} mints"
    );
    // No request is minted twice for one refresh: a second mint from a reconcile that read a
    // cache without the first would come within the watch's lag.
    for i in 0..REQUESTS {
        let arn = viewer_arn(i);
        let times: Vec<std::time::Instant> = h
            .aws
            .calls()
            .into_iter()
            .filter(|c| c.inputs.get("user-arn").and_then(Value::as_str) == Some(arn.as_str()))
            .map(|c| c.at)
            .collect();
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs(1),
                "viewer-{i}: mints {gap:?} apart"
            );
        }
    }
    let events = h.kube.list("events.k8s.io/v1", "events");
    assert!(events.iter().all(|e| e["type"] == "Normal"), "{events:?}");
}

// ---- 4. Killed between the AWS call and the Secret write ----------------------------------

#[tokio::test]
async fn an_operator_killed_mid_mint_mints_again_exactly_once() {
    let mut h = Harness::start(LONG_WINDOW).await;
    h.aws.set_latency(Duration::from_millis(800));
    h.create("console", quick_sight()).await;
    // The call is recorded when it reaches the fake AWS, 800 ms before it is answered.
    eventually("the AWS call arrived", WAIT, || {
        (h.aws.calls().len() == 1).then_some(())
    })
    .await;
    h.kill_operator();

    // Past the moment the answer arrives: nobody is left to write it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(h.secret("console").is_none(), "no Secret written");
    assert_eq!(
        h.status("console"),
        EmbedUrlRequestStatus::default(),
        "no status written"
    );
    assert_eq!(h.aws.calls().len(), 1);

    h.aws.set_latency(Duration::ZERO);
    h.start_operator().await;
    let status = converged(&h, "console", "console", WAIT).await;
    // The lost URL is minted again, once.
    assert_eq!(h.aws.calls().len(), 2, "{:?}", h.aws.calls());
    assert_eq!(
        status.url_expires_at.as_deref(),
        h.secret_value("console", "expiresAt").as_deref()
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.ready().unwrap().status, "True");
    assert_eq!(h.kube.effective_write_count("secrets"), 1);
    assert_no_more_calls(&h, 2, "converged").await;
}

#[tokio::test]
async fn an_operator_killed_after_the_aws_answer_and_before_the_secret_write_mints_again_once() {
    let mut h = Harness::start(LONG_WINDOW).await;
    let secret_patches = |h: &Harness| h.kube.request_count("patch", "secrets");

    // A new request: AWS answers, the Secret write is on its way and never answered.
    h.kube.inject_stall("patch", "secrets", 1);
    h.create("console", quick_sight()).await;
    eventually("the URL minted and its Secret write sent", WAIT, || {
        (h.aws.success_count(Service::QuickSight) == 1 && secret_patches(&h) == 1).then_some(())
    })
    .await;
    h.kill_operator();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.secret("console").is_none(), "nothing half-written");
    assert_eq!(h.status("console"), EmbedUrlRequestStatus::default());

    h.start_operator().await;
    converged(&h, "console", "console", WAIT).await;
    assert_eq!(h.aws.calls().len(), 2, "minted again, once");
    assert_eq!(h.kube.effective_write_count("secrets"), 1);
    let first = h.secret_value("console", "url").unwrap();
    assert_no_more_calls(&h, 2, "converged").await;

    // A refresh: the same, with a usable URL in the Secret that must stay as it is.
    h.kube.inject_stall("patch", "secrets", 1);
    let patches = secret_patches(&h);
    h.request_refresh("console", "again").await;
    eventually("the new URL minted and its Secret write sent", WAIT, || {
        (h.aws.success_count(Service::QuickSight) == 3 && secret_patches(&h) == patches + 1)
            .then_some(())
    })
    .await;
    h.kill_operator();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.secret_value("console", "url"), Some(first.clone()));
    assert_eq!(h.kube.effective_write_count("secrets"), 1);
    assert_ne!(
        h.status("console").last_handled_refresh_request.as_deref(),
        Some("again")
    );

    h.start_operator().await;
    let replaced = eventually("the refresh done after the restart", WAIT, || {
        h.secret_value("console", "url").filter(|url| *url != first)
    })
    .await;
    let status = converged(&h, "console", "console", WAIT).await;
    assert_eq!(
        status.last_handled_refresh_request.as_deref(),
        Some("again")
    );
    assert_eq!(h.secret_value("console", "url"), Some(replaced));
    assert_eq!(h.aws.calls().len(), 4, "{:?}", h.aws.calls());
    assert_eq!(h.kube.effective_write_count("secrets"), 2);
    assert_no_more_calls(&h, 4, "converged").await;
}

// ---- 5. AWS throttling storm -----------------------------------------------------------------

#[tokio::test]
async fn a_throttling_storm_longer_than_the_window_backs_off_and_recovers() {
    const REQUESTS: usize = 5;
    const STORM: Duration = Duration::from_secs(5);
    // A 3 s window: refreshBefore 1.5 s, so each URL is due 1.35-1.5 s after it is minted.
    let h = Harness::start(Duration::from_secs(3)).await;
    for i in 0..REQUESTS {
        h.create(&format!("viewer-{i}"), quick_sight_for(i)).await;
    }
    for i in 0..REQUESTS {
        let name = format!("viewer-{i}");
        converged(&h, &name, &name, WAIT).await;
    }

    h.aws.fail_always(Service::QuickSight, Fault::Throttle);
    let storm_started = Instant::now();
    // Let a call answered just before the storm reach its Secret, then take what the Secrets hold.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held: Vec<(String, String)> = (0..REQUESTS)
        .map(|i| {
            let name = format!("viewer-{i}");
            (
                h.secret_value(&name, "url").unwrap(),
                h.secret_value(&name, "expiresAt").unwrap(),
            )
        })
        .collect();
    let before: Vec<(usize, usize)> = (0..REQUESTS).map(|i| viewer_calls(&h, i)).collect();
    let mut throttled_while_usable = BTreeSet::new();
    while storm_started.elapsed() < STORM {
        for (i, (url, expires)) in held.iter().enumerate() {
            let name = format!("viewer-{i}");
            // The URL stays in the Secret, unchanged, for as long as it is valid (and after).
            assert_eq!(h.secret_value(&name, "url").as_ref(), Some(url), "{name}");
            assert_eq!(
                h.secret_value(&name, "expiresAt").as_ref(),
                Some(expires),
                "{name}"
            );
            if h.ready_reason(&name) == Some(("True".into(), "AwsThrottled".into())) {
                throttled_while_usable.insert(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Snapshot before clearing the faults.
    let during: Vec<(usize, usize)> = (0..REQUESTS).map(|i| viewer_calls(&h, i)).collect();
    let statuses: Vec<_> = (0..REQUESTS)
        .map(|i| h.status(&format!("viewer-{i}")))
        .collect();
    h.aws.clear_faults();

    assert_eq!(
        throttled_while_usable.len(),
        REQUESTS,
        "every request reported AwsThrottled with Ready=True while its URL was usable"
    );
    for i in 0..REQUESTS {
        let throttled = during[i].0 - before[i].0;
        assert_eq!(during[i].1, before[i].1, "viewer-{i}: nothing minted");
        // The bound, per request, from the backoff schedule: attempt 1 at the planned refresh;
        // attempt 2 at least 0.8 s later (1 s minus jitter); attempt 3 pulled forward to 0.3 s
        // (a tenth of the window) before the URL's use-by time; attempt 4 at most, 0.5 s later,
        // if the URL was still usable then; the next waits 8 s minus 20 %, past the storm. At
        // most 4 attempts of one call each. A requeue at the 0.5 s floor would make 10, the
        // SDK's own retries on top 8 or more, a hot loop hundreds.
        assert!(
            (1..=4).contains(&throttled),
            "viewer-{i}: {throttled} throttled calls in {STORM:?}"
        );
        // The storm outlived the URL: the request says it is not ready, and why.
        let ready = statuses[i].ready().unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "AwsThrottled"),
            "viewer-{i}: {}",
            ready.message
        );
        assert!(
            ready.message.contains("ThrottlingException")
                && ready.message.contains("the Secret holds no usable URL"),
            "{}",
            ready.message
        );
        assert!(statuses[i].consecutive_failures.unwrap() >= 2);
    }

    // Every request recovers at its next retry (at most 8 s after its last throttled attempt).
    for (i, (old_url, old_expiry)) in held.iter().enumerate() {
        let name = format!("viewer-{i}");
        let status = converged(&h, &name, &name, Duration::from_secs(12)).await;
        assert_ne!(&h.secret_value(&name, "url").unwrap(), old_url);
        assert!(status.url_expires_at.unwrap().as_str() > old_expiry.as_str());
    }
    assert!(
        h.metrics()
            .encode()
            .contains(r#"embedurl_aws_calls_total{service="QuickSight",operation="GetSessionEmbedUrl",outcome="Throttled"}"#)
    );
}

// ---- 6. AWS 5xx for longer than a window -----------------------------------------------------

#[tokio::test]
async fn an_aws_outage_longer_than_the_window_reports_unavailable_then_recovers() {
    const OUTAGE: Duration = Duration::from_secs(4);
    let h = Harness::start(Duration::from_secs(3)).await;
    h.create("dashboard", flink()).await;
    let first = converged(&h, "dashboard", "dashboard", WAIT).await;
    let first_url = h.secret_value("dashboard", "url").unwrap();

    h.aws.fail_always(Service::Flink, Fault::ServerError);
    let outage_started = Instant::now();
    // A request created during the outage has no URL to fall back on.
    let mut late = flink();
    late.flink.as_mut().unwrap().application_name = "payments".into();
    h.create("late", late).await;

    let mut seen = BTreeSet::new();
    while outage_started.elapsed() < OUTAGE {
        for name in ["dashboard", "late"] {
            if let Some(c) = h.status(name).ready() {
                seen.insert((name, c.status.clone(), c.reason.clone()));
            }
        }
        assert_eq!(
            h.secret_value("dashboard", "url").as_deref(),
            Some(first_url.as_str())
        );
        assert!(h.secret("late").is_none());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outage_calls = h.aws.call_count(Service::Flink) - 1;
    let statuses = (h.status("dashboard"), h.status("late"));
    h.aws.clear_faults();

    // While the old URL was usable the request stayed ready, saying AWS is unavailable; once it
    // lapsed, not ready. The request without any URL was never ready.
    for expected in [
        ("dashboard", "True", "AwsUnavailable"),
        ("dashboard", "False", "AwsUnavailable"),
        ("late", "False", "AwsUnavailable"),
    ] {
        let key = (expected.0, expected.1.into(), expected.2.into());
        assert!(seen.contains(&key), "{expected:?} never seen in {seen:?}");
    }
    assert!(!seen.contains(&("late", "True".into(), "AwsUnavailable".into())));
    for status in [&statuses.0, &statuses.1] {
        let ready = status.ready().unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "AwsUnavailable")
        );
        assert!(
            ready.message.contains("InternalFailure")
                && ready.message.contains("the Secret holds no usable URL"),
            "{}",
            ready.message
        );
    }
    assert_eq!(statuses.0.url_expires_at, first.url_expires_at);
    // Backoff, not a hot loop, one call per operator attempt: dashboard makes at most 4
    // attempts (as in the throttling storm); late, with no URL to pull retries forward, tries
    // at once, then after 1 s and 2 s (minus up to 20 %), and the next 4 s later is past the
    // outage: 3 attempts. 4 + 3 = 7 calls.
    assert!(outage_calls <= 7, "{outage_calls} calls during the outage");

    converged(&h, "dashboard", "dashboard", Duration::from_secs(12)).await;
    converged(&h, "late", "late", Duration::from_secs(12)).await;
    assert_ne!(h.secret_value("dashboard", "url").unwrap(), first_url);
    assert!(h.metrics().encode().contains(r#"outcome="Unavailable""#));
}

// ---- 7. Objects written around the schema ----------------------------------------------------

#[tokio::test]
async fn malformed_requests_get_invalid_spec_and_do_not_disturb_valid_ones() {
    let mut h = Harness::new_without_operator(LONG_WINDOW).await;
    let account = "111122223333";
    let huge = "x".repeat(1 << 20);

    // Some objects are there when the operator starts (its first list), others arrive by watch.
    create_raw(
        &h,
        "number-for-string",
        json!({"spec": {"quickSight": {"awsAccountId": 111_122_223_333_u64}}}),
    )
    .await;
    create_raw(
        &h,
        "list-for-spec",
        json!({"spec": [{"quickSight": {"awsAccountId": account}}]}),
    )
    .await;
    // Harmless: an unknown field holding 1 MB.
    create_raw(
        &h,
        "huge-unknown-field",
        json!({"spec": {"qBusiness": {"applicationId": crate::ID36, "webExperienceId": crate::ID36}, "notes": huge}}),
    )
    .await;
    // A valid spec with a status of the wrong types (written through the status subresource,
    // since creates ignore the status).
    create_raw(
        &h,
        "bad-status",
        json!({"spec": {"quickSight": {"awsAccountId": account}}}),
    )
    .await;
    raw_requests(&h)
        .patch_status(
            "bad-status",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "conditions": "none",
                "consecutiveFailures": "three",
                "urlExpiresAt": 5,
            }})),
        )
        .await
        .unwrap();
    // A status that is not even an object.
    create_raw(
        &h,
        "string-status",
        json!({"spec": {"flink": {"applicationName": "payments", "urlType": "FLINK_DASHBOARD_URL"}}}),
    )
    .await;
    raw_requests(&h)
        .patch_status(
            "string-status",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": "broken"})),
        )
        .await
        .unwrap();
    // Both broken: the spec is reported, and the unreadable status replaced by that report.
    create_raw(
        &h,
        "bad-spec-and-status",
        json!({"spec": {"quickSight": {"awsAccountId": account, "sessionLifetimeInMinutes": "long"}}}),
    )
    .await;
    raw_requests(&h)
        .patch_status(
            "bad-spec-and-status",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": 3, "secretName": ["x"]}})),
        )
        .await
        .unwrap();
    h.start_operator().await;

    create_raw(
        &h,
        "string-for-number",
        json!({"spec": {"qBusiness": {"applicationId": crate::ID36, "webExperienceId": crate::ID36, "sessionDurationInMinutes": "30"}}}),
    )
    .await;
    create_raw(
        &h,
        "object-for-string",
        json!({"spec": {"quickSight": {"awsAccountId": account}, "region": {"name": "us-east-1"}}}),
    )
    .await;
    create_raw(
        &h,
        "number-in-map",
        json!({"spec": {"flink": {"applicationName": "orders", "urlType": "FLINK_DASHBOARD_URL"}, "secretTemplate": {"labels": {"team": 7}}}}),
    )
    .await;
    // A 1 MB value in a known field breaks a validation rule.
    create_raw(
        &h,
        "huge-entry-point",
        json!({"spec": {"quickSight": {"awsAccountId": account, "entryPoint": huge}}}),
    )
    .await;
    // Harmless: unknown fields at the top, in spec, in a provider block and in the template.
    create_raw(
        &h,
        "unknown-fields",
        json!({
            "extra": {"a": [1, 2]},
            "spec": {
                "flink": {"applicationName": "orders", "urlType": "ZEPPELIN_UI_URL", "colour": "blue"},
                "secretTemplate": {"labels": {"team": "bi"}, "finalizers": ["x"]},
                "futureField": {"nested": true},
            },
        }),
    )
    .await;
    h.create("fine", q_business()).await;

    for (name, field) in [
        ("number-for-string", "spec.quickSight.awsAccountId"),
        ("list-for-spec", "spec"),
        (
            "string-for-number",
            "spec.qBusiness.sessionDurationInMinutes",
        ),
        ("object-for-string", "spec.region"),
        ("number-in-map", "spec.secretTemplate.labels.team"),
        ("huge-entry-point", "spec.quickSight.entryPoint"),
        (
            "bad-spec-and-status",
            "spec.quickSight.sessionLifetimeInMinutes",
        ),
    ] {
        let message = eventually(&format!("InvalidSpec on {name}"), WAIT, || {
            h.status(name)
                .ready()
                .filter(|c| c.reason == "InvalidSpec" && c.status == "False")
                .map(|c| c.message.clone())
        })
        .await;
        assert!(
            message.starts_with(&format!("{field}: ")),
            "{name}: {}",
            message.chars().take(300).collect::<String>()
        );
        // A condition message is for people: a 1 MB value is not copied into it.
        assert!(
            message.len() < 2048,
            "{name}: a {}-byte message",
            message.len()
        );
        assert!(h.secret(name).is_none(), "{name}: no Secret");
    }

    // Served normally: the valid request, the unknown fields (ignored), and the requests whose
    // unreadable status the operator replaced.
    for name in [
        "fine",
        "huge-unknown-field",
        "unknown-fields",
        "bad-status",
        "string-status",
    ] {
        converged(&h, name, name, WAIT).await;
    }
    assert_eq!(h.status("bad-spec-and-status").secret_name, None);
    // The unreadable status of a valid request was not a spec problem: no InvalidSpec event.
    let events = h.kube.list("events.k8s.io/v1", "events");
    assert!(
        events
            .iter()
            .any(|e| e["regarding"]["name"] == "number-for-string" && e["reason"] == "InvalidSpec"),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["regarding"]["name"] == "bad-status" && e["reason"] == "InvalidSpec"),
        "{events:?}"
    );
    let unknown = h.secret("unknown-fields").unwrap();
    assert_eq!(
        unknown
            .metadata
            .labels
            .unwrap()
            .get("team")
            .map(String::as_str),
        Some("bi")
    );

    // One mint per servable request, none for the others; the operator is still running, and
    // no reconcile failed (reporting an unreadable object is not an error to retry).
    assert_no_more_calls(&h, 5, "invalid requests are not minted").await;
    assert!(h.operator_running(), "the operator did not panic");
    let metrics = h.metrics().encode();
    assert!(
        !metrics.contains("embedurl_reconcile_errors_total{"),
        "{metrics}"
    );
}

// ---- 7. A leader whose controllers die -------------------------------------------------------

/// The Lease of the leader tests: renewed every second, given up 2 s after the last renewal.
fn three_second_lease() -> embed_url_operator::leader::LeaseConfig {
    embed_url_operator::leader::LeaseConfig {
        namespace: NS.to_string(),
        name: "embed-url-operator".to_string(),
        identity: "replica-a".to_string(),
        duration: Duration::from_secs(3),
    }
}

#[tokio::test]
async fn a_leader_whose_controllers_panic_gives_the_lease_up_and_stops() {
    use embed_url_operator::controller::Readiness;
    use embed_url_operator::http::ReadyFlag;
    use embed_url_operator::leader::run_while_leading;
    use k8s_openapi::api::coordination::v1::Lease;

    let kube = crate::support::fake_kube::FakeApiServer::new();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let leading = tokio::spawn(run_while_leading(
        kube.client(),
        three_second_lease(),
        ReadyFlag::default(),
        stop_rx,
        Duration::from_secs(20),
        |_, _| {
            let controllers = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!("the dispatcher died");
            };
            (Readiness::default(), controllers)
        },
    ));
    // Well before the lease (3 s) could expire: the panic ends the leader at once.
    let ended = tokio::time::timeout(Duration::from_secs(2), leading)
        .await
        .expect("the leader stopped");
    let panic = ended.expect_err("the panic is raised again");
    assert!(panic.is_panic());
    let leases: Api<Lease> = Api::namespaced(kube.client(), NS);
    let held = leases.get("embed-url-operator").await.unwrap();
    assert_eq!(
        held.spec.and_then(|spec| spec.holder_identity),
        None,
        "released for a standby"
    );
}

// ---- 8. A leader cut off from the API server, and a leader asked to stop ------------------------

/// A lease of 3 s (renewed every second, given up 2 s after the last renewal) led by a replica
/// whose controllers are busy with a reconcile that does not stop when told (an AWS call that
/// takes long).
fn leader_with_busy_controllers(
    kube: &crate::support::fake_kube::FakeApiServer,
    drain_limit: Duration,
) -> BusyLeader {
    use embed_url_operator::controller::Readiness;
    use embed_url_operator::http::ReadyFlag;
    use embed_url_operator::leader::run_while_leading;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = std::sync::Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    let ready = ReadyFlag::default();
    let leading = tokio::spawn(run_while_leading(
        kube.client(),
        three_second_lease(),
        ready.clone(),
        stop_rx,
        drain_limit,
        move |_, _| {
            flag.store(true, Ordering::SeqCst);
            (Readiness::default(), std::future::pending::<()>())
        },
    ));
    BusyLeader {
        leading,
        stop,
        started,
        ready,
    }
}

/// A replica run by [`leader_with_busy_controllers`].
struct BusyLeader {
    leading: tokio::task::JoinHandle<Result<(), embed_url_operator::leader::LeaderError>>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Turns true once it leads (its controllers started).
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ready: embed_url_operator::http::ReadyFlag,
}

impl BusyLeader {
    /// How it ended, which must be within `limit`.
    async fn ended_within(
        self,
        limit: Duration,
    ) -> Result<(), embed_url_operator::leader::LeaderError> {
        tokio::time::timeout(limit, self.leading)
            .await
            .expect("the leader ended in time")
            .expect("no panic")
    }

    async fn wait_leading(&self) {
        eventually("leading", Duration::from_secs(5), || {
            self.started
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_leader_whose_renewals_get_no_answer_stops_before_its_lease_expires() {
    use embed_url_operator::leader::LeaderError;

    let kube = crate::support::fake_kube::FakeApiServer::new();
    let leader = leader_with_busy_controllers(&kube, Duration::from_secs(60));
    leader.wait_leading().await;
    // From now on the API server receives the Lease calls and never answers them, as over a
    // connection to a replaced API server that was never closed.
    kube.inject_stall("*", "leases", usize::MAX);
    let cut_off = Instant::now();
    // It stops instead of waiting for an answer.
    let outcome = leader.ended_within(Duration::from_secs(10)).await;
    assert!(
        matches!(outcome, Err(LeaderError::LostLease(_))),
        "{outcome:?}"
    );
    // It gives up 2 s after its last renewal began, which was before the cut-off; a standby
    // may take the Lease 3 s after it. The leader, and the reconcile it was running, stopped
    // before that.
    assert!(
        cut_off.elapsed() < Duration::from_secs(3),
        "stopped {:?} after the cut-off",
        cut_off.elapsed()
    );
}

#[tokio::test]
async fn a_leader_asked_to_stop_waits_for_reconciles_only_so_long_then_releases_the_lease() {
    let kube = crate::support::fake_kube::FakeApiServer::new();
    let leader = leader_with_busy_controllers(&kube, Duration::from_millis(300));
    leader.wait_leading().await;
    let _ = leader.stop.send(true);
    // The drain ends at its limit.
    let outcome = leader.ended_within(Duration::from_secs(3)).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(lease_holder(&kube).await.0, None, "released for a standby");
}

#[tokio::test]
async fn a_replica_that_cannot_read_its_lease_is_not_ready() {
    use std::sync::atomic::Ordering;

    let kube = crate::support::fake_kube::FakeApiServer::new();
    // The first three rounds (a second apart) are refused, as a missing RBAC rule or a Lease
    // name the Role does not cover would refuse them all.
    kube.inject_failure("*", "leases", 403, 3);
    let leader = leader_with_busy_controllers(&kube, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!leader.ready.get(), "Ready while its Lease cannot be read");
    assert!(!leader.started.load(Ordering::SeqCst));
    // Once the Lease can be read and taken, it leads and is Ready.
    leader.wait_leading().await;
    eventually("ready", Duration::from_secs(5), || {
        leader.ready.get().then_some(())
    })
    .await;
}

/// Who holds the fake's Lease, and when it was last renewed.
async fn lease_holder(
    kube: &crate::support::fake_kube::FakeApiServer,
) -> (Option<String>, Option<jiff::Timestamp>) {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(kube.client(), NS);
    let spec = leases
        .get("embed-url-operator")
        .await
        .unwrap()
        .spec
        .unwrap_or_default();
    (spec.holder_identity, spec.renew_time.map(|time| time.0))
}

#[tokio::test]
async fn a_leader_keeps_its_lease_through_failed_renewals() {
    let kube = crate::support::fake_kube::FakeApiServer::new();
    let leader = leader_with_busy_controllers(&kube, Duration::from_secs(1));
    leader.wait_leading().await;
    // One renewal answered with a 500 (an API server restarting), the next one's write with a
    // 409 (someone labelled the Lease meanwhile): both retried within the deadline.
    kube.inject_failure("*", "leases", 500, 1);
    kube.inject_failure("update", "leases", 409, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!leader.leading.is_finished(), "{:?}", leader.leading.await);
    assert_eq!(lease_holder(&kube).await.0.as_deref(), Some("replica-a"));
}

#[tokio::test]
async fn a_leader_renews_its_lease_while_it_drains() {
    let kube = crate::support::fake_kube::FakeApiServer::new();
    // The drain may last longer than the lease (3 s): without renewals meanwhile, a standby
    // could take over while a reconcile of this replica still runs.
    let leader = leader_with_busy_controllers(&kube, Duration::from_secs(5));
    leader.wait_leading().await;
    let _ = leader.stop.send(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!leader.leading.is_finished(), "still draining");
    let (holder, renewed) = lease_holder(&kube).await;
    assert_eq!(holder.as_deref(), Some("replica-a"));
    let renewed = renewed.expect("renewTime");
    assert!(
        jiff::Timestamp::now().duration_since(renewed) < jiff::SignedDuration::from_secs(2),
        "last renewed at {renewed}"
    );
    let outcome = leader.ended_within(Duration::from_secs(3)).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(lease_holder(&kube).await.0, None, "released for a standby");
}
