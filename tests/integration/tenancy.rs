//! EmbedUrlPolicy enforcement and per-tenant AWS identities, against the stand-ins.

use crate::quick_sight;
use crate::support::fake_aws::{ASSUMED_ACCESS_KEY_PREFIX, FakeAws, TEST_ACCESS_KEY};
use crate::support::{Harness, NS, eventually};
use embed_url_operator::crd::EmbedUrlRequest;
use embed_url_operator::identity::AwsClients;
use embed_url_operator::policy::{
    EmbedUrlPolicy, EmbedUrlPolicySpec, PolicyAws, PolicyMode, QuickSightRules, RoleToAssume,
};
use embed_url_operator::providers::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

const WINDOW: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(10);

fn viewer_policy(name: &str) -> EmbedUrlPolicy {
    EmbedUrlPolicy::new(
        name,
        EmbedUrlPolicySpec {
            namespaces: vec![NS.into()],
            quick_sight: Some(QuickSightRules {
                aws_account_ids: vec!["111122223333".into()],
                user_arns: vec!["arn:aws:quicksight:*:111122223333:user/default/*".into()],
                entry_points: vec!["/start/*".into()],
                max_session_lifetime_in_minutes: Some(120),
                allow_caller_identity: false,
            }),
            ..Default::default()
        },
    )
}

/// [`viewer_policy`] with a role to assume, and nothing else about the identity.
fn policy_with_role() -> EmbedUrlPolicy {
    let mut with_role = viewer_policy("analytics-team");
    with_role.spec.aws = Some(PolicyAws {
        role_arn: Some("arn:aws:iam::111122223333:role/embed-analytics".into()),
        ..Default::default()
    });
    with_role
}

async fn apply_policy(h: &Harness, policy: &EmbedUrlPolicy) {
    let api: Api<EmbedUrlPolicy> = Api::all(h.client.clone());
    api.patch(
        policy.metadata.name.as_deref().unwrap(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(policy),
    )
    .await
    .expect("apply policy");
}

async fn reason_of(h: &Harness, name: &str, reason: &str) -> String {
    eventually(&format!("{reason} on {name}"), WAIT, || {
        h.status(name)
            .ready()
            .filter(|c| c.reason == reason)
            .map(|c| c.message.to_string())
    })
    .await
}

#[tokio::test]
async fn without_a_policy_nothing_is_minted() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    h.create("console", quick_sight()).await;
    let message = reason_of(&h, "console", "NotPermitted").await;
    assert!(
        message.contains("no EmbedUrlPolicy selects namespace \"analytics\""),
        "{message}"
    );
    assert_eq!(h.ready_reason("console").unwrap().0, "False");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.aws.calls().is_empty(),
        "a denied request makes no AWS call"
    );
    assert!(h.secret("console").is_none());
}

#[tokio::test]
async fn an_older_crd_without_a_status_field_still_gets_statuses() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    // The CRD in the cluster predates `status.policy` (Helm never upgrades `crds/`): an apply
    // that sets it is refused, as a real API server refuses it.
    h.kube.undeclare_field("embedurlrequests", "/status/policy");
    apply_policy(&h, &viewer_policy("analytics-team")).await;
    h.create("console", quick_sight()).await;
    eventually("minted", WAIT, || h.secret_value("console", "url")).await;
    let (ready, reason) = eventually("Ready", WAIT, || h.ready_reason("console")).await;
    assert_eq!((ready.as_str(), reason.as_str()), ("True", "UrlReady"));
    let status = h.status("console");
    assert!(status.url_expires_at.is_some() && status.next_refresh_time.is_some());
    assert_eq!(status.policy, None, "what the old CRD lacks is dropped");
    // One mint: the refused status write did not make the URL look lost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.aws.calls().len(), 1);
    // Every status write was an apply (without the undeclared field), none a plain update:
    // the operator's fields stay under its one apply manager.
    let stored = h
        .kube
        .get(
            "embedurl.io/v1alpha1",
            "embedurlrequests",
            Some(NS),
            "console",
        )
        .unwrap();
    let operations: Vec<&str> = stored["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["manager"] == "embed-url-operator")
        .filter_map(|entry| entry["operation"].as_str())
        .collect();
    assert_eq!(operations, ["Apply"], "{stored}");

    // The CRD is upgraded; then the policy goes. The status of a request not permitted has no
    // next refresh: the field the operator stops sending is removed.
    h.kube.declare_all_fields();
    let policies: Api<EmbedUrlPolicy> = Api::all(h.client.clone());
    policies
        .delete("analytics-team", &Default::default())
        .await
        .unwrap();
    reason_of(&h, "console", "NotPermitted").await;
    assert_eq!(h.status("console").next_refresh_time, None);
}

