//! The AWS APIs that mint sign-in URLs, one module per service behind one trait.
//!
//! Each provider turns a validated spec into one AWS call and returns the URL as an [`EmbedUrl`],
//! a type that cannot be printed. Errors are classified here, once, into retryable and permanent.

mod clients;
mod error;
pub mod flink;
pub mod qbusiness;
pub mod quicksight;

pub use clients::ClientCache;
pub use error::{AwsCallError, AwsErrorKind, classify};

use crate::crd::{FlinkSpec, QBusinessSpec, QuickSightSpec};
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The three AWS services the operator mints URLs from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    QuickSight,
    QBusiness,
    Flink,
}

impl Service {
    /// Name written to `status.service`, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Service::QuickSight => "QuickSight",
            Service::QBusiness => "QBusiness",
            Service::Flink => "Flink",
        }
    }

    /// The service named `name` in `status.service` (the inverse of [`Service::name`]).
    pub fn from_name(name: &str) -> Option<Service> {
        [Service::QuickSight, Service::QBusiness, Service::Flink]
            .into_iter()
            .find(|service| service.name() == name)
    }

    /// The AWS operation that mints this service's URL.
    pub fn operation(self) -> &'static str {
        match self {
            Service::QuickSight => "GetSessionEmbedUrl",
            Service::QBusiness => "CreateAnonymousWebExperienceUrl",
            Service::Flink => "CreateApplicationPresignedUrl",
        }
    }

    /// How long after the call a URL can still be used, as documented by AWS (the APIs return
    /// only the URL, never its expiry).
    pub fn documented_use_by_window(self) -> Duration {
        match self {
            Service::QuickSight | Service::QBusiness => Duration::from_secs(5 * 60),
            Service::Flink => Duration::from_secs(3 * 60),
        }
    }

    /// Length of the session a URL opens when the spec leaves it out (AWS defaults).
    pub fn default_session_length(self) -> Duration {
        match self {
            // GetSessionEmbedUrl: "valid for 10 hours" by default (SessionLifetimeInMinutes 15-600).
            Service::QuickSight => Duration::from_secs(600 * 60),
            // CreateAnonymousWebExperienceUrl: sessionDurationInMinutes 15-60; AWS applies the
            // maximum, 60 minutes, when it is left out.
            Service::QBusiness => Duration::from_secs(60 * 60),
            // CreateApplicationPresignedUrl: "valid for twelve hours" by default.
            Service::Flink => Duration::from_secs(12 * 60 * 60),
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to mint: the provider block of a validated spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    QuickSight(QuickSightSpec),
    QBusiness(QBusinessSpec),
    Flink(FlinkSpec),
}

impl Target {
    pub fn service(&self) -> Service {
        match self {
            Target::QuickSight(_) => Service::QuickSight,
            Target::QBusiness(_) => Service::QBusiness,
            Target::Flink(_) => Service::Flink,
        }
    }

    /// Length of the session the URL opens: the spec's value or the service default.
    pub fn session_length(&self) -> Duration {
        let explicit = match self {
            Target::QuickSight(s) => s.session_lifetime_in_minutes.map(|m| m * 60),
            Target::QBusiness(s) => s.session_duration_in_minutes.map(|m| m * 60),
            Target::Flink(s) => s.session_expiration_duration_in_seconds,
        };
        explicit
            .and_then(|secs| u64::try_from(secs).ok())
            .map(Duration::from_secs)
            .unwrap_or_else(|| self.service().default_session_length())
    }
}

/// A freshly minted sign-in URL. It is a bearer credential: `Debug` redacts it and there is no
/// `Display`, so it cannot end up in a log line, an event or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct EmbedUrl(String);

impl EmbedUrl {
    pub fn new(url: String) -> Self {
        EmbedUrl(url)
    }

    /// The URL in an AWS answer; an answer without one is AWS breaking its contract, reported as
    /// a retryable failure of `operation`.
    pub fn from_response(
        url: Option<String>,
        operation: &'static str,
    ) -> Result<Self, AwsCallError> {
        url.filter(|u| !u.is_empty())
            .map(EmbedUrl)
            .ok_or_else(|| AwsCallError::missing_url(operation))
    }

    /// `text` (say, an API server's refusal that may quote the object it refused) with this URL,
    /// as is, JSON-escaped or base64-encoded as in a Secret's data, replaced by `[URL]`.
    pub fn redact_in(&self, text: &str) -> String {
        use base64::Engine;
        let mut redacted = text.replace(&self.0, "[URL]");
        let encoded = base64::engine::general_purpose::STANDARD.encode(&self.0);
        redacted = redacted.replace(&encoded, "[URL]");
        if let Ok(quoted) = serde_json::to_string(&self.0) {
            let escaped = &quoted[1..quoted.len() - 1];
            // Go's encoder escapes '&', '<' and '>' too; serde_json does not.
            let go_escaped = escaped
                .replace('&', "\\u0026")
                .replace('<', "\\u003c")
                .replace('>', "\\u003e");
            for form in [escaped, go_escaped.as_str()] {
                if form != self.0 {
                    redacted = redacted.replace(form, "[URL]");
                }
            }
        }
        redacted
    }

    /// The URL itself, for the one place that needs it: the Secret's data.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EmbedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EmbedUrl(<redacted>)")
    }
}

