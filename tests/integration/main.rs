//! Integration tests: the real controller, the real AWS SDK clients and the real binary against
//! the stand-ins in tests/support. One test binary on purpose: each extra one relinks the AWS SDK.

#[path = "../support/mod.rs"]
mod support;

mod binary;
mod controller;
mod crd;
mod faults;
mod tenancy;

use embed_url_operator::crd::{EmbedUrlRequestSpec, FlinkSpec, FlinkUrlType, QBusinessSpec};

pub const ID36: &str = "a1b2c3d4-1111-2222-3333-444455556666";

pub use support::quick_sight;

pub fn q_business() -> EmbedUrlRequestSpec {
    EmbedUrlRequestSpec {
        q_business: Some(Box::new(QBusinessSpec {
            application_id: ID36.into(),
            web_experience_id: ID36.replace('a', "b"),
            session_duration_in_minutes: Some(30),
        })),
        ..Default::default()
    }
}

pub fn flink() -> EmbedUrlRequestSpec {
    EmbedUrlRequestSpec {
        flink: Some(Box::new(FlinkSpec {
            application_name: "orders".into(),
            url_type: FlinkUrlType::FlinkDashboardUrl,
            session_expiration_duration_in_seconds: Some(3600),
        })),
        ..Default::default()
    }
}
