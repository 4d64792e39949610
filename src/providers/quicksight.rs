//! Amazon QuickSight `GetSessionEmbedUrl`: a console session URL, usable once within 5 minutes.

use super::{AwsCallError, ClientCache, EmbedUrl, Target, UrlProvider};
use aws_sdk_quicksight::Client;
use aws_sdk_quicksight::config::Region;
use futures::future::BoxFuture;

const OPERATION: &str = "GetSessionEmbedUrl";

pub struct QuickSightProvider {
    clients: ClientCache<Client>,
}

impl QuickSightProvider {
    pub fn new(base: aws_config::SdkConfig) -> Self {
        QuickSightProvider {
            clients: ClientCache::new(base, |config, region| {
                let conf = aws_sdk_quicksight::config::Builder::from(config)
                    .region(Region::new(region.to_string()))
                    .retry_config(super::clients::mint_retry_config())
                    .build();
                Client::from_conf(conf)
            }),
        }
    }
}

impl UrlProvider for QuickSightProvider {
    fn mint<'a>(
        &'a self,
        target: &'a Target,
        region: &'a str,
    ) -> BoxFuture<'a, Result<EmbedUrl, AwsCallError>> {
        Box::pin(async move {
            let Target::QuickSight(spec) = target else {
                return Err(AwsCallError::wrong_target(OPERATION, target.service()));
            };
            let output = self
                .clients
                .get(region)
                .get_session_embed_url()
                .aws_account_id(&spec.aws_account_id)
                .set_entry_point(spec.entry_point.clone())
                .set_session_lifetime_in_minutes(spec.session_lifetime_in_minutes)
                .set_user_arn(spec.user_arn.clone())
                .send()
                .await
                .map_err(|e| AwsCallError::from_sdk(OPERATION, e))?;
            EmbedUrl::from_response(output.embed_url, OPERATION)
        })
    }
}
