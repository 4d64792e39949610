//! Classification of AWS failures into retryable and permanent.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// How the operator reacts to a failed AWS call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwsErrorKind {
    /// AWS asked us to slow down: retry with backoff, keep the current URL.
    Throttled,
    /// AWS or the network failed (5xx, timeout, connection error): retry with backoff.
    Unavailable,
    /// AWS refused the request (validation, not found, access denied, ...): retrying soon will
    /// not help, so back off for long and tell the user.
    Rejected,
}

impl AwsErrorKind {
    pub fn is_retryable(self) -> bool {
        !matches!(self, AwsErrorKind::Rejected)
    }

    /// The `Ready` condition reason for this kind of failure.
    pub const fn reason(self) -> &'static str {
        match self {
            AwsErrorKind::Throttled => "AwsThrottled",
            AwsErrorKind::Unavailable => "AwsUnavailable",
            AwsErrorKind::Rejected => "AwsRejected",
        }
    }
}

/// A failed AWS call, with what AWS said. Never holds a URL: the APIs only return one on success.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{operation} failed ({kind:?}): {code}: {message}")]
pub struct AwsCallError {
    pub operation: &'static str,
    pub kind: AwsErrorKind,
    /// The AWS error code, such as `AccessDeniedException`, or a description of the transport
    /// failure (`Timeout`, `DispatchFailure`).
    pub code: String,
    pub message: String,
}

/// Error codes AWS uses for throttling across services (the SDK's own list). A service quota
/// exceeded (`ServiceQuotaExceededException`) is not among them: it lasts until someone raises
/// the quota.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// Codes that mean AWS failed internally or the request timed out on its way, whatever the
/// HTTP status says (the timeouts are among the SDK's transient errors, sent with a 400).
const SERVER_FAULT_CODES: &[&str] = &[
    "InternalFailureException",
    "InternalServerException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Classifies an AWS error from its code and HTTP status.
pub fn classify(code: Option<&str>, http_status: Option<u16>) -> AwsErrorKind {
    if let Some(code) = code {
        if THROTTLING_CODES.contains(&code) {
            return AwsErrorKind::Throttled;
        }
        if SERVER_FAULT_CODES.contains(&code) {
            return AwsErrorKind::Unavailable;
        }
    }
    match http_status {
        Some(429) => AwsErrorKind::Throttled,
        // 408 Request Timeout: the request did not arrive in time; sending it again may work.
        Some(408) => AwsErrorKind::Unavailable,
        Some(s) if s >= 500 => AwsErrorKind::Unavailable,
        _ => AwsErrorKind::Rejected,
    }
}

impl AwsCallError {
    /// Converts any SDK error of any service.
    pub fn from_sdk<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (kind, code, message) = match &err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().map(str::to_string);
                let message = ctx.err().message().unwrap_or("no message").to_string();
                (
                    classify(code.as_deref(), Some(status)),
                    code.unwrap_or_else(|| format!("HTTP {status}")),
                    message,
                )
            }
            SdkError::TimeoutError(_) => (
                AwsErrorKind::Unavailable,
                "Timeout".to_string(),
                "the call to AWS timed out".to_string(),
            ),
            SdkError::DispatchFailure(failure) => (
                AwsErrorKind::Unavailable,
                "DispatchFailure".to_string(),
                failure
                    .as_connector_error()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "the request could not be sent".to_string()),
            ),
            SdkError::ResponseError(_) => (
                AwsErrorKind::Unavailable,
                "ResponseError".to_string(),
                "the response from AWS could not be read".to_string(),
            ),
            // Construction failures include missing credentials or region, which can come right
            // (an IMDS or web-identity hiccup), so they are retried with backoff.
            SdkError::ConstructionFailure(_) => (
                AwsErrorKind::Unavailable,
                "ConstructionFailure".to_string(),
                source_chain(&err),
            ),
            _ => (
                AwsErrorKind::Unavailable,
                "Unknown".to_string(),
                source_chain(&err),
            ),
        };
        AwsCallError {
            operation,
            kind,
            code,
            message,
        }
    }

    /// A provider was handed another service's target. The reconciler picks the provider from
    /// the target, so this is a bug; it is reported instead of panicking the reconcile task.
    pub fn wrong_target(operation: &'static str, service: super::Service) -> Self {
        AwsCallError {
            operation,
            kind: AwsErrorKind::Rejected,
            code: "WrongProvider".to_string(),
            message: format!("internal error: a {service} target reached the {operation} provider"),
        }
    }

    /// A successful response that carried no URL: AWS broke its contract, try again later.
    pub fn missing_url(operation: &'static str) -> Self {
        Self::empty_answer(operation, "a URL")
    }

    /// AWS answered `operation` without `what` it answers with.
    pub fn empty_answer(operation: &'static str, what: &str) -> Self {
        AwsCallError {
            operation,
            kind: AwsErrorKind::Unavailable,
            code: "EmptyResponse".to_string(),
            message: format!("AWS answered without {what}"),
        }
    }
}

/// The error and its sources in one line, e.g. "failed to construct request: no credentials".
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_codes_and_429_are_throttled() {
        assert_eq!(
            classify(Some("ThrottlingException"), Some(400)),
            AwsErrorKind::Throttled
        );
        assert_eq!(
            classify(Some("TooManyRequestsException"), Some(400)),
            AwsErrorKind::Throttled
        );
        assert_eq!(classify(None, Some(429)), AwsErrorKind::Throttled);
    }

    #[test]
    fn server_faults_are_unavailable() {
        assert_eq!(
            classify(Some("InternalFailureException"), Some(500)),
            AwsErrorKind::Unavailable
        );
        assert_eq!(
            classify(Some("InternalServerException"), Some(500)),
            AwsErrorKind::Unavailable
        );
        assert_eq!(classify(None, Some(503)), AwsErrorKind::Unavailable);
        // Timeouts on the way in are transient too, as the SDK counts them.
        assert_eq!(
            classify(Some("RequestTimeoutException"), Some(400)),
            AwsErrorKind::Unavailable
        );
        assert_eq!(
            classify(Some("RequestTimeout"), Some(400)),
            AwsErrorKind::Unavailable
        );
        assert_eq!(classify(None, Some(408)), AwsErrorKind::Unavailable);
    }

    #[test]
    fn client_errors_are_rejected() {
        for code in [
            "AccessDeniedException",
            "InvalidParameterValueException",
            "ResourceNotFoundException",
            "QuickSightUserNotFoundException",
            "UnsupportedUserEditionException",
            "SessionLifetimeInMinutesInvalidException",
            "ValidationException",
            "InvalidArgumentException",
            "ResourceInUseException",
            "ServiceQuotaExceededException",
        ] {
            assert_eq!(
                classify(Some(code), Some(400)),
                AwsErrorKind::Rejected,
                "{code}"
            );
        }
        assert!(!AwsErrorKind::Rejected.is_retryable());
        assert!(AwsErrorKind::Throttled.is_retryable());
    }
}
