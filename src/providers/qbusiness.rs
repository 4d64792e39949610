//! Amazon Q Business `CreateAnonymousWebExperienceUrl`: an anonymous web experience URL, usable
//! once within 5 minutes.
//!
//! The SDK's output type prints the URL in `Debug`, so it is never formatted or logged here.

use super::{AwsCallError, ClientCache, EmbedUrl, Target, UrlProvider};
use aws_sdk_qbusiness::Client;
use aws_sdk_qbusiness::config::Region;
use futures::future::BoxFuture;

const OPERATION: &str = "CreateAnonymousWebExperienceUrl";

pub struct QBusinessProvider {
    clients: ClientCache<Client>,
}

impl QBusinessProvider {
    pub fn new(base: aws_config::SdkConfig) -> Self {
        QBusinessProvider {
            clients: ClientCache::new(base, |config, region| {
                let conf = aws_sdk_qbusiness::config::Builder::from(config)
                    .region(Region::new(region.to_string()))
                    .retry_config(super::clients::mint_retry_config())
                    .build();
                Client::from_conf(conf)
            }),
        }
    }
}

impl UrlProvider for QBusinessProvider {
    fn mint<'a>(
        &'a self,
        target: &'a Target,
        region: &'a str,
    ) -> BoxFuture<'a, Result<EmbedUrl, AwsCallError>> {
        Box::pin(async move {
            let Target::QBusiness(spec) = target else {
                return Err(AwsCallError::wrong_target(OPERATION, target.service()));
            };
            // The schema bounds the duration to 15-60, so the conversion cannot fail for a
            // validated spec; an out-of-range value is sent as-is for AWS to reject.
            let duration = spec
                .session_duration_in_minutes
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX));
            let output = self
                .clients
                .get(region)
                .create_anonymous_web_experience_url()
                .application_id(&spec.application_id)
                .web_experience_id(&spec.web_experience_id)
                .set_session_duration_in_minutes(duration)
                .send()
                .await
                .map_err(|e| AwsCallError::from_sdk(OPERATION, e))?;
            EmbedUrl::from_response(output.anonymous_url, OPERATION)
        })
    }
}
