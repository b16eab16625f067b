//! The backward pass shared by mHC and HC, in two halves around the user's sublayer VJP.
//!
//! As in the paper (§4.3.2), training keeps only the block input `x` and the sublayer output
//! `y`. The write-in half recomputes the mappings and `u` from `x` (one fused pass per chunk of
//! tokens) and computes `∂y`, `∂H_post`, `∂H_res` and the mixing's part of `∂x`; the user turns
//! `∂y` into `∂u`; the read-out half computes `∂H_pre`, goes back through the mappings (sigmoids
//! or tanh, the Sinkhorn VJP, α, b), the RMS normalisation and the projection, and returns `∂x`
//! with the projection weight's gradient (`x_chunkᵀ · ∂proj` per fixed chunk, summed in chunk
//! order, so the result is the same on any number of threads).

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::error::check_same;
use crate::error::{Result, checked_size, reuse, try_zeroed};
use crate::mappings::{MapScratch, MappingKernel, Mappings, SUB_TOKENS, project};
use crate::mixing::{
    all_finite, blame, check_x, read_out_backward_token, read_out_token, with_slice_mut,
    write_in_backward_token,
};
use crate::{Float, par};

/// What the write-in half of a block's backward pass hands on: the sublayer input `u`
/// (recomputed from `x`) and `∂y` for the user's sublayer VJP, and the state the read-out half
/// needs.
///
/// A tape is also the reusable workspace of a training loop: `Tape::default()` is empty, and
/// the blocks' `*_into` methods (`forward_train_into`, `backward_into`,
/// `write_in_backward_into`, `read_out_backward_into`) size its buffers on first use and then
/// overwrite them in place.
///
/// # Shapes
///
/// - `u`, `dy`: `[T, C]`
///
/// # Examples
///
/// ```
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// use ndarray::Array3;
/// let block = mhc::MhcBlock::<f64>::new(mhc::MhcConfig::new(2, 3), &mut StdRng::seed_from_u64(0))?;
/// let x = Array3::from_elem((4, 2, 3), 0.5);
/// let (out, y) = block.forward_train(x.view(), |u| u.to_owned())?;
/// let tape: mhc::Tape<f64> = block.write_in_backward(x.view(), y.view(), Array3::ones(out.raw_dim()).view())?;
/// assert_eq!((tape.u.shape(), tape.dy.shape()), (&[4, 3][..], &[4, 3][..]));
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Tape<F> {
    /// The sublayer input `u = Σ_j H_pre[j] x_j`, recomputed: `[T, C]`.
    pub u: Array2<F>,
    /// The gradient with respect to the sublayer output: `[T, C]`.
    pub dy: Array2<F>,
    pub(crate) dx: Vec<F>,
    pub(crate) maps: Mappings<F>,
    pub(crate) dpost: Vec<F>,
    pub(crate) dres: Vec<F>,
    pub(crate) args: Vec<F>,
    pub(crate) inv_r: Vec<F>,
    /// Per-task partial sums of the projection weight's gradient (read-out half).
    pub(crate) parts: Vec<F>,
}

impl<F: Float> Default for Tape<F> {
    /// An empty tape, to be filled (and then refilled, reusing its buffers) by the `*_into`
    /// methods of the blocks.
    fn default() -> Self {
        Tape {
            u: Array2::zeros((0, 0)),
            dy: Array2::zeros((0, 0)),
            dx: Vec::new(),
            maps: Mappings::zeros(0, 0),
            dpost: Vec::new(),
            dres: Vec::new(),
            args: Vec::new(),
            inv_r: Vec::new(),
            parts: Vec::new(),
        }
    }
}

/// Makes `a` a standard-layout `[r, c]` array, reusing its allocation when the shape is
/// unchanged.
pub(crate) fn reuse2<F: Float>(
    a: &mut Array2<F>,
    what: &'static str,
    r: usize,
    c: usize,
) -> Result<()> {
    if a.dim() != (r, c) || !a.is_standard_layout() {
        let len = checked_size(what, &[r, c])?;
        *a = Array2::from_shape_vec((r, c), try_zeroed(what, len)?).expect("r·c");
    }
    Ok(())
}

