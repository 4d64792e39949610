//! Validation of an `EmbedUrlRequest` spec, mirroring the CRD schema.
//!
//! The API server enforces the same rules through the generated schema. They are checked again
//! here because an object can reach the operator around the schema (an older CRD, a schema
//! edited by hand), and such a spec must give a clear `InvalidSpec` condition, not an AWS call.

use crate::crd::OWN_ANNOTATION_PREFIX;
use crate::crd::{
    ACCOUNT_ID_PATTERN, DURATION_PATTERN, ENTRY_POINT_PATTERN, EmbedUrlRequestSpec,
    FLINK_APP_NAME_PATTERN, Q_BUSINESS_ID_PATTERN, REGION_PATTERN, SECRET_NAME_PATTERN,
    SecretTemplate,
};
use crate::providers::{Service, Target};
use crate::secret::MANAGED_BY_LABEL;
use regex::Regex;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

/// A spec that passed validation, with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    pub target: Target,
    /// The spec's region; see [`resolve_region`] for the defaults.
    pub region: Option<String>,
    pub secret_name: String,
    pub secret_template: SecretTemplate,
    pub refresh_before: Duration,
    pub suspend: bool,
}

impl ValidSpec {
    pub fn service(&self) -> Service {
        self.target.service()
    }
}

/// A rule the spec breaks: the field's path and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.to_string(),
        message: message.into(),
    }
}

/// How long each service's URLs stay usable. The documented values in production; tests and
/// the benchmark compress them to run in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UseByWindows {
    pub quick_sight: Duration,
    pub q_business: Duration,
    pub flink: Duration,
}

impl UseByWindows {
    pub fn documented() -> Self {
        UseByWindows {
            quick_sight: Service::QuickSight.documented_use_by_window(),
            q_business: Service::QBusiness.documented_use_by_window(),
            flink: Service::Flink.documented_use_by_window(),
        }
    }

    /// The same window for every service (used to compress time in tests).
    pub fn uniform(window: Duration) -> Self {
        UseByWindows {
            quick_sight: window,
            q_business: window,
            flink: window,
        }
    }

    pub fn for_service(&self, service: Service) -> Duration {
        match service {
            Service::QuickSight => self.quick_sight,
            Service::QBusiness => self.q_business,
            Service::Flink => self.flink,
        }
    }
}

impl Default for UseByWindows {
    fn default() -> Self {
        Self::documented()
    }
}

fn pattern(re: &str) -> Regex {
    // The patterns are compile-time constants covered by unit tests; an invalid one is a bug
    // that every test run would reveal at once.
    Regex::new(re).unwrap_or_else(|e| panic!("invalid built-in pattern {re}: {e}"))
}

static ACCOUNT_ID: LazyLock<Regex> = LazyLock::new(|| pattern(ACCOUNT_ID_PATTERN));
static ENTRY_POINT: LazyLock<Regex> = LazyLock::new(|| pattern(ENTRY_POINT_PATTERN));
static Q_BUSINESS_ID: LazyLock<Regex> = LazyLock::new(|| pattern(Q_BUSINESS_ID_PATTERN));
static FLINK_APP_NAME: LazyLock<Regex> = LazyLock::new(|| pattern(FLINK_APP_NAME_PATTERN));
static REGION: LazyLock<Regex> = LazyLock::new(|| pattern(REGION_PATTERN));
/// The CRD's bound on `spec.region`, checked again for specs that bypassed the schema.
const MAX_REGION_LENGTH: usize = 32;
static SECRET_NAME: LazyLock<Regex> = LazyLock::new(|| pattern(SECRET_NAME_PATTERN));
static DURATION: LazyLock<Regex> = LazyLock::new(|| pattern(DURATION_PATTERN));

