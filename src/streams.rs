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
