//! The per-token mappings `H_pre`, `H_post`, `H_res`: mHC's (paper Eq. 7–8) and HC's (mHC paper
//! Eq. 5), computed in chunks of tokens. The mixing they feed lives in [`crate::mixing`].

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2};

use crate::error::{Error, Result, try_zeroed};
use crate::mixing::{all_finite, check_x, read_out_token, with_slice_mut};
use crate::sinkhorn::check_same;
use crate::{Float, SinkhornKnopp};

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
    pub(crate) fn ensure(&mut self, t: usize, n: usize) {
        if self.pre.dim() != (t, n) || !self.pre.is_standard_layout() {
            self.pre = Array2::zeros((t, n));
        }
        if self.post.dim() != (t, n) || !self.post.is_standard_layout() {
            self.post = Array2::zeros((t, n));
        }
        if self.res.dim() != (t, n, n) || !self.res.is_standard_layout() {
            self.res = Array3::zeros((t, n, n));
        }
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

/// Tokens per matrix product inside a task: 16 tokens of `n·C = 4096` f32 (256 KiB) stay in L2
/// between the projection, the RMS and the read-out.
pub(crate) const SUB_TOKENS: usize = 16;

/// `1 / (1 + exp(−z))`; saturates to exactly 0 or 1 without NaN.
#[inline]
pub(crate) fn sigmoid<F: Float>(z: F) -> F {
    F::one() / (F::one() + (-z).exp())
}

/// `dst[rows, m] = lhs[rows, k] · rhs[k, m]`, all row-major and contiguous, through faer.
pub(crate) fn gemm<F: Float>(rows: usize, k: usize, m: usize, lhs: &[F], rhs: &[F], dst: &mut [F]) {
    F::gemm(
        faer::MatMut::from_row_major_slice_mut(&mut dst[..rows * m], rows, m),
        false,
        faer::MatRef::from_row_major_slice(&lhs[..rows * k], rows, k),
        faer::MatRef::from_row_major_slice(&rhs[..k * m], k, m),
        false,
    );
}

/// `sqrt(mean(v²) + eps)`, or `None` if `v` holds a NaN or infinity. Squares that overflow are
/// recomputed scaled by the largest magnitude, so every finite input has a finite RMS.
#[inline]
pub(crate) fn rms<F: Float>(v: &[F], eps: F) -> Option<F> {
    let len = F::from_usize(v.len());
    let mut ss = F::zero();
    for &x in v {
        ss += x * x;
    }
    if ss.is_finite() {
        return Some((ss / len + eps).sqrt());
    }
    if !all_finite(v) {
        return None;
    }
    let s = v.iter().fold(F::zero(), |m, x| m.max(x.abs()));
    let mut ss = F::zero();
    for &x in v {
        let y = x / s;
        ss += y * y;
    }
    Some(s * (ss / len + eps / (s * s)).sqrt())
}

/// Per-call constants of the mHC mappings (Eq. 7–8).
pub(crate) struct MhcKernel<'a, F> {
    pub n: usize,
    pub c: usize,
    /// `[n·C, n² + 2n]`, row-major.
    pub phi: &'a [F],
    pub alpha: [F; 3],
    pub bias: &'a [F],
    pub rms_eps: F,
    pub pre_eps: F,
    pub sinkhorn: SinkhornKnopp,
}

/// Scratch of one task of the mHC kernels, sized for [`SUB_TOKENS`] tokens.
pub(crate) struct MhcScratch<F> {
    /// Raw projections `x_t · φ`, then (per token) the normalised `h = x_t·φ / r`.
    pub h: Vec<F>,
    /// `H_res` logits.
    pub logits: Vec<F>,
    /// `1 / r` per token.
    pub inv_r: Vec<F>,
}

impl<'a, F: Float> MhcKernel<'a, F> {
    /// `n² + 2n`.
    pub fn m(&self) -> usize {
        self.n * self.n + 2 * self.n
    }

    pub fn scratch(&self) -> Result<MhcScratch<F>> {
        Ok(MhcScratch {
            h: try_zeroed("mhc scratch", SUB_TOKENS * self.m())?,
            logits: try_zeroed("mhc scratch", SUB_TOKENS * self.n * self.n)?,
            inv_r: try_zeroed("mhc scratch", SUB_TOKENS)?,
        })
    }