/// Makes `a` a standard-layout `[t, n, c]` array, reusing its allocation when the shape is
/// unchanged.
pub(crate) fn reuse3<F: Float>(
    a: &mut Array3<F>,
    what: &'static str,
    t: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    if a.dim() != (t, n, c) || !a.is_standard_layout() {
        let len = checked_size(what, &[t, n, c])?;
        *a = Array3::from_shape_vec((t, n, c), try_zeroed(what, len)?).expect("t·n·c");
    }
    Ok(())
}

impl<F: Float> Tape<F> {
    /// Sizes every buffer for `t` tokens of a kernel with `n` streams of width `c`, `rpt`
    /// projection rows a token and `m` mapping outputs a row.
    fn ensure(&mut self, t: usize, n: usize, c: usize, rpt: usize, m: usize) -> Result<()> {
        let tnc = checked_size("backward state", &[t, n, c])?;
        reuse2(&mut self.u, "u", t, c)?;
        reuse2(&mut self.dy, "dy", t, c)?;
        reuse(&mut self.dx, "dx", tnc)?;
        self.maps.ensure(t, n)?;
        reuse(&mut self.dpost, "dpost", checked_size("dpost", &[t, n])?)?;
        reuse(&mut self.dres, "dres", checked_size("dres", &[t, n, n])?)?;
        reuse(&mut self.args, "args", checked_size("args", &[t, rpt, m])?)?;
        reuse(&mut self.inv_r, "inv_r", checked_size("inv_r", &[t, rpt])?)?;
        Ok(())
    }
}

/// `∂x` (`[T, n, C]`), the projection weight's gradient (`[K, m]`, row-major) and the small
/// parameters' gradients (the kernel's accumulator).
pub(crate) struct RawGrads<F> {
    pub dx: Array3<F>,
    pub dw: Vec<F>,
    pub acc: Vec<F>,
}

/// The write-in half: recompute the mappings and `u`, then the mixing's backward.
pub(crate) fn write_in_backward<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    y: ArrayView2<F>,
    upstream: ArrayView3<F>,
) -> Result<Tape<F>> {
    let mut tape = Tape::default();
    write_in_backward_into(k, x, y, upstream, None, &mut tape)?;
    Ok(tape)
}

/// [`write_in_backward`] into a tape whose buffers are reused; `u` is recomputed with the
/// read-out weights `ro` (`[T, n]`) when given, with the block's own `H_pre` otherwise.
pub(crate) fn write_in_backward_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    y: ArrayView2<F>,
    upstream: ArrayView3<F>,
    ro: Option<ArrayView2<F>>,
    tape: &mut Tape<F>,
) -> Result<()> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let t = x.shape()[0];
    check_same("y", &[t, c], y.shape())?;
    check_same("upstream", &[t, n, c], upstream.shape())?;
    if let Some(r) = &ro {
        check_same("read-out weights", &[t, n], r.shape())?;
    }
    let ro = ro.as_ref().map(|r| r.as_standard_layout());
    let ro = ro.as_ref().map(|r| r.as_slice().expect("standard layout"));
    let (rpt, m) = (k.rows_per_token(), k.width());
    tape.ensure(t, n, c, rpt, m)?;
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let y = y.as_standard_layout();
    let y = y.as_slice().expect("standard layout");
    let g = upstream.as_standard_layout();
    let g = g.as_slice().expect("standard layout");
    let tt = par::TASK_TOKENS;
    let (pre, post, res) = tape.maps.slices_mut();
    let tasks: Vec<_> = pre
        .chunks_mut(tt * n)
        .zip(post.chunks_mut(tt * n))
        .zip(res.chunks_mut(tt * n * n))
        .zip(tape.u.as_slice_mut().expect("owned").chunks_mut(tt * c))
        .zip(tape.dy.as_slice_mut().expect("owned").chunks_mut(tt * c))
        .zip(tape.dx.chunks_mut(tt * n * c))
        .zip(tape.dpost.chunks_mut(tt * n))
        .zip(tape.dres.chunks_mut(tt * n * n))
        .zip(tape.args.chunks_mut(tt * rpt * m))
        .zip(tape.inv_r.chunks_mut(tt * rpt))
        .collect();
    par::try_for_each(
        tasks,
        |i, (((((((((pre, post), res), u), dy), dx), dpost), dres), args), inv_r)| {
            par::vectorized(
                #[inline(always)]
                move || {
                    let t0 = i * tt;
                    let tc = pre.len() / n;
                    let mut scratch = vec![F::zero(); n * n];
                    let mut ws = MapScratch::default();
                    for a in (0..tc).step_by(SUB_TOKENS) {
                        let b = (a + SUB_TOKENS).min(tc);
                        let xs = &x[(t0 + a) * n * c..(t0 + b) * n * c];
                        let (ra, rb) = (a * rpt, b * rpt);
                        project(k, t0 + a, xs, &mut args[ra * m..rb * m], &mut inv_r[ra..rb])?;
                        k.maps(
                            t0 + a,
                            &args[ra * m..rb * m],
                            &mut pre[a * n..b * n],
                            &mut post[a * n..b * n],
                            &mut res[a * n * n..b * n * n],
                            &mut ws,
                        )?;
                        for tl in a..b {
                            let tg = t0 + tl;
                            let (xt, yt, gt) = (
                                &x[tg * n * c..(tg + 1) * n * c],
                                &y[tg * c..(tg + 1) * c],
                                &g[tg * n * c..(tg + 1) * n * c],
                            );
                            let (pt, qt, rt) = (
                                &pre[tl * n..(tl + 1) * n],
                                &post[tl * n..(tl + 1) * n],
                                &res[tl * n * n..(tl + 1) * n * n],
                            );
                            let wt = ro.map_or(pt, |r| &r[tg * n..(tg + 1) * n]);
                            read_out_token(c, xt, wt, &mut u[tl * c..(tl + 1) * c]);
                            let (dpt, drt) = (
                                &mut dpost[tl * n..(tl + 1) * n],
                                &mut dres[tl * n * n..(tl + 1) * n * n],
                            );
                            write_in_backward_token(
                                c,
                                xt,
                                qt,
                                rt,
                                yt,
                                gt,
                                &mut dy[tl * c..(tl + 1) * c],
                                dpt,
                                drt,
                                &mut dx[tl * n * c..(tl + 1) * n * c],
                                &mut scratch,
                            );

                            if !all_finite(dpt) || !all_finite(drt) {
                                return Err(blame(
                                    tg,
                                    &[("upstream", gt), ("y", yt)],
                                    "write-in gradients (overflow)",
                                ));
                            }
                        }
                    }
                    Ok(())
                },
            )
        },
    )?;
    Ok(())
}

