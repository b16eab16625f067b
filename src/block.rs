//! The mHC block (paper Eq. 3, 7, 8): configuration, parameters, forward pass.

use std::fmt;

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::backward::{self, RawGrads, Tape};
use crate::error::{Error, Result, checked_size, non_negative, positive};
use crate::error::{check_finite, check_same};
use crate::kernel::MhcKernel;
use crate::mappings::{self, MappingKernel, Mappings};
use crate::mixing::{self, check_x};
use crate::{Float, SinkhornKnopp};

/// The initial bias of an mHC block (SPEC §3).
///
/// The default is [`BiasInit::Zero`], the paper-consistent choice: at initialisation the block
/// is exactly a pre-norm residual connection. Measured with `cargo run --release --example
/// train -- --variants mhc,mhc-id` (32 layers, C = 32, 300 Adam steps, one seed), the
/// identity-like bias reached a 4–8 % lower loss at learning rates 1e-3 to 1e-2 (0.081, 0.065,
/// 0.063 against 0.084, 0.070, 0.068) and still trained at 1e-1 where the zero bias diverged,
/// while the zero bias was 3 % better at 3e-2. Differences of that size on one seed of a toy task
/// do not justify leaving the paper's initialisation; both are one field away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BiasInit {
    /// All zeros: `H_pre = ½`, `H_post = 1`, `H_res = J/n` at initialisation (with φ ≈ 0). With
    /// replicated input streams `x` the block computes `x + F((n/2)·x)` on every stream: exactly
    /// a pre-norm residual connection `x + F(x)` when `F` starts with a (scale-invariant) norm.
    #[default]
    Zero,
    /// `H_res ≈ I` (diagonal logits `ln(1000)`, so the diagonal holds ≈ 0.997),
    /// `H_pre ≈ 1/n`, `H_post = 1`: each stream starts as its own residual path.
    IdentityLike,
}

/// Configuration of an [`MhcBlock`].
///
/// # Examples
///
/// ```
/// let mut cfg = mhc::MhcConfig::new(4, 1024);
/// cfg.pre_eps = 1e-6; // DeepSeek-V4
/// assert_eq!(cfg.sinkhorn.iters, 20);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct MhcConfig {
    /// Number of streams `n` (the paper uses 4).
    pub streams: usize,
    /// Channels per stream `C` (the model width).
    pub dim: usize,
    /// The projector that makes `H_res` doubly stochastic.
    pub sinkhorn: SinkhornKnopp,
    /// Added to the mean square before the square root of the RMS norm (default `1e-6`); > 0.
    pub rms_eps: f64,
    /// Added to `H_pre` after the sigmoid (default 0; DeepSeek-V4 uses `1e-6`); ≥ 0.
    pub pre_eps: f64,
    /// Bias initialisation used by [`MhcBlock::new`].
    pub bias_init: BiasInit,
    /// Standard deviation of the normal initialisation of φ in [`MhcBlock::new`] (default 0.02).
    pub phi_std: f64,
    /// Initial `alpha` (pre, post, res) in [`MhcBlock::new`] (default 0.01 each, paper Table 5).
    pub alpha_init: f64,
}

impl MhcConfig {
    /// The paper's defaults for `streams` streams of `dim` channels (validated when a block is
    /// made).
    ///
    /// # Examples
    ///
    /// ```
    /// let cfg = mhc::MhcConfig::new(4, 64);
    /// assert_eq!((cfg.streams, cfg.dim, cfg.rms_eps), (4, 64, 1e-6));
    /// ```
    pub fn new(streams: usize, dim: usize) -> Self {
        MhcConfig {
            streams,
            dim,
            sinkhorn: SinkhornKnopp::default(),
            rms_eps: 1e-6,
            pre_eps: 0.0,
            bias_init: BiasInit::Zero,
            phi_std: 0.02,
            alpha_init: 0.01,
        }
    }