/// Validates `spec` and applies defaults. `object_name` is the request's name (the default Secret
/// name).
pub fn validate(
    spec: &EmbedUrlRequestSpec,
    object_name: &str,
    windows: &UseByWindows,
) -> Result<ValidSpec, InvalidSpec> {
    let target = validate_target(spec)?;
    let service = target.service();

    if let Some(region) = &spec.region
        && (region.len() > MAX_REGION_LENGTH || !REGION.is_match(region))
    {
        return Err(invalid(
            "spec.region",
            format!(
                "{region:?} is not an AWS region name such as \"us-east-1\" (at most {MAX_REGION_LENGTH} characters)"
            ),
        ));
    }

    let secret_name = spec
        .secret_name
        .clone()
        .unwrap_or_else(|| object_name.to_string());
    if secret_name.len() > 253 || !SECRET_NAME.is_match(&secret_name) {
        let field = if spec.secret_name.is_some() {
            "spec.secretName"
        } else {
            "metadata.name"
        };
        return Err(invalid(
            field,
            format!(
                "{secret_name:?} is not a valid Secret name (lower-case DNS subdomain, at most 253 characters)"
            ),
        ));
    }

    let secret_template = spec.secret_template.as_deref().cloned().unwrap_or_default();
    if secret_template.labels.contains_key(MANAGED_BY_LABEL) {
        return Err(invalid(
            "spec.secretTemplate.labels",
            format!("{MANAGED_BY_LABEL} is set by the operator; remove it from the template"),
        ));
    }
    for (key, value) in &secret_template.labels {
        check_label(key, value)?;
    }
    if let Some(own) = secret_template
        .annotations
        .keys()
        .find(|key| key.starts_with(OWN_ANNOTATION_PREFIX))
    {
        // The operator writes its own values there: the Secret could never match the template
        // and would be rewritten on every reconcile.
        return Err(invalid(
            "spec.secretTemplate.annotations",
            format!(
                "{own}: annotations under {OWN_ANNOTATION_PREFIX} are set by the operator; remove it from the template"
            ),
        ));
    }
    check_annotations(&secret_template.annotations)?;

    let window = windows.for_service(service);
    let refresh_before = match &spec.refresh_before {
        None => window / 2,
        Some(text) => {
            let parsed = parse_duration(text).ok_or_else(|| {
                invalid(
                    "spec.refreshBefore",
                    format!("{text:?} is not a duration such as \"150s\" or \"2m\""),
                )
            })?;
            if parsed.is_zero() {
                return Err(invalid("spec.refreshBefore", "must be longer than zero"));
            }
            if parsed >= window {
                return Err(invalid(
                    "spec.refreshBefore",
                    format!(
                        "{text} is not shorter than the {service} use-by window of {}s; use a shorter duration",
                        window.as_secs()
                    ),
                ));
            }
            parsed
        }
    };

    Ok(ValidSpec {
        target,
        region: spec.region.clone(),
        secret_name,
        secret_template,
        refresh_before,
        suspend: spec.suspend.unwrap_or(false),
    })
}

/// The region a request calls: its own, else its policy's default, else the operator's.
pub fn resolve_region(
    spec: &ValidSpec,
    policy_region: Option<&str>,
    operator_region: Option<&str>,
) -> Result<String, InvalidSpec> {
    spec.region
        .as_deref()
        .or(policy_region)
        .or(operator_region)
        .map(str::to_string)
        .ok_or_else(|| {
            invalid(
                "spec.region",
                "not set, and neither the policy nor the operator has a default AWS region: set spec.region, or AWS_REGION on the operator",
            )
        })
}

