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

    /// Whether the API server refused to create an object because its namespace is being
    /// deleted (the NamespaceLifecycle admission plugin's 403, with the `NamespaceTerminating`
    /// cause): nothing can be created there any more, and everything in it is about to go.
    pub fn is_namespace_terminating(&self) -> bool {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } if status.code == 403 => status.details.as_ref().is_some_and(|details| {
                details
                    .causes
                    .iter()
                    .any(|cause| cause.reason == "NamespaceTerminating")
            }),
            _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;
    use kube::core::response::{StatusCause, StatusDetails};

    fn forbidden(causes: Vec<StatusCause>) -> Error {
        let status = Status::failure("secrets \"x\" is forbidden", "Forbidden")
            .with_code(403)
            .with_details(StatusDetails {
                name: "x".into(),
                group: String::new(),
                kind: "secrets".into(),
                uid: String::new(),
                causes,
                retry_after_seconds: 0,
            });
        Error::Kube {
            action: "writing the Secret",
            source: kube::Error::Api(status.boxed()),
        }
    }

    #[test]
    fn only_a_403_with_the_namespace_terminating_cause_means_the_namespace_is_going() {
        let terminating = StatusCause {
            reason: "NamespaceTerminating".into(),
            message: "namespace team-a is being terminated".into(),
            field: "metadata.namespace".into(),
        };
        assert!(forbidden(vec![terminating]).is_namespace_terminating());
        // RBAC or an admission policy: a person must act, and the request must say so.
        assert!(!forbidden(vec![]).is_namespace_terminating());
        assert!(!forbidden(vec![]).is_retryable());
    }
}