#[tokio::test]
async fn a_policy_allows_and_editing_it_flips_the_outcome() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    apply_policy(&h, &viewer_policy("analytics-team")).await;
    h.create("console", quick_sight()).await;
    eventually("minted", WAIT, || h.secret_value("console", "url")).await;
    eventually("status.policy", WAIT, || {
        (h.status("console").policy.as_deref() == Some("analytics-team")).then_some(())
    })
    .await;
    // Minted with the operator's own identity: the policy names no role.
    assert_eq!(
        h.aws.calls()[0].access_key.as_deref(),
        Some(TEST_ACCESS_KEY)
    );

    // The policy no longer allows alice: the request stops at once, with the field named.
    let mut narrower = viewer_policy("analytics-team");
    narrower.spec.quick_sight.as_mut().unwrap().user_arns =
        vec!["arn:aws:quicksight:*:111122223333:user/default/viewer-*".into()];
    apply_policy(&h, &narrower).await;
    let message = reason_of(&h, "console", "NotPermitted").await;
    assert!(message.contains("spec.quickSight.userArn"), "{message}");
    assert!(message.contains("quickSight.userArns"), "{message}");
    assert_eq!(h.status("console").policy, None);
    let calls = h.aws.calls().len();

    // Allowed again: the URL in the Secret is still fresh, so Ready returns without a mint.
    apply_policy(&h, &viewer_policy("analytics-team")).await;
    eventually("UrlReady again", WAIT, || {
        h.ready_reason("console")
            .filter(|(s, r)| s == "True" && r == "UrlReady")
    })
    .await;
    assert_eq!(h.aws.calls().len(), calls);
}

#[tokio::test]
async fn watched_namespaces_share_one_policy_watch_and_a_policy_edit_reaches_each() {
    let mut h = Harness::new_without_operator(WINDOW).await;
    h.policy_mode = PolicyMode::Enforce;
    h.watch_namespaces = vec![NS.into(), "marketing".into()];
    let mut policy = viewer_policy("analytics-team");
    policy.spec.namespaces.push("marketing".into());
    apply_policy(&h, &policy).await;
    h.start_operator().await;
    let marketing: Api<EmbedUrlRequest> = Api::namespaced(h.client.clone(), "marketing");
    let reason_in_marketing = |reason: &'static str| {
        let marketing = marketing.clone();
        async move {
            let mut seen = None;
            for _ in 0..100 {
                seen = marketing
                    .get("console")
                    .await
                    .ok()
                    .and_then(|r| r.status)
                    .and_then(|s| s.ready().map(|c| c.reason.clone()));
                if seen.as_deref() == Some(reason) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{reason} never seen in marketing, last {seen:?}");
        }
    };
    h.create("console", quick_sight()).await;
    marketing
        .create(
            &PostParams::default(),
            &EmbedUrlRequest::new("console", quick_sight()),
        )
        .await
        .unwrap();
    reason_of(&h, "console", "UrlReady").await;
    reason_in_marketing("UrlReady").await;
    // Two scopes, one policy list and one policy watch (each scope has its own namespace and
    // request watches).
    let policy_reads: Vec<_> = h
        .kube
        .reads()
        .into_iter()
        .filter(|read| read.resource == "embedurlpolicies")
        .map(|read| read.verb)
        .collect();
    assert_eq!(policy_reads, ["list", "watch"]);

    // Narrowing the policy re-evaluates the requests of both scopes.
    policy.spec.namespaces.clear();
    apply_policy(&h, &policy).await;
    reason_of(&h, "console", "NotPermitted").await;
    reason_in_marketing("NotPermitted").await;
}

#[tokio::test]
async fn the_operator_is_ready_only_once_the_policies_have_listed() {
    let mut h = Harness::new_without_operator(WINDOW).await;
    h.policy_mode = PolicyMode::Enforce;
    // The first two policy lists fail; the watcher retries with backoff.
    h.kube.inject_failure("list", "embedurlpolicies", 500, 2);
    h.start_operator().await;
    // Ready (start_operator waits for it) only after the third list answered.
    assert_eq!(h.kube.request_count("list", "embedurlpolicies"), 3);
}

