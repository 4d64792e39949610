//! `EmbedUrlPolicy`: which namespaces may mint which URLs, with which AWS identity.
//!
//! Without policies, anyone who may create an `EmbedUrlRequest` could use the operator's IAM role
//! for anything it allows (a QuickSight session as an admin, say) and read the URL from the
//! Secret. Policies are cluster-scoped, so only cluster administrators write them; a request is
//! served only when a policy that selects its namespace allows every value of its spec.
//!
//! Everything here is a pure function of the policies, the namespace's labels and the spec.

use crate::crd::FlinkUrlType;
use crate::providers::Target;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use kube::core::{Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Allows the requests of some namespaces to mint some URLs, optionally with an IAM role of its
/// own. Default is deny: a request that no policy selects and allows is not served.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "embedurl.io",
    version = "v1alpha1",
    kind = "EmbedUrlPolicy",
    plural = "embedurlpolicies",
    doc = "Allows EmbedUrlRequests in selected namespaces to mint selected URLs, with an optional IAM role.",
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.aws.roleArn"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EmbedUrlPolicySpec {
    /// Namespaces this policy applies to, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,

    /// Namespaces this policy applies to, by label. A namespace is selected when it is listed in
    /// `namespaces` or matches this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// The AWS identity that serves the selected requests. Default: the operator's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<PolicyAws>,

    /// Regions requests may call (glob patterns, `*` matches anything). Missing: any region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,

    /// What QuickSight requests may ask for. Missing: no QuickSight request is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quick_sight: Option<QuickSightRules>,

    /// What Amazon Q Business requests may ask for. Missing: none is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_business: Option<QBusinessRules>,

    /// What Managed Flink requests may ask for. Missing: none is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flink: Option<FlinkRules>,
}

/// The IAM role the operator assumes for the requests a policy serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAws {
    /// Role to assume through STS from the operator's own credentials. The session is named
    /// `embedurl-<namespace>-<policy>` and tagged `kubernetes-namespace` and `embedurl-policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$"))]
    pub role_arn: Option<String>,
    /// External ID the role's trust policy requires (`sts:ExternalId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1224))]
    pub external_id: Option<String>,
    /// Region for requests that do not name one. Default: the operator's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::crd::REGION_PATTERN))]
    pub region: Option<String>,
}

/// Allow-lists for QuickSight requests. Every list holds glob patterns (`*` matches any run of
/// characters, `/` and `:` included); an empty or missing list allows nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuickSightRules {
    /// Allowed `awsAccountId` values.
    #[serde(default)]
    pub aws_account_ids: Vec<String>,
    /// Allowed `userArn` values.
    #[serde(default)]
    pub user_arns: Vec<String>,
    /// Allowed `entryPoint` values (a request without one is checked as `/start`).
    #[serde(default)]
    pub entry_points: Vec<String>,
    /// Longest `sessionLifetimeInMinutes` allowed (a request without one is checked as 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_lifetime_in_minutes: Option<i64>,
    /// Whether a request may leave `userArn` out, signing in as the calling IAM identity itself.
    #[serde(default)]
    pub allow_caller_identity: bool,
}

/// Allow-lists for Amazon Q Business requests (glob patterns; empty or missing allows nothing).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QBusinessRules {
    /// Allowed `applicationId` values.
    #[serde(default)]
    pub application_ids: Vec<String>,
    /// Allowed `webExperienceId` values.
    #[serde(default)]
    pub web_experience_ids: Vec<String>,
    /// Longest `sessionDurationInMinutes` allowed (a request without one is checked as 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_duration_in_minutes: Option<i64>,
}

/// Allow-lists for Managed Flink requests (glob patterns; empty or missing allows nothing).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlinkRules {
    /// Allowed `applicationName` values.
    #[serde(default)]
    pub application_names: Vec<String>,
    /// Allowed `urlType` values.
    #[serde(default)]
    pub url_types: Vec<FlinkUrlType>,
    /// Longest `sessionExpirationDurationInSeconds` allowed (a request without one is checked as 43200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_expiration_duration_in_seconds: Option<i64>,
}

