//! Native core of `aumai-fedtrain`: the two hot paths of the design contract.
//!
//! - [`hash::canonical_hash`]: SHA-256 of the canonical JSON text of a gradient map, exactly
//!   `sha256(json.dumps(plain(g), sort_keys=True))`, streamed, never materialised.
//! - [`average::weighted_average`]: per-key weighted mean over many nodes, in one fused
//!   float64 pass, threaded for large inputs.
//!
//! The core is plain Rust; the optional `python` feature adds the PyO3 module
//! `aumai_fedtrain._native` on top of it.

pub mod array;
pub mod average;
pub mod error;
pub mod hash;
pub mod key;
pub mod magnitude;
pub mod parallel;
pub mod robust;
mod simd;
pub mod wire;

#[cfg(feature = "python")]
mod python;