fn validate_target(spec: &EmbedUrlRequestSpec) -> Result<Target, InvalidSpec> {
    let set: Vec<&str> = [
        spec.quick_sight.as_ref().map(|_| "spec.quickSight"),
        spec.q_business.as_ref().map(|_| "spec.qBusiness"),
        spec.flink.as_ref().map(|_| "spec.flink"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if set.len() != 1 {
        let found = if set.is_empty() {
            "none is".to_string()
        } else {
            format!("{} are", set.join(" and "))
        };
        return Err(invalid(
            "spec",
            format!(
                "exactly one of spec.quickSight, spec.qBusiness or spec.flink must be set; {found} set"
            ),
        ));
    }

    if let Some(qs) = &spec.quick_sight {
        if !ACCOUNT_ID.is_match(&qs.aws_account_id) {
            return Err(invalid(
                "spec.quickSight.awsAccountId",
                format!(
                    "{:?} is not a 12-digit AWS account ID (quote it in YAML)",
                    qs.aws_account_id
                ),
            ));
        }
        if let Some(entry) = &qs.entry_point
            && (entry.len() > 1000 || !ENTRY_POINT.is_match(entry))
        {
            return Err(invalid(
                "spec.quickSight.entryPoint",
                format!(
                    "{entry:?} is not one of /start, /start/analyses, /start/dashboards, /start/favorites, /dashboards/<id>, /analyses/<id>"
                ),
            ));
        }
        check_range(
            "spec.quickSight.sessionLifetimeInMinutes",
            qs.session_lifetime_in_minutes,
            15,
            600,
        )?;
        if let Some(arn) = &qs.user_arn
            && (arn.is_empty() || arn.len() > 2048)
        {
            return Err(invalid(
                "spec.quickSight.userArn",
                "must be 1 to 2048 characters",
            ));
        }
        return Ok(Target::QuickSight((**qs).clone()));
    }

    if let Some(qb) = &spec.q_business {
        for (field, value) in [
            ("spec.qBusiness.applicationId", &qb.application_id),
            ("spec.qBusiness.webExperienceId", &qb.web_experience_id),
        ] {
            if !Q_BUSINESS_ID.is_match(value) {
                return Err(invalid(
                    field,
                    format!("{value:?} is not a 36-character Amazon Q Business ID"),
                ));
            }
        }
        check_range(
            "spec.qBusiness.sessionDurationInMinutes",
            qb.session_duration_in_minutes,
            15,
            60,
        )?;
        return Ok(Target::QBusiness((**qb).clone()));
    }

    let Some(flink) = &spec.flink else {
        return Err(invalid("spec", "no provider block is set"));
    };
    if !FLINK_APP_NAME.is_match(&flink.application_name) {
        return Err(invalid(
            "spec.flink.applicationName",
            format!(
                "{:?} must be 1 to 128 of the characters a-z A-Z 0-9 _ . -",
                flink.application_name
            ),
        ));
    }
    check_range(
        "spec.flink.sessionExpirationDurationInSeconds",
        flink.session_expiration_duration_in_seconds,
        1800,
        43200,
    )?;
    Ok(Target::Flink((**flink).clone()))
}

fn check_range(field: &str, value: Option<i64>, min: i64, max: i64) -> Result<(), InvalidSpec> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(invalid(
            field,
            format!("{v} is out of range: use a value from {min} to {max}"),
        )),
        _ => Ok(()),
    }
}

static LABEL_NAME: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$"));
static LABEL_VALUE: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"));

/// Whether `key` is a Kubernetes qualified name, the form of label and annotation keys: an
/// optional DNS-subdomain prefix and `/`, then at most 63 alphanumerics, '-', '_' or '.'.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && SECRET_NAME.is_match(p));
    prefix_ok && !name.is_empty() && name.len() <= 63 && LABEL_NAME.is_match(name)
}

/// Kubernetes label rules, so a bad template is reported here instead of as a failed write.
fn check_label(key: &str, value: &str) -> Result<(), InvalidSpec> {
    let field = "spec.secretTemplate.labels";
    if !is_qualified_name(key) {
        return Err(invalid(
            field,
            format!(
                "{key:?} is not a valid label key (an optional DNS-subdomain prefix and '/', then at most 63 alphanumerics, '-', '_' or '.')"
            ),
        ));
    }
    if value.len() > 63 || !LABEL_VALUE.is_match(value) {
        return Err(invalid(
            field,
            format!(
                "the value of {key:?} is not a valid label value (at most 63 alphanumerics, '-', '_' or '.')"
            ),
        ));
    }
    Ok(())
}

/// The API server's limit on all annotations of one object together, keys and values, in bytes.
const ANNOTATIONS_SIZE_LIMIT: usize = 256 * 1024;
/// Room left under that limit for the annotations the operator adds to the Secret itself.
const OWN_ANNOTATIONS_ROOM: usize = 1024;

/// Kubernetes annotation rules. The API server refuses a Secret whose annotations break them,
/// and that refusal would come only after a URL was minted for it: checked here, nothing is
/// minted and the request says which key to fix.
fn check_annotations(annotations: &BTreeMap<String, String>) -> Result<(), InvalidSpec> {
    let field = "spec.secretTemplate.annotations";
    // The API server checks annotation keys in lower case (label keys as written).
    if let Some(key) = annotations
        .keys()
        .find(|key| !is_qualified_name(&key.to_ascii_lowercase()))
    {
        return Err(invalid(
            field,
            format!(
                "{key:?} is not a valid annotation key (an optional DNS-subdomain prefix and '/', then at most 63 alphanumerics, '-', '_' or '.')"
            ),
        ));
    }
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > ANNOTATIONS_SIZE_LIMIT - OWN_ANNOTATIONS_ROOM {
        return Err(invalid(
            field,
            format!(
                "the annotations take {size} bytes; Kubernetes allows {ANNOTATIONS_SIZE_LIMIT} in all, of which the operator needs {OWN_ANNOTATIONS_ROOM}"
            ),
        ));
    }
    Ok(())
}

