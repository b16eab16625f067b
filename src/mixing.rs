//! Read-out and write-in (paper Eq. 3), shared by mHC and HC: the two ways of computing the
//! mappings feed one implementation of the mixing.
//!
//! - read-out: `u_t = Σ_j H_pre[t][j] · x_t[j]`, the sublayer's input;
//! - write-in: `out_t[i] = Σ_j H_res[t][i][j] · x_t[j] + H_post[t][i] · y_t`.
//!
//! Both are memory-bound: one pass over each token's `n·C` values, the `n×n` weights in
//! registers, the `C` loops vectorised by LLVM.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::error::{Error, Result, check_same, try_zeroed};
use crate::{Float, par};

use crate::reduce::dot;
pub(crate) use crate::reduce::{all_finite, with_slice_mut};

/// The mappings of a block for `T` tokens (paper Eq. 3): `H_pre`, `H_post` and `H_res`.
///
/// # Shapes
///
/// - `pre`: `[T, n]`, the read-out weights (`u_t = Σ_j pre[t][j] x_t[j]`)
/// - `post`: `[T, n]`, the write-in weights of the sublayer output
/// - `res`: `[T, n, n]`, `res[t][i][j]` the weight of input stream `j` in output stream `i`
#[derive(Clone, Debug, PartialEq)]
pub struct Mappings<F> {
    /// `H_pre`: `[T, n]`.
    pub pre: Array2<F>,
    /// `H_post`: `[T, n]`.
    pub post: Array2<F>,
    /// `H_res`: `[T, n, n]`.
    pub res: Array3<F>,
}

impl<F: Float> Mappings<F> {
    /// All-zero mappings for `t` tokens and `n` streams (a buffer for the `*_into` calls).
    ///
    /// # Panics
    ///
    /// If `t·n·n` overflows `usize` or cannot be allocated (the crate's own calls check both
    /// and return an error instead).
    ///
    /// # Examples
    ///
    /// ```
    /// let m = mhc::Mappings::<f32>::zeros(5, 4);
    /// assert_eq!(m.res.shape(), &[5, 4, 4]);
    /// ```
    pub fn zeros(t: usize, n: usize) -> Self {
        Mappings {
            pre: Array2::zeros((t, n)),
            post: Array2::zeros((t, n)),
            res: Array3::zeros((t, n, n)),
        }
    }

    /// `H_pre = 1/n`, `H_post = 1`, `H_res = I`: the mixing that leaves the streams alone and
    /// adds the sublayer output to each.
    ///
    /// # Examples
    ///
    /// ```
    /// let m = mhc::Mappings::<f64>::identity(1, 2);
    /// assert_eq!(m.res[[0, 1, 1]], 1.0);
    /// assert_eq!(m.pre[[0, 0]], 0.5);
    /// ```
    pub fn identity(t: usize, n: usize) -> Self {
        let inv = F::one() / F::from_usize(n.max(1));
        Mappings {
            pre: Array2::from_elem((t, n), inv),
            post: Array2::ones((t, n)),
            res: Array3::from_shape_fn(
                (t, n, n),
                |(_, i, j)| if i == j { F::one() } else { F::zero() },
            ),
        }
    }

    /// [`Self::zeros`] with the sizes checked and allocation failure reported.
    pub(crate) fn try_zeros(t: usize, n: usize) -> Result<Self> {
        let tn = crate::error::checked_size("mappings", &[t, n])?;
        let tnn = crate::error::checked_size("mappings", &[t, n, n])?;
        Ok(Mappings {
            pre: Array2::from_shape_vec((t, n), try_zeroed("pre", tn)?).expect("t·n"),
            post: Array2::from_shape_vec((t, n), try_zeroed("post", tn)?).expect("t·n"),
            res: Array3::from_shape_vec((t, n, n), try_zeroed("res", tnn)?).expect("t·n·n"),
        })
    }

    /// Number of tokens `T`.
    pub fn tokens(&self) -> usize {
        self.pre.nrows()
    }

    /// Number of streams `n`.
    pub fn streams(&self) -> usize {
        self.pre.ncols()
    }

