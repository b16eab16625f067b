//! Read-out and write-in (SPEC §3, paper Eq. 3) in burn tensor ops, shared by mHC and HC, and
//! the conversions between the crate's 4-D activations and the core's token-major layout.

use burn::prelude::*;
use burn::tensor::FloatDType;

/// The per-token mappings of a block, in f32 (SPEC §9: mappings are computed in f32 whatever the
/// activations' dtype).
///
/// # Shapes
///
/// - `pre`, `post`: `[batch, seq, n]`
/// - `res`: `[batch, seq, n, n]`, `res[.., i, j]` the weight of input stream `j` in output `i`
#[derive(Clone, Debug)]
pub struct Mappings {
    /// `H_pre`: `[batch, seq, n]`.
    pub pre: Tensor<3>,
    /// `H_post`: `[batch, seq, n]`.
    pub post: Tensor<3>,
    /// `H_res`: `[batch, seq, n, n]`.
    pub res: Tensor<4>,
}

impl Mappings {
    /// The token-major forms `[T, n]`, `[T, n]`, `[T, n, n]`.
    pub(crate) fn flat(&self) -> (Tensor<2>, Tensor<2>, Tensor<3>) {
        let [b, s, n] = self.pre.dims();
        (
            self.pre.clone().reshape([b * s, n]),
            self.post.clone().reshape([b * s, n]),
            self.res.clone().reshape([b * s, n, n]),
        )
    }

    pub(crate) fn from_flat(
        b: usize,
        s: usize,
        pre: Tensor<2>,
        post: Tensor<2>,
        res: Tensor<3>,
    ) -> Self {
        let n = pre.dims()[1];
        Mappings {
            pre: pre.reshape([b, s, n]),
            post: post.reshape([b, s, n]),
            res: res.reshape([b, s, n, n]),
        }
    }
}

/// `x: [b, s, n, C]` as `[T, n, C]`, and in f32 for the mappings.
pub(crate) fn tokens_f32(x: &Tensor<4>) -> Tensor<3> {
    let [b, s, n, c] = x.dims();
    x.clone().cast(FloatDType::F32).reshape([b * s, n, c])
}

/// `u_t = Σ_j w[t][j] · x_t[j]`: `x: [b, s, n, C]`, `w: [b, s, n]` → `[b, s, C]`, in the
/// activations' dtype.
///
/// # Shapes
///
/// - `x`: `[batch, seq, n, C]`; `w`: `[batch, seq, n]`; returns `[batch, seq, C]`
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let device = Device::flex();
/// let x = Tensor::<4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device);
/// let w = Tensor::<3>::from_floats([[[0.5, 0.25]]], &device);
/// let u: Vec<f32> = mhc_burn::read_out(x, w).into_data().try_to_vec().unwrap();
/// assert_eq!(u, vec![1.25, 2.0]);
/// ```
pub fn read_out(x: Tensor<4>, w: Tensor<3>) -> Tensor<3> {
    let [b, s, n, c] = x.dims();
    let w = w.cast(x.dtype()).reshape([b * s, 1, n]);
    w.matmul(x.reshape([b * s, n, c])).reshape([b, s, c])
}

/// `out_t[i] = Σ_j H_res[t][i][j] · x_t[j] + H_post[t][i] · y_t`, in the activations' dtype.
///
/// # Shapes
///
/// - `x`: `[batch, seq, n, C]`; `y`: `[batch, seq, C]`; returns `[batch, seq, n, C]`
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// use mhc_burn::Mappings;
/// let device = Device::flex();
/// let x = Tensor::<4>::ones([1, 1, 2, 3], &device);
/// let maps = Mappings {
///     pre: Tensor::full([1, 1, 2], 0.5, &device),
///     post: Tensor::ones([1, 1, 2], &device),
///     res: Tensor::<2>::eye(2, &device).reshape([1, 1, 2, 2]),
/// };
/// let out = mhc_burn::write_in(x, &maps, Tensor::full([1, 1, 3], 2.0, &device));
/// let v: Vec<f32> = out.into_data().try_to_vec().unwrap();
/// assert!(v.iter().all(|&v| v == 3.0));
/// ```
pub fn write_in(x: Tensor<4>, maps: &Mappings, y: Tensor<3>) -> Tensor<4> {
    let [b, s, n, c] = x.dims();
    let dt = x.dtype();
    let (_, post, res) = maps.flat();
    let x3 = x.reshape([b * s, n, c]);
    let mixed = res.cast(dt).matmul(x3);
    let post = post.cast(dt).reshape([b * s, n, 1]);
    let y = y.reshape([b * s, 1, c]);
    (mixed + post * y).reshape([b, s, n, c])
}

/// `sqrt(mean(v²) + eps)` over the last dimension, kept as size 1.
pub(crate) fn rms<const D: usize>(v: Tensor<D>, eps: f64) -> Tensor<D> {
    (v.square().mean_dim(D - 1) + eps).sqrt()
}
