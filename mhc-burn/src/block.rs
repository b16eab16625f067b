//! The mHC block (SPEC §3, paper Eq. 3, 7, 8) as a burn module.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::sigmoid;

use crate::convert::{array1, array2, tensor1, tensor2};
use crate::mixing::{Mappings, read_out, rms, tokens_f32, write_in};
use crate::sinkhorn::sinkhorn;

/// The initial bias of a block (SPEC §3; the core's [`mhc::BiasInit`]).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum BiasInit {
    /// All zeros: `H_pre = ½`, `H_post = 1`, `H_res = J/n` (the paper-consistent default).
    Zero,
    /// `H_res ≈ I`, `H_pre ≈ 1/n`, `H_post = 1`.
    IdentityLike,
}

impl From<BiasInit> for mhc::BiasInit {
    fn from(b: BiasInit) -> Self {
        match b {
            BiasInit::Zero => mhc::BiasInit::Zero,
            BiasInit::IdentityLike => mhc::BiasInit::IdentityLike,
        }
    }
}

/// Configuration of an [`MhcBlock`]: the fields of [`mhc::MhcConfig`], with the projector's two
/// flattened into `sinkhorn_iters` and `sinkhorn_eps`.
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let block = mhc_burn::MhcBlockConfig::new(4, 64).with_pre_eps(1e-6).init(&Device::flex());
/// assert_eq!(block.phi.dims(), [256, 24]);
/// ```
#[derive(Config, Debug)]
pub struct MhcBlockConfig {
    /// Number of streams `n` (the paper uses 4).
    pub streams: usize,
    /// Channels per stream `C`.
    pub dim: usize,
    /// Sinkhorn-Knopp iterations (paper: 20).
    #[config(default = 20)]
    pub sinkhorn_iters: usize,
    /// Sinkhorn epsilon (0: the paper's map; DeepSeek's kernel: 1e-6).
    #[config(default = 0.0)]
    pub sinkhorn_eps: f64,
    /// RMS epsilon, > 0.
    #[config(default = 1e-6)]
    pub rms_eps: f64,
    /// Added to `H_pre` after the sigmoid, ≥ 0 (DeepSeek-V4: 1e-6).
    #[config(default = 0.0)]
    pub pre_eps: f64,
    /// The initial bias.
    #[config(default = "BiasInit::Zero")]
    pub bias_init: BiasInit,
    /// Standard deviation of φ's normal initialisation.
    #[config(default = 0.02)]
    pub phi_std: f64,
    /// Initial `alpha` (pre, post, res), paper Table 5: 0.01.
    #[config(default = 0.01)]
    pub alpha_init: f64,
}

impl MhcBlockConfig {
    /// The core's configuration with these fields.
    pub fn to_core(&self) -> mhc::MhcConfig {
        let mut c = mhc::MhcConfig::new(self.streams, self.dim);
        c.sinkhorn = mhc::SinkhornKnopp {
            iters: self.sinkhorn_iters,
            eps: self.sinkhorn_eps,
        };
        c.rms_eps = self.rms_eps;
        c.pre_eps = self.pre_eps;
        c.bias_init = self.bias_init.into();
        c.phi_std = self.phi_std;
        c.alpha_init = self.alpha_init;
        c
    }

    /// A block initialised as the paper says (φ ~ N(0, `phi_std²`) from the device's random
    /// generator, `alpha = alpha_init`, the bias from `bias_init`), or the configuration's error.
    ///
    /// # Errors
    ///
    /// The errors of [`mhc::MhcConfig::validate`] (e.g. `streams == 0`, `rms_eps ≤ 0`,
    /// `sinkhorn_iters == 0`).
    ///
    /// # Examples
    ///
    /// ```
    /// use burn::prelude::*;
    /// let bad = mhc_burn::MhcBlockConfig::new(4, 8).with_rms_eps(0.0);
    /// assert!(matches!(bad.try_init(&Device::flex()), Err(mhc::Error::InvalidEpsilon { what: "rms_eps", .. })));
    /// ```
    pub fn try_init(&self, device: &Device) -> mhc::Result<MhcBlock> {
        let core = self.to_core();
        core.validate()?;
        let (n, c, m) = (self.streams, self.dim, core.mapping_width());
        let phi = Tensor::<2>::random([n * c, m], Distribution::Normal(0.0, self.phi_std), device);
        let bias = mhc::MhcParams::<f32>::initial_bias(core.bias_init, n);
        Ok(MhcBlock {
            phi: Param::from_tensor(phi),
            alpha: Param::from_tensor(Tensor::full([3], self.alpha_init, device)),
            bias: Param::from_tensor(tensor1(&bias, device)),
            streams: n,
            dim: c,
            sinkhorn_iters: self.sinkhorn_iters,
            sinkhorn_eps: self.sinkhorn_eps,
            rms_eps: self.rms_eps,
            pre_eps: self.pre_eps,
        })
    }