    /// Number of mapping logits per token, `n² + 2n`.
    pub fn mapping_width(&self) -> usize {
        self.streams * self.streams + 2 * self.streams
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDimension`] for `streams == 0` or `dim == 0`; [`Error::SizeOverflow`]
    /// when `n·C·(n² + 2n)` overflows; [`Error::InvalidEpsilon`] for `rms_eps ≤ 0`, `pre_eps < 0`,
    /// a bad `phi_std` or non-finite values; the errors of [`SinkhornKnopp::validate`].
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
        let m = self
            .streams
            .checked_mul(self.streams + 2)
            .ok_or(Error::SizeOverflow { what: "phi" })?;
        checked_size("phi", &[self.streams, self.dim, m])?;
        self.sinkhorn.validate()?;
        positive("rms_eps", self.rms_eps)?;
        non_negative("pre_eps", self.pre_eps)?;
        non_negative("phi_std", self.phi_std)?;
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

/// The learned parameters of an [`MhcBlock`] (SPEC §3).
///
/// Columns of `phi` and entries of `bias` are ordered `[pre (n) | post (n) | res (n², row-major)]`,
/// so `H̃_res[i][j]` sits at column `2n + i·n + j`. The RMSNorm gain is folded into `phi`.
///
/// # Shapes
///
/// - `phi`: `[n·C, n² + 2n]`
/// - `alpha`: pre, post, res scales
/// - `bias`: `[n² + 2n]`
#[derive(Clone, Debug, PartialEq)]
pub struct MhcParams<F> {
    /// φ: `[n·C, n² + 2n]`.
    pub phi: Array2<F>,
    /// α: (pre, post, res).
    pub alpha: [F; 3],
    /// b: `[n² + 2n]`.
    pub bias: Array1<F>,
}

impl<F: Float> MhcParams<F> {
    /// All-zero parameters of the right shapes (e.g. to accumulate gradients into).
    ///
    /// # Examples
    ///
    /// ```
    /// let p = mhc::MhcParams::<f32>::zeros(4, 8);
    /// assert_eq!(p.phi.shape(), &[32, 24]);
    /// ```
    pub fn zeros(streams: usize, dim: usize) -> Self {
        let m = streams * streams + 2 * streams;
        MhcParams {
            phi: Array2::zeros((streams * dim, m)),
            alpha: [F::zero(); 3],
            bias: Array1::zeros(m),
        }
    }

    /// The initial bias `init` for `n` streams (`[n² + 2n]`).
    ///
    /// # Examples
    ///
    /// ```
    /// let b = mhc::MhcParams::<f32>::initial_bias(mhc::BiasInit::Zero, 4);
    /// assert!(b.len() == 24 && b.iter().all(|&v| v == 0.0));
    /// ```
    pub fn initial_bias(init: BiasInit, n: usize) -> Array1<F> {
        let mut b = Array1::zeros(n * n + 2 * n);
        if init == BiasInit::IdentityLike {
            // sigmoid(b) = 1/n  ⇔  b = ln(1/(n−1)); n = 1 takes H_pre ≈ 0.99.
            let b_pre = if n > 1 { -((n - 1) as f64).ln() } else { 4.6 };
            for j in 0..n {
                b[j] = F::from_f64(b_pre);
                b[2 * n + j * n + j] = F::from_f64(1000f64.ln());
            }
        }
        b
    }
}
/// A block of `n` residual streams around a sublayer (paper Eq. 3): the read-out `H_pre`, the
/// write-in `H_post` and the stream mixing `H_res`, computed per token by the connection `K`.
///
/// One type for every connection, with the connection as a type parameter (ndarray's
/// `ArrayBase<S, D>` behind `Array` and `ArrayView`): [`MhcBlock`] (`K =` [`Mhc`]) and
/// [`HcBlock`](crate::HcBlock) (`K =` [`Hc`](crate::Hc)) are aliases, and every method below
/// is inherent, so no trait needs importing. The mapping kernel (mHC's projection, sigmoids and Sinkhorn-Knopp or HC's
/// tanh mappings) is the only part that differs; the read-out, write-in, their fused and
/// backward passes, chunking and parallelism are one implementation.
///
/// The block never owns the sublayer: [`forward`](Self::forward) takes it as a closure, and the
/// split [`read_out`](Self::read_out) / [`write_in`](Self::write_in) let any framework compute it
/// in between.
///
/// # Examples
///
/// Code generic over the connection names `K` in a bound:
///
/// ```
/// use mhc::{Block, Connection, HcBlock, HcConfig, MhcBlock, MhcConfig};
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// use ndarray::Array3;
///
/// fn run<K: Connection>(block: &Block<f32, K>, x: &Array3<f32>) -> mhc::Result<Array3<f32>> {
///     block.forward(x.view(), |u| u.mapv(f32::tanh))
/// }
///
/// let x = Array3::<f32>::ones((3, 4, 8));
/// let m = MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut StdRng::seed_from_u64(0))?;
/// let h = HcBlock::<f32>::new(HcConfig::new(4, 8))?;
/// assert_eq!(run(&m, &x)?.shape(), run(&h, &x)?.shape());
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Block<F: Float, K: Connection> {
    config: K::Config,
    params: K::Params<F>,
    /// Whatever the connection derives once from its parameters (HC: θ as one matrix).
    cache: K::Cache<F>,
}

pub(crate) mod sealed {
    /// Implemented by the crate's connections only.
    pub trait Sealed {}
    impl Sealed for super::Mhc {}
}

/// The connection a [`Block`] computes: [`Mhc`] or [`Hc`](crate::Hc).
///
/// Sealed: the crate's mapping kernels implement it. Name it in bounds to write code generic
/// over the connection (see [`Block`]); its items other than [`Config`](Self::Config) and
/// [`Params`](Self::Params) are the crate's plumbing.
// The kernel type is crate-internal: a user can neither implement this trait nor name it.
#[allow(private_bounds)]
pub trait Connection: sealed::Sealed + Copy + fmt::Debug + Send + Sync + 'static {
    /// The configuration: [`MhcConfig`] or [`HcConfig`](crate::HcConfig).
    type Config: Copy + fmt::Debug + PartialEq + Send + Sync;
    /// The parameters and, in the same layout, their gradients: [`MhcParams`] or [`HcParams`](crate::HcParams).
    type Params<F: Float>: Clone + fmt::Debug + Send + Sync;
    #[doc(hidden)]
    type Cache<F: Float>: Clone + fmt::Debug + Send + Sync;
    #[doc(hidden)]
    type Kernel<'a, F: Float>: MappingKernel<F>;
    #[doc(hidden)]
    fn dims(config: &Self::Config) -> (usize, usize);
    /// Validates `config` and checks `params` against it, into the block's parameters (in
    /// standard layout) and cache.
    #[doc(hidden)]
    fn build<F: Float>(
        config: &Self::Config,
        params: Self::Params<F>,
    ) -> Result<(Self::Params<F>, Self::Cache<F>)>;
    #[doc(hidden)]
    fn kernel<'a, F: Float>(
        config: &'a Self::Config,
        params: &'a Self::Params<F>,
        cache: &'a Self::Cache<F>,
    ) -> Self::Kernel<'a, F>;
    /// The parameters' gradients from the projection weight's gradient and the accumulator of
    /// the small parameters' gradients.
    #[doc(hidden)]
    fn grads<F: Float>(config: &Self::Config, dw: Vec<F>, acc: Vec<F>) -> Self::Params<F>;
}