#[tokio::test]
async fn the_need_for_aws_calls_counts_the_region_a_policy_gives() {
    let mut h = Harness::new_without_operator(Duration::from_secs(10)).await;
    h.policy_mode = PolicyMode::Enforce;
    let mut policy = viewer_policy("analytics-team");
    policy.spec.aws = Some(PolicyAws {
        region: Some("eu-west-1".into()),
        ..Default::default()
    });
    apply_policy(&h, &policy).await;
    h.start_operator().await;
    // Nine requests in the policy's region, refreshing every 4.5 s at the most (10 s window,
    // refreshBefore 5 s plus its 10 % of jitter): 2 calls/s. One names the operator's region.
    for i in 0..9 {
        h.create(&format!("west-{i}"), quick_sight()).await;
    }
    let mut east = quick_sight();
    east.region = Some("us-east-1".into());
    h.create("east", east).await;
    for i in 0..9 {
        reason_of(&h, &format!("west-{i}"), "UrlReady").await;
    }
    // The need is computed when the caches have synced (then every 30 s): restart.
    h.stop_operator().await;
    h.start_operator().await;
    let need = h.quick_sight_need().await;
    // The busiest region is the policy's, with nine; counted in the operator's region, all ten
    // would need 2.2 calls/s.
    assert!((need - 2.0).abs() < 1e-6, "{need}");
}

#[tokio::test]
async fn the_need_for_aws_calls_counts_each_identity_apart() {
    let mut h = Harness::new_without_operator(Duration::from_secs(10)).await;
    h.policy_mode = PolicyMode::Enforce;
    // First by name: the role's policy serves the viewers named `role-*`; the other policy,
    // without a role (the operator's own identity), serves the rest.
    let mut with_role = policy_with_role();
    with_role.metadata.name = Some("a-with-role".into());
    with_role.spec.quick_sight.as_mut().unwrap().user_arns =
        vec!["arn:aws:quicksight:*:111122223333:user/default/role-*".into()];
    apply_policy(&h, &with_role).await;
    apply_policy(&h, &viewer_policy("b-own-identity")).await;
    h.start_operator().await;
    // Six requests under the role, four under the operator's identity, all in one region,
    // each refreshing every 4.5 s at the most (10 s window, refreshBefore 5 s plus its 10 %
    // of jitter). The limit applies to each identity alone: the busiest needs 6 / 4.5 calls/s,
    // not the region's 10 / 4.5.
    let viewer = |user: &str| {
        let mut spec = quick_sight();
        spec.quick_sight.as_mut().unwrap().user_arn = Some(format!(
            "arn:aws:quicksight:us-east-1:111122223333:user/default/{user}"
        ));
        spec
    };
    for i in 0..6 {
        h.create(&format!("role-{i}"), viewer(&format!("role-{i}")))
            .await;
    }
    for i in 0..4 {
        h.create(&format!("own-{i}"), viewer("alice")).await;
    }
    for i in 0..6 {
        reason_of(&h, &format!("role-{i}"), "UrlReady").await;
        assert_eq!(
            h.status(&format!("role-{i}")).policy.as_deref(),
            Some("a-with-role")
        );
    }
    for i in 0..4 {
        reason_of(&h, &format!("own-{i}"), "UrlReady").await;
        assert_eq!(
            h.status(&format!("own-{i}")).policy.as_deref(),
            Some("b-own-identity")
        );
    }
    // Requests no policy allows make no calls, and count nowhere (with no policy in their
    // status, they would count under the operator's identity: seven, the busiest).
    for i in 0..3 {
        let mut elsewhere = quick_sight();
        let spec = elsewhere.quick_sight.as_mut().unwrap();
        spec.aws_account_id = "999999999999".into();
        spec.user_arn = Some("arn:aws:quicksight:us-east-1:999999999999:user/default/eve".into());
        h.create(&format!("refused-{i}"), elsewhere).await;
        reason_of(&h, &format!("refused-{i}"), "NotPermitted").await;
    }
    // The need is computed when the caches have synced (then every 30 s): restart.
    h.stop_operator().await;
    h.start_operator().await;
    let need = h.quick_sight_need().await;
    assert!((need - 6.0 / 4.5).abs() < 1e-6, "{need}");
}

