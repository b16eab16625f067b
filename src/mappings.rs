//! The per-token mappings `H_pre`, `H_post`, `H_res`: mHC's (paper Eq. 7–8) and HC's (mHC paper
//! Eq. 5), computed in chunks of tokens. The mixing they feed lives in [`crate::mixing`].

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2};

use crate::Float;
use crate::error::check_same;
use crate::error::{Error, Result, try_zeroed};
use crate::kernel::{HcKernel, MhcKernel};
use crate::mixing::{all_finite, check_x, read_out_token, with_slice_mut};

pub use crate::mixing::Mappings;

/// Tokens per matrix product inside a task: 16 tokens of `n·C = 4096` f32 (256 KiB) stay in L2
/// between the projection, the RMS and the read-out.
pub(crate) const SUB_TOKENS: usize = 16;

/// `1 / (1 + exp(−z))`; saturates to exactly 0 or 1 without NaN.
#[inline]
pub(crate) fn sigmoid<F: Float>(z: F) -> F {
    F::one() / (F::one() + (-z).exp())
}

/// `dst[rows, m] (+)= lhs[rows, k] · rhs[k, m]`, all row-major and contiguous, through faer,
/// sequentially (callers parallelise over fixed chunks).
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
#[inline(always)]
pub(crate) fn rms<F: Float>(v: &[F], eps: F) -> Option<F> {
    let len = F::from_usize(v.len());
    let ss = crate::reduce::sum_sq(v);
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

/// A way of computing the mappings from RMS-normalised projections of the tokens: mHC's (one
/// row of `n·C` per token, `m = n² + 2n` projections) or HC's (one row of `C` per stream,
/// `m = n + 2`). Everything else (the projection `x·W` through faer, the RMS normalisation,
/// the read-out and write-in, their backward passes, chunking and parallelism) is shared.
pub(crate) trait MappingKernel<F: Float>: Sync {
    /// `(n, C)`.
    fn dims(&self) -> (usize, usize);
    /// RMS-normalised rows per token (1 for mHC, `n` for HC).
    fn rows_per_token(&self) -> usize;
    /// `W`: `[K, m]` row-major, `K = n·C / rows_per_token`.
    fn weight(&self) -> &[F];
    /// `m`, the projections per row.
    fn width(&self) -> usize;
    /// The RMS epsilon.
    fn rms_eps(&self) -> F;
    /// Length of the accumulator of the small parameters' gradients ([`Self::grads`]).
    fn acc_len(&self) -> usize;
    /// From the normalised projections `args` (`[tc·rows, m]`) of `tc` tokens (token `t0`
    /// first), the mappings `pre`, `post` (`[tc, n]`) and `res` (`[tc, n, n]`).
    fn maps(
        &self,
        t0: usize,
        args: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        ws: &mut MapScratch<F>,
    ) -> Result<()>;
    /// The backward of [`Self::maps`]: from `args`, the mappings and their gradients, the
    /// gradient with respect to `args` (`dargs`, overwritten) and the small parameters'
    /// gradients (added to `acc`).
    #[allow(clippy::too_many_arguments)]
    fn grads(
        &self,
        args: &[F],
        pre: &[F],
        post: &[F],
        dpre: &[F],
        dpost: &[F],
        dres: &[F],
        dargs: &mut [F],
        acc: &mut [F],
        ws: &mut MapScratch<F>,
    ) -> Result<()>;
}

impl<F: Float> MhcKernel<'_, F> {
    /// The `H_res` logits `α_res · h_res + b_res` of the tokens whose `h` is in `args`.
    fn res_logits(&self, args: &[F], lg: &mut Vec<F>) {
        let (n, m) = (self.n, self.width());
        lg.clear();
        for h in args.chunks(m) {
            for (k, &v) in h[2 * n..].iter().enumerate() {
                lg.push(self.alpha[2] * v + self.bias[2 * n + k]);
            }
        }
    }
}