/// The longest duration [`parse_duration`] accepts: far beyond any use-by window or flag, and far
/// below what `std::time::Duration` can hold.
const MAX_DURATION_SECS: f64 = 100.0 * 365.0 * 24.0 * 3600.0;

/// Parses a Go-style duration (`150s`, `2m30s`, `1.5m`, `500ms`), the format of `refreshBefore`.
/// A value too large to mean anything (`99999999999999999h`) is refused, not a panic: kube's
/// parser multiplies without a bound, and its panic would take the whole operator down on
/// every restart for one object written around the schema.
pub fn parse_duration(text: &str) -> Option<Duration> {
    static PART: LazyLock<Regex> = LazyLock::new(|| pattern(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)"));
    if text.len() > 64 || !DURATION.is_match(text) {
        return None;
    }
    let mut seconds = 0.0_f64;
    for part in PART.captures_iter(text) {
        let number: f64 = part[1].parse().ok()?;
        let unit = match &part[2] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            _ => 3600.0,
        };
        seconds += number * unit;
    }
    if !seconds.is_finite() || seconds > MAX_DURATION_SECS {
        return None;
    }
    Duration::try_from_secs_f64(seconds).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FlinkSpec, FlinkUrlType, QBusinessSpec, QuickSightSpec};

    const ID36: &str = "a1b2c3d4-1111-2222-3333-444455556666";

    fn qs() -> EmbedUrlRequestSpec {
        EmbedUrlRequestSpec {
            quick_sight: Some(Box::new(QuickSightSpec {
                aws_account_id: "111122223333".into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn check(spec: &EmbedUrlRequestSpec) -> Result<ValidSpec, InvalidSpec> {
        validate(spec, "sales", &UseByWindows::documented())
    }

    fn field_of(spec: &EmbedUrlRequestSpec) -> String {
        check(spec).expect_err("spec should be invalid").field
    }

    #[test]
    fn minimal_quicksight_spec_gets_defaults() {
        let valid = check(&qs()).unwrap();
        assert_eq!(valid.region, None);
        assert_eq!(valid.secret_name, "sales");
        assert_eq!(valid.refresh_before, Duration::from_secs(150));
        assert!(!valid.suspend);
        assert_eq!(valid.target.session_length(), Duration::from_secs(36000));
    }

    #[test]
    fn flink_default_refresh_is_half_of_three_minutes() {
        let spec = EmbedUrlRequestSpec {
            flink: Some(Box::new(FlinkSpec {
                application_name: "orders".into(),
                url_type: FlinkUrlType::FlinkDashboardUrl,
                session_expiration_duration_in_seconds: Some(3600),
            })),
            ..Default::default()
        };
        let valid = check(&spec).unwrap();
        assert_eq!(valid.refresh_before, Duration::from_secs(90));
        assert_eq!(valid.target.session_length(), Duration::from_secs(3600));
    }

    #[test]
    fn exactly_one_provider() {
        let none = EmbedUrlRequestSpec::default();
        let err = check(&none).unwrap_err();
        assert_eq!(err.field, "spec");
        assert!(err.message.contains("none is set"), "{err}");
        let mut two = qs();
        two.q_business = Some(Box::new(QBusinessSpec {
            application_id: ID36.into(),
            web_experience_id: ID36.into(),
            session_duration_in_minutes: None,
        }));
        let err = check(&two).unwrap_err();
        assert!(
            err.message
                .contains("spec.quickSight and spec.qBusiness are set"),
            "{err}"
        );
    }

    #[test]
    fn quicksight_constraints() {
        let mut spec = qs();
        spec.quick_sight.as_mut().unwrap().aws_account_id = "12345".into();
        assert_eq!(field_of(&spec), "spec.quickSight.awsAccountId");

        for (entry, ok) in [
            ("/start", true),
            ("/start/dashboards", true),
            ("/dashboards/abc-123", true),
            ("/analyses/x", true),
            ("/start/other", false),
            ("/dashboards/", false),
            ("start", false),
        ] {
            let mut spec = qs();
            spec.quick_sight.as_mut().unwrap().entry_point = Some(entry.into());
            assert_eq!(check(&spec).is_ok(), ok, "{entry}");
        }

        for (minutes, ok) in [(14, false), (15, true), (600, true), (601, false)] {
            let mut spec = qs();
            spec.quick_sight
                .as_mut()
                .unwrap()
                .session_lifetime_in_minutes = Some(minutes);
            let result = check(&spec);
            assert_eq!(result.is_ok(), ok, "{minutes}");
            if let Err(e) = result {
                assert_eq!(e.field, "spec.quickSight.sessionLifetimeInMinutes");
                assert!(e.message.contains("15 to 600"));
            }
        }

        let mut spec = qs();
        spec.quick_sight.as_mut().unwrap().user_arn = Some(String::new());
        assert_eq!(field_of(&spec), "spec.quickSight.userArn");
    }

    #[test]
    fn qbusiness_constraints() {
        let good = QBusinessSpec {
            application_id: ID36.into(),
            web_experience_id: ID36.into(),
            session_duration_in_minutes: Some(30),
        };
        let spec = |qb: QBusinessSpec| EmbedUrlRequestSpec {
            q_business: Some(Box::new(qb)),
            ..Default::default()
        };
        let valid = check(&spec(good.clone())).unwrap();
        assert_eq!(valid.target.session_length(), Duration::from_secs(1800));
        let mut bad = good.clone();
        bad.application_id = "short".into();
        assert_eq!(field_of(&spec(bad)), "spec.qBusiness.applicationId");
        let mut bad = good.clone();
        bad.web_experience_id = format!("-{}", &ID36[1..]);
        assert_eq!(field_of(&spec(bad)), "spec.qBusiness.webExperienceId");
        for (minutes, ok) in [(14, false), (15, true), (60, true), (61, false)] {
            let mut qb = good.clone();
            qb.session_duration_in_minutes = Some(minutes);
            assert_eq!(check(&spec(qb)).is_ok(), ok, "{minutes}");
        }
    }

    #[test]
    fn flink_constraints() {
        let spec = |name: &str, secs: Option<i64>| EmbedUrlRequestSpec {
            flink: Some(Box::new(FlinkSpec {
                application_name: name.into(),
                url_type: FlinkUrlType::ZeppelinUiUrl,
                session_expiration_duration_in_seconds: secs,
            })),
            ..Default::default()
        };
        assert!(check(&spec("orders_v2.prod-1", None)).is_ok());
        assert_eq!(
            field_of(&spec("bad name", None)),
            "spec.flink.applicationName"
        );
        assert_eq!(
            field_of(&spec(&"a".repeat(129), None)),
            "spec.flink.applicationName"
        );
        assert!(check(&spec(&"a".repeat(128), None)).is_ok());
        for (secs, ok) in [(1799, false), (1800, true), (43200, true), (43201, false)] {
            assert_eq!(check(&spec("orders", Some(secs))).is_ok(), ok, "{secs}");
        }
    }

    #[test]
    fn region_and_default_region() {
        let mut spec = qs();
        spec.region = Some("eu-west-1".into());
        let valid = check(&spec).unwrap();
        assert_eq!(
            resolve_region(&valid, Some("us-west-2"), Some("us-east-1")).unwrap(),
            "eu-west-1"
        );
        for region in ["us-gov-west-1", "cn-northwest-1", "eusc-de-east-1"] {
            spec.region = Some(region.into());
            assert!(check(&spec).is_ok(), "{region}");
        }
        spec.region = Some("Europe".into());
        assert_eq!(field_of(&spec), "spec.region");
        // The schema's length bound holds for specs that bypassed it.
        spec.region = Some(format!("eu-{}-1", "a".repeat(40)));
        assert_eq!(field_of(&spec), "spec.region");

        let valid = check(&qs()).unwrap();
        assert_eq!(
            resolve_region(&valid, Some("us-west-2"), Some("us-east-1")).unwrap(),
            "us-west-2"
        );
        assert_eq!(
            resolve_region(&valid, None, Some("us-east-1")).unwrap(),
            "us-east-1"
        );
        let err = resolve_region(&valid, None, None).unwrap_err();
        assert_eq!(err.field, "spec.region");
        assert!(err.message.contains("AWS_REGION"));
    }

    #[test]
    fn secret_name_and_template() {
        let mut spec = qs();
        spec.secret_name = Some("Bad_Name".into());
        assert_eq!(field_of(&spec), "spec.secretName");
        assert_eq!(
            validate(&qs(), "UPPER", &UseByWindows::documented())
                .unwrap_err()
                .field,
            "metadata.name"
        );

        let mut spec = qs();
        spec.secret_template = Some(Box::new(SecretTemplate {
            labels: [(MANAGED_BY_LABEL.to_string(), "someone-else".to_string())].into(),
            ..Default::default()
        }));
        assert_eq!(field_of(&spec), "spec.secretTemplate.labels");

        let mut spec = qs();
        spec.secret_template = Some(Box::new(SecretTemplate {
            annotations: [("embedurl.io/generation".to_string(), "1".to_string())].into(),
            ..Default::default()
        }));
        assert_eq!(field_of(&spec), "spec.secretTemplate.annotations");

        for (key, value, ok) in [
            ("team", "analytics", true),
            ("example.com/team", "a.b-c_d", true),
            ("team", "", true),
            ("-team", "x", false),
            ("team", "has space", false),
            ("a/b/c", "x", false),
        ] {
            let mut spec = qs();
            spec.secret_template = Some(Box::new(SecretTemplate {
                labels: [(key.to_string(), value.to_string())].into(),
                ..Default::default()
            }));
            assert_eq!(check(&spec).is_ok(), ok, "{key}={value}");
        }

        // Annotation keys follow the label key rules; values are free, but not their total size.
        for (key, value, ok) in [
            (
                "example.com/owner",
                "anything at all: spaces, / and :",
                true,
            ),
            ("note", "", true),
            ("has space", "x", false),
            ("Example.com/Owner", "x", true),
            ("example_com/owner", "x", false),
            ("example.com/", "x", false),
            ("note", &"x".repeat(200 * 1024), true),
            ("note", &"x".repeat(256 * 1024), false),
        ] {
            let mut spec = qs();
            spec.secret_template = Some(Box::new(SecretTemplate {
                annotations: [(key.to_string(), value.to_string())].into(),
                ..Default::default()
            }));
            let result = check(&spec);
            assert_eq!(result.is_ok(), ok, "{key}={:.40}", value);
            if let Err(e) = result {
                assert_eq!(e.field, "spec.secretTemplate.annotations");
            }
        }
    }

    #[test]
    fn refresh_before_rules() {
        for (text, expected) in [
            ("150s", Some(150)),
            ("2m", Some(120)),
            ("2m30s", Some(150)),
            ("4m59s", Some(299)),
            ("5m", None),
            ("0s", None),
            ("-1s", None),
            ("10", None),
            ("1d", None),
            // 18 characters that match the CRD's pattern; kube's parser panics on them.
            ("99999999999999999h", None),
        ] {
            let mut spec = qs();
            spec.refresh_before = Some(text.into());
            match (check(&spec), expected) {
                (Ok(v), Some(secs)) => {
                    assert_eq!(v.refresh_before, Duration::from_secs(secs), "{text}")
                }
                (Err(e), None) => assert_eq!(e.field, "spec.refreshBefore", "{text}"),
                (other, _) => panic!("{text}: unexpected {other:?}"),
            }
        }
        // Flink's window is 3 minutes, so 3m is too long there.
        let spec = EmbedUrlRequestSpec {
            flink: Some(Box::new(FlinkSpec {
                application_name: "orders".into(),
                ..Default::default()
            })),
            refresh_before: Some("3m".into()),
            ..Default::default()
        };
        assert_eq!(field_of(&spec), "spec.refreshBefore");
    }

    #[test]
    fn parse_duration_formats() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("2m30s"), Some(Duration::from_secs(150)));
        assert_eq!(
            parse_duration("1h0.5s"),
            Some(Duration::from_millis(3_600_500))
        );
        // Too large for a Duration, and matching the CRD's pattern and length: refused, where
        // kube's parser panics.
        assert_eq!(parse_duration("99999999999999999h"), None);
        assert_eq!(parse_duration(&"9".repeat(400)), None);
    }
}