    /// [`try_init`](Self::try_init), for configurations known to be valid.
    ///
    /// # Panics
    ///
    /// With the error's message if the configuration is invalid (see
    /// [`try_init`](Self::try_init)).
    pub fn init(&self, device: &Device) -> MhcBlock {
        self.try_init(device)
            .unwrap_or_else(|e| panic!("invalid MhcBlockConfig: {e}"))
    }
}

/// An mHC block (SPEC §3, §9): `n` residual streams read out into a sublayer and mixed by a
/// per-token doubly-stochastic `H_res`, in burn tensor ops on any backend, trained by burn's
/// autodiff.
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let device = Device::flex();
/// let block = mhc_burn::MhcBlockConfig::new(4, 8).init(&device);
/// let x = Tensor::<4>::ones([2, 3, 4, 8], &device);
/// let out = block.forward(x, |u| u.tanh());
/// assert_eq!(out.dims(), [2, 3, 4, 8]);
/// ```
#[derive(Module, Debug)]
pub struct MhcBlock {
    /// φ: `[n·C, n² + 2n]`, columns `[pre (n) | post (n) | res (n², row-major)]`.
    pub phi: Param<Tensor<2>>,
    /// α: `[3]` (pre, post, res).
    pub alpha: Param<Tensor<1>>,
    /// b: `[n² + 2n]`.
    pub bias: Param<Tensor<1>>,
    /// `n`.
    pub streams: usize,
    /// `C`.
    pub dim: usize,
    /// Sinkhorn-Knopp iterations.
    pub sinkhorn_iters: usize,
    /// Sinkhorn epsilon.
    pub sinkhorn_eps: f64,
    /// RMS epsilon.
    pub rms_eps: f64,
    /// Added to `H_pre` after the sigmoid.
    pub pre_eps: f64,
}

impl MhcBlock {
    /// The burn twin of a core block, on `device` (f32 parameters).
    ///
    /// # Examples
    ///
    /// ```
    /// use burn::prelude::*;
    /// let core = mhc::MhcBlock::<f32>::from_params(mhc::MhcConfig::new(2, 4), mhc::MhcParams::zeros(2, 4))?;
    /// let block = mhc_burn::MhcBlock::from_core(&core, &Device::flex());
    /// assert_eq!(block.to_core()?.params(), core.params());
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn from_core(block: &mhc::MhcBlock<f32>, device: &Device) -> Self {
        let (cfg, p) = (block.config(), block.params());
        MhcBlock {
            phi: Param::from_tensor(tensor2(&p.phi, device)),
            alpha: Param::from_tensor(Tensor::from_floats(p.alpha, device)),
            bias: Param::from_tensor(tensor1(&p.bias, device)),
            streams: cfg.streams,
            dim: cfg.dim,
            sinkhorn_iters: cfg.sinkhorn.iters,
            sinkhorn_eps: cfg.sinkhorn.eps,
            rms_eps: cfg.rms_eps,
            pre_eps: cfg.pre_eps,
        }
    }

    /// The core block with these parameters (read back from the device).
    ///
    /// # Errors
    ///
    /// The errors of [`mhc::MhcBlock::from_params`]: a NaN or infinite parameter (e.g. after a
    /// diverged training run), a parameter of the wrong shape.
    pub fn to_core(&self) -> mhc::Result<mhc::MhcBlock<f32>> {
        let mut cfg = mhc::MhcConfig::new(self.streams, self.dim);
        cfg.sinkhorn = mhc::SinkhornKnopp {
            iters: self.sinkhorn_iters,
            eps: self.sinkhorn_eps,
        };
        cfg.rms_eps = self.rms_eps;
        cfg.pre_eps = self.pre_eps;
        let a = array1(&self.alpha.val());
        let params = mhc::MhcParams {
            phi: array2(&self.phi.val()),
            alpha: [a[0], a[1], a[2]],
            bias: array1(&self.bias.val()),
        };
        mhc::MhcBlock::from_params(cfg, params)
    }

