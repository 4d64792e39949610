//! Errors of a reconcile that the controller retries with backoff.
//!
//! AWS failures are not here: they are an expected outcome, recorded in the request's status and
//! scheduled by [`crate::schedule::retry_at`]. What reaches the controller as an error is a failed
//! Kubernetes API call, which is always worth retrying.

/// A reconcile that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed while {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// An object could not be turned into a patch (a bug).
    #[error("could not serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { action, source }
    }

    /// Whether retrying soon can help: conflicts, throttling, server errors and transport
    /// failures can; a refused write (403 Forbidden from RBAC, 422 Invalid) needs a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } => matches!(status.code, 409 | 429) || status.code >= 500,
            Error::Kube { .. } => true,
            Error::Serialize { .. } => false,
        }
    }

    /// Whether the API server answered 404: the object is gone.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } if status.code == 404
        )
    }

    /// What the API server said when it refused a call ("403 Forbidden: ..."), or the whole
    /// error for failures without an answer.
    pub fn refusal(&self) -> String {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } => format!("{} {}: {}", status.code, status.reason, status.message),
            other => other.to_string(),
        }
    }

    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::Serialize { .. } => "serialize",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