    /// Reallocates any field that is not `[t, n]` / `[t, n, n]` in standard layout, so that the
    /// kernels can write into contiguous slices.
    pub(crate) fn ensure(&mut self, t: usize, n: usize) -> Result<()> {
        let ok = |a: &[usize], s: &[usize], std: bool| a == s && std;
        if !(ok(self.pre.shape(), &[t, n], self.pre.is_standard_layout())
            && ok(self.post.shape(), &[t, n], self.post.is_standard_layout())
            && ok(self.res.shape(), &[t, n, n], self.res.is_standard_layout()))
        {
            *self = Self::try_zeros(t, n)?;
        }
        Ok(())
    }

    /// The three fields as contiguous mutable slices (after [`Self::ensure`]).
    pub(crate) fn slices_mut(&mut self) -> (&mut [F], &mut [F], &mut [F]) {
        (
            self.pre.as_slice_mut().expect("standard layout"),
            self.post.as_slice_mut().expect("standard layout"),
            self.res.as_slice_mut().expect("standard layout"),
        )
    }
}

/// `u = Σ_j pre[j] · x[j]` for one token (`x`: `n·c`, `u`: `c`).
#[inline(always)]
pub(crate) fn read_out_token<F: Float>(c: usize, x: &[F], pre: &[F], u: &mut [F]) {
    match pre.len() {
        2 => read_out_n::<F, 2>(c, x, pre, u),
        4 => read_out_n::<F, 4>(c, x, pre, u),
        8 => read_out_n::<F, 8>(c, x, pre, u),
        _ => read_out_dyn(c, x, pre, u),
    }
}

/// [`read_out_token`] for any `n`: one pass over `u` per stream.
#[inline(always)]
fn read_out_dyn<F: Float>(c: usize, x: &[F], pre: &[F], u: &mut [F]) {
    let u = &mut u[..c];
    let p0 = pre[0];
    for (u, &x) in u.iter_mut().zip(&x[..c]) {
        *u = p0 * x;
    }
    for (j, &p) in pre.iter().enumerate().skip(1) {
        for (u, &x) in u.iter_mut().zip(&x[j * c..(j + 1) * c]) {
            *u += p * x;
        }
    }
}

/// [`read_out_token`] for a fixed `n`: one pass, the `n` weights in registers; the same
/// operations in the same order as [`read_out_dyn`].
#[inline(always)]
fn read_out_n<F: Float, const N: usize>(c: usize, x: &[F], pre: &[F], u: &mut [F]) {
    let xs: [&[F]; N] = std::array::from_fn(|j| &x[j * c..(j + 1) * c]);
    let p: [F; N] = std::array::from_fn(|j| pre[j]);
    for (k, u) in u[..c].iter_mut().enumerate() {
        let mut acc = p[0] * xs[0][k];
        for j in 1..N {
            acc += p[j] * xs[j][k];
        }
        *u = acc;
    }
}

/// `out[i] = Σ_j res[i][j] · x[j] + post[i] · y` for one token.
#[inline(always)]
pub(crate) fn write_in_token<F: Float>(
    c: usize,
    x: &[F],
    post: &[F],
    res: &[F],
    y: &[F],
    out: &mut [F],
) {
    match post.len() {
        2 => write_in_n::<F, 2>(c, x, post, res, y, out),
        4 => write_in_n::<F, 4>(c, x, post, res, y, out),
        8 => write_in_n::<F, 8>(c, x, post, res, y, out),
        _ => write_in_dyn(c, x, post, res, y, out),
    }
}

/// [`write_in_token`] for any `n`: `n + n²` passes over L1-resident rows.
#[inline(always)]
fn write_in_dyn<F: Float>(c: usize, x: &[F], post: &[F], res: &[F], y: &[F], out: &mut [F]) {
    let n = post.len();
    let y = &y[..c];
    for i in 0..n {
        let o = &mut out[i * c..(i + 1) * c];
        let p = post[i];
        for (o, &y) in o.iter_mut().zip(y) {
            *o = p * y;
        }
        for j in 0..n {
            let r = res[i * n + j];
            for (o, &x) in o.iter_mut().zip(&x[j * c..(j + 1) * c]) {
                *o += r * x;
            }
        }
    }
}