    /// The mappings of every token (Eq. 7–8), in f32.
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; returns `pre`, `post`: `[batch, seq, n]`, `res`:
    ///   `[batch, seq, n, n]`
    ///
    /// # Examples
    ///
    /// ```
    /// use burn::prelude::*;
    /// let block = mhc_burn::MhcBlockConfig::new(4, 8).init(&Device::flex());
    /// let maps = block.mappings(Tensor::ones([1, 2, 4, 8], &Device::flex()));
    /// assert_eq!(maps.res.dims(), [1, 2, 4, 4]);
    /// ```
    pub fn mappings(&self, x: Tensor<4>) -> Mappings {
        let [b, s, n, c] = x.dims();
        assert_shape!(x, [b, s, self.streams, self.dim]);
        let t = b * s;
        let f = tokens_f32(&x).reshape([t, n * c]);
        let h = f.clone().matmul(self.phi.val()) / rms(f, self.rms_eps);
        let alpha = self.alpha.val();
        let bias = self.bias.val().reshape([1, n * n + 2 * n]);
        let part = |k: usize, lo: usize, len: usize| {
            let a = alpha.clone().narrow(0, k, 1).reshape([1, 1]);
            h.clone().narrow(1, lo, len) * a + bias.clone().narrow(1, lo, len)
        };
        let pre = sigmoid(part(0, 0, n)) + self.pre_eps;
        let post = sigmoid(part(1, n, n)) * 2.0;
        let res = sinkhorn(
            part(2, 2 * n, n * n).reshape([t, n, n]),
            self.sinkhorn_iters,
            self.sinkhorn_eps,
        );
        Mappings::from_flat(b, s, pre, post, res)
    }

    /// Read-out, sublayer, write-in (Eq. 3).
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; the sublayer maps `[batch, seq, C]` to `[batch, seq, C]`;
    ///   returns `[batch, seq, n, C]`
    ///
    /// # Panics
    ///
    /// If `x` is not `[.., .., n, C]`.
    ///
    /// # Examples
    ///
    /// See [`MhcBlock`].
    pub fn forward(
        &self,
        x: Tensor<4>,
        sublayer: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<4> {
        let maps = self.mappings(x.clone());
        let y = sublayer(read_out(x.clone(), maps.pre.clone()));
        write_in(x, &maps, y)
    }
}

/// Configuration of an [`HcBlock`] (the core's [`mhc::HcConfig`]).
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let block = mhc_burn::HcBlockConfig::new(4, 8).with_layer(1).init(&Device::flex());
/// assert_eq!(block.b_pre.val().into_data().try_to_vec::<f32>().unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
/// ```
#[derive(Config, Debug)]
pub struct HcBlockConfig {
    /// Number of streams `n`.
    pub streams: usize,
    /// Channels per stream `C`.
    pub dim: usize,
    /// RMS epsilon, > 0.
    #[config(default = 1e-6)]
    pub rms_eps: f64,
    /// The layer index `k`: `b_pre = e_(k mod n)` at initialisation (HC paper §2.3).
    #[config(default = 0)]
    pub layer: usize,
    /// Initial `alpha`.
    #[config(default = 0.01)]
    pub alpha_init: f64,
}

impl HcBlockConfig {
    /// A block with HC's initialisation (`theta = 0`, `b_pre = e_(layer mod n)`, `b_post = 1`,
    /// `b_res = I`), or the configuration's error.
    ///
    /// # Errors
    ///
    /// The errors of [`mhc::HcConfig::validate`].
    pub fn try_init(&self, device: &Device) -> mhc::Result<HcBlock> {
        let mut cfg = mhc::HcConfig::new(self.streams, self.dim);
        cfg.rms_eps = self.rms_eps;
        cfg.layer = self.layer;
        cfg.alpha_init = self.alpha_init;
        Ok(HcBlock::from_core(&mhc::HcBlock::<f32>::new(cfg)?, device))
    }

    /// [`try_init`](Self::try_init), for configurations known to be valid.
    ///
    /// # Panics
    ///
    /// With the error's message if the configuration is invalid.
    pub fn init(&self, device: &Device) -> HcBlock {
        self.try_init(device)
            .unwrap_or_else(|e| panic!("invalid HcBlockConfig: {e}"))
    }
}

/// The Hyper-Connections baseline (mHC paper Eq. 5) as a burn module: unconstrained dynamic
/// `H_pre`, `H_post`, `H_res` from tanh projections of per-stream RMS-normalised streams.
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let device = Device::flex();
/// let block = mhc_burn::HcBlockConfig::new(2, 4).init(&device);
/// let out = block.forward(Tensor::<4>::ones([1, 3, 2, 4], &device), |u| u * 2.0);
/// assert_eq!(out.dims(), [1, 3, 2, 4]);
/// ```
#[derive(Module, Debug)]
pub struct HcBlock {
    /// `theta_pre`: `[C]`.
    pub theta_pre: Param<Tensor<1>>,
    /// `theta_post`: `[C]`.
    pub theta_post: Param<Tensor<1>>,
    /// `theta_res`: `[n, C]`.
    pub theta_res: Param<Tensor<2>>,
    /// α: `[3]` (pre, post, res).
    pub alpha: Param<Tensor<1>>,
    /// `b_pre`: `[n]`.
    pub b_pre: Param<Tensor<1>>,
    /// `b_post`: `[n]`.
    pub b_post: Param<Tensor<1>>,
    /// `b_res`: `[n, n]`.
    pub b_res: Param<Tensor<2>>,
    /// `n`.
    pub streams: usize,
    /// `C`.
    pub dim: usize,
    /// RMS epsilon.
    pub rms_eps: f64,
}

impl HcBlock {
    /// The burn twin of a core HC block, on `device`.
    pub fn from_core(block: &mhc::HcBlock<f32>, device: &Device) -> Self {
        let (cfg, p) = (block.config(), block.params());
        let p1 = |a: &ndarray::Array1<f32>| Param::from_tensor(tensor1(a, device));
        let p2 = |a: &ndarray::Array2<f32>| Param::from_tensor(tensor2(a, device));
        HcBlock {
            theta_pre: p1(&p.theta_pre),
            theta_post: p1(&p.theta_post),
            theta_res: p2(&p.theta_res),
            alpha: Param::from_tensor(Tensor::from_floats(p.alpha, device)),
            b_pre: p1(&p.b_pre),
            b_post: p1(&p.b_post),
            b_res: p2(&p.b_res),
            streams: cfg.streams,
            dim: cfg.dim,
            rms_eps: cfg.rms_eps,
        }
    }