    /// For the `tc ≤ SUB_TOKENS` tokens in `x` (token `t0` first): `h` normalised, `1/r`, and
    /// the `H_res` logits in the scratch; `H_pre`, `H_post` into `pre`, `post`.
    pub fn logits(
        &self,
        t0: usize,
        x: &[F],
        pre: &mut [F],
        post: &mut [F],
        s: &mut MhcScratch<F>,
    ) -> Result<()> {
        let (n, nc, m) = (self.n, self.n * self.c, self.m());
        let tc = x.len() / nc;
        gemm(tc, nc, m, x, self.phi, &mut s.h);
        for t in 0..tc {
            let xt = &x[t * nc..(t + 1) * nc];
            let r = rms(xt, self.rms_eps).ok_or(Error::NonFinite {
                what: "x",
                index: t0 + t,
            })?;
            let inv = F::one() / r;
            s.inv_r[t] = inv;
            let h = &mut s.h[t * m..(t + 1) * m];
            for v in h.iter_mut() {
                *v *= inv;
            }
            let [a_pre, a_post, a_res] = self.alpha;
            for j in 0..n {
                pre[t * n + j] = sigmoid(a_pre * h[j] + self.bias[j]) + self.pre_eps;
                post[t * n + j] = F::from_f64(2.0) * sigmoid(a_post * h[n + j] + self.bias[n + j]);
            }
            let lg = &mut s.logits[t * n * n..(t + 1) * n * n];
            for (k, l) in lg.iter_mut().enumerate() {
                *l = a_res * h[2 * n + k] + self.bias[2 * n + k];
            }
            if !all_finite(lg) || !all_finite(&h[..2 * n]) {
                return Err(Error::NonFinite {
                    what: "mapping logits (overflow)",
                    index: t0 + t,
                });
            }
        }
        Ok(())
    }

    /// The mappings (and, with `u`, the read-out) of the tokens in `x`, a task's worth,
    /// processed [`SUB_TOKENS`] at a time so that each token is read from DRAM once.
    pub fn run(
        &self,
        t0: usize,
        x: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        mut u: Option<&mut [F]>,
    ) -> Result<()> {
        let (n, c, nc) = (self.n, self.c, self.n * self.c);
        let mut s = self.scratch()?;
        let sub = SUB_TOKENS;
        for (k, xs) in x.chunks(sub * nc).enumerate() {
            let tc = xs.len() / nc;
            let (a, b) = (k * sub, k * sub + tc);
            self.logits(
                t0 + a,
                xs,
                &mut pre[a * n..b * n],
                &mut post[a * n..b * n],
                &mut s,
            )?;
            self.sinkhorn.project_slices(
                n,
                &s.logits[..tc * n * n],
                &mut res[a * n * n..b * n * n],
            )?;
            if let Some(u) = u.as_deref_mut() {
                for t in a..b {
                    read_out_token(
                        c,
                        &x[t * nc..(t + 1) * nc],
                        &pre[t * n..(t + 1) * n],
                        &mut u[t * c..(t + 1) * c],
                    );
                }
            }
        }
        Ok(())
    }
}

/// Per-call constants of HC's mappings (mHC paper Eq. 5).
pub(crate) struct HcKernel<'a, F> {
    pub n: usize,
    pub c: usize,
    /// `[C, n + 2]`, row-major: columns `theta_pre`, `theta_post`, `theta_res[0..n]`.
    pub theta: &'a [F],
    pub alpha: [F; 3],
    pub b_pre: &'a [F],
    pub b_post: &'a [F],
    pub b_res: &'a [F],
    pub rms_eps: F,
}

impl<'a, F: Float> HcKernel<'a, F> {
    /// The mappings (and, with `u`, the read-out) of the tokens in `x`.
    pub fn run(
        &self,
        t0: usize,
        x: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        mut u: Option<&mut [F]>,
    ) -> Result<()> {
        let (n, c, nc, m) = (self.n, self.c, self.n * self.c, self.n + 2);
        let sub = SUB_TOKENS;
        let mut d = try_zeroed("hc scratch", sub * n * m)?;
        let [a_pre, a_post, a_res] = self.alpha;
        for (k, xs) in x.chunks(sub * nc).enumerate() {
            let tc = xs.len() / nc;
            gemm(tc * n, c, m, xs, self.theta, &mut d);
            for tl in 0..tc {
                let t = k * sub + tl;
                for j in 0..n {
                    let xj = &xs[(tl * n + j) * c..(tl * n + j + 1) * c];
                    let r = rms(xj, self.rms_eps).ok_or(Error::NonFinite {
                        what: "x",
                        index: t0 + t,
                    })?;
                    let dj = &d[(tl * n + j) * m..(tl * n + j + 1) * m];
                    pre[t * n + j] = a_pre * (dj[0] / r).tanh() + self.b_pre[j];
                    post[t * n + j] = a_post * (dj[1] / r).tanh() + self.b_post[j];
                    for i in 0..n {
                        res[(t * n + i) * n + j] =
                            a_res * (dj[2 + i] / r).tanh() + self.b_res[i * n + j];
                    }
                }
                if let Some(u) = u.as_deref_mut() {
                    read_out_token(
                        c,
                        &x[t * nc..(t + 1) * nc],
                        &pre[t * n..(t + 1) * n],
                        &mut u[t * c..(t + 1) * c],
                    );
                }
            }
        }
        Ok(())
    }
}

