//! The `EmbedUrlRequest` custom resource: the user-facing API of the operator.
//!
//! Every constraint that can be expressed in OpenAPI or CEL lives in the generated schema, so
//! `kubectl apply` refuses a bad spec with the field's name; [`crate::validation`] checks the same
//! rules again for objects that reached the cluster around the schema (an older CRD, say).

use compact_str::CompactString;
use kube::CustomResource;
use kube::{CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// API group of every kind this operator serves.
pub const GROUP: &str = "embedurl.io";
/// Annotation a user sets to a new value to ask for one immediate refresh.
pub const REFRESH_REQUESTED_AT_ANNOTATION: &str = "embedurl.io/refresh-requested-at";
/// Prefix of every annotation the operator reads or writes (on requests and on Secrets).
pub const OWN_ANNOTATION_PREFIX: &str = "embedurl.io/";
/// Type of the condition that tells whether the Secret holds a usable URL.
pub const READY_CONDITION: &str = "Ready";
/// Type of the condition that tells whether the operator's own AWS rate limit delayed the last
/// refresh (demand above the configured rate). Set once it first applies, then kept up to date.
pub const RATE_LIMITED_CONDITION: &str = "RateLimited";

/// Pattern of a Go/Kubernetes duration as accepted by `refreshBefore` (for example `150s`, `2m30s`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
/// Pattern of an AWS region name such as `us-east-1`, `us-gov-west-1` or, in the AWS European
/// Sovereign Cloud, `eusc-de-east-1` (a partition prefix of up to four letters).
pub const REGION_PATTERN: &str = r"^[a-z]{2,4}(-[a-z]+)+-[0-9]+$";
/// Pattern of a DNS-1123 subdomain, the rule for Secret names.
pub const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Pattern of a QuickSight console entry point.
/// A 12-digit AWS account ID.
pub const ACCOUNT_ID_PATTERN: &str = r"^[0-9]{12}$";
/// A Q Business application or web experience ID.
pub const Q_BUSINESS_ID_PATTERN: &str = r"^[a-zA-Z0-9][a-zA-Z0-9-]{35}$";
/// A Managed Flink application name.
pub const FLINK_APP_NAME_PATTERN: &str = r"^[a-zA-Z0-9_.-]{1,128}$";
pub const ENTRY_POINT_PATTERN: &str = r"^(/start|/start/analyses|/start/dashboards|/start/favorites|/dashboards/[^/]+|/analyses/[^/]+)$";

/// A request as watched and cached: readable, or its metadata and why it is not (written
/// around the schema; see `reconciler::reconcile`).
pub type CachedRequest = crate::guard::Guarded<EmbedUrlRequest>;

/// Asks the operator to keep a fresh, short-lived AWS sign-in URL in a Secret.
///
/// Exactly one of `quickSight`, `qBusiness` or `flink` selects the AWS API that mints the URL.
/// The operator writes the URL into the Secret named by `secretName` and replaces it before its
/// use-by time, for as long as this object exists.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "embedurl.io",
    version = "v1alpha1",
    kind = "EmbedUrlRequest",
    doc = "Asks the operator to keep a fresh, short-lived AWS sign-in URL in a Secret (see spec).",
    plural = "embedurlrequests",
    shortname = "eur",
    namespaced,
    status = "EmbedUrlRequestStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".status.service"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.urlExpiresAt","description":"Use-by time of the URL now in the Secret"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("[has(self.quickSight), has(self.qBusiness), has(self.flink)].filter(x, x).size() == 1")
        .message("exactly one of spec.quickSight, spec.qBusiness or spec.flink must be set"),
    validation = Rule::new("!has(self.refreshBefore) || duration(self.refreshBefore) < duration(has(self.flink) ? '180s' : '300s')")
        .message("spec.refreshBefore must be shorter than the service's use-by window (5m for QuickSight and Q Business, 3m for Flink)")
        .field_path(".refreshBefore"),
    validation = Rule::new("!has(self.refreshBefore) || duration(self.refreshBefore) > duration('0s')")
        .message("spec.refreshBefore must be longer than zero")
        .field_path(".refreshBefore"),
    validation = Rule::new("!has(self.secretTemplate) || !has(self.secretTemplate.labels) || !('app.kubernetes.io/managed-by' in self.secretTemplate.labels)")
        .message("spec.secretTemplate.labels must not set app.kubernetes.io/managed-by: the operator sets it")
        .field_path(".secretTemplate.labels"),
    validation = Rule::new("!has(self.secretTemplate) || !has(self.secretTemplate.annotations) || self.secretTemplate.annotations.all(k, !k.startsWith('embedurl.io/'))")
        .message("spec.secretTemplate.annotations must not set embedurl.io/ annotations: the operator sets them")
        .field_path(".secretTemplate.annotations")
)]
#[serde(rename_all = "camelCase")]
pub struct EmbedUrlRequestSpec {
    // The provider specs and the template are boxed: only one provider is ever set and the
    // template is rare, and the controller's cache holds every request, so inline they made the
    // cached request 936 bytes instead of 712 (docs/benchmarks.md). Boxing does not change the schema.
    /// Mint an Amazon QuickSight console session URL with GetSessionEmbedUrl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quick_sight: Option<Box<QuickSightSpec>>,