/// The read-out half: from `∂u`, the rest of `∂x` and the parameters' gradients.
pub(crate) fn read_out_backward<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    mut tape: Tape<F>,
    du: ArrayView2<F>,
) -> Result<RawGrads<F>> {
    let (t, n, c) = x.dim();
    let mut dx = std::mem::take(&mut tape.dx);
    // `dx` holds the write-in's part and receives the read-out's in place.
    let (dw, acc) =
        read_out_backward_slices(k, x, &mut tape, du, None, PreFlow::default(), &mut dx)?;
    Ok(RawGrads {
        dx: Array3::from_shape_vec((t, n, c), dx).expect("T·n·C"),
        dw,
        acc,
    })
}

/// Where the read-out's weights come from and where the gradients of `H_pre` go (SPEC §8).
///
/// The default is the block's own schedule: the read-out weighs the streams by the block's own
/// `H_pre`, and its gradient is the read-out's. Under the shifted schedule the read-out uses
/// the previous block's weights `ro` (`[T, n]`), whose gradient goes to `ro_grad`, and the
/// block's own `H_pre` receives only `pre_grad`, from the next block.
#[derive(Default)]
pub(crate) struct PreFlow<'a, F> {
    /// Read-out weights other than the block's own `H_pre`: `[T, n]`.
    pub ro: Option<&'a [F]>,
    /// Added to the gradient of the block's own `H_pre`: `[T, n]`.
    pub pre_grad: Option<&'a [F]>,
    /// Receives the gradient of the read-out weights `ro`: `[T, n]`.
    pub ro_grad: Option<&'a mut [F]>,
}

