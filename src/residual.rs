//! The plain residual connection `out = x + F(x)`, the baseline of every comparison.

use ndarray::{Array2, ArrayView2};

use crate::Float;
use crate::error::check_same;
use crate::error::{Error, Result};
use crate::mixing::{all_finite, blame};

/// A plain residual block on `[T, C]`: `out = x + F(x)` (SPEC §4), with the calling convention
/// of [`MhcBlock`](crate::MhcBlock) and [`HcBlock`](crate::HcBlock) so that benches and
/// examples can swap the three.
///
/// # Examples
///
/// ```
/// use ndarray::Array2;
/// let block = mhc::ResidualBlock::new(3)?;
/// let out = block.forward(Array2::<f32>::ones((2, 3)).view(), |u| u.mapv(|v| 2.0 * v))?;
/// assert!(out.iter().all(|&v| v == 3.0));
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResidualBlock {
    dim: usize,
}

impl ResidualBlock {
    /// A residual block of width `dim`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDimension`] if `dim == 0`.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidDimension {
                what: "dim",
                got: 0,
            });
        }
        Ok(ResidualBlock { dim })
    }

    /// The width `C`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `x + F(x)`.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, C]`; the sublayer maps `[T, C]` to `[T, C]`; returns `[T, C]`
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `x` or the sublayer output; [`Error::NonFinite`] naming the
    /// first token whose `x` or sublayer output is not finite.
    ///
    /// # Examples
    ///
    /// ```
    /// let block = mhc::ResidualBlock::new(2)?;
    /// let out = block.forward(ndarray::array![[1.0, 2.0f64]].view(), |u| u.to_owned())?;
    /// assert_eq!(out, ndarray::array![[2.0, 4.0]]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn forward<F: Float>(
        &self,
        x: ArrayView2<F>,
        sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
    ) -> Result<Array2<F>> {
        check_same("x", &[x.nrows(), self.dim], x.shape())?;
        let y = sublayer(x);
        check_same("sublayer output", x.shape(), y.shape())?;
        let mut out = y;
        out += &x;
        for (t, row) in out.rows().into_iter().enumerate() {
            let row = row.as_slice().expect("owned standard layout");
            if !all_finite(row) {
                let xs = x.row(t).to_vec();
                let ys: Vec<F> = row.iter().zip(&xs).map(|(&o, &x)| o - x).collect();
                return Err(blame(t, &[("x", &xs), ("sublayer output", &ys)], "out"));
            }
        }
        Ok(out)
    }
}