/// Whether requests no policy selects are refused (`enforce`, the default) or served with the
/// operator's own identity (`permissive`, for single-tenant clusters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyMode {
    Enforce,
    Permissive,
}

/// The IAM role a policy says to use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoleToAssume {
    pub role_arn: String,
    pub external_id: Option<String>,
}

/// The outcome of checking a request against the policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it. `policy` is the name of the policy that allowed it (`None` in permissive mode
    /// when no policy selects the namespace).
    Allowed {
        policy: Option<String>,
        role: Option<RoleToAssume>,
        default_region: Option<String>,
    },
    /// Refuse it, and say why (the field and the check that failed, per selecting policy).
    Denied { message: String },
}

/// What a request asks for, in the terms policies check.
pub struct Ask<'a> {
    pub namespace: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// Whether the namespace's labels are known (it is in the cache). A namespace created a
    /// moment ago may not be yet: then only policies that list it by name select it, since
    /// judging a `NotIn` or `DoesNotExist` selector against no labels would match by mistake.
    pub namespace_known: bool,
    pub target: &'a Target,
    /// The spec's `region`, if set.
    pub region: Option<&'a str>,
    /// The operator's region, used when neither the spec nor the policy names one.
    pub operator_region: Option<&'a str>,
}

/// Checks a request against `policies` (in any order: the first allowing one by name wins).
pub fn decide(policies: &[&EmbedUrlPolicy], ask: &Ask<'_>, mode: PolicyMode) -> Decision {
    let mut selecting: Vec<&EmbedUrlPolicy> = policies
        .iter()
        .copied()
        .filter(|p| {
            if ask.namespace_known {
                selects(&p.spec, ask.namespace, ask.namespace_labels)
            } else {
                p.spec.namespaces.iter().any(|n| n == ask.namespace)
            }
        })
        .collect();
    selecting.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    if selecting.is_empty() {
        if !ask.namespace_known && policies.iter().any(|p| p.spec.namespace_selector.is_some()) {
            // The namespace's first watch event is on its way; it re-evaluates every request.
            return Decision::Denied {
                message: format!(
                    "namespace {:?} is not in the operator's cache yet, so which policies select it by label is not known; it is decided again as soon as it is",
                    ask.namespace
                ),
            };
        }
        // In permissive mode an unselected namespace is served with no limits, so a selector
        // the operator cannot read must not count as "selects nothing": the policy was meant
        // to limit someone.
        // The first by name, so the message does not change with the cache's order.
        let unreadable = policies
            .iter()
            .filter(|p| {
                p.spec
                    .namespace_selector
                    .as_ref()
                    .is_some_and(|selector| Selector::try_from(selector.clone()).is_err())
            })
            .min_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        if let (PolicyMode::Permissive, Some(policy)) = (mode, unreadable) {
            return Decision::Denied {
                message: format!(
                    "EmbedUrlPolicy {:?} has a namespaceSelector the operator cannot read, so it cannot tell whether that policy should limit namespace {:?}; ask a cluster administrator to fix the selector",
                    policy.metadata.name.as_deref().unwrap_or_default(),
                    ask.namespace
                ),
            };
        }
        return match mode {
            PolicyMode::Permissive => Decision::Allowed {
                policy: None,
                role: None,
                default_region: None,
            },
            PolicyMode::Enforce => Decision::Denied {
                message: format!(
                    "no EmbedUrlPolicy selects namespace {:?}; ask a cluster administrator for one",
                    ask.namespace
                ),
            },
        };
    }

    let mut refusals = Vec::new();
    for policy in selecting {
        let name = policy.metadata.name.clone().unwrap_or_default();
        match check(&policy.spec, ask) {
            Ok(()) => {
                let aws = policy.spec.aws.clone().unwrap_or_default();
                return Decision::Allowed {
                    policy: Some(name),
                    role: aws.role_arn.map(|role_arn| RoleToAssume {
                        role_arn,
                        external_id: aws.external_id,
                    }),
                    default_region: aws.region,
                };
            }
            Err(reason) => refusals.push(format!("policy {name:?}: {reason}")),
        }
    }
    Decision::Denied {
        message: refusals.join("; "),
    }
}

