//! embed-url-operator: keeps short-lived AWS sign-in URLs (QuickSight, Amazon Q Business,
//! Managed Flink) fresh in Kubernetes Secrets.
//!
//! Module map: [`crd`] is the API; [`validation`] checks a spec; [`providers`] calls AWS;
//! [`schedule`] decides when; [`secret`] renders and reads the Secret; [`reconciler`] ties them
//! together for one object, and [`events`] reports its transitions; [`work_queue`] decides what
//! is reconciled next; [`controller`] runs the watches; [`telemetry`] and [`http`] are the
//! operator's logs, metrics and probes.

pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod guard;
pub mod http;
pub mod identity;
pub mod leader;
pub mod policy;
pub mod providers;
pub mod ratelimit;
pub mod recent;
pub mod reconciler;
pub mod schedule;
pub mod secret;
pub mod secret_cache;
pub mod status;
pub mod telemetry;
pub mod validation;
pub mod work_queue;