/// mHC (paper Eq. 7, 8): sigmoid read-out and write-in, Sinkhorn-Knopp `H_res`; the connection
/// of [`MhcBlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mhc;

impl Connection for Mhc {
    type Config = MhcConfig;
    type Params<F: Float> = MhcParams<F>;
    type Cache<F: Float> = ();
    type Kernel<'a, F: Float> = MhcKernel<'a, F>;

    fn dims(config: &MhcConfig) -> (usize, usize) {
        (config.streams, config.dim)
    }

    fn build<F: Float>(config: &MhcConfig, params: MhcParams<F>) -> Result<(MhcParams<F>, ())> {
        config.validate()?;
        let (n, c, m) = (config.streams, config.dim, config.mapping_width());
        check_same("phi", &[n * c, m], params.phi.shape())?;
        check_same("bias", &[m], params.bias.shape())?;
        let phi = params.phi.as_standard_layout().into_owned();
        check_finite("phi", 1, phi.as_slice().expect("standard layout"))?;
        check_finite("alpha", 1, &params.alpha)?;
        check_finite("bias", 1, &params.bias.to_vec())?;
        let bias = params.bias.as_standard_layout().into_owned();
        Ok((
            MhcParams {
                phi,
                bias,
                ..params
            },
            (),
        ))
    }

    fn kernel<'a, F: Float>(
        config: &'a MhcConfig,
        params: &'a MhcParams<F>,
        _: &'a (),
    ) -> MhcKernel<'a, F> {
        MhcKernel {
            n: config.streams,
            c: config.dim,
            phi: params
                .phi
                .as_slice()
                .expect("standard layout by construction"),
            alpha: params.alpha,
            bias: params
                .bias
                .as_slice()
                .expect("standard layout by construction"),
            rms_eps: F::from_f64(config.rms_eps),
            pre_eps: F::from_f64(config.pre_eps),
            sinkhorn: config.sinkhorn,
        }
    }

    fn grads<F: Float>(config: &MhcConfig, dw: Vec<F>, acc: Vec<F>) -> MhcParams<F> {
        let (n, c, m) = (config.streams, config.dim, config.mapping_width());
        MhcParams {
            phi: Array2::from_shape_vec((n * c, m), dw).expect("[n·C, m]"),
            alpha: [acc[0], acc[1], acc[2]],
            bias: Array1::from(acc[3..].to_vec()),
        }
    }
}

/// An mHC block (paper Eq. 3, 7, 8): `n` residual streams read out into a sublayer and mixed by
/// a per-token doubly-stochastic `H_res`.
///
/// The block never owns the sublayer: [`forward`](Self::forward) takes it as a closure, and the
/// split [`read_out`](Self::read_out) / [`write_in`](Self::write_in) let any framework compute it
/// in between.
///
/// # Examples
///
/// ```
/// use mhc::{MhcBlock, MhcConfig, rand::{SeedableRng, rngs::StdRng}};
/// use ndarray::Array3;
///
/// let block = MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut StdRng::seed_from_u64(0))?;
/// let x = Array3::<f32>::ones((3, 4, 8));
/// let out = block.forward(x.view(), |u| u.mapv(f32::tanh))?;
/// assert_eq!(out.shape(), &[3, 4, 8]);
/// # Ok::<(), mhc::Error>(())
/// ```
pub type MhcBlock<F> = Block<F, Mhc>;

impl<F: Float> Block<F, Mhc> {
    /// A block with the paper's initialisation: `alpha = config.alpha_init` (0.01), φ drawn from
    /// `N(0, phi_std²)` with `rng`, the bias from `config.bias_init`.
    ///
    /// # Errors
    ///
    /// The errors of [`MhcConfig::validate`]; [`Error::AllocationFailed`] if φ does not fit.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// let b = mhc::MhcBlock::<f64>::new(mhc::MhcConfig::new(4, 16), &mut StdRng::seed_from_u64(7))?;
    /// assert_eq!(b.params().alpha, [0.01; 3]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn new(config: MhcConfig, rng: &mut impl Rng) -> Result<Self> {
        config.validate()?;
        let (n, c, m) = (config.streams, config.dim, config.mapping_width());
        let mut data = crate::error::try_zeroed::<F>("phi", n * c * m)?;
        for v in data.iter_mut() {
            let z: f64 = StandardNormal.sample(rng);
            *v = F::from_f64(z * config.phi_std);
        }
        let params = MhcParams {
            phi: Array2::from_shape_vec((n * c, m), data).expect("n·C × m"),
            alpha: [F::from_f64(config.alpha_init); 3],
            bias: MhcParams::initial_bias(config.bias_init, n),
        };
        Self::from_params(config, params)
    }
}