/// Whether a policy applies to a namespace.
pub fn selects(
    spec: &EmbedUrlPolicySpec,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    spec.namespaces.iter().any(|n| n == namespace)
        || spec
            .namespace_selector
            .as_ref()
            // A selector the API server would reject (bad operator) selects nothing.
            .and_then(|selector| Selector::try_from(selector.clone()).ok())
            .is_some_and(|selector| selector.matches(labels))
}

/// Every value the request sends (or AWS will assume) must be allowed.
fn check(spec: &EmbedUrlPolicySpec, ask: &Ask<'_>) -> Result<(), String> {
    let region = ask
        .region
        .or(spec.aws.as_ref().and_then(|a| a.region.as_deref()))
        .or(ask.operator_region);
    if let (Some(patterns), Some(region)) = (&spec.regions, region) {
        allow("regions", "spec.region", region, patterns)?;
    }
    match ask.target {
        Target::QuickSight(qs) => {
            let rules = spec
                .quick_sight
                .as_ref()
                .ok_or("it has no quickSight block, so it allows no QuickSight request")?;
            allow(
                "quickSight.awsAccountIds",
                "spec.quickSight.awsAccountId",
                &qs.aws_account_id,
                &rules.aws_account_ids,
            )?;
            match &qs.user_arn {
                Some(arn) => allow(
                    "quickSight.userArns",
                    "spec.quickSight.userArn",
                    arn,
                    &rules.user_arns,
                )?,
                None if rules.allow_caller_identity => {}
                None => {
                    return Err("spec.quickSight.userArn is not set (the session would be the operator's own IAM identity), and quickSight.allowCallerIdentity is not true".into());
                }
            }
            let entry = qs.entry_point.as_deref().unwrap_or("/start");
            allow(
                "quickSight.entryPoints",
                "spec.quickSight.entryPoint",
                entry,
                &rules.entry_points,
            )?;
            at_most(
                "quickSight.maxSessionLifetimeInMinutes",
                "spec.quickSight.sessionLifetimeInMinutes",
                qs.session_lifetime_in_minutes.unwrap_or(600),
                rules.max_session_lifetime_in_minutes,
            )
        }
        Target::QBusiness(qb) => {
            let rules = spec
                .q_business
                .as_ref()
                .ok_or("it has no qBusiness block, so it allows no Q Business request")?;
            allow(
                "qBusiness.applicationIds",
                "spec.qBusiness.applicationId",
                &qb.application_id,
                &rules.application_ids,
            )?;
            allow(
                "qBusiness.webExperienceIds",
                "spec.qBusiness.webExperienceId",
                &qb.web_experience_id,
                &rules.web_experience_ids,
            )?;
            at_most(
                "qBusiness.maxSessionDurationInMinutes",
                "spec.qBusiness.sessionDurationInMinutes",
                qb.session_duration_in_minutes.unwrap_or(60),
                rules.max_session_duration_in_minutes,
            )
        }
        Target::Flink(fl) => {
            let rules = spec
                .flink
                .as_ref()
                .ok_or("it has no flink block, so it allows no Flink request")?;
            allow(
                "flink.applicationNames",
                "spec.flink.applicationName",
                &fl.application_name,
                &rules.application_names,
            )?;
            if !rules.url_types.contains(&fl.url_type) {
                return Err(format!(
                    "spec.flink.urlType {} is not in flink.urlTypes",
                    fl.url_type.as_str()
                ));
            }
            at_most(
                "flink.maxSessionExpirationDurationInSeconds",
                "spec.flink.sessionExpirationDurationInSeconds",
                fl.session_expiration_duration_in_seconds.unwrap_or(43200),
                rules.max_session_expiration_duration_in_seconds,
            )
        }
    }
}

