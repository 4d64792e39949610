//! How the operator builds its Kubernetes client and its AWS configuration: the timeouts and
//! settings every request goes through. Shared with the floor benchmark (benches/floor.rs), so
//! that it measures the clients exactly as the operator configures them.

use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader};
use std::time::Duration;

/// The Kubernetes client for `config`, each request bounded by `timeout` until its answer
/// starts, and each read from a connection by `read_timeout`.
pub fn kube_client(
    mut config: kube::Config,
    timeout: Duration,
    read_timeout: Duration,
) -> Result<kube::Client, String> {
    config.read_timeout = Some(read_timeout);
    // Counted from each request sent, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| format!("could not build the Kubernetes client: {e}"))?
        .with_layer(&tower::timeout::TimeoutLayer::new(timeout))
        .build();
    Ok(client)
}

/// The standard AWS chain: env, profile, web identity (IRSA), EKS Pod Identity, IMDS; and the
/// AWS_ENDPOINT_URL_* overrides. Timeouts keep a stuck call from holding a reconcile slot.
/// They also bound a stalled answer (a few hundred bytes of JSON), so the SDK's stalled-stream
/// protection, meant for large bodies, is off: it re-armed a timer on every poll of a response
/// body, which woke the runtime's I/O driver once per call.
pub fn aws_config_loader() -> ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest())
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
}