/// [`write_in_token`] for a fixed `n`: one pass reading each `x[j][k]` and `y[k]` once, the
/// `n² + n` weights in registers; the same operations in the same order as [`write_in_dyn`].
#[inline(always)]
fn write_in_n<F: Float, const N: usize>(
    c: usize,
    x: &[F],
    post: &[F],
    res: &[F],
    y: &[F],
    out: &mut [F],
) {
    let xs: [&[F]; N] = std::array::from_fn(|j| &x[j * c..(j + 1) * c]);
    let p: [F; N] = std::array::from_fn(|i| post[i]);
    let r: [[F; N]; N] = std::array::from_fn(|i| std::array::from_fn(|j| res[i * N + j]));
    let mut outs = out[..N * c].chunks_exact_mut(c);
    let os: [&mut [F]; N] = std::array::from_fn(|_| outs.next().expect("N rows"));
    let y = &y[..c];
    for k in 0..c {
        let xv: [F; N] = std::array::from_fn(|j| xs[j][k]);
        for i in 0..N {
            let mut acc = p[i] * y[k];
            for j in 0..N {
                acc += r[i][j] * xv[j];
            }
            os[i][k] = acc;
        }
    }
}

/// The error for a token whose result came out non-finite: the first named input that holds a
/// NaN or infinity, else `result` (an overflow of finite values).
pub(crate) fn blame<F: Float>(
    t: usize,
    inputs: &[(&'static str, &[F])],
    result: &'static str,
) -> Error {
    let what = inputs
        .iter()
        .find(|(_, v)| !all_finite(v))
        .map_or(result, |(w, _)| w);
    Error::NonFinite { what, index: t }
}

/// Checks `x: [T, n, C]` against the block's `n` and `C`.
pub(crate) fn check_x(shape: &[usize], n: usize, c: usize) -> Result<()> {
    check_same("x", &[shape[0], n, c], shape)
}

/// Eq. 3's read-out for given mappings: `u_t = Σ_j H_pre[t][j] · x_t[j]`.
///
/// Blocks compute the mappings and the read-out in one fused pass
/// ([`MhcBlock::read_out`](crate::MhcBlock::read_out)); this function serves mappings that come
/// from elsewhere.
///
/// # Shapes
///
/// - `x`: `[T, n, C]`; `pre`: `[T, n]`
/// - returns `u`: `[T, C]`
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `pre` is not `[T, n]`; [`Error::NonFinite`] naming the first
/// token whose `x` or `pre` holds a NaN or infinity.
///
/// # Examples
///
/// ```
/// use ndarray::{Array2, Array3};
/// let x = Array3::<f32>::ones((2, 4, 3));
/// let pre = Array2::from_elem((2, 4), 0.25);
/// let u = mhc::mixing::read_out(x.view(), pre.view())?;
/// assert_eq!(u, Array2::<f32>::ones((2, 3)));
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn read_out<F: Float>(x: ArrayView3<F>, pre: ArrayView2<F>) -> Result<Array2<F>> {
    let (t, _, c) = x.dim();
    let mut u = Array2::zeros((t, c));
    read_out_into(x, pre, u.view_mut())?;
    Ok(u)
}

/// [`read_out`] into a caller-provided `[T, C]` array.
///
/// # Shapes
///
/// - `x`: `[T, n, C]`; `pre`: `[T, n]`; `u`: `[T, C]`
///
/// # Errors
///
/// As [`read_out`], plus [`Error::ShapeMismatch`] for `u`.
///
/// # Examples
///
/// ```
/// use ndarray::{Array2, Array3};
/// let x = Array3::<f64>::ones((2, 2, 3));
/// let mut u = Array2::zeros((2, 3));
/// mhc::mixing::read_out_into(x.view(), Array2::ones((2, 2)).view(), u.view_mut())?;
/// assert_eq!(u[[1, 2]], 2.0);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn read_out_into<F: Float>(
    x: ArrayView3<F>,
    pre: ArrayView2<F>,
    u: ArrayViewMut2<F>,
) -> Result<()> {
    let (t, n, c) = x.dim();
    check_same("pre", &[t, n], pre.shape())?;
    check_same("u", &[t, c], u.shape())?;
    if t == 0 || c == 0 {
        return Ok(());
    }
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let pre = pre.as_standard_layout();
    let pre = pre.as_slice().expect("standard layout");
    with_slice_mut(u, |u| {
        let tt = par::TASK_TOKENS;
        let tasks: Vec<_> = u.chunks_mut(tt * c).collect();
        par::try_for_each(tasks, |k, u| {
            // Find the first bad token with the kernel vectorised, then report it outside.
            let bad = par::vectorized(
                #[inline(always)]
                || {
                    for (i, u) in u.chunks_mut(c).enumerate() {
                        let t = k * tt + i;
                        let (xt, pt) = (&x[t * n * c..(t + 1) * n * c], &pre[t * n..(t + 1) * n]);
                        read_out_token(c, xt, pt, u);
                        if !all_finite(u) {
                            return Some(t);
                        }
                    }
                    None
                },
            );
            match bad {
                Some(t) => {
                    let (xt, pt) = (&x[t * n * c..(t + 1) * n * c], &pre[t * n..(t + 1) * n]);
                    Err(blame(t, &[("x", xt), ("pre", pt)], "u"))
                }
                None => Ok(()),
            }
        })
    })
}

/// Eq. 3's write-in: `out_t[i] = Σ_j H_res[t][i][j] · x_t[j] + H_post[t][i] · y_t`.
///
/// # Shapes
///
/// - `x`: `[T, n, C]`; `maps`: `post [T, n]`, `res [T, n, n]` (`pre` is not read); `y`: `[T, C]`
/// - returns `out`: `[T, n, C]`
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `y` is not `[T, C]` or the mappings are not `[T, n]` /
/// `[T, n, n]`; [`Error::NonFinite`] naming the first token whose sublayer output `y` (or `x`,
/// or mappings) holds a NaN or infinity.
///
/// # Examples
///
/// ```
/// use mhc::Mappings;
/// use ndarray::{Array2, Array3};
/// let (t, n, c) = (3, 2, 4);
/// let x = Array3::<f64>::ones((t, n, c));
/// let maps = Mappings::identity(t, n);
/// let y = Array2::from_elem((t, c), 0.5);
/// let out = mhc::mixing::write_in(x.view(), &maps, y.view())?;
/// assert!(out.iter().all(|&v| v == 1.5)); // identity mixing plus H_post = 1
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn write_in<F: Float>(
    x: ArrayView3<F>,
    maps: &Mappings<F>,
    y: ArrayView2<F>,
) -> Result<Array3<F>> {
    let mut out = Array3::zeros(x.raw_dim());
    write_in_into(x, maps, y, out.view_mut())?;
    Ok(out)
}

/// [`write_in`] into a caller-provided `[T, n, C]` array.
///
/// # Shapes
///
/// - as [`write_in`]; `out`: `[T, n, C]`
///
/// # Errors
///
/// As [`write_in`], plus [`Error::ShapeMismatch`] for `out`.
///
/// # Examples
///
/// ```
/// use mhc::Mappings;
/// use ndarray::{Array2, Array3};
/// let x = Array3::<f32>::ones((2, 4, 8));
/// let mut out = Array3::zeros((2, 4, 8));
/// mhc::mixing::write_in_into(x.view(), &Mappings::identity(2, 4), Array2::zeros((2, 8)).view(), out.view_mut())?;
/// assert_eq!(out, x);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn write_in_into<F: Float>(
    x: ArrayView3<F>,
    maps: &Mappings<F>,
    y: ArrayView2<F>,
    out: ArrayViewMut3<F>,
) -> Result<()> {
    let (t, n, c) = x.dim();
    check_same("y", &[t, c], y.shape())?;
    check_same("post", &[t, n], maps.post.shape())?;
    check_same("res", &[t, n, n], maps.res.shape())?;
    check_same("out", &[t, n, c], out.shape())?;
    if t == 0 || c == 0 || n == 0 {
        return Ok(());
    }
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let y = y.as_standard_layout();
    let y = y.as_slice().expect("standard layout");
    let post = maps.post.as_standard_layout();
    let post = post.as_slice().expect("standard layout");
    let res = maps.res.as_standard_layout();
    let res = res.as_slice().expect("standard layout");
    with_slice_mut(out, |out| write_in_slices(n, c, 0, x, post, res, y, out))
}

