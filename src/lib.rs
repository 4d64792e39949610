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
