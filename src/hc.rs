//! The Hyper-Connections baseline (HC; Zhu et al., arXiv 2409.19606, as restated in the mHC
//! paper Eq. 5): the same read-out and write-in as mHC, with unconstrained tanh mappings.

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::Float;
use crate::backward::{self, RawGrads, Tape};
use crate::block::positive;
use crate::error::{Error, Result, checked_size};
use crate::mappings::{self, HcKernel, Mappings};
use crate::mixing::{self, check_x};
use crate::sinkhorn::{check_finite, check_same};

/// Configuration of an [`HcBlock`].
///
/// # Examples
///
/// ```
/// let mut cfg = mhc::HcConfig::new(4, 64);
/// cfg.layer = 3; // b_pre = e_(3 mod 4) at initialisation
/// assert_eq!(cfg.rms_eps, 1e-6);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct HcConfig {
    /// Number of streams `n`.
    pub streams: usize,
    /// Channels per stream `C`.
    pub dim: usize,
    /// Added to the per-stream mean square of the RMS norm (default `1e-6`); > 0.
    pub rms_eps: f64,
    /// The block's layer index `k`, used by [`HcBlock::new`] for `b_pre = e_(k mod n)`.
    pub layer: usize,
    /// Initial `alpha` (pre, post, res) in [`HcBlock::new`] (default 0.01).
    pub alpha_init: f64,
}

