//! A reference sublayer for examples, tests and benches: a pre-norm MLP `C → 4C → C` with GELU.
//!
//! It is a reference, not a framework: enough to put a realistic amount of matrix work between
//! an mHC block's read-out and write-in, with a hand-written backward pass.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Float;
use crate::error::check_same;
use crate::error::{Error, Result};
use crate::linalg::{matmul, matmul_into};
use crate::mappings::rms;

/// `sqrt(2/π)`, the tanh-GELU constant.
const GELU_K: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation of GELU.
const GELU_A: f64 = 0.044_715;

/// GELU, tanh approximation: `½ a (1 + tanh(√(2/π)(a + 0.044715 a³)))`, and its derivative.
#[inline]
fn gelu<F: Float>(a: F) -> (F, F) {
    let (k, c, half, one) = (
        F::from_f64(GELU_K),
        F::from_f64(GELU_A),
        F::from_f64(0.5),
        F::one(),
    );
    let inner = k * (a + c * a * a * a);
    let th = inner.tanh_fast();
    let g = half * a * (one + th);
    let dinner = k * (one + F::from_f64(3.0) * c * a * a);
    let dg = half * (one + th) + half * a * (one - th * th) * dinner;
    (g, dg)
}

/// The parameters' gradients of an [`Mlp`], in its field order.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpGrads<F> {
    /// `∂w1`: `[C, H]`.
    pub w1: Array2<F>,
    /// `∂b1`: `[H]`.
    pub b1: Array1<F>,
    /// `∂w2`: `[H, C]`.
    pub w2: Array2<F>,
    /// `∂b2`: `[C]`.
    pub b2: Array1<F>,
}

/// A pre-norm two-layer perceptron: `y = GELU(RMSNorm(u) · w1 + b1) · w2 + b2`.
///
/// The RMSNorm has no gain (fold it into `w1`) and `eps = 1e-6`; GELU is the tanh
/// approximation. Matrix products go through faer on rayon's pool.
///
/// # Shapes
///
/// - `w1`: `[C, H]`, `b1`: `[H]`, `w2`: `[H, C]`, `b2`: `[C]` (the examples use `H = 4C`)
///
/// # Examples
///
/// ```
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// let mlp = mhc::Mlp::<f32>::new(8, 32, &mut StdRng::seed_from_u64(0))?;
/// let y = mlp.forward(ndarray::Array2::ones((3, 8)).view())?;
/// assert_eq!(y.shape(), &[3, 8]);
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp<F> {
    /// `[C, H]`.
    pub w1: Array2<F>,
    /// `[H]`.
    pub b1: Array1<F>,
    /// `[H, C]`.
    pub w2: Array2<F>,
    /// `[C]`.
    pub b2: Array1<F>,
}