/// The write-in over contiguous token-major slices, parallel over fixed chunks of tokens;
/// `t0` is the index of the first token (for error messages).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_in_slices<F: Float>(
    n: usize,
    c: usize,
    t0: usize,
    x: &[F],
    post: &[F],
    res: &[F],
    y: &[F],
    out: &mut [F],
) -> Result<()> {
    let tt = par::TASK_TOKENS;
    let tasks: Vec<_> = out.chunks_mut(tt * n * c).collect();
    par::try_for_each(tasks, |k, out| {
        // Find the first bad token with the kernel vectorised, then report it outside.
        let bad = par::vectorized(
            #[inline(always)]
            || {
                for (i, o) in out.chunks_mut(n * c).enumerate() {
                    let t = k * tt + i;
                    let xt = &x[t * n * c..(t + 1) * n * c];
                    let (pt, rt) = (&post[t * n..(t + 1) * n], &res[t * n * n..(t + 1) * n * n]);
                    write_in_token(c, xt, pt, rt, &y[t * c..(t + 1) * c], o);
                    if !all_finite(o) {
                        return Some(t);
                    }
                }
                None
            },
        );
        if let Some(t) = bad {
            let xt = &x[t * n * c..(t + 1) * n * c];
            let (pt, rt) = (&post[t * n..(t + 1) * n], &res[t * n * n..(t + 1) * n * n]);
            let yt = &y[t * c..(t + 1) * c];
            {
                let inputs = [
                    ("sublayer output", yt),
                    ("x", xt),
                    ("post", pt),
                    ("res", rt),
                ];
                return Err(blame(t0 + t, &inputs, "out"));
            }
        }
        Ok(())
    })
}