/// Mints URLs for one AWS service.
pub trait UrlProvider: Send + Sync {
    /// Calls AWS once in `region` (one HTTP attempt: see [`clients::mint_retry_config`]).
    fn mint<'a>(
        &'a self,
        target: &'a Target,
        region: &'a str,
    ) -> BoxFuture<'a, Result<EmbedUrl, AwsCallError>>;
}

/// One provider per service, each with its own client per region, built once and reused.
#[derive(Clone)]
pub struct Providers {
    pub quick_sight: Arc<dyn UrlProvider>,
    pub q_business: Arc<dyn UrlProvider>,
    pub flink: Arc<dyn UrlProvider>,
}

impl Providers {
    /// Real AWS providers built from a shared SDK config (credentials chain, retry and timeout
    /// settings, and any `AWS_ENDPOINT_URL_*` overrides the config loaded).
    pub fn from_sdk_config(config: &aws_config::SdkConfig) -> Self {
        Providers {
            quick_sight: Arc::new(quicksight::QuickSightProvider::new(config.clone())),
            q_business: Arc::new(qbusiness::QBusinessProvider::new(config.clone())),
            flink: Arc::new(flink::FlinkProvider::new(config.clone())),
        }
    }

    pub fn for_service(&self, service: Service) -> &dyn UrlProvider {
        match service {
            Service::QuickSight => self.quick_sight.as_ref(),
            Service::QBusiness => self.q_business.as_ref(),
            Service::Flink => self.flink.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_redacted_as_is_and_json_escaped() {
        let url = EmbedUrl::new("https://x.example/embed?code=a&b=<c>/d".to_string());
        for text in [
            "refused https://x.example/embed?code=a&b=<c>/d here",
            r#"refused {"url":"https://x.example/embed?code=a&b=<c>/d"}"#,
            r#"refused {"url":"https://x.example/embed?code=a\u0026b=\u003cc\u003e/d"}"#,
        ] {
            let redacted = url.redact_in(text);
            assert!(redacted.contains("[URL]"), "{text} -> {redacted}");
            assert!(!redacted.contains("code=a"), "{text} -> {redacted}");
        }
        // As a Secret's data holds it (what a webhook quoting the object would show).
        let in_data =
            r#"denied: {"data":{"url":"aHR0cHM6Ly94LmV4YW1wbGUvZW1iZWQ/Y29kZT1hJmI9PGM+L2Q="}}"#;
        assert_eq!(
            url.redact_in(in_data),
            r#"denied: {"data":{"url":"[URL]"}}"#
        );
        assert_eq!(url.redact_in("nothing to hide"), "nothing to hide");
    }
}
