//! # mhc-burn — Manifold-Constrained Hyper-Connections as burn modules
//!
//! mHC (DeepSeek, arXiv 2512.24880), its Hyper-Connections baseline and DeepSeek-V4.1's
//! single-pass chain as [burn](https://burn.dev) modules, in burn tensor ops: they run on every
//! burn backend (Flex on the CPU, wgpu, Vulkan, CUDA, ROCm, Metal; pick one with this crate's
//! features) and train with burn's autodiff. The maths, conventions and parameter layouts are
//! the core crate [`mhc`]'s (SPEC §2–§9), and `from_core` / `to_core` convert both ways, so the
//! core's loaders (`mhc::io::load_deepseek_v4`, safetensors files) feed burn models and trained
//! burn models get the core's diagnostics ([`mhc::gain`]).
//!
//! - [`MhcBlock`] / [`MhcBlockConfig`]: the mHC block (Eq. 3, 7, 8).
//! - [`HcBlock`] / [`HcBlockConfig`]: Hyper-Connections (mHC paper Eq. 5); [`ResidualBlock`].
//! - [`MhcStack`]: chains of blocks under [`Schedule::Current`] (paper, DeepSeek-V4) and
//!   [`Schedule::Shifted`] (DeepSeek-V4.1), returning `x_L` and the last `H_pre`.
//! - [`expand`], [`collapse`], [`LearnedCollapse`] (DeepSeek-V4's `hc_head`), and V4.1's last-pre
//!   read-out [`read_out`].
//! - [`sinkhorn`]: the projector in tensor ops, in the linear domain where it is exact and in the
//!   log domain otherwise (finite for any finite logit).
//!
//! Activations are `[batch, seq, n, C]`; sublayers see `[batch, seq, C]` and are any closure.
//! Mappings are computed in f32 whatever the activations' dtype.
//!
//! ```
//! use burn::prelude::*;
//! use mhc_burn::{MhcBlockConfig, collapse, expand, Collapse};
//!
//! let device = Device::flex().autodiff();
//! let block = MhcBlockConfig::new(4, 16).init(&device);
//! let h = Tensor::<3>::ones([2, 5, 16], &device);
//! let out = block.forward(expand(h, 4), |u| u.tanh());
//! let loss = collapse(out, Collapse::Mean).sum();
//! let grads = loss.backward();
//! assert_eq!(block.phi.val().grad(&grads).unwrap().dims(), [64, 24]);
//! ```
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![doc(test(attr(deny(warnings))))]

mod block;
mod convert;
mod mixing;
mod sinkhorn;
mod stack;
mod streams;

pub use block::{BiasInit, HcBlock, HcBlockConfig, MhcBlock, MhcBlockConfig, ResidualBlock};
pub use convert::{array_from_tensor, tensor_from_array};
pub use mixing::{Mappings, read_out, write_in};
pub use sinkhorn::{LINEAR_SPREAD, sinkhorn};
pub use stack::{MhcStack, Schedule, initial_pre};
pub use streams::{Collapse, LearnedCollapse, collapse, expand};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
