//! Stability diagnostics (paper §3.1, Fig. 3, 7, 8): the Amax gain magnitude of a mixing matrix
//! and of products of them across layers.
//!
//! The forward gain of `M` is `max_i |Σ_j M[i][j]|`, the largest absolute row sum (not the sum
//! of absolute values): how much a signal that is the same on every stream can grow. The
//! backward gain is the largest absolute column sum, its counterpart for gradients. For a
//! doubly-stochastic `M` both are 1, and they stay 1 under products; the minimum row and
//! column sums show attenuation, which the maxima alone hide.

use ndarray::{Array2, ArrayView2, Axis};

use crate::Float;
use crate::error::check_finite;
use crate::error::{Error, Result};
use crate::mappings::Mappings;

/// Amax gains of one matrix (paper §3.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gain {
    /// `max_i |Σ_j M[i][j]|`.
    pub forward: f64,
    /// `max_j |Σ_i M[i][j]|`.
    pub backward: f64,
    /// `min_i Σ_j M[i][j]`.
    pub min_row_sum: f64,
    /// `min_j Σ_i M[i][j]`.
    pub min_col_sum: f64,
}

fn gain_f64(m: ArrayView2<f64>) -> Gain {
    let rows = m.sum_axis(Axis(1));
    let cols = m.sum_axis(Axis(0));
    let amax = |v: &ndarray::Array1<f64>| v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let min = |v: &ndarray::Array1<f64>| v.iter().fold(f64::INFINITY, |a, &x| a.min(x));
    Gain {
        forward: amax(&rows),
        backward: amax(&cols),
        min_row_sum: min(&rows),
        min_col_sum: min(&cols),
    }
}

/// The Amax gains of `m`, computed in f64.
///
/// # Shapes
///
/// - `m`: `[r, c]`, non-empty (mixing matrices are square, but any matrix is accepted)
///
/// # Errors
///
/// [`Error::Empty`] for an empty matrix; [`Error::NonFinite`] if `m` holds a NaN or infinity.
///
/// # Examples
///
/// ```
/// use ndarray::array;
/// let g = mhc::gain::amax_gain(array![[0.5, 0.5], [1.5, -0.1f64]].view())?;
/// assert_eq!((g.forward, g.min_row_sum), (1.4, 1.0));
/// assert!((g.backward - 2.0).abs() < 1e-15);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn amax_gain<F: Float>(m: ArrayView2<F>) -> Result<Gain> {
    if m.is_empty() {
        return Err(Error::Empty { what: "matrix" });
    }
    let m = m.mapv(F::as_f64);
    check_finite(
        "matrix",
        m.len(),
        &m.as_standard_layout().iter().copied().collect::<Vec<_>>(),
    )?;
    Ok(gain_f64(m.view()))
}

/// Composite gains across layers `H_1 … H_L`: for each layer `l`, the forward gain of
/// `H_l ⋯ H_1` and the backward gain of `H_L ⋯ H_l` (paper Fig. 3b, 7b). Products are formed
/// in f64; a product that overflows gives an infinite gain.
///
/// # Shapes
///
/// - `layers`: `L` matrices, each `[n, n]`; returns `L` pairs `(forward, backward)`
///
/// # Errors
///
/// [`Error::NotSquare`] / [`Error::Empty`] for the first matrix, [`Error::ShapeMismatch`] for
/// a later one of another size, [`Error::NonFinite`] naming the layer holding a NaN or infinity.
///
/// # Examples
///
/// ```
/// use ndarray::array;
/// let h = array![[1.1, 0.0], [0.0, 0.9f64]];
/// let g = mhc::gain::composite_gains(&[h.clone(), h.clone(), h])?;
/// assert!((g[2].0 - 1.1f64.powi(3)).abs() < 1e-12); // H_3 H_2 H_1
/// assert!((g[0].1 - 1.1f64.powi(3)).abs() < 1e-12); // H_3 H_2 H_1 again, from layer 1
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn composite_gains<F: Float>(layers: &[Array2<F>]) -> Result<Vec<(f64, f64)>> {
    let Some(first) = layers.first() else {
        return Ok(Vec::new());
    };
    let (r, c) = first.dim();
    if r != c {
        return Err(Error::NotSquare {
            what: "layers",
            got: vec![r, c],
        });
    }
    if r == 0 {
        return Err(Error::Empty { what: "layers" });
    }
    let mats = layers
        .iter()
        .enumerate()
        .map(|(l, m)| {
            if m.dim() != (r, r) {
                return Err(Error::ShapeMismatch {
                    what: "layers",
                    expected: vec![r, r],
                    got: m.shape().to_vec(),
                });
            }
            let m = m.mapv(F::as_f64);
            if m.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite {
                    what: "layers",
                    index: l,
                });
            }
            Ok(m)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = vec![(0.0, 0.0); mats.len()];
    let mut prefix = Array2::<f64>::eye(r);
    for (l, m) in mats.iter().enumerate() {
        prefix = m.dot(&prefix); // H_l ⋯ H_1
        out[l].0 = gain_f64(prefix.view()).forward;
    }
    let mut suffix = Array2::<f64>::eye(r);
    for (l, m) in mats.iter().enumerate().rev() {
        suffix = suffix.dot(m); // H_L ⋯ H_l
        out[l].1 = gain_f64(suffix.view()).backward;
    }
    Ok(out)
}

/// The token average of a block's `H_res`: the per-layer matrix the paper's composite gains are
/// taken over ("averaged over the tokens of one sequence").
///
/// # Shapes
///
/// - `maps.res`: `[T, n, n]`; returns `[n, n]`
///
/// # Errors
///
/// [`Error::Empty`] if `T = 0`.
///
/// # Examples
///
/// ```
/// let m = mhc::gain::mean_res(&mhc::Mappings::<f32>::identity(3, 2))?;
/// assert_eq!(m, ndarray::Array2::<f32>::eye(2));
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn mean_res<F: Float>(maps: &Mappings<F>) -> Result<Array2<F>> {
    let t = maps.res.shape()[0];
    if t == 0 {
        return Err(Error::Empty { what: "tokens" });
    }
    Ok(maps.res.sum_axis(Axis(0)) / F::from_usize(t))
}