    /// The core block with these parameters.
    ///
    /// # Errors
    ///
    /// The errors of [`mhc::HcBlock::from_params`].
    pub fn to_core(&self) -> mhc::Result<mhc::HcBlock<f32>> {
        let mut cfg = mhc::HcConfig::new(self.streams, self.dim);
        cfg.rms_eps = self.rms_eps;
        let a = array1(&self.alpha.val());
        let params = mhc::HcParams {
            theta_pre: array1(&self.theta_pre.val()),
            theta_post: array1(&self.theta_post.val()),
            theta_res: array2(&self.theta_res.val()),
            alpha: [a[0], a[1], a[2]],
            b_pre: array1(&self.b_pre.val()),
            b_post: array1(&self.b_post.val()),
            b_res: array2(&self.b_res.val()),
        };
        mhc::HcBlock::from_params(cfg, params)
    }

    /// HC's mappings (mHC paper Eq. 5), in f32.
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; returns `[batch, seq, n]`, `[batch, seq, n]`,
    ///   `[batch, seq, n, n]`
    pub fn mappings(&self, x: Tensor<4>) -> Mappings {
        let [b, s, n, c] = x.dims();
        assert_shape!(x, [b, s, self.streams, self.dim]);
        let t = b * s;
        let f = tokens_f32(&x);
        let xn = (f.clone() / rms(f, self.rms_eps)).reshape([t * n, c]);
        // One product with the columns [theta_pre | theta_post | theta_res[0..n]], as the core.
        let w = Tensor::cat(
            vec![
                self.theta_pre.val().reshape([c, 1]),
                self.theta_post.val().reshape([c, 1]),
                self.theta_res.val().transpose(),
            ],
            1,
        );
        let z = xn.matmul(w).tanh().reshape([t, n, n + 2]); // [T, j, k]
        let alpha = self.alpha.val();
        let a = |k: usize| alpha.clone().narrow(0, k, 1);
        let pre = z.clone().narrow(2, 0, 1).reshape([t, n]) * a(0).reshape([1, 1])
            + self.b_pre.val().reshape([1, n]);
        let post = z.clone().narrow(2, 1, 1).reshape([t, n]) * a(1).reshape([1, 1])
            + self.b_post.val().reshape([1, n]);
        // z[t, j, 2 + i] = tanh(theta_res[i] · x̂_t[j]) → res[t, i, j].
        let res = z.narrow(2, 2, n).swap_dims(1, 2) * a(2).reshape([1, 1, 1])
            + self.b_res.val().reshape([1, n, n]);
        Mappings::from_flat(b, s, pre, post, res)
    }

    /// Read-out, sublayer, write-in with HC's mappings.
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; the sublayer maps `[batch, seq, C]` to itself; returns
    ///   `[batch, seq, n, C]`
    ///
    /// # Panics
    ///
    /// If `x` is not `[.., .., n, C]`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        sublayer: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<4> {
        let maps = self.mappings(x.clone());
        let y = sublayer(read_out(x.clone(), maps.pre.clone()));
        write_in(x, &maps, y)
    }
}

/// The plain residual connection `out = x + F(x)` on one stream, for comparisons.
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let x = Tensor::<3>::ones([1, 2, 4], &Device::flex());
/// let out = mhc_burn::ResidualBlock.forward(x, |u| u * 2.0);
/// assert_eq!(out.into_data().try_to_vec::<f32>().unwrap(), vec![3.0; 8]);
/// ```
#[derive(Module, Debug, Default)]
pub struct ResidualBlock;

impl ResidualBlock {
    /// `x + F(x)`.
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, C]`; returns `[batch, seq, C]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        sublayer: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        x.clone() + sublayer(x)
    }
}