impl HcConfig {
    /// Defaults for `streams` streams of `dim` channels, layer 0.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(mhc::HcConfig::new(4, 8).layer, 0);
    /// ```
    pub fn new(streams: usize, dim: usize) -> Self {
        HcConfig {
            streams,
            dim,
            rms_eps: 1e-6,
            layer: 0,
            alpha_init: 0.01,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDimension`] for `streams == 0` or `dim == 0`; [`Error::SizeOverflow`];
    /// [`Error::InvalidEpsilon`] for `rms_eps ≤ 0` or a non-finite `alpha_init`.
    pub fn validate(&self) -> Result<()> {
        if self.streams == 0 {
            return Err(Error::InvalidDimension {
                what: "streams",
                got: 0,
            });
        }
        if self.dim == 0 {
            return Err(Error::InvalidDimension {
                what: "dim",
                got: 0,
            });
        }
        checked_size("theta", &[self.streams + 2, self.dim])?;
        checked_size("b_res", &[self.streams, self.streams])?;
        positive("rms_eps", self.rms_eps)?;
        if !self.alpha_init.is_finite() {
            return Err(Error::InvalidEpsilon {
                what: "alpha_init",
                expected: "finite",
                got: self.alpha_init,
            });
        }
        Ok(())
    }
}

/// The learned parameters of an [`HcBlock`] (mHC paper Eq. 5).
///
/// # Shapes
///
/// - `theta_pre`, `theta_post`: `[C]`; `theta_res`: `[n, C]`
/// - `b_pre`, `b_post`: `[n]`; `b_res`: `[n, n]`
#[derive(Clone, Debug, PartialEq)]
pub struct HcParams<F> {
    /// θ_pre: `[C]`.
    pub theta_pre: Array1<F>,
    /// θ_post: `[C]`.
    pub theta_post: Array1<F>,
    /// θ_res: `[n, C]`.
    pub theta_res: Array2<F>,
    /// α: (pre, post, res).
    pub alpha: [F; 3],
    /// b_pre: `[n]`.
    pub b_pre: Array1<F>,
    /// b_post: `[n]`.
    pub b_post: Array1<F>,
    /// b_res: `[n, n]`.
    pub b_res: Array2<F>,
}

impl<F: Float> HcParams<F> {
    /// HC's initialisation (HC paper §2.3) for layer `layer`: `θ = 0`, `α = alpha`,
    /// `b_pre = e_(layer mod n)`, `b_post = 1`, `b_res = I`.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = mhc::HcParams::<f32>::init(4, 8, 5, 0.01);
    /// assert_eq!(p.b_pre.to_vec(), vec![0.0, 1.0, 0.0, 0.0]);
    /// ```
    pub fn init(streams: usize, dim: usize, layer: usize, alpha: f64) -> Self {
        let n = streams;
        HcParams {
            theta_pre: Array1::zeros(dim),
            theta_post: Array1::zeros(dim),
            theta_res: Array2::zeros((n, dim)),
            alpha: [F::from_f64(alpha); 3],
            b_pre: Array1::from_shape_fn(n, |j| {
                if j == layer % n.max(1) {
                    F::one()
                } else {
                    F::zero()
                }
            }),
            b_post: Array1::ones(n),
            b_res: Array2::eye(n),
        }
    }
}

/// A Hyper-Connections block (the unconstrained baseline of mHC paper Eq. 5).
///
/// # Examples
///
/// ```
/// use ndarray::Array3;
/// let block = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(4, 8))?;
/// let out = block.forward(Array3::ones((2, 4, 8)).view(), |u| u.to_owned())?;
/// assert_eq!(out.shape(), &[2, 4, 8]);
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HcBlock<F> {
    config: HcConfig,
    params: HcParams<F>,
    /// `[C, n + 2]`: θ_pre, θ_post, θ_res rows as columns, for one matrix product.
    theta: Array2<F>,
}

impl<F: Float> HcBlock<F> {
    /// A block with HC's initialisation ([`HcParams::init`] with `config.layer`).
    ///
    /// # Errors
    ///
    /// The errors of [`HcConfig::validate`].
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::HcBlock::<f64>::new(mhc::HcConfig::new(2, 4))?;
    /// assert_eq!(b.params().b_post.to_vec(), vec![1.0, 1.0]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn new(config: HcConfig) -> Result<Self> {
        config.validate()?;
        Self::from_params(
            config,
            HcParams::init(config.streams, config.dim, config.layer, config.alpha_init),
        )
    }

    /// A block with the given parameters, shape-checked against `config`.
    ///
    /// # Errors
    ///
    /// The errors of [`HcConfig::validate`]; [`Error::ShapeMismatch`] naming the parameter of
    /// the wrong shape; [`Error::NonFinite`] for a NaN or infinite parameter.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = mhc::HcParams::<f32>::init(3, 5, 0, 0.01);
    /// let b = mhc::HcBlock::from_params(mhc::HcConfig::new(3, 5), p)?;
    /// assert_eq!(b.config().streams, 3);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn from_params(config: HcConfig, params: HcParams<F>) -> Result<Self> {
        config.validate()?;
        let (n, c) = (config.streams, config.dim);
        check_same("theta_pre", &[c], params.theta_pre.shape())?;
        check_same("theta_post", &[c], params.theta_post.shape())?;
        check_same("theta_res", &[n, c], params.theta_res.shape())?;
        check_same("b_pre", &[n], params.b_pre.shape())?;
        check_same("b_post", &[n], params.b_post.shape())?;
        check_same("b_res", &[n, n], params.b_res.shape())?;
        check_finite("alpha", 1, &params.alpha)?;
        for (what, v) in [
            ("theta_pre", params.theta_pre.to_vec()),
            ("theta_post", params.theta_post.to_vec()),
            ("theta_res", params.theta_res.iter().copied().collect()),
            ("b_pre", params.b_pre.to_vec()),
            ("b_post", params.b_post.to_vec()),
            ("b_res", params.b_res.iter().copied().collect()),
        ] {
            check_finite(what, 1, &v)?;
        }
        let theta = Array2::from_shape_fn((c, n + 2), |(k, col)| match col {
            0 => params.theta_pre[k],
            1 => params.theta_post[k],
            i => params.theta_res[[i - 2, k]],
        });
        let p = HcParams {
            b_res: params.b_res.as_standard_layout().into_owned(),
            b_pre: params.b_pre.as_standard_layout().into_owned(),
            b_post: params.b_post.as_standard_layout().into_owned(),
            ..params
        };
        Ok(HcBlock {
            config,
            params: p,
            theta,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HcConfig {
        &self.config
    }

    /// The parameters.
    pub fn params(&self) -> &HcParams<F> {
        &self.params
    }

    /// Replaces the parameters (e.g. after an optimiser step), shape-checked.
    ///
    /// # Errors
    ///
    /// As [`from_params`](Self::from_params); on error the block is unchanged.
    pub fn set_params(&mut self, params: HcParams<F>) -> Result<()> {
        *self = Self::from_params(self.config, params)?;
        Ok(())
    }

    pub(crate) fn kernel(&self) -> HcKernel<'_, F> {
        HcKernel {
            n: self.config.streams,
            c: self.config.dim,
            theta: self.theta.as_slice().expect("built in standard layout"),
            alpha: self.params.alpha,
            b_pre: self.params.b_pre.as_slice().expect("standard layout"),
            b_post: self.params.b_post.as_slice().expect("standard layout"),
            b_res: self.params.b_res.as_slice().expect("standard layout"),
            rms_eps: F::from_f64(self.config.rms_eps),
        }
    }

    /// The mappings of every token (Eq. 5).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; returns `pre [T, n]`, `post [T, n]`, `res [T, n, n]`
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `x`; [`Error::NonFinite`] naming the first bad token.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::HcBlock::<f64>::new(mhc::HcConfig::new(2, 3))?;
    /// let m = b.mappings(ndarray::Array3::ones((1, 2, 3)).view())?;
    /// assert_eq!(m.res[[0, 0, 0]], 1.0); // θ = 0: the bias, b_res = I
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn mappings(&self, x: ArrayView3<F>) -> Result<Mappings<F>> {
        mappings::mappings(&self.kernel(), x)
    }

    /// The read-out half: the mappings and `u_t = Σ_j H_pre[t][j] x_t[j]` in one pass.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; returns `u [T, C]` and the mappings
    ///
    /// # Errors
    ///
    /// As [`mappings`](Self::mappings).
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(2, 3))?;
    /// let (u, _) = b.read_out(ndarray::Array3::ones((4, 2, 3)).view())?;
    /// assert_eq!(u.shape(), &[4, 3]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn read_out(&self, x: ArrayView3<F>) -> Result<(Array2<F>, Mappings<F>)> {
        mappings::read_out(&self.kernel(), x)
    }

