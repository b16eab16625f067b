//! The per-call constants of the mapping kernels, one struct per connection.
//!
//! They are `pub` in this private module: [`Connection`](crate::Connection) names them as its
//! kernel type, which a public trait may do only with nominally public types, and nothing outside
//! the crate can reach them. Their `MappingKernel` impls are in
//! `mappings`.

use crate::SinkhornKnopp;

/// Per-call constants of the mHC mappings (Eq. 7–8).
pub struct MhcKernel<'a, F> {
    pub n: usize,
    pub c: usize,
    /// `[n·C, n² + 2n]`, row-major.
    pub phi: &'a [F],
    pub alpha: [F; 3],
    pub bias: &'a [F],
    pub rms_eps: F,
    pub pre_eps: F,
    pub sinkhorn: SinkhornKnopp,
}

/// Per-call constants of HC's mappings (mHC paper Eq. 5).
pub struct HcKernel<'a, F> {
    pub n: usize,
    pub c: usize,
    /// `[C, n + 2]`, row-major: columns `theta_pre`, `theta_post`, `theta_res[0..n]`.
    pub theta: &'a [F],
    pub alpha: [F; 3],
    pub b_pre: &'a [F],
    pub b_post: &'a [F],
    pub b_res: &'a [F],
    pub rms_eps: F,
}
