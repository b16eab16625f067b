//! # mhc — Manifold-Constrained Hyper-Connections for Rust
//!
//! mHC (Xie, Wei, Cao et al., DeepSeek, arXiv 2512.24880) widens a network's residual stream
//! into `n` parallel streams and mixes them, per token, through a doubly-stochastic matrix
//! `H_res` produced by Sinkhorn-Knopp iterations. Products of doubly-stochastic matrices stay
//! doubly stochastic, so deep stacks keep the expressiveness of Hyper-Connections without their
//! exploding signal.
//!
//! This crate provides the paper's exact conventions (see the crate's `SPEC`), hand-written and
//! gradient-checked backward passes, and CPU kernels designed for memory traffic.
//!
//! - [`SinkhornKnopp`]: the projector onto the Birkhoff polytope (paper Eq. 9), forward and VJP.
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![doc(test(attr(deny(warnings))))]

pub mod error;
mod float;
mod par;
pub mod sinkhorn;

pub use error::{Error, Result};
pub use float::Float;
pub use sinkhorn::SinkhornKnopp;

/// The `rand` crate this crate is built against, re-exported so that callers pass an RNG of the
/// same version.
pub use rand;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