impl<F: Float, K: Connection> Block<F, K> {
    /// A block with the given parameters, shape-checked against `config`.
    ///
    /// # Errors
    ///
    /// The errors of the configuration's `validate` ([`MhcConfig::validate`],
    /// [`HcConfig::validate`](crate::HcConfig::validate)); [`Error::ShapeMismatch`] naming the parameter of the wrong shape
    /// (mHC: `phi` is `[n·C, n² + 2n]`, `bias` `[n² + 2n]`; HC: see [`HcParams`](crate::HcParams));
    /// [`Error::NonFinite`] for a NaN or infinite parameter (`index`: the flat position).
    ///
    /// # Examples
    ///
    /// ```
    /// let params = mhc::MhcParams::<f32>::zeros(2, 3);
    /// let block = mhc::MhcBlock::from_params(mhc::MhcConfig::new(2, 3), params)?;
    /// assert_eq!(block.config().streams, 2);
    /// let hc = mhc::HcBlock::from_params(mhc::HcConfig::new(2, 3), mhc::HcParams::<f32>::init(2, 3, 0, 0.01))?;
    /// assert_eq!(hc.config().streams, 2);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn from_params(config: K::Config, params: K::Params<F>) -> Result<Self> {
        let (params, cache) = K::build(&config, params)?;
        Ok(Block {
            config,
            params,
            cache,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &K::Config {
        &self.config
    }

    /// The parameters.
    pub fn params(&self) -> &K::Params<F> {
        &self.params
    }

    /// Replaces the parameters (e.g. after an optimiser step), shape-checked.
    ///
    /// # Errors
    ///
    /// As [`from_params`](Self::from_params); on error the block is unchanged.
    pub fn set_params(&mut self, params: K::Params<F>) -> Result<()> {
        *self = Self::from_params(self.config, params)?;
        Ok(())
    }

    pub(crate) fn kernel(&self) -> K::Kernel<'_, F> {
        K::kernel(&self.config, &self.params, &self.cache)
    }

    /// The mappings `H_pre`, `H_post`, `H_res` of every token (Eq. 7–8).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`
    /// - returns: `pre [T, n]`, `post [T, n]`, `res [T, n, n]`
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if `x` is not `[T, n, C]`; [`Error::NonFinite`] naming the
    /// first token of `x` holding a NaN or infinity.
    ///
    /// # Examples
    ///
    /// ```
    /// let block = mhc::MhcBlock::<f64>::from_params(mhc::MhcConfig::new(4, 8), mhc::MhcParams::zeros(4, 8))?;
    /// let maps = block.mappings(ndarray::Array3::ones((2, 4, 8)).view())?;
    /// assert!(maps.res.iter().all(|&v| (v - 0.25).abs() < 1e-12)); // zero bias: J/n
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn mappings(&self, x: ArrayView3<F>) -> Result<Mappings<F>> {
        mappings::mappings(&self.kernel(), x)
    }

    /// The read-out half of the block: the mappings and the sublayer input
    /// `u_t = Σ_j H_pre[t][j] x_t[j]`, in one fused pass over `x`.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`
    /// - returns: `u [T, C]` and the mappings
    ///
    /// # Errors
    ///
    /// As [`mappings`](Self::mappings).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let block = mhc::MhcBlock::<f32>::from_params(mhc::MhcConfig::new(2, 4), mhc::MhcParams::zeros(2, 4))?;
    /// let x = Array3::ones((5, 2, 4));
    /// let (u, maps) = block.read_out(x.view())?;
    /// let y = u.mapv(|v| 2.0 * v);                       // any sublayer, any framework
    /// let out = block.write_in(x.view(), &maps, y.view())?;
    /// assert_eq!(out, block.forward(x.view(), |u| u.mapv(|v| 2.0 * v))?);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn read_out(&self, x: ArrayView3<F>) -> Result<(Array2<F>, Mappings<F>)> {
        mappings::read_out(&self.kernel(), x)
    }

    /// [`read_out`](Self::read_out) into caller-provided buffers: `maps` is reused when it has
    /// the right shapes (reallocated otherwise), `u` must be `[T, C]`.
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
    /// use ndarray::{Array2, Array3};
    /// let block = mhc::MhcBlock::<f32>::from_params(mhc::MhcConfig::new(2, 4), mhc::MhcParams::zeros(2, 4))?;
    /// let mut maps = mhc::Mappings::zeros(5, 2);
    /// let mut u = Array2::zeros((5, 4));
    /// block.read_out_into(Array3::ones((5, 2, 4)).view(), &mut maps, u.view_mut())?;
    /// assert!(u.iter().all(|&v| v == 1.0)); // H_pre = ½ on two equal streams
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

    /// The write-in half: `out_t[i] = Σ_j H_res[t][i][j] x_t[j] + H_post[t][i] y_t` (the same
    /// kernel as [`mixing::write_in`]).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `y`: `[T, C]`; returns `[T, n, C]`
    ///
    /// # Errors
    ///
    /// As [`mixing::write_in`], plus [`Error::ShapeMismatch`] if `x` does not match the block.
    ///
    /// # Examples
    ///
    /// See [`read_out`](Self::read_out).
    pub fn write_in(
        &self,
        x: ArrayView3<F>,
        maps: &Mappings<F>,
        y: ArrayView2<F>,
    ) -> Result<Array3<F>> {
        let (n, c) = K::dims(&self.config);
        check_x(x.shape(), n, c)?;
        mixing::write_in(x, maps, y)
    }