#[tokio::test]
async fn a_namespace_selector_selects_by_label() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    let mut by_label = viewer_policy("by-label");
    by_label.spec.namespaces.clear();
    by_label.spec.namespace_selector =
        Some(serde_json::from_value(json!({"matchLabels": {"team": "analytics"}})).unwrap());
    apply_policy(&h, &by_label).await;
    let namespaces = h.create_namespace().await;
    h.create("console", quick_sight()).await;
    reason_of(&h, "console", "NotPermitted").await;
    assert!(h.aws.calls().is_empty());

    // Labelling the namespace re-evaluates its requests.
    namespaces
        .patch(
            NS,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "analytics"}}})),
        )
        .await
        .unwrap();
    eventually("minted after labelling", WAIT, || {
        h.secret_value("console", "url")
    })
    .await;
    assert_eq!(h.status("console").policy.as_deref(), Some("by-label"));
}

#[tokio::test]
async fn a_policy_role_is_assumed_with_external_id_and_session_tags() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    let mut with_role = viewer_policy("analytics-team");
    with_role.spec.aws = Some(PolicyAws {
        role_arn: Some("arn:aws:iam::111122223333:role/embed-analytics".into()),
        external_id: Some("analytics".into()),
        region: Some("eu-west-1".into()),
    });
    apply_policy(&h, &with_role).await;
    h.create("console", quick_sight()).await;
    eventually("minted", WAIT, || h.secret_value("console", "url")).await;

    let sts = h.aws.sts_calls();
    assert_eq!(sts.len(), 1, "{sts:?}");
    let call = &sts[0];
    assert_eq!(call["Action"], "AssumeRole");
    assert_eq!(
        call["RoleArn"],
        "arn:aws:iam::111122223333:role/embed-analytics"
    );
    assert_eq!(call["ExternalId"], "analytics");
    assert_eq!(call["RoleSessionName"], "embedurl-analytics-analytics-team");
    let tags: Vec<(&str, &str)> = (1..=2)
        .map(|i| {
            (
                call[&format!("Tags.member.{i}.Key")].as_str(),
                call[&format!("Tags.member.{i}.Value")].as_str(),
            )
        })
        .collect();
    assert!(
        tags.contains(&("kubernetes-namespace", "analytics")),
        "{tags:?}"
    );
    assert!(
        tags.contains(&("embedurl-policy", "analytics-team")),
        "{tags:?}"
    );

    // The mint was signed with the assumed credentials, in the policy's default region.
    let mint = &h.aws.calls()[0];
    assert!(
        mint.access_key
            .as_deref()
            .unwrap()
            .starts_with(ASSUMED_ACCESS_KEY_PREFIX),
        "{mint:?}"
    );
    assert_eq!(mint.region.as_deref(), Some("eu-west-1"));

    // Refreshing again reuses the cached credentials: no second STS call.
    h.request_refresh("console", "now").await;
    eventually("second mint", WAIT, || {
        (h.aws.call_count(Service::QuickSight) == 2).then_some(())
    })
    .await;
    assert_eq!(h.aws.sts_calls().len(), 1);
}

#[tokio::test]
async fn an_sts_refusal_is_reported_as_assume_role_and_nothing_is_minted() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    h.aws.fail_sts_next(1);
    apply_policy(&h, &policy_with_role()).await;
    h.create("console", quick_sight()).await;
    let message = reason_of(&h, "console", "AssumeRoleFailed").await;
    assert!(
        message.contains("AssumeRole") && message.contains("AccessDenied"),
        "{message}"
    );
    assert_eq!(h.aws.call_count(Service::QuickSight), 0);
    assert_eq!(h.status("console").consecutive_failures, Some(1));
    // Counted as the call that failed, not as a mint that was never made.
    let metrics = h.metrics().encode();
    assert!(
        metrics.contains(r#"embedurl_aws_calls_total{service="QuickSight",operation="AssumeRole",outcome="Rejected"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"operation="GetSessionEmbedUrl""#),
        "{metrics}"
    );
}

#[tokio::test]
async fn one_failed_assume_role_answers_everyone_waiting_for_it() {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    // STS throttles (retryable): both HTTP attempts of one AssumeRole.
    h.aws.throttle_sts_next(2);
    apply_policy(&h, &policy_with_role()).await;
    // Four requests at once (the harness's four slots): they wait for one STS call, and its
    // failure answers them all, rather than each asking STS in turn.
    for i in 0..4 {
        h.create(&format!("console-{i}"), quick_sight()).await;
    }
    for i in 0..4 {
        let message = reason_of(&h, &format!("console-{i}"), "AssumeRoleFailed").await;
        assert!(message.contains("Throttling"), "{message}");
    }
    assert_eq!(
        h.aws.sts_calls().len(),
        2,
        "one AssumeRole (two attempts) for the four"
    );
    assert_eq!(h.aws.calls().len(), 0);
    // Throttling is retryable: their retries, a second later, ask again, and STS answers.
    for i in 0..4 {
        eventually("minted after the retry", WAIT, || {
            h.secret_value(&format!("console-{i}"), "url")
        })
        .await;
    }
    assert_eq!(h.aws.sts_calls().len(), 3, "credentials cached after that");
}

