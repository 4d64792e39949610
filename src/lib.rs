//! embed-url-operator: keeps short-lived AWS sign-in URLs (QuickSight, Amazon Q Business,
//! Managed Flink) fresh in Kubernetes Secrets.
//!
//! Module map: [`crd`] is the API; [`validation`] checks a spec; [`policy`] decides who may
//! mint what, and [`identity`] with which AWS credentials; [`providers`] calls AWS, paced by
//! [`ratelimit`]; [`schedule`] decides when; [`secret`] renders and reads the Secret,
//! [`secret_writer`] writes it and [`secret_cache`] remembers what was written; [`status`]
//! computes the status and [`status_writer`] writes it, with [`events`] on transitions;
//! [`reconciler`] ties them together for one object; [`work_queue`] decides what is reconciled
//! next; [`controller`] runs the watches; [`leader`] elects one active replica; [`telemetry`]
//! and [`http`] are the operator's logs, metrics and probes.

/// The type-level half of a `kube::Resource` impl for a wrapper of `$wrapped` (see
/// [`guard::Guarded`], [`lean::Lean`]): the same kind, the same URLs, the same Accept header.
/// `meta` and `meta_mut` are the wrapper's own.
macro_rules! same_resource_as {
    ($wrapped:ident) => {
        type DynamicType = $wrapped::DynamicType;
        type Scope = $wrapped::Scope;

        fn metadata_api() -> bool {
            $wrapped::metadata_api()
        }

        fn kind(dt: &Self::DynamicType) -> ::std::borrow::Cow<'_, str> {
            $wrapped::kind(dt)
        }

        fn group(dt: &Self::DynamicType) -> ::std::borrow::Cow<'_, str> {
            $wrapped::group(dt)
        }

        fn version(dt: &Self::DynamicType) -> ::std::borrow::Cow<'_, str> {
            $wrapped::version(dt)
        }

        fn api_version(dt: &Self::DynamicType) -> ::std::borrow::Cow<'_, str> {
            $wrapped::api_version(dt)
        }

        fn plural(dt: &Self::DynamicType) -> ::std::borrow::Cow<'_, str> {
            $wrapped::plural(dt)
        }

        fn url_path(dt: &Self::DynamicType, namespace: Option<&str>) -> String {
            $wrapped::url_path(dt, namespace)
        }
    };
}

pub mod clients;
pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod guard;
pub mod http;
pub mod identity;
pub mod leader;
pub mod lean;
pub mod policy;
pub mod providers;
pub mod ratelimit;
pub mod recent;
pub mod reconciler;
pub mod schedule;
pub mod secret;
pub mod secret_cache;
pub mod secret_writer;
pub mod status;
pub mod status_writer;
pub mod telemetry;
pub mod validation;
pub mod work_queue;