    /// Read-out, sublayer, write-in: the block's forward pass (Eq. 3).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; the sublayer maps `u: [T, C]` to `y: [T, C]`; returns `[T, n, C]`
    ///
    /// # Errors
    ///
    /// As [`read_out`](Self::read_out) and [`write_in`](Self::write_in); [`Error::ShapeMismatch`]
    /// (`what: "sublayer output"`) if the sublayer returns another shape than `[T, C]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let block = mhc::MhcBlock::<f64>::from_params(mhc::MhcConfig::new(4, 2), mhc::MhcParams::zeros(4, 2))?;
    /// let x = Array3::ones((1, 4, 2));
    /// // Zero bias, replicated streams: out = x + F(2x) on every stream (H_pre = ½, n = 4).
    /// let out = block.forward(x.view(), |u| u.mapv(|v| v * 3.0))?;
    /// assert!(out.iter().all(|&v| (v - 7.0).abs() < 1e-12));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
    ) -> Result<Array3<F>> {
        mappings::forward(&self.kernel(), x, sublayer)
    }

    /// [`forward`](Self::forward) for training: also returns the sublayer output `y`, which the
    /// backward pass needs besides `x` (the paper's recompute strategy, §4.3.2: nothing else is
    /// kept).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; returns `out: [T, n, C]` and `y: [T, C]`
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

    /// The backward pass: from the block input `x`, the saved sublayer output `y` and the
    /// gradient `upstream = ∂out`, returns `∂x` and the gradients of every parameter.
    ///
    /// The mappings and `u` are recomputed from `x`; the sublayer is not called again: its
    /// VJP `(u, ∂y) → ∂u` is called once. To drive the sublayer's backward yourself (another
    /// framework, your own autodiff), call the halves [`write_in_backward`](Self::write_in_backward)
    /// and [`read_out_backward`](Self::read_out_backward) instead.
    ///
    /// # Shapes
    ///
    /// - `x`, `upstream`: `[T, n, C]`; `y`: `[T, C]`; the VJP maps `([T, C], [T, C])` to `[T, C]`
    /// - returns `∂x: [T, n, C]` and gradients shaped like [`MhcParams`]
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `x`, `y` (`"y"`), `upstream` (`"upstream"`) or a VJP result
    /// of the wrong shape (`"sublayer vjp output"`); [`Error::NonFinite`] naming the first token
    /// whose `x`, `y`, `upstream` or `∂u` holds a NaN or infinity.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use ndarray::Array3;
    /// let block = mhc::MhcBlock::<f64>::new(mhc::MhcConfig::new(4, 8), &mut StdRng::seed_from_u64(0))?;
    /// let x = Array3::from_shape_fn((3, 4, 8), |(t, i, c)| ((t + 2 * i + 3 * c) as f64).sin());
    /// let (out, y) = block.forward_train(x.view(), |u| u.mapv(f64::tanh))?;
    /// // Loss = Σ out: upstream gradient of ones. The sublayer's VJP: ∂u = ∂y ⊙ (1 − tanh²(u)).
    /// let (dx, grads) = block.backward(x.view(), y.view(), Array3::ones(out.raw_dim()).view(), |u, dy| {
    ///     &dy * &u.mapv(|v| 1.0 - v.tanh().powi(2))
    /// })?;
    /// assert_eq!(dx.shape(), x.shape());
    /// assert_eq!(grads.phi.shape(), block.params().phi.shape());
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn backward(
        &self,
        x: ArrayView3<F>,
        y: ArrayView2<F>,
        upstream: ArrayView3<F>,
        sublayer_vjp: impl FnOnce(ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, K::Params<F>)> {
        let g = backward::backward(&self.kernel(), x, y, upstream, sublayer_vjp)?;
        Ok(self.params_grad(g))
    }

    /// The write-in half of the backward pass: recomputes the mappings and `u` from `x`, and
    /// returns a [`Tape`] holding `u` and `∂y` for the sublayer's VJP.
    ///
    /// # Shapes
    ///
    /// - `x`, `upstream`: `[T, n, C]`; `y`: `[T, C]`; the tape's `u`, `dy`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward).
    ///
    /// # Examples
    ///
    /// The flow when the sublayer's backward lives elsewhere:
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use ndarray::Array3;
    /// let block = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(2, 4), &mut StdRng::seed_from_u64(0))?;
    /// let x = Array3::from_elem((5, 2, 4), 0.5f32);
    /// let (out, y) = block.forward_train(x.view(), |u| u.mapv(|v| 3.0 * v))?;
    /// let tape = block.write_in_backward(x.view(), y.view(), Array3::ones(out.raw_dim()).view())?;
    /// let du = tape.dy.mapv(|g| 3.0 * g); // the sublayer's VJP, computed by anything
    /// let (dx, grads) = block.read_out_backward(x.view(), tape, du.view())?;
    /// assert_eq!(dx.shape(), &[5, 2, 4]);
    /// assert_eq!(grads.bias.len(), 8);
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

    /// The read-out half of the backward pass: from the tape and `∂u`, returns `∂x` and the
    /// parameters' gradients.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `du`: `[T, C]`; returns `∂x: [T, n, C]` and [`MhcParams`]-shaped
    ///   gradients
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if `x`, the tape or `du` (`"sublayer vjp output"`) do not
    /// match; [`Error::NonFinite`] for a non-finite `∂u`.
    ///
    /// # Examples
    ///
    /// See [`write_in_backward`](Self::write_in_backward).
    pub fn read_out_backward(
        &self,
        x: ArrayView3<F>,
        tape: Tape<F>,
        du: ArrayView2<F>,
    ) -> Result<(Array3<F>, K::Params<F>)> {
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
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use ndarray::Array3;
    /// let block = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(2, 4), &mut StdRng::seed_from_u64(0))?;
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
    ) -> Result<K::Params<F>> {
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
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use ndarray::Array3;
    /// let block = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(2, 4), &mut StdRng::seed_from_u64(0))?;
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
    ) -> Result<K::Params<F>> {
        let (dw, acc) =
            backward::read_out_backward_into(&self.kernel(), x, tape, du, Default::default(), dx)?;
        Ok(self.grads(dw, acc))
    }

    fn params_grad(&self, g: RawGrads<F>) -> (Array3<F>, K::Params<F>) {
        (g.dx, self.grads(g.dw, g.acc))
    }

    /// The parameters' gradients from the projection weight's gradient and the accumulator.
    pub(crate) fn grads(&self, dw: Vec<F>, acc: Vec<F>) -> K::Params<F> {
        K::grads(&self.config, dw, acc)
    }
}