impl<F: Float> MappingKernel<F> for MhcKernel<'_, F> {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.c)
    }
    fn rows_per_token(&self) -> usize {
        1
    }
    fn weight(&self) -> &[F] {
        self.phi
    }
    fn width(&self) -> usize {
        self.n * self.n + 2 * self.n
    }
    fn rms_eps(&self) -> F {
        self.rms_eps
    }
    fn acc_len(&self) -> usize {
        3 + self.width()
    }

    fn maps(
        &self,
        t0: usize,
        args: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        ws: &mut MapScratch<F>,
    ) -> Result<()> {
        let (n, m) = (self.n, self.width());
        let [a_pre, a_post, _] = self.alpha;
        let two = F::from_f64(2.0);
        for (t, h) in args.chunks(m).enumerate() {
            for j in 0..n {
                pre[t * n + j] = sigmoid(a_pre * h[j] + self.bias[j]) + self.pre_eps;
                post[t * n + j] = two * sigmoid(a_post * h[n + j] + self.bias[n + j]);
            }
        }
        let MapScratch { sk, lg, .. } = ws;
        self.res_logits(args, lg);
        if let Some(p) = lg.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "mapping logits (overflow)",
                index: t0 + p / (n * n),
            });
        }
        self.sinkhorn
            .project_slices(n, lg, &mut res[..lg.len()], sk)
    }

    fn grads(
        &self,
        args: &[F],
        pre: &[F],
        post: &[F],
        dpre: &[F],
        dpost: &[F],
        dres: &[F],
        dargs: &mut [F],
        acc: &mut [F],
        ws: &mut MapScratch<F>,
    ) -> Result<()> {
        let (n, m) = (self.n, self.width());
        let nn = n * n;
        let MapScratch { sk, lg, dlg } = ws;
        self.res_logits(args, lg);
        dlg.clear();
        dlg.resize(lg.len(), F::zero());
        self.sinkhorn
            .vjp_slices(n, lg, &dres[..lg.len()], dlg, sk)?;
        let (one, half) = (F::one(), F::from_f64(0.5));
        let (dalpha, dbias) = acc.split_at_mut(3);
        for (t, h) in args.chunks(m).enumerate() {
            let da = &mut dargs[t * m..(t + 1) * m];
            for j in 0..n {
                // H_pre = σ(z) + pre_eps, H_post = 2σ(z): σ' = σ(1 − σ).
                let s = pre[t * n + j] - self.pre_eps;
                let dz = dpre[t * n + j] * s * (one - s);
                dalpha[0] += dz * h[j];
                dbias[j] += dz;
                da[j] = self.alpha[0] * dz;
                let s = post[t * n + j] * half;
                let dz = dpost[t * n + j] * (s + s) * (one - s);
                dalpha[1] += dz * h[n + j];
                dbias[n + j] += dz;
                da[n + j] = self.alpha[1] * dz;
            }
            for k in 0..nn {
                let dz = dlg[t * nn + k];
                dalpha[2] += dz * h[2 * n + k];
                dbias[2 * n + k] += dz;
                da[2 * n + k] = self.alpha[2] * dz;
            }
        }
        Ok(())
    }
}