    /// [`read_out`](Self::read_out) into caller-provided buffers.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `u`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`read_out`](Self::read_out), plus [`Error::ShapeMismatch`] for `u`.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(2, 3))?;
    /// let mut maps = mhc::Mappings::zeros(4, 2);
    /// let mut u = ndarray::Array2::zeros((4, 3));
    /// b.read_out_into(ndarray::Array3::ones((4, 2, 3)).view(), &mut maps, u.view_mut())?;
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn read_out_into(
        &self,
        x: ArrayView3<F>,
        maps: &mut Mappings<F>,
        u: ArrayViewMut2<F>,
    ) -> Result<()> {
        mappings::read_out_into(&self.kernel(), x, maps, u, None)
    }

    /// The write-in half (the same kernel as mHC's, [`mixing::write_in`]).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `y`: `[T, C]`; returns `[T, n, C]`
    ///
    /// # Errors
    ///
    /// As [`mixing::write_in`].
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(2, 3))?;
    /// let x = ndarray::Array3::ones((4, 2, 3));
    /// let (u, maps) = b.read_out(x.view())?;
    /// let out = b.write_in(x.view(), &maps, u.view())?;
    /// assert_eq!(out.shape(), x.shape());
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn write_in(
        &self,
        x: ArrayView3<F>,
        maps: &Mappings<F>,
        y: ArrayView2<F>,
    ) -> Result<Array3<F>> {
        check_x(x.shape(), self.config.streams, self.config.dim)?;
        mixing::write_in(x, maps, y)
    }

    /// Read-out, sublayer, write-in.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; the sublayer maps `[T, C]` to `[T, C]`; returns `[T, n, C]`
    ///
    /// # Errors
    ///
    /// As [`read_out`](Self::read_out) and [`write_in`](Self::write_in), and
    /// [`Error::ShapeMismatch`] (`"sublayer output"`) for a sublayer output of the wrong shape.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::HcBlock::<f64>::new(mhc::HcConfig::new(2, 3))?;
    /// let out = b.forward(ndarray::Array3::ones((4, 2, 3)).view(), |u| u.to_owned())?;
    /// assert_eq!(out.shape(), &[4, 2, 3]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
    ) -> Result<Array3<F>> {
        mappings::forward(&self.kernel(), x, sublayer)
    }

    /// [`forward`](Self::forward) that also returns the sublayer output `y` for
    /// [`backward`](Self::backward).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; returns `out: [T, n, C]`, `y: [T, C]`
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward).
    ///
    /// # Examples
    ///
    /// See [`backward`](Self::backward).
    pub fn forward_train(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, Array2<F>)> {
        backward::forward_train(&self.kernel(), x, sublayer)
    }

    /// The backward pass (the same flow as [`MhcBlock::backward`](crate::MhcBlock::backward)):
    /// `∂x` and the gradients of every parameter, calling the sublayer VJP once.
    ///
    /// # Shapes
    ///
    /// - `x`, `upstream`: `[T, n, C]`; `y`: `[T, C]`; returns `∂x` and [`HcParams`]-shaped
    ///   gradients
    ///
    /// # Errors
    ///
    /// As [`MhcBlock::backward`](crate::MhcBlock::backward).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let block = mhc::HcBlock::<f64>::new(mhc::HcConfig::new(2, 4))?;
    /// let x = Array3::from_shape_fn((3, 2, 4), |(t, i, c)| (t + i + c) as f64 * 0.1);
    /// let (out, y) = block.forward_train(x.view(), |u| u.to_owned())?;
    /// let (dx, g) = block.backward(x.view(), y.view(), Array3::ones(out.raw_dim()).view(), |_u, dy| dy.to_owned())?;
    /// assert_eq!((dx.shape(), g.theta_res.shape()), (&[3, 2, 4][..], &[2, 4][..]));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn backward(
        &self,
        x: ArrayView3<F>,
        y: ArrayView2<F>,
        upstream: ArrayView3<F>,
        sublayer_vjp: impl FnOnce(ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, HcParams<F>)> {
        let g = backward::backward(&self.kernel(), x, y, upstream, sublayer_vjp)?;
        Ok(self.params_grad(g))
    }

    /// The write-in half of the backward pass (see
    /// [`MhcBlock::write_in_backward`](crate::MhcBlock::write_in_backward)).
    ///
    /// # Shapes
    ///
    /// - `x`, `upstream`: `[T, n, C]`; `y`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let block = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(2, 4))?;
    /// let x = Array3::from_elem((2, 2, 4), 1.0f32);
    /// let (out, y) = block.forward_train(x.view(), |u| u.to_owned())?;
    /// let tape = block.write_in_backward(x.view(), y.view(), Array3::ones(out.raw_dim()).view())?;
    /// let (dx, _) = block.read_out_backward(x.view(), tape.clone(), tape.dy.view())?;
    /// assert_eq!(dx.shape(), x.shape());
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn write_in_backward(
        &self,
        x: ArrayView3<F>,
        y: ArrayView2<F>,
        upstream: ArrayView3<F>,
    ) -> Result<Tape<F>> {
        backward::write_in_backward(&self.kernel(), x, y, upstream)
    }

    /// The read-out half of the backward pass.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `du`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`MhcBlock::read_out_backward`](crate::MhcBlock::read_out_backward).
    ///
    /// # Examples
    ///
    /// See [`write_in_backward`](Self::write_in_backward).
    pub fn read_out_backward(
        &self,
        x: ArrayView3<F>,
        tape: Tape<F>,
        du: ArrayView2<F>,
    ) -> Result<(Array3<F>, HcParams<F>)> {
        let g = backward::read_out_backward(&self.kernel(), x, tape, du)?;
        Ok(self.params_grad(g))
    }

    /// [`forward_train`](Self::forward_train) without fresh `[T, n, C]` or `[T, C]` buffers:
    /// writes `out`, keeps `u` and the mappings in `tape` (grown on first use, then reused),
    /// and returns the sublayer's output `y`.
    ///
    /// In a training loop, keep one [`Tape`] per block and pass it to this method and to
    /// [`backward_into`](Self::backward_into): in the steady state neither allocates anything
    /// proportional to `T` beyond what the sublayer itself allocates. Fresh buffers cost page
    /// faults: on the benchmark machine (n = 4, C = 1024, T = 4096) the write-in half of the
    /// backward pass took 64 ms with fresh buffers and 29 ms with a reused tape.
    ///
    /// # Shapes
    ///
    /// - `x`, `out`: `[T, n, C]`; returns `y: [T, C]`
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward), plus [`Error::ShapeMismatch`] for `out`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let block = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(2, 4))?;
    /// let mut tape = mhc::Tape::default();
    /// let x = Array3::from_elem((5, 2, 4), 0.5f32);
    /// let (mut out, mut dx) = (Array3::zeros((5, 2, 4)), Array3::zeros((5, 2, 4)));
    /// for _step in 0..3 {
    ///     let y = block.forward_train_into(x.view(), |u| u.mapv(|v| 3.0 * v), &mut tape, out.view_mut())?;
    ///     let upstream = Array3::ones((5, 2, 4));
    ///     let grads = block.backward_into(x.view(), y.view(), upstream.view(), |_u, dy| dy.mapv(|g| 3.0 * g), &mut tape, dx.view_mut())?;
    ///     # let _ = grads;
    /// }
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn forward_train_into(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
        tape: &mut Tape<F>,
        out: ArrayViewMut3<F>,
    ) -> Result<Array2<F>> {
        backward::forward_train_into(&self.kernel(), x, sublayer, tape, out)
    }

    /// [`backward`](Self::backward) writing `∂x` into `dx` and reusing `tape`'s buffers
    /// (see [`forward_train_into`](Self::forward_train_into)); returns the parameters'
    /// gradients.
    ///
    /// # Shapes
    ///
    /// - `x`, `upstream`, `dx`: `[T, n, C]`; `y`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward), plus [`Error::ShapeMismatch`] for `dx`.
    ///
    /// # Examples
    ///
    /// See [`forward_train_into`](Self::forward_train_into).
    pub fn backward_into(
        &self,
        x: ArrayView3<F>,
        y: ArrayView2<F>,
        upstream: ArrayView3<F>,
        sublayer_vjp: impl FnOnce(ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
        tape: &mut Tape<F>,
        dx: ArrayViewMut3<F>,
    ) -> Result<HcParams<F>> {
        let (dw, acc) =
            backward::backward_into(&self.kernel(), x, y, upstream, sublayer_vjp, tape, dx)?;
        Ok(self.grads(dw, acc))
    }

    /// [`write_in_backward`](Self::write_in_backward) into a reused `tape`.
    ///
    /// # Shapes
    ///
    /// As [`write_in_backward`](Self::write_in_backward).
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let block = mhc::HcBlock::<f32>::new(mhc::HcConfig::new(2, 4))?;
    /// let mut tape = mhc::Tape::default();
    /// let x = Array3::from_elem((5, 2, 4), 0.5f32);
    /// let mut dx = Array3::zeros((5, 2, 4));
    /// let (out, y) = block.forward_train(x.view(), |u| u.to_owned())?;
    /// block.write_in_backward_into(x.view(), y.view(), Array3::ones(out.raw_dim()).view(), &mut tape)?;
    /// let du = tape.dy.clone(); // the sublayer's VJP, computed by anything
    /// let grads = block.read_out_backward_into(x.view(), &mut tape, du.view(), dx.view_mut())?;
    /// # let _ = grads;
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn write_in_backward_into(
        &self,
        x: ArrayView3<F>,
        y: ArrayView2<F>,
        upstream: ArrayView3<F>,
        tape: &mut Tape<F>,
    ) -> Result<()> {
        backward::write_in_backward_into(&self.kernel(), x, y, upstream, None, tape)
    }

    /// [`read_out_backward`](Self::read_out_backward) writing `∂x` into `dx`; the tape is kept
    /// (and may be refilled by the next [`write_in_backward_into`](Self::write_in_backward_into)).
    ///
    /// # Shapes
    ///
    /// - `x`, `dx`: `[T, n, C]`; `du`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`read_out_backward`](Self::read_out_backward), plus [`Error::ShapeMismatch`] for `dx`.
    ///
    /// # Examples
    ///
    /// See [`write_in_backward_into`](Self::write_in_backward_into).
    pub fn read_out_backward_into(
        &self,
        x: ArrayView3<F>,
        tape: &mut Tape<F>,
        du: ArrayView2<F>,
        dx: ArrayViewMut3<F>,
    ) -> Result<HcParams<F>> {
        let (dw, acc) =
            backward::read_out_backward_into(&self.kernel(), x, tape, du, Default::default(), dx)?;
        Ok(self.grads(dw, acc))
    }

    fn params_grad(&self, g: RawGrads<F>) -> (Array3<F>, HcParams<F>) {
        (g.dx, self.grads(g.dw, g.acc))
    }

    /// The parameters' gradients from the projection weight's gradient and the accumulator.
    fn grads(&self, dw: Vec<F>, acc: Vec<F>) -> HcParams<F> {
        let (n, c) = (self.config.streams, self.config.dim);
        let dtheta = Array2::from_shape_vec((c, n + 2), dw).expect("[C, n + 2]");
        HcParams {
            theta_pre: dtheta.column(0).to_owned(),
            theta_post: dtheta.column(1).to_owned(),
            theta_res: dtheta
                .slice(ndarray::s![.., 2..])
                .t()
                .as_standard_layout()
                .into_owned(),
            alpha: [acc[0], acc[1], acc[2]],
            b_pre: Array1::from(acc[3..3 + n].to_vec()),
            b_post: Array1::from(acc[3 + n..3 + 2 * n].to_vec()),
            b_res: Array2::from_shape_vec((n, n), acc[3 + 2 * n..].to_vec()).expect("[n, n]"),
        }
    }
}