/// How a block's read-out is linked to its neighbours in a chain (SPEC §8), for
/// [`MhcBlock::read_out_backward_linked_into`](crate::MhcBlock::read_out_backward_linked_into):
/// which weights the read-out used, and where the gradients of `H_pre` come from and go.
///
/// `ChainLink::default()` (all `None`) is a block on its own: its read-out uses its own
/// `H_pre`, whose gradient is the read-out's.
///
/// # Shapes
///
/// - every field: `[T, n]`
#[derive(Debug, Default)]
pub struct ChainLink<'a, F> {
    /// The weights the read-out used, when they are not the block's own `H_pre`: under
    /// [`Schedule::Shifted`](crate::Schedule::Shifted), the previous block's `H_pre`
    /// ([`initial_pre`](crate::initial_pre) for the first block).
    pub prev_pre: Option<ArrayView2<'a, F>>,
    /// A gradient of the block's own `H_pre` from further down the chain: under the shifted
    /// schedule the next block's `dprev_pre`, and the caller's `∂pre_{L-1}` for the last block.
    pub dpre: Option<ArrayView2<'a, F>>,
    /// Receives the gradient of `prev_pre` (overwritten), when `prev_pre` is given.
    pub dprev_pre: Option<ArrayViewMut2<'a, F>>,
}

/// [`read_out_backward_into`] with the read-out linked as `link` says.
pub(crate) fn read_out_backward_linked_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    tape: &mut Tape<F>,
    du: ArrayView2<F>,
    link: ChainLink<'_, F>,
    dx: ArrayViewMut3<F>,
) -> Result<(Vec<F>, Vec<F>)> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let tn = [x.shape()[0], n];
    let ChainLink {
        prev_pre,
        dpre,
        dprev_pre,
    } = link;
    if let Some(p) = &prev_pre {
        check_same("read-out weights", &tn, p.shape())?;
    }
    if let Some(p) = &dpre {
        check_same("dpre", &tn, p.shape())?;
        if let Some(bad) = p
            .rows()
            .into_iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(crate::Error::NonFinite {
                what: "dpre",
                index: bad,
            });
        }
    }
    if let Some(p) = &dprev_pre {
        check_same("dprev_pre", &tn, p.shape())?;
    }
    let ro = prev_pre.as_ref().map(|r| r.as_standard_layout());
    let pg = dpre.as_ref().map(|r| r.as_standard_layout());
    let ro = ro.as_ref().map(|r| r.as_slice().expect("standard layout"));
    let pre_grad = pg.as_ref().map(|r| r.as_slice().expect("standard layout"));
    match dprev_pre {
        Some(g) if ro.is_some() => {
            let mut out = None;
            with_slice_mut(g, |g| {
                let flow = PreFlow {
                    ro,
                    pre_grad,
                    ro_grad: Some(g),
                };
                out = Some(read_out_backward_into(k, x, tape, du, flow, dx)?);
                Ok(())
            })?;
            Ok(out.expect("set on success"))
        }
        _ => {
            let flow = PreFlow {
                ro,
                pre_grad,
                ro_grad: None,
            };
            read_out_backward_into(k, x, tape, du, flow, dx)
        }
    }
}

/// [`read_out_backward`] writing `∂x` into `dx` and reusing the tape's buffers; the tape keeps
/// the write-in's part of `∂x`, so the call can be repeated.
pub(crate) fn read_out_backward_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    tape: &mut Tape<F>,
    du: ArrayView2<F>,
    flow: PreFlow<'_, F>,
    dx: ArrayViewMut3<F>,
) -> Result<(Vec<F>, Vec<F>)> {
    check_same("dx", x.shape(), dx.shape())?;
    let mut grads = None;
    with_slice_mut(dx, |dx| {
        let src = std::mem::take(&mut tape.dx);
        let r = read_out_backward_slices(k, x, tape, du, Some(&src), flow, dx);
        tape.dx = src;
        grads = Some(r?);
        Ok(())
    })?;
    Ok(grads.expect("set on success"))
}