impl<F: Float> MappingKernel<F> for HcKernel<'_, F> {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.c)
    }
    fn rows_per_token(&self) -> usize {
        self.n
    }
    fn weight(&self) -> &[F] {
        self.theta
    }
    fn width(&self) -> usize {
        self.n + 2
    }
    fn rms_eps(&self) -> F {
        self.rms_eps
    }
    fn acc_len(&self) -> usize {
        3 + 2 * self.n + self.n * self.n
    }

    fn maps(
        &self,
        _t0: usize,
        args: &[F],
        pre: &mut [F],
        post: &mut [F],
        res: &mut [F],
        _ws: &mut MapScratch<F>,
    ) -> Result<()> {
        let (n, m) = (self.n, self.width());
        let [a_pre, a_post, a_res] = self.alpha;
        for (t, a) in args.chunks(m * n).enumerate() {
            for j in 0..n {
                let aj = &a[j * m..(j + 1) * m];
                pre[t * n + j] = a_pre * aj[0].tanh() + self.b_pre[j];
                post[t * n + j] = a_post * aj[1].tanh() + self.b_post[j];
                for i in 0..n {
                    res[(t * n + i) * n + j] = a_res * aj[2 + i].tanh() + self.b_res[i * n + j];
                }
            }
        }
        Ok(())
    }

    fn grads(
        &self,
        args: &[F],
        _pre: &[F],
        _post: &[F],
        dpre: &[F],
        dpost: &[F],
        dres: &[F],
        dargs: &mut [F],
        acc: &mut [F],
        _ws: &mut MapScratch<F>,
    ) -> Result<()> {
        let (n, m) = (self.n, self.width());
        let (dalpha, rest) = acc.split_at_mut(3);
        let (db_pre, rest) = rest.split_at_mut(n);
        let (db_post, db_res) = rest.split_at_mut(n);
        let one = F::one();
        // d/da [α tanh(a) + b] = α (1 − tanh²(a)).
        let mut term = |slot: usize, g: F, a: F, da: &mut F| {
            let th = a.tanh();
            dalpha[slot] += g * th;
            *da = self.alpha[slot] * g * (one - th * th);
        };
        for (t, a) in args.chunks(m * n).enumerate() {
            for j in 0..n {
                let (aj, dj) = (
                    &a[j * m..(j + 1) * m],
                    &mut dargs[(t * n + j) * m..(t * n + j + 1) * m],
                );
                let g = dpre[t * n + j];
                db_pre[j] += g;
                term(0, g, aj[0], &mut dj[0]);
                let g = dpost[t * n + j];
                db_post[j] += g;
                term(1, g, aj[1], &mut dj[1]);
                for i in 0..n {
                    let g = dres[(t * n + i) * n + j];
                    db_res[i * n + j] += g;
                    term(2, g, aj[2 + i], &mut dj[2 + i]);
                }
            }
        }
        Ok(())
    }
}

/// Per-call constants of a learned collapse (DeepSeek-V4's `hc_head`): only `H_pre`.
pub(crate) struct HeadKernel<'a, F> {
    pub n: usize,
    pub c: usize,
    /// `[n·C, n]`, row-major.
    pub phi: &'a [F],
    pub scale: F,
    pub bias: &'a [F],
    pub rms_eps: F,
    pub pre_eps: F,
}

impl<F: Float> MappingKernel<F> for HeadKernel<'_, F> {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.c)
    }
    fn rows_per_token(&self) -> usize {
        1
    }
    fn weight(&self) -> &[F] {
        self.phi
    }
    fn width(&self) -> usize {
        self.n
    }
    fn rms_eps(&self) -> F {
        self.rms_eps
    }
    fn acc_len(&self) -> usize {
        1 + self.n
    }
    #[inline(always)]
    fn maps(
        &self,
        _t0: usize,
        args: &[F],
        pre: &mut [F],
        _post: &mut [F],
        _res: &mut [F],
        _ws: &mut MapScratch<F>,
    ) -> Result<()> {
        for (p, (&h, &b)) in pre
            .iter_mut()
            .zip(args.iter().zip(self.bias.iter().cycle()))
        {
            *p = sigmoid(self.scale * h + b) + self.pre_eps;
        }
        Ok(())
    }
    fn grads(
        &self,
        args: &[F],
        pre: &[F],
        _post: &[F],
        dpre: &[F],
        _dpost: &[F],
        _dres: &[F],
        dargs: &mut [F],
        acc: &mut [F],
        _ws: &mut MapScratch<F>,
    ) -> Result<()> {
        let n = self.n;
        for (k, ((&h, &p), &g)) in args.iter().zip(pre).zip(dpre).enumerate() {
            let s = p - self.pre_eps;
            let dz = g * s * (F::one() - s);
            acc[0] += dz * h;
            acc[1 + k % n] += dz;
            dargs[k] = self.scale * dz;
        }
        Ok(())
    }
}