#[tokio::test]
async fn an_assume_role_given_up_midway_counts_as_failed_for_a_moment() {
    let aws = FakeAws::start().await;
    let clients = AwsClients::new(aws.sdk_config());
    let role = RoleToAssume {
        role_arn: "arn:aws:iam::111122223333:role/embed-analytics".into(),
        external_id: None,
    };
    let assumed = clients
        .assumed(&role, "us-east-1", NS, "analytics-team")
        .assumed
        .expect("an assumed identity");
    // STS is slow, and the caller gives up (its reconcile cancelled, say at shutdown).
    aws.delay_sts(Duration::from_secs(5));
    let given_up = tokio::time::timeout(Duration::from_millis(200), assumed.credentials()).await;
    assert!(given_up.is_err(), "STS answered within 200 ms");
    assert_eq!(aws.sts_calls().len(), 1);
    aws.delay_sts(Duration::ZERO);
    // The next caller right after does not start a second call at once: the one given up
    // counts as failed, as a refusal would.
    let error = assumed.credentials().await.unwrap_err();
    assert_eq!(
        (error.operation, error.code.as_str()),
        ("AssumeRole", "Abandoned")
    );
    assert_eq!(aws.sts_calls().len(), 1);
    // A moment later STS is asked again, and answers.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assumed.credentials().await.expect("credentials");
    assert_eq!(aws.sts_calls().len(), 2);
}

#[tokio::test]
async fn permissive_mode_serves_unselected_namespaces_and_says_so() {
    let h = Harness::start_with(WINDOW, PolicyMode::Permissive).await;
    h.create("console", quick_sight()).await;
    eventually("minted", WAIT, || h.secret_value("console", "url")).await;
    let message = reason_of(&h, "console", "UrlReady").await;
    assert!(message.contains("permissive"), "{message}");
    assert_eq!(h.status("console").policy, None);
}

/// A request minted through [`policy_with_role`], whose assumed credentials last `lifetime`.
async fn minted_through_a_role(lifetime: Duration) -> Harness {
    let h = Harness::start_with(WINDOW, PolicyMode::Enforce).await;
    h.aws.set_sts_lifetime(lifetime);
    apply_policy(&h, &policy_with_role()).await;
    h.create("console", quick_sight()).await;
    eventually("minted", WAIT, || h.secret_value("console", "url")).await;
    h
}

#[tokio::test]
async fn a_failed_renewal_falls_back_to_credentials_still_valid() {
    // Valid for six seconds, renewed after three.
    let h = minted_through_a_role(Duration::from_secs(6)).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Time to renew, and STS throttles: the credentials in hand still work for a while.
    h.aws.throttle_sts_next(2);
    h.request_refresh("console", "again").await;
    eventually("second mint", WAIT, || {
        (h.aws.success_count(Service::QuickSight) == 2).then_some(())
    })
    .await;
    assert_eq!(h.aws.sts_calls().len(), 3, "the renewal was tried");
    let keys: Vec<String> = h
        .aws
        .calls()
        .iter()
        .filter_map(|c| c.access_key.clone())
        .collect();
    assert_eq!(keys[0], keys[1], "minted with the credentials still valid");
    assert_eq!(h.ready_reason("console").unwrap().1, "UrlReady");
}

#[tokio::test]
async fn assumed_credentials_are_renewed_before_they_expire() {
    // Credentials valid for two seconds are renewed after half their life.
    let h = minted_through_a_role(Duration::from_secs(2)).await;
    assert_eq!(
        h.aws.sts_calls().len(),
        1,
        "the SDK reuses the credentials just fetched"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.request_refresh("console", "again").await;
    eventually("second mint", WAIT, || {
        (h.aws.call_count(Service::QuickSight) == 2).then_some(())
    })
    .await;
    assert_eq!(h.aws.sts_calls().len(), 2);
    let keys: Vec<String> = h
        .aws
        .calls()
        .iter()
        .filter_map(|c| c.access_key.clone())
        .collect();
    assert_ne!(
        keys[0], keys[1],
        "the second mint used the renewed credentials"
    );
}