/// A way of computing the mappings (and the fused read-out) of a task's tokens: mHC's or HC's.
/// The generic drivers below give both blocks the same validation, chunking and parallelism.
pub(crate) trait MappingKernel<F: Float>: Sync {
    /// `(n, C)`.
    fn dims(&self) -> (usize, usize);
    /// Mappings of the tokens in `x` (token `t0` first) and, with `u`, the read-out.
    fn run(
        &self,
        t0: usize,
        x: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        u: Option<&mut [F]>,
    ) -> Result<()>;
}

impl<F: Float> MappingKernel<F> for MhcKernel<'_, F> {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.c)
    }
    fn run(
        &self,
        t0: usize,
        x: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        u: Option<&mut [F]>,
    ) -> Result<()> {
        MhcKernel::run(self, t0, x, pre, post, res, u)
    }
}

impl<F: Float> MappingKernel<F> for HcKernel<'_, F> {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.c)
    }
    fn run(
        &self,
        t0: usize,
        x: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        u: Option<&mut [F]>,
    ) -> Result<()> {
        HcKernel::run(self, t0, x, pre, post, res, u)
    }
}

/// Splits the tokens and their outputs into fixed tasks of
/// [`TASK_TOKENS`](crate::par::TASK_TOKENS) and runs the kernel on each, in parallel.
fn run_tasks<F: Float>(
    k: &impl MappingKernel<F>,
    x: &[F],
    maps: &mut Mappings<F>,
    u: Option<&mut [F]>,
) -> Result<()> {
    let (n, c) = k.dims();
    let tt = crate::par::TASK_TOKENS;
    let (pre, post, res) = maps.slices_mut();
    let us: Vec<Option<&mut [F]>> = match u {
        Some(u) => u.chunks_mut(tt * c).map(Some).collect(),
        None => (0..pre.len().div_ceil(tt * n)).map(|_| None).collect(),
    };
    let tasks: Vec<_> = x
        .chunks(tt * n * c)
        .zip(pre.chunks_mut(tt * n))
        .zip(post.chunks_mut(tt * n))
        .zip(res.chunks_mut(tt * n * n))
        .zip(us)
        .collect();
    crate::par::try_for_each(tasks, |i, ((((x, pre), post), res), u)| {
        k.run(i * tt, x, pre, post, res, u)
    })
}

/// The mappings of `x: [T, n, C]` (shape-checked).
pub(crate) fn mappings<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
) -> Result<Mappings<F>> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let mut maps = Mappings::zeros(x.shape()[0], n);
    let x = x.as_standard_layout();
    run_tasks(k, x.as_slice().expect("standard layout"), &mut maps, None)?;
    Ok(maps)
}

/// The fused mappings and read-out of `x: [T, n, C]` into `maps` and `u: [T, C]`.
pub(crate) fn read_out_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    maps: &mut Mappings<F>,
    u: ArrayViewMut2<F>,
) -> Result<()> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let t = x.shape()[0];
    check_same("u", &[t, c], u.shape())?;
    maps.ensure(t, n);
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    with_slice_mut(u, |u| run_tasks(k, x, maps, Some(u)))
}

/// [`read_out_into`] with fresh buffers.
pub(crate) fn read_out<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
) -> Result<(Array2<F>, Mappings<F>)> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let t = x.shape()[0];
    let mut maps = Mappings::zeros(t, n);
    let mut u = Array2::zeros((t, c));
    read_out_into(k, x, &mut maps, u.view_mut())?;
    Ok((u, maps))
}

/// Read-out, sublayer, write-in.
pub(crate) fn forward<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
) -> Result<Array3<F>> {
    let (u, maps) = read_out(k, x)?;
    let y = sublayer(u.view());
    check_same("sublayer output", u.shape(), y.shape())?;
    crate::mixing::write_in(x, &maps, y.view())
}
