//! Content-defined chunks: how cardeploy moves an artifact (an OS rootfs image, a container
//! layer) to a car while sending only what the car lacks.
//!
//! - [`chunk_file`] cuts bytes with FastCDC ([`Params`] are fixed and recorded in every index)
//!   and names each chunk by its sha256 ([`Digest`]).
//! - A [`ChunkIndex`] lists an artifact's chunks in order; it is content-addressed itself.
//! - A [`Store`] keeps chunks, zstd-compressed, written atomically and verified on every read,
//!   in [`blobs::Blobs`] (files, or the twin's object storage); kept indexes pin chunks,
//!   [`Store::gc`] removes the rest.
//! - A [`Seed`] is data the car already has (its running rootfs slot, an older layer): it is
//!   chunked with the same parameters, so identical regions are found wherever they moved.
//! - A [`Plan`] says where each chunk of a target comes from: the store, a seed, or the network.
//! - [`transit`] encodes the chunks that travel: zstd whole, or zstd with a reference taken from
//!   the base artifact the car holds (the bytes between the nearest chunks that did match), so a
//!   small change inside a chunk costs a few bytes, not the whole chunk.
//! - [`assemble`] streams the target out of store and seeds, one chunk in memory at a time, and
//!   verifies the artifact digest before the file appears under its name.
//!
//! Everything here is synchronous and does blocking I/O: async callers use `spawn_blocking`.
//! Tests: `cargo test -p cardeploy-chunks`; the size/memory comparison with other delta tools is
//! `cargo xtask bench delta`.

mod assemble;
pub mod atomic;
pub mod blobs;
mod chunker;
mod digest;
mod error;
mod index;
mod plan;
mod seed;
mod store;
pub mod transit;

pub use assemble::{Assembled, Assembler, assemble};
pub use chunker::{ChunkCut, chunk_bytes, chunk_file, chunk_reader};
pub use digest::{Digest, Sha256};
pub use error::Error;
pub use index::{ChunkIndex, ChunkRef, INDEX_HEADER_BYTES, Params};
pub use plan::{Plan, PlanStats, Source};
pub use seed::Seed;
pub use store::{Store, StoreStats};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
