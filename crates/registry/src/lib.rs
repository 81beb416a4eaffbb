//! The car's container registry: the pull side of the OCI distribution spec (`/v2/`, manifests
//! by tag and digest with content negotiation, blobs with `HEAD` and `Range`, tag lists, the
//! spec's JSON errors), read-only, served from blobs the caller already holds on disk — on the
//! car, the artifacts the agent fetched. k3s's containerd pulls from it through the mirror the
//! Yocto layer writes into `/etc/rancher/k3s/registries.yaml` (`127.0.0.1:5000` by default).
//!
//! Trust: manifests are hashed when the catalog is built and kept in memory; configs and layers
//! are hashed before they are first served, and again whenever their file changes, so a blob
//! damaged on disk is refused (and reported by [`Registry::take_damaged`]) instead of served.
//!
//! Written here rather than embedding CNCF Distribution or zot: those are Go daemons with push,
//! garbage collection and storage drivers a car does not need; this is a few hundred lines over
//! axum, and serves straight from the agent's files without a copy.
//!
//! Tests: unit tests for the parsers; `tests/http.rs` for the endpoints and their errors;
//! `tests/clients.rs` pulls with skopeo and containerd's `ctr`, clients nobody here wrote.

mod catalog;
mod error;
mod http;
pub mod manifest;
pub mod request;
mod verify;

pub use catalog::{BlobFile, Catalog, Manifest, Repository};
pub use error::Error;
pub use http::{Registry, serve};
pub use manifest::Platform;