fn allow(list: &str, field: &str, value: &str, patterns: &[String]) -> Result<(), String> {
    if patterns.iter().any(|p| glob_matches(p, value)) {
        Ok(())
    } else if patterns.is_empty() {
        Err(format!("{field} {value:?} is not allowed: {list} is empty"))
    } else {
        Err(format!("{field} {value:?} matches nothing in {list}"))
    }
}

fn at_most(limit: &str, field: &str, value: i64, max: Option<i64>) -> Result<(), String> {
    match max {
        Some(max) if value > max => Err(format!("{field} {value} is above {limit} {max}")),
        _ => Ok(()),
    }
}

/// `*` matches any run of characters (including none, `/` and `:`); everything else matches
/// itself. A pattern without `*` must equal the value.
pub fn glob_matches(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, rest) = parts.split_first().unwrap_or((&"", &[]));
    let Some(mut remaining) = value.strip_prefix(first) else {
        return false;
    };
    let (last, middle) = rest.split_last().unwrap_or((&"", &[]));
    for part in middle {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FlinkSpec, QBusinessSpec, QuickSightSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn policy(name: &str, spec: EmbedUrlPolicySpec) -> EmbedUrlPolicy {
        EmbedUrlPolicy::new(name, spec)
    }

    fn analytics_qs() -> QuickSightRules {
        QuickSightRules {
            aws_account_ids: vec!["111122223333".into()],
            user_arns: vec!["arn:aws:quicksight:*:111122223333:user/default/viewer-*".into()],
            entry_points: vec!["/start/dashboards".into(), "/dashboards/*".into()],
            max_session_lifetime_in_minutes: Some(120),
            allow_caller_identity: false,
        }
    }

    fn qs_target(user: Option<&str>, entry: Option<&str>, minutes: Option<i64>) -> Target {
        Target::QuickSight(QuickSightSpec {
            aws_account_id: "111122223333".into(),
            entry_point: entry.map(str::to_string),
            session_lifetime_in_minutes: minutes,
            user_arn: user.map(str::to_string),
        })
    }

    fn ask<'a>(ns: &'a str, labels: &'a BTreeMap<String, String>, target: &'a Target) -> Ask<'a> {
        Ask {
            namespace: ns,
            namespace_labels: labels,
            namespace_known: true,
            target,
            region: None,
            operator_region: Some("us-east-1"),
        }
    }

    const VIEWER: &str = "arn:aws:quicksight:us-east-1:111122223333:user/default/viewer-bob";

    #[test]
    fn globs() {
        assert!(glob_matches("orders-*", "orders-eu"));
        assert!(glob_matches("orders-*", "orders-"));
        assert!(!glob_matches("orders-*", "order"));
        assert!(glob_matches("*", "anything/with:colons"));
        assert!(glob_matches(
            "arn:aws:*:user/*",
            "arn:aws:quicksight:us-east-1:1:user/default/x"
        ));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(!glob_matches("a*b*c", "aXXcYYb"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
        assert!(
            !glob_matches("ab*ba", "aba"),
            "the prefix and suffix must not overlap"
        );
    }

    #[test]
    fn default_is_deny_and_permissive_serves_unselected_namespaces() {
        let labels = BTreeMap::new();
        let target = qs_target(Some(VIEWER), None, None);
        let Decision::Denied { message } = decide(
            &[],
            &ask("analytics", &labels, &target),
            PolicyMode::Enforce,
        ) else {
            panic!("denied without policies");
        };
        assert!(
            message.contains("no EmbedUrlPolicy selects namespace \"analytics\""),
            "{message}"
        );
        assert_eq!(
            decide(
                &[],
                &ask("analytics", &labels, &target),
                PolicyMode::Permissive
            ),
            Decision::Allowed {
                policy: None,
                role: None,
                default_region: None
            }
        );
    }

    /// "Every namespace whose `tier` is not `restricted`", with the selector operator spelt
    /// `operator` (the API server stores a misspelt one).
    fn not_restricted_selector(operator: &str) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: operator.into(),
                values: Some(vec!["restricted".into()]),
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn a_namespace_not_yet_seen_is_selected_only_by_name() {
        let labels = BTreeMap::new();
        let target = qs_target(Some(VIEWER), None, None);
        let open_rules = EmbedUrlPolicySpec {
            quick_sight: Some(QuickSightRules {
                aws_account_ids: vec!["*".into()],
                user_arns: vec!["*".into()],
                entry_points: vec!["*".into()],
                max_session_lifetime_in_minutes: None,
                allow_caller_identity: true,
            }),
            ..Default::default()
        };
        // "Every namespace not labelled restricted": a namespace whose labels are not known yet
        // must not count as unlabelled.
        let not_restricted = policy(
            "not-restricted",
            EmbedUrlPolicySpec {
                namespace_selector: Some(not_restricted_selector("NotIn")),
                ..open_rules.clone()
            },
        );
        let mut unseen = ask("analytics", &labels, &target);
        unseen.namespace_known = false;
        for mode in [PolicyMode::Enforce, PolicyMode::Permissive] {
            let Decision::Denied { message } = decide(&[&not_restricted], &unseen, mode) else {
                panic!("{mode:?}: served a namespace whose labels are unknown");
            };
            assert!(
                message.contains("not in the operator's cache yet"),
                "{message}"
            );
        }
        assert!(matches!(
            decide(
                &[&not_restricted],
                &ask("analytics", &labels, &target),
                PolicyMode::Enforce
            ),
            Decision::Allowed { .. }
        ));
        let by_name = policy(
            "by-name",
            EmbedUrlPolicySpec {
                namespaces: vec!["analytics".into()],
                ..open_rules
            },
        );
        assert!(matches!(
            decide(&[&by_name], &unseen, PolicyMode::Enforce),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn permissive_mode_does_not_serve_past_an_unreadable_selector() {
        let labels = BTreeMap::new();
        let target = qs_target(Some(VIEWER), None, None);
        let broken = policy(
            "tenants",
            EmbedUrlPolicySpec {
                namespace_selector: Some(not_restricted_selector("Notin")),
                ..Default::default()
            },
        );
        let Decision::Denied { message } = decide(
            &[&broken],
            &ask("analytics", &labels, &target),
            PolicyMode::Permissive,
        ) else {
            panic!("served past a broken selector");
        };
        assert!(message.contains("\"tenants\""), "{message}");
    }

    #[test]
    fn selection_by_name_and_by_label() {
        let by_name = EmbedUrlPolicySpec {
            namespaces: vec!["analytics".into()],
            ..Default::default()
        };
        let by_label = EmbedUrlPolicySpec {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("team".into(), "analytics".into())])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["sandbox".into()]),
                }]),
            }),
            ..Default::default()
        };
        let team = BTreeMap::from([("team".to_string(), "analytics".to_string())]);
        let sandbox = BTreeMap::from([
            ("team".to_string(), "analytics".to_string()),
            ("tier".to_string(), "sandbox".to_string()),
        ]);
        assert!(selects(&by_name, "analytics", &BTreeMap::new()));
        assert!(!selects(&by_name, "other", &team));
        assert!(selects(&by_label, "other", &team));
        assert!(!selects(&by_label, "other", &sandbox));
        assert!(
            !selects(&EmbedUrlPolicySpec::default(), "analytics", &team),
            "selects nothing by default"
        );
    }

    #[test]
    fn every_value_must_be_allowed_including_defaults() {
        let p = policy(
            "analytics-team",
            EmbedUrlPolicySpec {
                namespaces: vec!["analytics".into()],
                quick_sight: Some(analytics_qs()),
                ..Default::default()
            },
        );
        let labels = BTreeMap::new();
        let decide_for = |target: &Target| {
            decide(
                &[&p],
                &ask("analytics", &labels, target),
                PolicyMode::Enforce,
            )
        };

        let ok = qs_target(Some(VIEWER), Some("/dashboards/abc"), Some(60));
        assert!(
            matches!(decide_for(&ok), Decision::Allowed { policy: Some(name), .. } if name == "analytics-team")
        );

        let denied = |target: Target, needle: &str| match decide_for(&target) {
            Decision::Denied { message } => {
                assert!(message.contains(needle), "{message} lacks {needle}")
            }
            other => panic!("expected a denial mentioning {needle}, got {other:?}"),
        };
        denied(
            qs_target(
                Some("arn:aws:quicksight:us-east-1:111122223333:user/default/admin"),
                Some("/start/dashboards"),
                Some(60),
            ),
            "spec.quickSight.userArn",
        );
        // The default entry point is /start, which this policy does not list.
        denied(
            qs_target(Some(VIEWER), None, Some(60)),
            "spec.quickSight.entryPoint \"/start\"",
        );
        // The default session length is 600 minutes, above the 120 allowed.
        denied(
            qs_target(Some(VIEWER), Some("/start/dashboards"), None),
            "spec.quickSight.sessionLifetimeInMinutes 600",
        );
        // No userArn: the caller's own identity, only with allowCallerIdentity.
        denied(
            qs_target(None, Some("/start/dashboards"), Some(60)),
            "allowCallerIdentity",
        );
        denied(
            Target::QBusiness(QBusinessSpec::default()),
            "no qBusiness block",
        );
        assert!(matches!(decide_for(&ok), Decision::Allowed { .. }));
    }

    #[test]
    fn empty_lists_allow_nothing_and_regions_are_checked() {
        let p = policy(
            "strict",
            EmbedUrlPolicySpec {
                namespaces: vec!["streaming".into()],
                regions: Some(vec!["eu-*".into()]),
                aws: Some(PolicyAws {
                    role_arn: Some("arn:aws:iam::111122223333:role/embed".into()),
                    external_id: Some("streaming".into()),
                    region: Some("eu-west-1".into()),
                }),
                flink: Some(FlinkRules {
                    application_names: vec!["orders-*".into()],
                    url_types: vec![FlinkUrlType::FlinkDashboardUrl],
                    max_session_expiration_duration_in_seconds: Some(3600),
                }),
                ..Default::default()
            },
        );
        let labels = BTreeMap::new();
        let flink = |name: &str, secs: Option<i64>, url_type| {
            Target::Flink(FlinkSpec {
                application_name: name.into(),
                url_type,
                session_expiration_duration_in_seconds: secs,
            })
        };
        let target = flink("orders-eu", Some(1800), FlinkUrlType::FlinkDashboardUrl);
        // No region in the request: the policy's region is checked and handed back.
        assert_eq!(
            decide(
                &[&p],
                &ask("streaming", &labels, &target),
                PolicyMode::Enforce
            ),
            Decision::Allowed {
                policy: Some("strict".into()),
                role: Some(RoleToAssume {
                    role_arn: "arn:aws:iam::111122223333:role/embed".into(),
                    external_id: Some("streaming".into()),
                }),
                default_region: Some("eu-west-1".into()),
            }
        );
        let mut us = ask("streaming", &labels, &target);
        us.region = Some("us-east-1");
        assert!(
            matches!(decide(&[&p], &us, PolicyMode::Enforce), Decision::Denied { message } if message.contains("spec.region"))
        );
        for bad in [
            flink("payments", Some(1800), FlinkUrlType::FlinkDashboardUrl),
            flink("orders-eu", None, FlinkUrlType::FlinkDashboardUrl),
            flink("orders-eu", Some(1800), FlinkUrlType::ZeppelinUiUrl),
        ] {
            assert!(matches!(
                decide(&[&p], &ask("streaming", &labels, &bad), PolicyMode::Enforce),
                Decision::Denied { .. }
            ));
        }
        // Even permissive mode checks the requests a policy selects.
        assert!(matches!(
            decide(
                &[&p],
                &ask(
                    "streaming",
                    &labels,
                    &flink("payments", None, FlinkUrlType::FlinkDashboardUrl)
                ),
                PolicyMode::Permissive
            ),
            Decision::Denied { .. }
        ));

        // Each list left empty allows nothing, and says which list it is.
        let denial = |edit: &dyn Fn(&mut EmbedUrlPolicySpec), mut ask: Ask<'_>| {
            let mut empty = p.clone();
            edit(&mut empty.spec);
            ask.region = Some("eu-west-1");
            match decide(&[&empty], &ask, PolicyMode::Enforce) {
                Decision::Denied { message } => message,
                other => panic!("allowed with an empty list: {other:?}"),
            }
        };
        let on_flink = || ask("streaming", &labels, &target);
        for (edit, list) in [
            (
                &(|s: &mut EmbedUrlPolicySpec| s.regions = Some(vec![]))
                    as &dyn Fn(&mut EmbedUrlPolicySpec),
                "regions is empty",
            ),
            (
                &|s: &mut EmbedUrlPolicySpec| s.flink.as_mut().unwrap().application_names.clear(),
                "flink.applicationNames is empty",
            ),
            (
                &|s: &mut EmbedUrlPolicySpec| s.flink.as_mut().unwrap().url_types.clear(),
                "flink.urlTypes",
            ),
        ] {
            let message = denial(edit, on_flink());
            assert!(message.contains(list), "{message}");
        }
        let quick_sight = qs_target(Some(VIEWER), Some("/start/dashboards"), Some(60));
        let mut qs_rules = analytics_qs();
        qs_rules.aws_account_ids.clear();
        let message = denial(
            &|s: &mut EmbedUrlPolicySpec| s.quick_sight = Some(qs_rules.clone()),
            ask("streaming", &labels, &quick_sight),
        );
        assert!(
            message.contains("quickSight.awsAccountIds is empty"),
            "{message}"
        );
        let q_business = Target::QBusiness(QBusinessSpec {
            application_id: "a".repeat(36),
            web_experience_id: "w".repeat(36),
            ..Default::default()
        });
        let message = denial(
            &|s: &mut EmbedUrlPolicySpec| {
                s.q_business = Some(QBusinessRules {
                    application_ids: vec![],
                    web_experience_ids: vec!["*".into()],
                    ..Default::default()
                })
            },
            ask("streaming", &labels, &q_business),
        );
        assert!(
            message.contains("qBusiness.applicationIds is empty"),
            "{message}"
        );
    }

    #[test]
    fn the_first_allowing_policy_by_name_wins() {
        let open = |name: &str| {
            policy(
                name,
                EmbedUrlPolicySpec {
                    namespaces: vec!["analytics".into()],
                    quick_sight: Some(QuickSightRules {
                        aws_account_ids: vec!["*".into()],
                        user_arns: vec!["*".into()],
                        entry_points: vec!["*".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
        };
        let closed = policy(
            "a-closed",
            EmbedUrlPolicySpec {
                namespaces: vec!["analytics".into()],
                ..Default::default()
            },
        );
        let (b, c) = (open("b-open"), open("c-open"));
        let labels = BTreeMap::new();
        let target = qs_target(Some(VIEWER), None, None);
        let decision = decide(
            &[&c, &closed, &b],
            &ask("analytics", &labels, &target),
            PolicyMode::Enforce,
        );
        assert!(
            matches!(decision, Decision::Allowed { policy: Some(name), .. } if name == "b-open")
        );
        let only_closed = decide(
            &[&closed],
            &ask("analytics", &labels, &target),
            PolicyMode::Enforce,
        );
        assert!(
            matches!(only_closed, Decision::Denied { message } if message.starts_with("policy \"a-closed\": it has no quickSight block"))
        );
    }
}
