//! Kinesis Analytics V2 `CreateApplicationPresignedUrl` (Managed Service for Apache Flink): a
//! dashboard URL that must be used within 3 minutes.
//!
//! The SDK's output type prints the URL in `Debug`, so it is never formatted or logged here.

use super::{AwsCallError, ClientCache, EmbedUrl, Target, UrlProvider};
use aws_sdk_kinesisanalyticsv2::Client;
use aws_sdk_kinesisanalyticsv2::config::Region;
use aws_sdk_kinesisanalyticsv2::types::UrlType;
use futures::future::BoxFuture;

const OPERATION: &str = "CreateApplicationPresignedUrl";

pub struct FlinkProvider {
    clients: ClientCache<Client>,
}

impl FlinkProvider {
    pub fn new(base: aws_config::SdkConfig) -> Self {
        FlinkProvider {
            clients: ClientCache::new(base, |config, region| {
                let conf = aws_sdk_kinesisanalyticsv2::config::Builder::from(config)
                    .region(Region::new(region.to_string()))
                    .retry_config(super::clients::mint_retry_config())
                    .build();
                Client::from_conf(conf)
            }),
        }
    }
}

impl UrlProvider for FlinkProvider {
    fn mint<'a>(
        &'a self,
        target: &'a Target,
        region: &'a str,
    ) -> BoxFuture<'a, Result<EmbedUrl, AwsCallError>> {
        Box::pin(async move {
            let Target::Flink(spec) = target else {
                return Err(AwsCallError::wrong_target(OPERATION, target.service()));
            };
            let output = self
                .clients
                .get(region)
                .create_application_presigned_url()
                .application_name(&spec.application_name)
                .url_type(UrlType::from(spec.url_type.as_str()))
                .set_session_expiration_duration_in_seconds(
                    spec.session_expiration_duration_in_seconds,
                )
                .send()
                .await
                .map_err(|e| AwsCallError::from_sdk(OPERATION, e))?;
            EmbedUrl::from_response(output.authorized_url, OPERATION)
        })
    }
}
