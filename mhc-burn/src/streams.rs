//! Entering and leaving the `n` streams (SPEC §3), once per network.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;

use crate::convert::{array1, array2, tensor1, tensor2};
use crate::mixing::{read_out, rms, tokens_f32};

/// Replicates each token into `n` identical streams.
///
/// # Shapes
///
/// - `h`: `[batch, seq, C]`; returns `[batch, seq, n, C]`
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let x = mhc_burn::expand(Tensor::<3>::ones([2, 3, 8], &Device::flex()), 4);
/// assert_eq!(x.dims(), [2, 3, 4, 8]);
/// ```
pub fn expand(h: Tensor<3>, n: usize) -> Tensor<4> {
    let [b, s, c] = h.dims();
    h.unsqueeze_dim::<4>(2).expand([b, s, n, c])
}

/// How [`collapse`] reduces the streams (the core's [`mhc::Collapse`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Collapse {
    /// `Σ_i x[i]`.
    Sum,
    /// `(1/n) Σ_i x[i]`.
    #[default]
    Mean,
}

/// Reduces `n` streams to one.
///
/// # Shapes
///
/// - `x`: `[batch, seq, n, C]`; returns `[batch, seq, C]`
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let h = mhc_burn::collapse(Tensor::<4>::ones([1, 2, 4, 3], &Device::flex()), mhc_burn::Collapse::Sum);
/// assert_eq!(h.into_data().try_to_vec::<f32>().unwrap(), vec![4.0; 6]);
/// ```
pub fn collapse(x: Tensor<4>, how: Collapse) -> Tensor<3> {
    let [b, s, _, c] = x.dims();
    match how {
        Collapse::Sum => x.sum_dim(2).reshape([b, s, c]),
        Collapse::Mean => x.mean_dim(2).reshape([b, s, c]),
    }
}

/// DeepSeek-V4's learned collapse (`hc_head`; the core's [`mhc::streams::LearnedCollapse`]):
/// `h = Σ_j w_j x_j` with `w = sigmoid(scale · (vec(x)·φ)/rms(x) + bias) + pre_eps`.
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let device = Device::flex();
/// let head = mhc_burn::LearnedCollapse::new(4, 8, &device);
/// let h = head.forward(Tensor::<4>::ones([1, 2, 4, 8], &device));
/// assert_eq!(h.dims(), [1, 2, 8]);
/// ```
#[derive(Module, Debug)]
pub struct LearnedCollapse {
    /// φ: `[n·C, n]`.
    pub phi: Param<Tensor<2>>,
    /// `[1]`.
    pub scale: Param<Tensor<1>>,
    /// `[n]`.
    pub bias: Param<Tensor<1>>,
    /// `n`.
    pub streams: usize,
    /// `C`.
    pub dim: usize,
    /// RMS epsilon.
    pub rms_eps: f64,
    /// Added to the weights after the sigmoid.
    pub pre_eps: f64,
}

impl LearnedCollapse {
    /// A head with φ = 0, scale 1 and a zero bias (the mean of the streams' halves: weights ½),
    /// DeepSeek-V4's epsilons (1e-6).
    pub fn new(streams: usize, dim: usize, device: &Device) -> Self {
        LearnedCollapse {
            phi: Param::from_tensor(Tensor::zeros([streams * dim, streams], device)),
            scale: Param::from_tensor(Tensor::ones([1], device)),
            bias: Param::from_tensor(Tensor::zeros([streams], device)),
            streams,
            dim,
            rms_eps: 1e-6,
            pre_eps: 1e-6,
        }
    }

    /// The burn twin of a core head.
    pub fn from_core(head: &mhc::streams::LearnedCollapse<f32>, device: &Device) -> Self {
        let (n, c) = head.dims();
        LearnedCollapse {
            phi: Param::from_tensor(tensor2(head.phi(), device)),
            scale: Param::from_tensor(Tensor::from_floats([head.scale()], device)),
            bias: Param::from_tensor(tensor1(head.bias(), device)),
            streams: n,
            dim: c,
            rms_eps: head.rms_eps(),
            pre_eps: head.pre_eps(),
        }
    }

    /// The core head with these parameters.
    ///
    /// # Errors
    ///
    /// The errors of [`mhc::streams::LearnedCollapse::new`].
    pub fn to_core(&self) -> mhc::Result<mhc::streams::LearnedCollapse<f32>> {
        mhc::streams::LearnedCollapse::new(
            self.streams,
            self.dim,
            array2(&self.phi.val()),
            array1(&self.scale.val())[0],
            array1(&self.bias.val()),
            self.rms_eps,
            self.pre_eps,
        )
    }

    /// The read-out weights of every token, in f32.
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; returns `[batch, seq, n]`
    pub fn weights(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, s, n, c] = x.dims();
        assert_shape!(x, [b, s, self.streams, self.dim]);
        let f = tokens_f32(&x).reshape([b * s, n * c]);
        let h = f.clone().matmul(self.phi.val()) / rms(f, self.rms_eps);
        let z = h * self.scale.val().reshape([1, 1]) + self.bias.val().reshape([1, n]);
        (sigmoid(z) + self.pre_eps).reshape([b, s, n])
    }

    /// `h = Σ_j w_j x_j`.
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; returns `[batch, seq, C]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let w = self.weights(x.clone());
        read_out(x, w)
    }
}