/// The read-out half over slices: `∂x` is accumulated into `dx`, which starts as a copy of
/// `src` when given (and already holds the write-in's part otherwise). Returns the projection
/// weight's gradient and the kernel's accumulator.
fn read_out_backward_slices<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    tape: &mut Tape<F>,
    du: ArrayView2<F>,
    src: Option<&[F]>,
    flow: PreFlow<'_, F>,
    dx: &mut [F],
) -> Result<(Vec<F>, Vec<F>)> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    let t = x.shape()[0];
    check_same("tape", &[t, c], tape.u.shape())?;
    check_same("tape", &[t, n], tape.maps.pre.shape())?;
    check_same("sublayer vjp output", &[t, c], du.shape())?;
    let (rpt, m) = (k.rows_per_token(), k.width());
    let kk = n * c / rpt;
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let du = du.as_standard_layout();
    let du = du.as_slice().expect("standard layout");
    let Tape {
        maps,
        dpost,
        dres,
        args,
        inv_r,
        parts,
        ..
    } = tape;
    let (pre, post) = (
        maps.pre.as_slice().expect("owned"),
        maps.post.as_slice().expect("owned"),
    );
    let tt = par::TASK_TOKENS;
    let ntasks = t.div_ceil(tt);
    let part_len = kk * m + k.acc_len();
    reuse(
        parts,
        "gradient partials",
        checked_size("gradient partials", &[ntasks.max(1), part_len])?,
    )?;
    let PreFlow {
        ro,
        pre_grad,
        ro_grad,
    } = flow;
    let ro_grads: Vec<Option<&mut [F]>> = match ro_grad {
        Some(g) => g.chunks_mut(tt * n).map(Some).collect(),
        None => (0..ntasks).map(|_| None).collect(),
    };
    let tasks: Vec<_> = dx
        .chunks_mut(tt * n * c)
        .zip(parts.chunks_mut(part_len))
        .zip(ro_grads)
        .collect();
    par::try_for_each(tasks, |i, ((dx, part), mut ro_grad)| {
        par::vectorized(
            #[inline(always)]
            || {
                let t0 = i * tt;
                let tc = dx.len() / (n * c);
                let (dw, acc) = part.split_at_mut(kk * m);
                acc.fill(F::zero());
                let mut dpre = vec![F::zero(); SUB_TOKENS * n];
                // The whole task's ∂args, for one ∂W product per task (below).
                let mut dargs = vec![F::zero(); tc * rpt * m];
                let mut ws = MapScratch::default();
                for a in (0..tc).step_by(SUB_TOKENS) {
                    let b = (a + SUB_TOKENS).min(tc);
                    let (ga, gb) = (t0 + a, t0 + b);
                    let xs = &x[ga * n * c..gb * n * c];
                    let dxs = &mut dx[a * n * c..b * n * c];
                    if let Some(src) = src {
                        dxs.copy_from_slice(&src[ga * n * c..gb * n * c]);
                    }
                    for tl in 0..b - a {
                        let tg = ga + tl;
                        let dut = &du[tg * c..(tg + 1) * c];
                        if !all_finite(dut) {
                            return Err(blame(
                                tg,
                                &[("sublayer vjp output", dut)],
                                "sublayer vjp output",
                            ));
                        }
                        let xt = &xs[tl * n * c..(tl + 1) * n * c];
                        let pt =
                            ro.map_or(&pre[tg * n..(tg + 1) * n], |r| &r[tg * n..(tg + 1) * n]);
                        read_out_backward_token(
                            c,
                            xt,
                            pt,
                            dut,
                            &mut dpre[tl * n..(tl + 1) * n],
                            &mut dxs[tl * n * c..(tl + 1) * n * c],
                        );
                    }
                    let dpre = &mut dpre[..(b - a) * n];
                    if ro.is_some() {
                        // The read-out's weights are not this block's H_pre.
                        if let Some(g) = ro_grad.as_deref_mut() {
                            g[a * n..b * n].copy_from_slice(dpre);
                        }
                        dpre.fill(F::zero());
                    }
                    if let Some(g) = pre_grad {
                        for (d, &v) in dpre.iter_mut().zip(&g[ga * n..gb * n]) {
                            *d += v;
                        }
                    }
                    let (ra, rb) = (ga * rpt, gb * rpt);
                    let rows = rb - ra;
                    let ar = &args[ra * m..rb * m];
                    let da = &mut dargs[a * rpt * m..b * rpt * m];
                    k.grads(
                        ar,
                        &pre[ga * n..gb * n],
                        &post[ga * n..gb * n],
                        dpre,
                        &dpost[ga * n..gb * n],
                        &dres[ga * n * n..gb * n * n],
                        da,
                        acc,
                        &mut ws,
                    )?;
                    // RMS normalisation, args = (x·W) / r: ∂(x·W) = ∂args / r, and through r,
                    // ∂x += (∂r / (K r)) x with ∂r = −(∂args · args) / r.
                    let kf = F::from_usize(kk);
                    for row in 0..rows {
                        let ir = inv_r[ra + row];
                        let (arow, drow) =
                            (&ar[row * m..(row + 1) * m], &mut da[row * m..(row + 1) * m]);
                        let dot = arow
                            .iter()
                            .zip(drow.iter())
                            .fold(F::zero(), |s, (&a, &d)| s + a * d);
                        let scale = -dot * ir * ir / kf;
                        for (o, &xv) in dxs[row * kk..(row + 1) * kk]
                            .iter_mut()
                            .zip(&xs[row * kk..(row + 1) * kk])
                        {
                            *o += scale * xv;
                        }
                        for d in drow.iter_mut() {
                            *d *= ir;
                        }
                    }
                    // ∂x += ∂(x·W) · Wᵀ, while this sub-chunk's ∂x is in cache.
                    let draw = faer::MatRef::from_row_major_slice(&da[..], rows, m);
                    let w = faer::MatRef::from_row_major_slice(k.weight(), kk, m);
                    F::gemm(
                        faer::MatMut::from_row_major_slice_mut(dxs, rows, kk),
                        true,
                        draw,
                        w.transpose(),
                        false,
                    );
                }
                // ∂W = x_taskᵀ · ∂(x·W)_task: one product per task. Accumulating it per
                // sub-chunk read and wrote the whole `[K, m]` ∂W every 16 tokens (2.6 MiB at
                // n = 8, C = 1024), more traffic than the task's `x`.
                let rows = tc * rpt;
                let xr =
                    faer::MatRef::from_row_major_slice(&x[t0 * n * c..(t0 + tc) * n * c], rows, kk);
                let draw = faer::MatRef::from_row_major_slice(&dargs[..], rows, m);
                F::gemm(
                    faer::MatMut::from_row_major_slice_mut(dw, kk, m),
                    false,
                    xr.transpose(),
                    draw,
                    false,
                );
                Ok(())
            },
        )
    })?;
    // Only the tasks' partials: with no tokens there are none, and a reused tape's buffer holds
    // the previous call's.
    let mut it = parts[..ntasks * part_len].chunks(part_len);
    let mut total = it
        .next()
        .map(<[F]>::to_vec)
        .unwrap_or_else(|| vec![F::zero(); part_len]);
    for p in it {
        for (s, &v) in total.iter_mut().zip(p) {
            *s += v;
        }
    }
    let acc = total.split_off(kk * m);
    Ok((total, acc))
}

