//! Entering and leaving the widened residual stream (SPEC §3): replicate once at the bottom of
//! the network, reduce once at the top.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

use crate::Float;
use crate::error::{Error, Result, checked_size};

/// How [`collapse`] reduces `n` streams to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Collapse {
    /// `Σ_i x[i]`.
    Sum,
    /// `(1/n) Σ_i x[i]`.
    #[default]
    Mean,
}

/// Replicates each token into `n` identical streams.
///
/// # Shapes
///
/// - `h`: `[T, C]`; returns `[T, n, C]`
///
/// # Errors
///
/// [`Error::InvalidDimension`] if `n == 0`; [`Error::SizeOverflow`] if `T·n·C` overflows.
///
/// # Examples
///
/// ```
/// let x = mhc::streams::expand(ndarray::array![[1.0, 2.0f32]].view(), 3)?;
/// assert_eq!(x.shape(), &[1, 3, 2]);
/// assert_eq!(x[[0, 2, 1]], 2.0);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn expand<F: Float>(h: ArrayView2<F>, n: usize) -> Result<Array3<F>> {
    if n == 0 {
        return Err(Error::InvalidDimension {
            what: "streams",
            got: 0,
        });
    }
    let (t, c) = h.dim();
    checked_size("expanded streams", &[t, n, c])?;
    Ok(h.insert_axis(Axis(1))
        .broadcast((t, n, c))
        .expect("broadcast 1 → n")
        .to_owned())
}

/// Reduces `n` streams to one.
///
/// # Shapes
///
/// - `x`: `[T, n, C]`; returns `[T, C]`
///
/// # Errors
///
/// [`Error::Empty`] if `n == 0`.
///
/// # Examples
///
/// ```
/// use mhc::streams::{collapse, expand, Collapse};
/// let h = ndarray::array![[1.0, -2.0f64]];
/// let x = expand(h.view(), 4)?;
/// assert_eq!(collapse(x.view(), Collapse::Mean)?, h);
/// assert_eq!(collapse(x.view(), Collapse::Sum)?, h * 4.0);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn collapse<F: Float>(x: ArrayView3<F>, how: Collapse) -> Result<Array2<F>> {
    let n = x.shape()[1];
    if n == 0 {
        return Err(Error::Empty { what: "streams" });
    }
    let s = x.sum_axis(Axis(1));
    Ok(match how {
        Collapse::Sum => s,
        Collapse::Mean => s / F::from_usize(n),
    })
}

/// A learned collapse, DeepSeek-V4's `hc_head`: `out_t = Σ_j w_t[j] x_t[j]` with
/// `w_t = σ(scale · (vec(x_t) · φ) / r_t + bias) + pre_eps`, `r_t` the token's RMS — the read-out
/// of an mHC block with only its `H_pre` part.
///
/// # Shapes
///
/// - `phi`: `[n·C, n]`; `bias`: `[n]`
///
/// # Examples
///
/// ```
/// use ndarray::{Array1, Array2, Array3};
/// let head = mhc::streams::LearnedCollapse::new(2, 3, Array2::<f32>::zeros((6, 2)), 1.0, Array1::zeros(2), 1e-6, 0.0)?;
/// let out = head.collapse(Array3::ones((4, 2, 3)).view())?;
/// assert!(out.iter().all(|&v| v == 1.0)); // weights σ(0) = ½ on two equal streams
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedCollapse<F> {
    streams: usize,
    dim: usize,
    phi: Array2<F>,
    scale: F,
    bias: ndarray::Array1<F>,
    rms_eps: f64,
    pre_eps: f64,
}

impl<F: Float> LearnedCollapse<F> {
    /// A learned collapse of `streams` streams of `dim` channels.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDimension`] for zero sizes; [`Error::ShapeMismatch`] for `phi` or `bias`;
    /// [`Error::InvalidEpsilon`] for `rms_eps ≤ 0` or `pre_eps < 0`; [`Error::NonFinite`] for a
    /// non-finite parameter.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        streams: usize,
        dim: usize,
        phi: Array2<F>,
        scale: F,
        bias: ndarray::Array1<F>,
        rms_eps: f64,
        pre_eps: f64,
    ) -> Result<Self> {
        for (what, v) in [("streams", streams), ("dim", dim)] {
            if v == 0 {
                return Err(Error::InvalidDimension { what, got: 0 });
            }
        }
        let nc = checked_size("phi", &[streams, dim])?;
        crate::error::check_same("phi", &[nc, streams], phi.shape())?;
        crate::error::check_same("bias", &[streams], bias.shape())?;
        crate::error::positive("rms_eps", rms_eps)?;
        crate::error::non_negative("pre_eps", pre_eps)?;
        let phi = phi.as_standard_layout().into_owned();
        crate::error::check_finite("phi", 1, phi.as_slice().expect("standard"))?;
        crate::error::check_finite("scale", 1, &[scale])?;
        let bias = bias.as_standard_layout().into_owned();
        crate::error::check_finite("bias", 1, bias.as_slice().expect("standard"))?;
        Ok(LearnedCollapse {
            streams,
            dim,
            phi,
            scale,
            bias,
            rms_eps,
            pre_eps,
        })
    }

    fn kernel(&self) -> crate::mappings::HeadKernel<'_, F> {
        crate::mappings::HeadKernel {
            n: self.streams,
            c: self.dim,
            phi: self.phi.as_slice().expect("standard by construction"),
            scale: self.scale,
            bias: self.bias.as_slice().expect("standard by construction"),
            rms_eps: F::from_f64(self.rms_eps),
            pre_eps: F::from_f64(self.pre_eps),
        }
    }

    /// The per-token weights `w` (`[T, n]`).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `x`; [`Error::NonFinite`] naming the first bad token.
    pub fn weights(&self, x: ArrayView3<F>) -> Result<Array2<F>> {
        Ok(crate::mappings::mappings(&self.kernel(), x)?.pre)
    }

    /// Collapses `x: [T, n, C]` to `[T, C]`.
    ///
    /// # Errors
    ///
    /// As [`weights`](Self::weights).
    pub fn collapse(&self, x: ArrayView3<F>) -> Result<Array2<F>> {
        Ok(crate::mappings::read_out(&self.kernel(), x)?.0)
    }
}

impl<F: Float> LearnedCollapse<F> {
    /// φ: `[n·C, n]`.
    pub fn phi(&self) -> &Array2<F> {
        &self.phi
    }
    /// The scale of the projections.
    pub fn scale(&self) -> F {
        self.scale
    }
    /// The bias: `[n]`.
    pub fn bias(&self) -> &ndarray::Array1<F> {
        &self.bias
    }

    /// `(n, C)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.streams, self.dim)
    }

    /// The RMS epsilon.
    pub fn rms_eps(&self) -> f64 {
        self.rms_eps
    }

    /// The epsilon added to the weights after the sigmoid.
    pub fn pre_eps(&self) -> f64 {
        self.pre_eps
    }
}
