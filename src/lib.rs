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
//! - [`MhcBlock`]: the mHC block (Eq. 3, 7, 8), split into a fused read-out (mappings and the
//!   sublayer input) and a write-in, so that any sublayer from any framework plugs in between.
//! - [`HcBlock`] and [`ResidualBlock`]: the baselines, behind the same calling convention.
//!   `MhcBlock` and `HcBlock` are one type, [`Block`], over the [`Connection`] ([`Mhc`] or
//!   [`Hc`]): one implementation of the read-out, write-in, backward and the [`mixing`]
//!   kernels, with only the mappings differing.
//! - [`MhcStack`]: chains of blocks under the paper's [`Schedule::Current`] and DeepSeek-V4.1's
//!   single-pass [`Schedule::Shifted`] (SPEC §8), with a fused seam kernel between blocks
//!   ([`MhcBlock::write_in_seam_into`]) and the cross-block gradient of `H_pre`.
//! - [`gain`]: the paper's Amax gain diagnostics, per layer and composite.
//! - [`streams::expand`] / [`streams::collapse`]: entering and leaving the `n` streams;
//!   [`streams::LearnedCollapse`] for DeepSeek-V4's learned head.
//! - [`Mlp`]: a reference sublayer with a hand-written backward pass, for examples and benches.
//! - `io` (feature `safetensors`, on by default): weights in safetensors files, ours and
//!   DeepSeek-V4's `hc_*` layout.
//!
//! # Features
//!
//! - `rayon` (default): parallel over fixed chunks of tokens; results are bitwise identical
//!   with any number of threads and with the feature off.
//! - `safetensors` (default): the `io` module.
//!
//! # Training flow
//!
//! `forward_train` returns the block output and the sublayer output `y`; keep `x` and `y`.
//! `backward(x, y, ∂out, vjp)` recomputes the mappings and `u`, calls `vjp(u, ∂y) → ∂u` once,
//! and returns `∂x` and the parameters' gradients. When the sublayer's backward lives in
//! another framework, call [`MhcBlock::write_in_backward`] (gives `u` and `∂y` in a [`Tape`]),
//! run that backward, then [`MhcBlock::read_out_backward`] with `∂u`.
//!
//! In a training loop, use the `*_into` forms ([`MhcBlock::forward_train_into`],
//! [`MhcBlock::backward_into`], and the two halves') with one [`Tape`] per block and
//! caller-provided `out` and `∂x`: after the first step they allocate nothing proportional to
//! the number of tokens (fresh `[T, n, C]` buffers cost page faults).
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![doc(test(attr(deny(warnings))))]

mod backward;
mod block;
pub mod error;
mod float;
pub mod gain;
mod hc;
#[cfg(feature = "safetensors")]
pub mod io;
mod kernel;
mod linalg;
pub mod mappings;
pub mod mixing;
mod mlp;
mod par;
mod reduce;
mod residual;
mod seam;
pub mod sinkhorn;
mod stack;
pub mod streams;

pub use backward::{ChainLink, Tape};
pub use block::{BiasInit, Block, Connection, Mhc, MhcBlock, MhcConfig, MhcParams, PrevBlock};
pub use error::{Error, Result};
pub use float::Float;
pub use hc::{Hc, HcBlock, HcConfig, HcParams};
pub use mappings::Mappings;
pub use mlp::{Mlp, MlpGrads};
pub use residual::ResidualBlock;
pub use sinkhorn::SinkhornKnopp;
pub use stack::{MhcStack, Schedule, StackTape, StackWorkspace, Stage, initial_pre};
pub use streams::{Collapse, collapse, expand};

/// The `rand` crate this crate is built against, re-exported so that callers pass an RNG of the
/// same version.
pub use rand;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