    /// Mint an Amazon Q Business anonymous web experience URL with CreateAnonymousWebExperienceUrl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_business: Option<Box<QBusinessSpec>>,

    /// Mint an Amazon Managed Service for Apache Flink dashboard URL with
    /// CreateApplicationPresignedUrl (Kinesis Analytics V2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flink: Option<Box<FlinkSpec>>,

    /// AWS region to call, for example `eu-west-1`. Default: the region of the EmbedUrlPolicy
    /// that serves the request (`spec.aws.region`), else the operator's own (its `AWS_REGION`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(REGION_PATTERN), length(max = 32))]
    pub region: Option<String>,

    /// Name of the Secret, in this namespace, that receives the URL. Default: the name of this
    /// EmbedUrlRequest. The operator creates and owns the Secret; it refuses to overwrite a Secret
    /// of that name that it does not own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SECRET_NAME_PATTERN), length(min = 1, max = 253))]
    pub secret_name: Option<String>,

    /// Extra labels and annotations copied onto the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<Box<SecretTemplate>>,

    /// How long before the URL's use-by time the operator replaces it, as a duration such as
    /// `150s` or `2m`. Default: half the service's use-by window (150s for QuickSight and Q Business,
    /// 90s for Flink), which leaves pods time to see the new Secret content (the kubelet syncs
    /// mounted Secrets with a delay of up to a minute or more). Must be shorter than the window;
    /// above 90% of the window it counts as 90%, so refreshes are never closer than a tenth of
    /// the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub refresh_before: Option<String>,

    /// When true the operator stops refreshing; the Secret keeps its last URL, which then expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
}

/// Inputs of QuickSight GetSessionEmbedUrl. The URL must be used within 5 minutes, once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuickSightSpec {
    /// ID of the AWS account that holds the QuickSight subscription: 12 digits, quoted in YAML.
    #[schemars(pattern(ACCOUNT_ID_PATTERN))]
    pub aws_account_id: String,

    /// Page the console opens on: `/start`, `/start/analyses`, `/start/dashboards`,
    /// `/start/favorites`, `/dashboards/<DashboardId>` or `/analyses/<AnalysisId>`. Default: `/start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(ENTRY_POINT_PATTERN), length(min = 1, max = 1000))]
    pub entry_point: Option<String>,

    /// How long the console session opened by the URL lasts, 15 to 600 minutes. Default: 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 15, max = 600))]
    pub session_lifetime_in_minutes: Option<i64>,

    /// ARN of the QuickSight user the session signs in as (for QUICKSIGHT-identity users, AD users
    /// and invited users). Leave it out to sign in as the IAM identity the operator calls with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub user_arn: Option<String>,
}

/// Inputs of Amazon Q Business CreateAnonymousWebExperienceUrl. The URL must be used within
/// 5 minutes, once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QBusinessSpec {
    /// ID of the Amazon Q Business application: 36 characters.
    #[schemars(pattern(Q_BUSINESS_ID_PATTERN))]
    pub application_id: String,

    /// ID of the anonymous web experience of that application: 36 characters.
    #[schemars(pattern(Q_BUSINESS_ID_PATTERN))]
    pub web_experience_id: String,

    /// How long the chat session opened by the URL lasts, 15 to 60 minutes. Default: 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 15, max = 60))]
    pub session_duration_in_minutes: Option<i64>,
}