/// The chain primitives (SPEC §8): what [`MhcStack`](crate::MhcStack) is built on, for models
/// that run their own layer loop.
impl<F: Float> Block<F, Mhc> {
    /// The read-out of a block inside a chain (SPEC §8): this block's mappings from `x`, and the
    /// sublayer input `u` read out with `prev_pre` when given (the shifted schedule: the previous
    /// block's `H_pre`, or [`initial_pre`](crate::initial_pre) for the first block), with this
    /// block's own `H_pre` otherwise (then it is [`read_out_into`](Self::read_out_into)).
    ///
    /// With this, [`write_in_seam_into`](Self::write_in_seam_into) and the two `*_linked_into`
    /// backward halves, a model that runs its own layer loop (another framework, pipeline
    /// stages) gets what [`MhcStack`](crate::MhcStack) does.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `prev_pre`: `[T, n]`; `u`: `[T, C]`
    ///
    /// # Errors
    ///
    /// As [`read_out_into`](Self::read_out_into), plus [`Error::ShapeMismatch`]
    /// (`"read-out weights"`) for `prev_pre`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{Array2, Array3};
    /// let block = mhc::MhcBlock::<f32>::from_params(mhc::MhcConfig::new(2, 4), mhc::MhcParams::zeros(2, 4))?;
    /// let x = Array3::from_shape_fn((3, 2, 4), |(_, i, _)| i as f32);
    /// let (mut maps, mut u) = (mhc::Mappings::zeros(3, 2), Array2::zeros((3, 4)));
    /// // The first block of a shifted chain reads out stream 0 alone.
    /// block.read_out_linked_into(x.view(), Some(mhc::initial_pre(3, 2).view()), &mut maps, u.view_mut())?;
    /// assert!(u.iter().all(|&v| v == 0.0));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn read_out_linked_into(
        &self,
        x: ArrayView3<F>,
        prev_pre: Option<ArrayView2<F>>,
        maps: &mut Mappings<F>,
        u: ArrayViewMut2<F>,
    ) -> Result<()> {
        mappings::read_out_into(&self.kernel(), x, maps, u, prev_pre)
    }

    /// The seam between this block and the `next` in a chain: this block's write-in
    /// `x' = H_res·x + H_post·y` fused with `next`'s read-out of `x'` (its mappings and `u'`,
    /// read out with this block's `H_pre` under [`Schedule::Shifted`](crate::Schedule::Shifted), with `next`'s own under
    /// [`Schedule::Current`](crate::Schedule::Current)), in one pass over the streams. Bitwise equal to
    /// [`write_in`](Self::write_in) followed by [`read_out_linked_into`](Self::read_out_linked_into).
    ///
    /// `stage` is overwritten (its buffers are reused when they have the right shapes).
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `maps`: this block's, for `T` tokens; `y`: `[T, C]`
    /// - `stage.x`: `[T, n, C]`, `stage.maps`: `next`'s, `stage.u`: `[T, C]` (written)
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `x`, `maps` (`"pre"`, `"post"`, `"res"`), `y`, or a `next`
    /// with other `n` or `C` (`"next block"`); [`Error::NonFinite`] as
    /// [`write_in`](Self::write_in) (first the write-in's, naming `"sublayer output"` for a
    /// non-finite `y`) and as [`read_out`](Self::read_out) for `next`.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::{MhcBlock, MhcConfig, MhcParams, Schedule, Stage};
    /// use ndarray::Array3;
    /// let (a, b) = (
    ///     MhcBlock::<f64>::from_params(MhcConfig::new(2, 4), MhcParams::zeros(2, 4))?,
    ///     MhcBlock::<f64>::from_params(MhcConfig::new(2, 4), MhcParams::zeros(2, 4))?,
    /// );
    /// let x = Array3::from_elem((3, 2, 4), 0.5);
    /// let (u, maps) = a.read_out(x.view())?;
    /// let y = u.mapv(f64::tanh);
    /// let mut stage = Stage::default();
    /// a.write_in_seam_into(x.view(), &maps, y.view(), &b, Schedule::Current, &mut stage)?;
    /// assert_eq!(stage.x, a.write_in(x.view(), &maps, y.view())?);
    /// assert_eq!(stage.u, b.read_out(stage.x.view())?.0);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn write_in_seam_into(
        &self,
        x: ArrayView3<F>,
        maps: &Mappings<F>,
        y: ArrayView2<F>,
        next: &MhcBlock<F>,
        schedule: crate::Schedule,
        stage: &mut crate::Stage<F>,
    ) -> Result<()> {
        let (n, c) = (self.config.streams, self.config.dim);
        check_x(x.shape(), n, c)?;
        check_same(
            "next block",
            &[n, c],
            &[next.config.streams, next.config.dim],
        )?;
        let t = x.shape()[0];
        check_same("y", &[t, c], y.shape())?;
        check_same("pre", &[t, n], maps.pre.shape())?;
        check_same("post", &[t, n], maps.post.shape())?;
        check_same("res", &[t, n, n], maps.res.shape())?;
        stage.ensure(t, n, c)?;
        let x = x.as_standard_layout();
        let y = y.as_standard_layout();
        let (pre, post, res) = (
            maps.pre.as_standard_layout(),
            maps.post.as_standard_layout(),
            maps.res.as_standard_layout(),
        );
        let w = crate::seam::WriteIn {
            x: x.as_slice().expect("standard layout"),
            post: post.as_slice().expect("standard layout"),
            res: res.as_slice().expect("standard layout"),
            y: y.as_slice().expect("standard layout"),
            ro: (schedule == crate::Schedule::Shifted)
                .then(|| pre.as_slice().expect("standard layout")),
        };
        let (spre, spost, sres) = stage.maps.slices_mut();
        let r = crate::seam::ReadOut {
            x: stage.x.as_slice_mut().expect("standard layout"),
            pre: spre,
            post: spost,
            res: sres,
            u: stage.u.as_slice_mut().expect("standard layout"),
        };
        crate::seam::seam(&next.kernel(), w, r)
    }

    /// [`write_in_backward_into`](Self::write_in_backward_into) for a block inside a chain:
    /// `u` is recomputed with `prev_pre` when given (the shifted schedule, as in
    /// [`read_out_linked_into`](Self::read_out_linked_into)).
    ///
    /// # Shapes
    ///
    /// - `x`, `upstream`: `[T, n, C]`; `y`: `[T, C]`; `prev_pre`: `[T, n]`
    ///
    /// # Errors
    ///
    /// As [`write_in_backward_into`](Self::write_in_backward_into), plus
    /// [`Error::ShapeMismatch`] (`"read-out weights"`) for `prev_pre`.
    ///
    /// # Examples
    ///
    /// See [`read_out_backward_linked_into`](Self::read_out_backward_linked_into).
    pub fn write_in_backward_linked_into(
        &self,
        x: ArrayView3<F>,
        y: ArrayView2<F>,
        upstream: ArrayView3<F>,
        prev_pre: Option<ArrayView2<F>>,
        tape: &mut Tape<F>,
    ) -> Result<()> {
        backward::write_in_backward_into(&self.kernel(), x, y, upstream, prev_pre, tape)
    }

    /// [`read_out_backward_into`](Self::read_out_backward_into) for a block inside a chain
    /// (SPEC §8): the read-out's weights and the gradients of `H_pre` as `link` says.
    ///
    /// With `link.prev_pre` (shifted schedule), the read-out used those weights: their gradient
    /// `∂prev_pre[t][j] = ⟨∂u_t, x_t[j]⟩` is written into `link.dprev_pre` (when given; it is the
    /// previous block's `dpre`), and this block's own `H_pre` gets only `link.dpre`. Without it,
    /// `link.dpre` is added to the read-out's gradient of the block's own `H_pre` (the caller's
    /// `∂pre_{L-1}` for the last block of a current-schedule chain).
    ///
    /// # Shapes
    ///
    /// - `x`, `dx`: `[T, n, C]`; `du`: `[T, C]`; `link`'s arrays: `[T, n]`
    ///
    /// # Errors
    ///
    /// As [`read_out_backward_into`](Self::read_out_backward_into), plus
    /// [`Error::ShapeMismatch`] for `link`'s arrays (`"read-out weights"`, `"dpre"`,
    /// `"dprev_pre"`); [`Error::NonFinite`] (`"dpre"`) for a non-finite `link.dpre`.
    ///
    /// # Examples
    ///
    /// Two blocks under the shifted schedule, by hand (what [`MhcStack`](crate::MhcStack) does):
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use mhc::{ChainLink, MhcBlock, MhcConfig, Tape, initial_pre};
    /// use ndarray::{Array2, Array3};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let b0 = MhcBlock::<f64>::new(MhcConfig::new(2, 3), &mut rng)?;
    /// let b1 = MhcBlock::<f64>::new(MhcConfig::new(2, 3), &mut rng)?;
    /// let (t, e0) = (4, initial_pre::<f64>(4, 2));
    /// let x0 = Array3::from_shape_fn((t, 2, 3), |(a, b, c)| (a + b * c) as f64 * 0.1);
    /// // Forward: block 0 reads out with e_0, block 1 with block 0's H_pre.
    /// let (mut m0, mut u0) = (mhc::Mappings::zeros(t, 2), Array2::zeros((t, 3)));
    /// b0.read_out_linked_into(x0.view(), Some(e0.view()), &mut m0, u0.view_mut())?;
    /// let y0 = u0.clone(); // identity sublayers
    /// let x1 = b0.write_in(x0.view(), &m0, y0.view())?;
    /// let (mut m1, mut u1) = (mhc::Mappings::zeros(t, 2), Array2::zeros((t, 3)));
    /// b1.read_out_linked_into(x1.view(), Some(m0.pre.view()), &mut m1, u1.view_mut())?;
    /// let y1 = u1.clone();
    /// // Backward of ⟨1, x_2⟩, block 1 first: it hands block 0 the gradient of block 0's H_pre.
    /// let (mut tape, mut dx1, mut dpre0) = (Tape::default(), Array3::zeros((t, 2, 3)), Array2::zeros((t, 2)));
    /// b1.write_in_backward_linked_into(x1.view(), y1.view(), Array3::ones((t, 2, 3)).view(), Some(m0.pre.view()), &mut tape)?;
    /// let du1 = tape.dy.clone();
    /// let link = ChainLink { prev_pre: Some(m0.pre.view()), dpre: None, dprev_pre: Some(dpre0.view_mut()) };
    /// let _g1 = b1.read_out_backward_linked_into(x1.view(), &mut tape, du1.view(), link, dx1.view_mut())?;
    /// let mut dx0 = Array3::zeros((t, 2, 3));
    /// b0.write_in_backward_linked_into(x0.view(), y0.view(), dx1.view(), Some(e0.view()), &mut tape)?;
    /// let du0 = tape.dy.clone();
    /// let link = ChainLink { prev_pre: Some(e0.view()), dpre: Some(dpre0.view()), dprev_pre: None };
    /// let g0 = b0.read_out_backward_linked_into(x0.view(), &mut tape, du0.view(), link, dx0.view_mut())?;
    /// assert_eq!(g0.phi.shape(), &[6, 8]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn read_out_backward_linked_into(
        &self,
        x: ArrayView3<F>,
        tape: &mut Tape<F>,
        du: ArrayView2<F>,
        link: crate::ChainLink<'_, F>,
        dx: ArrayViewMut3<F>,
    ) -> Result<MhcParams<F>> {
        let (dw, acc) =
            backward::read_out_backward_linked_into(&self.kernel(), x, tape, du, link, dx)?;
        Ok(self.grads(dw, acc))
    }

    /// The backward seam between `prev.block` (block `l`) and this block (block `l + 1`) of a
    /// chain: this block's [`read_out_backward_linked_into`](Self::read_out_backward_linked_into)
    /// fused with block `l`'s
    /// [`write_in_backward_linked_into`](Self::write_in_backward_linked_into), whose upstream
    /// gradient is this block's `∂x_{l+1}`. Per chunk of tokens, `∂x_{l+1}` is completed in
    /// cache and consumed there by block `l`'s write-in half: it is never written to memory,
    /// which saves `2·n·C` values of traffic a token and a `[T, n, C]` buffer (what
    /// [`MhcStack::backward_into`](crate::MhcStack::backward_into) does between blocks). On a
    /// 2-core Zen 3 it is no faster than the two halves (the backward pass is bound by its
    /// arithmetic; BENCHMARKS.md).
    ///
    /// Returns this block's parameter gradients and fills `prev_tape` as block `l`'s
    /// `write_in_backward_linked_into` would; bitwise equal to the two calls one after the other.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `du`: `[T, C]`; `link`'s arrays: `[T, n]`
    /// - `prev.x`: `[T, n, C]`; `prev.y`: `[T, C]`; `prev.prev_pre`: `[T, n]`
    ///
    /// # Errors
    ///
    /// This block's first, as [`read_out_backward_linked_into`](Self::read_out_backward_linked_into)
    /// (without its `dx`); then block `l`'s, as
    /// [`write_in_backward_linked_into`](Self::write_in_backward_linked_into), except that a
    /// `prev.x` of another `T` is [`Error::ShapeMismatch`] `"x"` (the upstream gradient has this
    /// block's shape), and a `prev.block` with other `n` or `C` is `"previous block"`.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use mhc::{ChainLink, MhcBlock, MhcConfig, PrevBlock, Tape};
    /// use ndarray::Array3;
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let b0 = MhcBlock::<f64>::new(MhcConfig::new(2, 3), &mut rng)?;
    /// let b1 = MhcBlock::<f64>::new(MhcConfig::new(2, 3), &mut rng)?;
    /// let x0 = Array3::from_shape_fn((4, 2, 3), |(a, b, c)| (a + b * c) as f64 * 0.1);
    /// let (x1, y0) = b0.forward_train(x0.view(), |u| u.to_owned())?;
    /// let (x2, y1) = b1.forward_train(x1.view(), |u| u.to_owned())?;
    /// // Backward of ⟨1, x_2⟩ with identity sublayers: block 1's read-out half and block 0's
    /// // write-in half in one pass.
    /// let mut t1 = Tape::default();
    /// b1.write_in_backward_into(x1.view(), y1.view(), Array3::ones(x2.raw_dim()).view(), &mut t1)?;
    /// let du1 = t1.dy.clone();
    /// let mut t0 = Tape::default();
    /// let prev = PrevBlock { block: &b0, x: x0.view(), y: y0.view(), prev_pre: None };
    /// let g1 = b1.read_out_backward_seam_into(x1.view(), &mut t1, du1.view(), ChainLink::default(), prev, &mut t0)?;
    /// // The same as the two halves one after the other:
    /// let mut dx1 = Array3::zeros(x1.raw_dim());
    /// let g1_ = b1.read_out_backward_into(x1.view(), &mut t1, du1.view(), dx1.view_mut())?;
    /// let mut t0_ = Tape::default();
    /// b0.write_in_backward_into(x0.view(), y0.view(), dx1.view(), &mut t0_)?;
    /// assert_eq!((g1, &t0.dy), (g1_, &t0_.dy));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn read_out_backward_seam_into(
        &self,
        x: ArrayView3<F>,
        tape: &mut Tape<F>,
        du: ArrayView2<F>,
        link: crate::ChainLink<'_, F>,
        prev: PrevBlock<'_, F>,
        prev_tape: &mut Tape<F>,
    ) -> Result<MhcParams<F>> {
        let kp = prev.block.kernel();
        let side = backward::SeamPrev {
            k: &kp,
            x: prev.x,
            y: prev.y,
            ro: prev.prev_pre,
            tape: prev_tape,
        };
        match backward::backward_seam(&self.kernel(), x, tape, du, link, side) {
            Ok((dw, acc)) => Ok(self.grads(dw, acc)),
            Err(backward::SeamError::This(e) | backward::SeamError::Prev(e)) => Err(e),
        }
    }
}

/// The block before a backward seam, for
/// [`MhcBlock::read_out_backward_seam_into`]: block `l` of the seam `l → l + 1`, with what its
/// write-in half's backward needs.
///
/// # Shapes
///
/// - `x`: `[T, n, C]`; `y`: `[T, C]`; `prev_pre`: `[T, n]`
///
/// # Examples
///
/// See [`MhcBlock::read_out_backward_seam_into`].
#[derive(Clone, Copy, Debug)]
pub struct PrevBlock<'a, F: Float> {
    /// Block `l`.
    pub block: &'a MhcBlock<F>,
    /// Its input `x_l`.
    pub x: ArrayView3<'a, F>,
    /// Its sublayer's output `y_l`.
    pub y: ArrayView2<'a, F>,
    /// The weights its sublayer input was read out with, when they are not its own `H_pre`: under
    /// [`Schedule::Shifted`](crate::Schedule::Shifted) block `l − 1`'s `H_pre`
    /// ([`initial_pre`](crate::initial_pre) for block 0), as in
    /// [`write_in_backward_linked_into`](MhcBlock::write_in_backward_linked_into).
    pub prev_pre: Option<ArrayView2<'a, F>>,
}