/// Buffers that [`MappingKernel::maps`] and [`MappingKernel::grads`] reuse from one
/// sub-chunk to the next (the `H_res` logits, their gradient, the projector's scratch).
#[derive(Debug, Default)]
pub(crate) struct MapScratch<F> {
    pub sk: crate::sinkhorn::Scratch<F>,
    pub lg: Vec<F>,
    pub dlg: Vec<F>,
}

/// Scratch of one task: projections, normalised projections and `1/r` for [`SUB_TOKENS`]
/// tokens, and the kernel's own buffers.
pub(crate) struct Scratch<F> {
    pub args: Vec<F>,
    pub inv_r: Vec<F>,
    pub ws: MapScratch<F>,
}

impl<F: Float> Scratch<F> {
    pub fn new(k: &impl MappingKernel<F>) -> Result<Self> {
        let rows = SUB_TOKENS * k.rows_per_token();
        Ok(Scratch {
            args: try_zeroed("mapping scratch", rows * k.width())?,
            inv_r: try_zeroed("mapping scratch", rows)?,
            ws: MapScratch::default(),
        })
    }
}

/// For the `tc` tokens in `x` (token `t0` first): the projections `x·W`, the RMS of each row,
/// the normalised projections (`args`, `[tc·rows, m]`) and `1/r` (`inv_r`).
#[inline(always)]
pub(crate) fn project<F: Float>(
    k: &impl MappingKernel<F>,
    t0: usize,
    x: &[F],
    args: &mut [F],
    inv_r: &mut [F],
) -> Result<()> {
    let (n, c) = k.dims();
    let rpt = k.rows_per_token();
    let kk = n * c / rpt;
    let m = k.width();
    let rows = x.len() / kk;
    gemm(rows, kk, m, x, k.weight(), args);
    for (row, (xr, a)) in x.chunks(kk).zip(args.chunks_mut(m)).enumerate() {
        let r = rms(xr, k.rms_eps()).ok_or(Error::NonFinite {
            what: "x",
            index: t0 + row / rpt,
        })?;
        let inv = F::one() / r;
        inv_r[row] = inv;
        for v in a.iter_mut() {
            *v *= inv;
        }
        if !all_finite(a) {
            return Err(Error::NonFinite {
                what: "mapping logits (overflow)",
                index: t0 + row / rpt,
            });
        }
    }
    Ok(())
}

/// The mappings (and, with `u`, the read-out) of a task's tokens, [`SUB_TOKENS`] at a time so
/// that each token is read from DRAM once. The read-out weighs the streams by `ro` (`[tc, n]`)
/// when given (SPEC §8's shifted schedule), by the block's own `H_pre` otherwise.
#[allow(clippy::too_many_arguments)]
fn run_task<F: Float>(
    k: &impl MappingKernel<F>,
    t0: usize,
    x: &[F],
    pre: &mut [F],
    post: &mut [F],
    res: &mut [F],
    mut u: Option<&mut [F]>,
    ro: Option<&[F]>,
) -> Result<()> {
    let (n, c) = k.dims();
    let nc = n * c;
    let mut s = Scratch::new(k)?;
    crate::par::vectorized(
        #[inline(always)]
        || {
            for (i, xs) in x.chunks(SUB_TOKENS * nc).enumerate() {
                let a = i * SUB_TOKENS;
                let (pre, post, res) = sub_maps(n, a, xs.len() / nc, pre, post, res);
                project_maps(k, t0 + a, xs, pre, post, res, &mut s)?;
                if let Some(u) = u.as_deref_mut() {
                    let w = ro.map_or(&*pre, |r| &r[a * n..a * n + pre.len()]);
                    read_out_tokens(n, c, xs, w, &mut u[a * c..a * c + xs.len() / n]);
                }
            }
            Ok(())
        },
    )
}