/// Inputs of Kinesis Analytics V2 CreateApplicationPresignedUrl (Managed Service for Apache
/// Flink). The URL must be used within 3 minutes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlinkSpec {
    /// Name of the Managed Flink application: 1 to 128 of `a-z A-Z 0-9 _ . -`.
    #[schemars(pattern(FLINK_APP_NAME_PATTERN))]
    pub application_name: String,

    /// Which UI the URL opens: `FLINK_DASHBOARD_URL` (the Apache Flink dashboard) or
    /// `ZEPPELIN_UI_URL` (Studio notebooks).
    pub url_type: FlinkUrlType,

    /// How long the session opened by the URL lasts, 1800 to 43200 seconds. Default: 43200 (12 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1800, max = 43200))]
    pub session_expiration_duration_in_seconds: Option<i64>,
}

/// The UI a Flink presigned URL opens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum FlinkUrlType {
    /// The Apache Flink dashboard of the application.
    #[default]
    #[serde(rename = "FLINK_DASHBOARD_URL")]
    FlinkDashboardUrl,
    /// The Apache Zeppelin UI of a Studio notebook.
    #[serde(rename = "ZEPPELIN_UI_URL")]
    ZeppelinUiUrl,
}

impl FlinkUrlType {
    /// The value AWS expects on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FlinkUrlType::FlinkDashboardUrl => "FLINK_DASHBOARD_URL",
            FlinkUrlType::ZeppelinUiUrl => "ZEPPELIN_UI_URL",
        }
    }
}

/// Metadata copied onto the Secret the operator writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Labels added to the Secret. `app.kubernetes.io/managed-by` is always set by the operator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the operator last did for this request. Never contains the URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct EmbedUrlRequestStatus {
    /// The AWS service that mints the URL: `QuickSight`, `QBusiness` or `Flink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<CompactString>,
    /// The Secret that holds the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<CompactString>,
    /// Use-by time of the URL in the Secret (RFC 3339): after it the URL no longer signs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_expires_at: Option<CompactString>,
    /// End of the session that the URL opens once used (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_expires_at: Option<CompactString>,
    /// When the URL in the Secret was minted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<CompactString>,
    /// When the operator will next mint a URL, or retry after a failure (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<CompactString>,
    /// The `metadata.generation` of the spec the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Failed mint attempts since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// The EmbedUrlPolicy that allowed this request (none in permissive mode without a policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<CompactString>,
    /// The value of the `embedurl.io/refresh-requested-at` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_refresh_request: Option<CompactString>,
    /// `Ready` tells whether the Secret holds a usable URL, and why not. `RateLimited` (once
    /// it first applies) tells whether the operator's AWS rate limit delayed the last refresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition, in the shape of the standard `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: `Ready` or `RateLimited`.
    #[serde(rename = "type")]
    pub type_: CompactString,
    /// `True`, `False` or `Unknown`.
    pub status: CompactString,
    /// One-word CamelCase reason, for example `UrlReady`, `AwsThrottled` or `InvalidSpec`.
    pub reason: CompactString,
    /// Human-readable explanation. Never contains the URL.
    pub message: CompactString,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: CompactString,
}

impl EmbedUrlRequestStatus {
    /// The `Ready` condition, if set.
    pub fn ready(&self) -> Option<&Condition> {
        self.condition(READY_CONDITION)
    }

    /// The condition of type `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The CustomResourceDefinitions of every kind the operator serves: (file name, YAML).
///
/// `crds/` and the Helm chart's `crds/` hold exactly these files (a test compares them);
/// `embed-url-operator crd --output-dir crds` writes them.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_yaml_ng::Error> {
    let header =
        "# Generated by `embed-url-operator crd` from the Rust types. Do not edit by hand.\n---\n";
    Ok(vec![
        (
            "embedurlrequest.yaml",
            format!(
                "{header}{}",
                serde_yaml_ng::to_string(&kept(EmbedUrlRequest::crd()))?
            ),
        ),
        (
            "embedurlpolicy.yaml",
            format!(
                "{header}{}",
                serde_yaml_ng::to_string(&kept(crate::policy::EmbedUrlPolicy::crd()))?
            ),
        ),
    ])
}

/// Deleting a CRD deletes every object of its kind, and with every EmbedUrlRequest every Secret
/// the operator wrote: pods lose their URLs. Helm never deletes the CRDs it installs from
/// `crds/`, but a GitOps tool that renders the chart owns them like any other manifest, and
/// would delete them with its application or prune them. These annotations ask Helm and Argo
/// CD to leave them.
fn kept(
    mut crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let annotations = crd
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert("helm.sh/resource-policy".into(), "keep".into());
    annotations.insert(
        "argocd.argoproj.io/sync-options".into(),
        "Prune=false,Delete=false".into(),
    );
    crd
}
