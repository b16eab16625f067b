//! The Hyper-Connections baseline (HC; Zhu et al., arXiv 2409.19606, as restated in the mHC
//! paper Eq. 5): the same read-out and write-in as mHC, with unconstrained tanh mappings.

use ndarray::{Array1, Array2};

use crate::Float;
use crate::block::{Block, Connection, sealed};
use crate::error::{Error, Result, checked_size, positive};
use crate::error::{check_finite, check_same};
use crate::kernel::HcKernel;

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
pub type HcBlock<F> = Block<F, Hc>;

/// Hyper-Connections (mHC paper Eq. 5): unconstrained tanh mappings, the connection of
/// [`HcBlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Hc;

impl sealed::Sealed for Hc {}

impl Connection for Hc {
    type Config = HcConfig;
    type Params<F: Float> = HcParams<F>;
    /// `[C, n + 2]`: θ_pre, θ_post, θ_res rows as columns, for one matrix product.
    type Cache<F: Float> = Array2<F>;
    type Kernel<'a, F: Float> = HcKernel<'a, F>;

    fn dims(config: &HcConfig) -> (usize, usize) {
        (config.streams, config.dim)
    }

    fn build<F: Float>(config: &HcConfig, params: HcParams<F>) -> Result<(HcParams<F>, Array2<F>)> {
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
        Ok((p, theta))
    }

    fn kernel<'a, F: Float>(
        config: &'a HcConfig,
        params: &'a HcParams<F>,
        theta: &'a Array2<F>,
    ) -> HcKernel<'a, F> {
        HcKernel {
            n: config.streams,
            c: config.dim,
            theta: theta.as_slice().expect("built in standard layout"),
            alpha: params.alpha,
            b_pre: params.b_pre.as_slice().expect("standard layout"),
            b_post: params.b_post.as_slice().expect("standard layout"),
            b_res: params.b_res.as_slice().expect("standard layout"),
            rms_eps: F::from_f64(config.rms_eps),
        }
    }

    fn grads<F: Float>(config: &HcConfig, dw: Vec<F>, acc: Vec<F>) -> HcParams<F> {
        let (n, c) = (config.streams, config.dim);
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

impl<F: Float> Block<F, Hc> {
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
}