/// The mappings of the `tc` tokens from token `a` of a task's buffers.
#[inline(always)]
pub(crate) fn sub_maps<'a, F>(
    n: usize,
    a: usize,
    tc: usize,
    pre: &'a mut [F],
    post: &'a mut [F],
    res: &'a mut [F],
) -> (&'a mut [F], &'a mut [F], &'a mut [F]) {
    let b = a + tc;
    (
        &mut pre[a * n..b * n],
        &mut post[a * n..b * n],
        &mut res[a * n * n..b * n * n],
    )
}

/// Projection, RMS and mappings of the tokens in `xs` (at most [`SUB_TOKENS`], token `t0`
/// first), written into `pre`, `post`, `res`.
#[inline(always)]
pub(crate) fn project_maps<F: Float>(
    k: &impl MappingKernel<F>,
    t0: usize,
    xs: &[F],
    pre: &mut [F],
    post: &mut [F],
    res: &mut [F],
    s: &mut Scratch<F>,
) -> Result<()> {
    let (n, c) = k.dims();
    let tc = xs.len() / (n * c);
    let rows = k.rows_per_token() * k.width();
    project(k, t0, xs, &mut s.args, &mut s.inv_r)?;
    k.maps(t0, &s.args[..tc * rows], pre, post, res, &mut s.ws)
}

/// `u_t = Σ_j w[t][j] x_t[j]` for the tokens of `xs` (`w`: `[tc, n]`, `u`: `[tc, C]`).
#[inline(always)]
pub(crate) fn read_out_tokens<F: Float>(n: usize, c: usize, xs: &[F], w: &[F], u: &mut [F]) {
    for ((xt, wt), ut) in xs.chunks(n * c).zip(w.chunks(n)).zip(u.chunks_mut(c)) {
        read_out_token(c, xt, wt, ut);
    }
}

/// Splits the tokens and their outputs into fixed tasks of
/// [`TASK_TOKENS`](crate::par::TASK_TOKENS) and runs the kernel on each, in parallel.
fn run_tasks<F: Float>(
    k: &impl MappingKernel<F>,
    x: &[F],
    maps: &mut Mappings<F>,
    u: Option<&mut [F]>,
    ro: Option<&[F]>,
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
        let ro = ro.map(|r| &r[i * tt * n..(i * tt * n + pre.len())]);
        run_task(k, i * tt, x, pre, post, res, u, ro)
    })
}

/// The mappings of `x: [T, n, C]` (shape-checked).
pub(crate) fn mappings<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
) -> Result<Mappings<F>> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let mut maps = Mappings::try_zeros(x.shape()[0], n)?;
    let x = x.as_standard_layout();
    run_tasks(
        k,
        x.as_slice().expect("standard layout"),
        &mut maps,
        None,
        None,
    )?;
    Ok(maps)
}

/// The fused mappings and read-out of `x: [T, n, C]` into `maps` and `u: [T, C]`; the read-out
/// weighs the streams by `ro` (`[T, n]`) when given, by the block's own `H_pre` otherwise.
pub(crate) fn read_out_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    maps: &mut Mappings<F>,
    u: ArrayViewMut2<F>,
    ro: Option<ArrayView2<F>>,
) -> Result<()> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let t = x.shape()[0];
    check_same("u", &[t, c], u.shape())?;
    if let Some(r) = &ro {
        check_same("read-out weights", &[t, n], r.shape())?;
    }
    maps.ensure(t, n)?;
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let ro = ro.as_ref().map(|r| r.as_standard_layout());
    let ro = ro.as_ref().map(|r| r.as_slice().expect("standard layout"));
    with_slice_mut(u, |u| run_tasks(k, x, maps, Some(u), ro))
}

/// [`read_out_into`] with fresh buffers.
pub(crate) fn read_out<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
) -> Result<(Array2<F>, Mappings<F>)> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let t = x.shape()[0];
    let mut maps = Mappings::try_zeros(t, n)?;

    let mut u = Array2::zeros((t, c));
    read_out_into(k, x, &mut maps, u.view_mut(), None)?;
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