impl<F: Float> Mlp<F> {
    /// `w1 ~ N(0, 1/C)`, `w2 ~ N(0, 1/H)`, zero biases.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDimension`] if `dim` or `hidden` is 0; [`Error::SizeOverflow`] or
    /// [`Error::AllocationFailed`] if the weights do not fit.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// let mlp = mhc::Mlp::<f64>::new(16, 64, &mut StdRng::seed_from_u64(0))?;
    /// assert_eq!((mlp.dim(), mlp.w1.shape()), (16, &[16, 64][..]));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn new(dim: usize, hidden: usize, rng: &mut impl Rng) -> Result<Self> {
        for (what, v) in [("dim", dim), ("hidden", hidden)] {
            if v == 0 {
                return Err(Error::InvalidDimension { what, got: 0 });
            }
        }
        let len = crate::error::checked_size("w1", &[dim, hidden])?;
        let mut normal = |r: usize, c: usize, std: f64| -> Result<Array2<F>> {
            let mut v = crate::error::try_zeroed::<F>("mlp weights", len)?;
            for w in v.iter_mut() {
                let z: f64 = StandardNormal.sample(&mut *rng);
                *w = F::from_f64(std * z);
            }
            Ok(Array2::from_shape_vec((r, c), v).expect("r·c = len"))
        };
        let w1 = normal(dim, hidden, (1.0 / dim as f64).sqrt())?;
        let w2 = normal(hidden, dim, (1.0 / hidden as f64).sqrt())?;
        Ok(Mlp {
            w1,
            b1: Array1::zeros(hidden),
            w2,
            b2: Array1::zeros(dim),
        })
    }

    /// The width `C`.
    pub fn dim(&self) -> usize {
        self.w1.nrows()
    }

    fn check(&self, u: &ArrayView2<F>) -> Result<()> {
        let (c, h) = self.w1.dim();
        check_same("w2", &[h, c], self.w2.shape())?;
        check_same("b1", &[h], self.b1.shape())?;
        check_same("b2", &[c], self.b2.shape())?;
        check_same("u", &[u.nrows(), c], u.shape())
    }

    /// `RMSNorm(u)` and the hidden pre-activation `a = RMSNorm(u) · w1 + b1`.
    fn hidden(&self, u: ArrayView2<F>) -> Result<(Array2<F>, Array1<F>, Array2<F>)> {
        let eps = F::from_f64(1e-6);
        let mut normed = u.as_standard_layout().into_owned();
        let mut inv_r = Array1::zeros(u.nrows());
        for (t, mut row) in normed.rows_mut().into_iter().enumerate() {
            let r = rms(row.as_slice().expect("standard"), eps).ok_or(Error::NonFinite {
                what: "u",
                index: t,
            })?;
            inv_r[t] = F::one() / r;
            row *= inv_r[t];
        }
        let mut a = Array2::zeros((u.nrows(), self.b1.len()));
        a += &self.b1;
        matmul_into(&mut a, true, normed.view(), self.w1.view(), true);
        Ok((normed, inv_r, a))
    }

    /// `y = GELU(RMSNorm(u) · w1 + b1) · w2 + b2`.
    ///
    /// # Shapes
    ///
    /// - `u`: `[T, C]`; returns `[T, C]`
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `u` or inconsistent parameters; [`Error::NonFinite`] for a
    /// token of `u` that is not finite.
    ///
    /// # Examples
    ///
    /// See [`Mlp`].
    pub fn forward(&self, u: ArrayView2<F>) -> Result<Array2<F>> {
        self.check(&u)?;
        let (_, _, a) = self.hidden(u)?;
        let g = a.mapv(|v| gelu(v).0);
        let mut y = Array2::zeros((u.nrows(), self.dim()));
        y += &self.b2;
        matmul_into(&mut y, true, g.view(), self.w2.view(), true);
        Ok(y)
    }

    /// The vector-Jacobian product: given the input `u` and `∂y`, returns `∂u` and the
    /// parameters' gradients. Recomputes the hidden layer from `u`.
    ///
    /// # Shapes
    ///
    /// - `u`, `dy`: `[T, C]`; returns `∂u`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward), plus [`Error::ShapeMismatch`] for `dy`.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// let mlp = mhc::Mlp::<f64>::new(4, 16, &mut StdRng::seed_from_u64(1))?;
    /// let u = ndarray::Array2::from_shape_fn((2, 4), |(i, j)| (i + j) as f64);
    /// let (du, grads) = mlp.backward(u.view(), ndarray::Array2::ones((2, 4)).view())?;
    /// assert_eq!((du.shape(), grads.w1.shape()), (&[2, 4][..], &[4, 16][..]));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn backward(
        &self,
        u: ArrayView2<F>,
        dy: ArrayView2<F>,
    ) -> Result<(Array2<F>, MlpGrads<F>)> {
        self.check(&u)?;
        check_same("dy", u.shape(), dy.shape())?;
        let (normed, inv_r, a) = self.hidden(u)?;
        let mut g = a.clone();
        let mut da = a;
        ndarray::Zip::from(&mut g).and(&mut da).for_each(|g, d| {
            let (v, dv) = gelu(*g);
            *g = v;
            *d = dv;
        });
        let w2 = matmul(g.t(), dy);
        let b2 = dy.sum_axis(Axis(0));
        da *= &matmul(dy, self.w2.t());
        let w1 = matmul(normed.t(), da.view());
        let b1 = da.sum_axis(Axis(0));
        let mut du = matmul(da.view(), self.w1.t());
        // RMSNorm backward: ∂u = (∂n − n · mean(∂n ⊙ n)) / r.
        let c = F::from_usize(self.dim());
        for ((mut d, n), &ir) in du.rows_mut().into_iter().zip(normed.rows()).zip(&inv_r) {
            let m = d.iter().zip(n).fold(F::zero(), |s, (&d, &n)| s + d * n) / c;
            d.zip_mut_with(&n, |d, &n| *d = (*d - n * m) * ir);
        }
        Ok((du, MlpGrads { w1, b1, w2, b2 }))
    }
}