/// The write-in's backward for one token, from the upstream gradient `g` (`[n, c]`):
/// `∂y = Σ_i post[i] g[i]`, `∂post[i] = g[i]·y`, `∂res[i][j] = g[i]·x[j]`, and the mixing's
/// part of the input gradient `∂x[j] = Σ_i res[i][j] g[i]` (written, not added). `rt` is `n²`
/// scratch.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn write_in_backward_token<F: Float>(
    c: usize,
    x: &[F],
    post: &[F],
    res: &[F],
    y: &[F],
    g: &[F],
    dy: &mut [F],
    dpost: &mut [F],
    dres: &mut [F],
    dx: &mut [F],
    rt: &mut [F],
) {
    let n = post.len();
    // ∂y = Σ_i post[i] g[i] and ∂x[j] = Σ_i res[i][j] g[i]: the read-out kernel applied to
    // `g` with the weights `post` and the columns of `res`.
    for (k, r) in rt[..n * n].iter_mut().enumerate() {
        *r = res[(k % n) * n + k / n];
    }
    read_out_token(c, g, post, dy);
    for j in 0..n {
        read_out_token(c, g, &rt[j * n..(j + 1) * n], &mut dx[j * c..(j + 1) * c]);
    }

    for i in 0..n {
        let gi = &g[i * c..(i + 1) * c];
        dpost[i] = dot(gi, &y[..c]);
        for j in 0..n {
            dres[i * n + j] = dot(gi, &x[j * c..(j + 1) * c]);
        }
    }
}

/// The read-out's backward for one token: `∂pre[j] = ∂u·x[j]` and `∂x[j] += pre[j] ∂u`.
#[inline(always)]
pub(crate) fn read_out_backward_token<F: Float>(
    c: usize,
    x: &[F],
    pre: &[F],
    du: &[F],
    dpre: &mut [F],
    dx: &mut [F],
) {
    let du = &du[..c];
    for (j, &p) in pre.iter().enumerate() {
        dpre[j] = dot(du, &x[j * c..(j + 1) * c]);
        for (o, &g) in dx[j * c..(j + 1) * c].iter_mut().zip(du) {
            *o += p * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed-`n` kernels perform the dynamic kernels' operations in the same order: equal
    /// bits, so results do not depend on which `n` is specialised.
    #[test]
    fn fixed_n_kernels_equal_dynamic_bitwise() {
        let c = 37;
        for n in [2usize, 4, 8] {
            let v = |k: usize| ((k as f64) * 0.7311).sin() as f32;
            let x: Vec<f32> = (0..n * c).map(v).collect();
            let y: Vec<f32> = (0..c).map(|k| v(k + 999)).collect();
            let post: Vec<f32> = (0..n).map(|k| v(k + 77)).collect();
            let res: Vec<f32> = (0..n * n).map(|k| v(k + 55)).collect();
            let (mut a, mut b) = (vec![0.0; n * c], vec![0.0; n * c]);
            write_in_token(c, &x, &post, &res, &y, &mut a);
            write_in_dyn(c, &x, &post, &res, &y, &mut b);
            assert_eq!(a, b);
            let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
            read_out_token(c, &x, &post, &mut a);
            read_out_dyn(c, &x, &post, &mut b);
            assert_eq!(a, b);
        }
    }
}