/// Forward pass that returns what the backward pass needs besides `x`: `(out, y)`.
pub(crate) fn forward_train<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
) -> Result<(Array3<F>, Array2<F>)> {
    let (u, maps) = crate::mappings::read_out(k, x)?;
    let y = sublayer(u.view());
    check_same("sublayer output", u.shape(), y.shape())?;
    let out = crate::mixing::write_in(x, &maps, y.view())?;
    Ok((out, y))
}

/// Both halves around the user's sublayer VJP `(u, ∂y) → ∂u`, called once.
pub(crate) fn backward<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    y: ArrayView2<F>,
    upstream: ArrayView3<F>,
    sublayer_vjp: impl FnOnce(ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
) -> Result<RawGrads<F>> {
    let tape = write_in_backward(k, x, y, upstream)?;
    let du = sublayer_vjp(tape.u.view(), tape.dy.view());
    read_out_backward(k, x, tape, du.view())
}

/// [`forward_train`] writing `out` and keeping `u` and the mappings in the tape's buffers.
pub(crate) fn forward_train_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>,
    tape: &mut Tape<F>,
    out: ArrayViewMut3<F>,
) -> Result<Array2<F>> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c)?;
    check_same("out", x.shape(), out.shape())?;
    let t = x.shape()[0];
    reuse2(&mut tape.u, "u", t, c)?;
    crate::mappings::read_out_into(k, x, &mut tape.maps, tape.u.view_mut(), None)?;
    let y = sublayer(tape.u.view());
    check_same("sublayer output", &[t, c], y.shape())?;
    crate::mixing::write_in_into(x, &tape.maps, y.view(), out)?;
    Ok(y)
}

/// [`backward`] writing `∂x` into `dx` and reusing the tape's buffers.
pub(crate) fn backward_into<F: Float>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    y: ArrayView2<F>,
    upstream: ArrayView3<F>,
    sublayer_vjp: impl FnOnce(ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
    tape: &mut Tape<F>,
    dx: ArrayViewMut3<F>,
) -> Result<(Vec<F>, Vec<F>)> {
    check_same("dx", x.shape(), dx.shape())?;
    write_in_backward_into(k, x, y, upstream, None, tape)?;
    let du = sublayer_vjp(tape.u.view(), tape.dy.view());
    read_out_backward_into(k, x, tape, du.view(), PreFlow::default(), dx)
}
