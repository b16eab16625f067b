//! The backward pass shared by mHC and HC, in two halves around the user's sublayer VJP.
//!
//! As in the paper (§4.3.2), training keeps only the block input `x` and the sublayer output
//! `y`. The write-in half recomputes the mappings and `u` from `x` (one fused pass per chunk of
//! tokens) and computes `∂y`, `∂H_post`, `∂H_res` and the mixing's part of `∂x`; the user turns
//! `∂y` into `∂u`; the read-out half computes `∂H_pre`, goes back through the mappings (sigmoids
//! or tanh, the Sinkhorn VJP, α, b), the RMS normalisation and the projection, and returns `∂x`
//! with the projection weight's gradient (`x_chunkᵀ · ∂proj` per fixed chunk, summed in chunk
//! order, so the result is the same on any number of threads).
//!
//! In a chain, block `l+1`'s read-out half and block `l`'s write-in half meet at `∂x_{l+1}`:
//! [`backward_seam`] runs both per sub-chunk of tokens, with the same per-sub-chunk kernels
//! ([`ro_sub`], [`wi_sub`]) as the two halves alone, so `∂x_{l+1}` stays in cache.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::error::check_same;
use crate::error::{Error, Result, checked_size, reuse, try_zeroed};
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
    check_write_in_side(t, n, c, y, ro.as_ref())?;
    check_same("upstream", &[t, n, c], upstream.shape())?;
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
    let inp = WiIn { x, y, ro };
    let tt = par::TASK_TOKENS;
    par::try_for_each(wi_tasks(tape, n, c, rpt, m), |i, mut w| {
        par::vectorized(
            #[inline(always)]
            move || {
                let t0 = i * tt;
                let tc = w.pre.len() / n;
                for a in (0..tc).step_by(SUB_TOKENS) {
                    let b = (a + SUB_TOKENS).min(tc);
                    let gs = &g[(t0 + a) * n * c..(t0 + b) * n * c];
                    wi_sub(k, &inp, t0, a, b, gs, &mut w)?;
                }
                Ok(())
            },
        )
    })
}

/// The write-in half's `y` (`[t, C]`) and read-out weights (`[t, n]`) for `t` tokens.
fn check_write_in_side<F>(
    t: usize,
    n: usize,
    c: usize,
    y: ArrayView2<F>,
    ro: Option<&ArrayView2<F>>,
) -> Result<()> {
    check_same("y", &[t, c], y.shape())?;
    if let Some(r) = ro {
        check_same("read-out weights", &[t, n], r.shape())?;
    }
    Ok(())
}

/// What the write-in half reads, for all `T` tokens: `x` (`[T, n, C]`), `y` (`[T, C]`), and the
/// read-out weights `ro` (`[T, n]`) when they are not the block's own `H_pre`.
#[derive(Clone, Copy)]
struct WiIn<'a, F> {
    x: &'a [F],
    y: &'a [F],
    ro: Option<&'a [F]>,
}

/// One task's share of the tape the write-in half fills, and its scratch.
struct WiTask<'a, F> {
    pre: &'a mut [F],
    post: &'a mut [F],
    res: &'a mut [F],
    u: &'a mut [F],
    dy: &'a mut [F],
    dx: &'a mut [F],
    dpost: &'a mut [F],
    dres: &'a mut [F],
    args: &'a mut [F],
    inv_r: &'a mut [F],
    scratch: Vec<F>,
    ws: MapScratch<F>,
}

/// The tape's buffers (sized) cut into tasks of [`par::TASK_TOKENS`].
fn wi_tasks<F: Float>(
    tape: &mut Tape<F>,
    n: usize,
    c: usize,
    rpt: usize,
    m: usize,
) -> Vec<WiTask<'_, F>> {
    let tt = par::TASK_TOKENS;
    let Tape {
        u,
        dy,
        dx,
        maps,
        dpost,
        dres,
        args,
        inv_r,
        ..
    } = tape;
    let (pre, post, res) = maps.slices_mut();
    pre.chunks_mut(tt * n)
        .zip(post.chunks_mut(tt * n))
        .zip(res.chunks_mut(tt * n * n))
        .zip(u.as_slice_mut().expect("owned").chunks_mut(tt * c))
        .zip(dy.as_slice_mut().expect("owned").chunks_mut(tt * c))
        .zip(dx.chunks_mut(tt * n * c))
        .zip(dpost.chunks_mut(tt * n))
        .zip(dres.chunks_mut(tt * n * n))
        .zip(args.chunks_mut(tt * rpt * m))
        .zip(inv_r.chunks_mut(tt * rpt))
        .map(
            |(((((((((pre, post), res), u), dy), dx), dpost), dres), args), inv_r)| WiTask {
                pre,
                post,
                res,
                u,
                dy,
                dx,
                dpost,
                dres,
                args,
                inv_r,
                scratch: vec![F::zero(); n * n],
                ws: MapScratch::default(),
            },
        )
        .collect()
}

/// The write-in half for the task-local tokens `a..b` (at most [`SUB_TOKENS`]) of the task whose
/// first token is `t0`, with the upstream gradient `g` of those tokens (`[b − a, n, C]`).
#[inline(always)]
fn wi_sub<F: Float>(
    k: &impl MappingKernel<F>,
    inp: &WiIn<'_, F>,
    t0: usize,
    a: usize,
    b: usize,
    g: &[F],
    w: &mut WiTask<'_, F>,
) -> Result<()> {
    let (n, c) = k.dims();
    let (rpt, m) = (k.rows_per_token(), k.width());
    let (x, y) = (inp.x, inp.y);
    let xs = &x[(t0 + a) * n * c..(t0 + b) * n * c];
    let (ra, rb) = (a * rpt, b * rpt);
    project(
        k,
        t0 + a,
        xs,
        &mut w.args[ra * m..rb * m],
        &mut w.inv_r[ra..rb],
    )?;
    k.maps(
        t0 + a,
        &w.args[ra * m..rb * m],
        &mut w.pre[a * n..b * n],
        &mut w.post[a * n..b * n],
        &mut w.res[a * n * n..b * n * n],
        &mut w.ws,
    )?;
    for tl in a..b {
        let tg = t0 + tl;
        let (xt, yt, gt) = (
            &x[tg * n * c..(tg + 1) * n * c],
            &y[tg * c..(tg + 1) * c],
            &g[(tl - a) * n * c..(tl - a + 1) * n * c],
        );
        let (pt, qt, rt) = (
            &w.pre[tl * n..(tl + 1) * n],
            &w.post[tl * n..(tl + 1) * n],
            &w.res[tl * n * n..(tl + 1) * n * n],
        );
        let wt = inp.ro.map_or(pt, |r| &r[tg * n..(tg + 1) * n]);
        read_out_token(c, xt, wt, &mut w.u[tl * c..(tl + 1) * c]);
        let (dpt, drt) = (
            &mut w.dpost[tl * n..(tl + 1) * n],
            &mut w.dres[tl * n * n..(tl + 1) * n * n],
        );
        write_in_backward_token(
            c,
            xt,
            qt,
            rt,
            yt,
            gt,
            &mut w.dy[tl * c..(tl + 1) * c],
            dpt,
            drt,
            &mut w.dx[tl * n * c..(tl + 1) * n * c],
            &mut w.scratch,
        );
        if !all_finite(dpt) || !all_finite(drt) {
            return Err(blame(
                tg,
                &[("upstream", gt), ("y", yt)],
                "write-in gradients (overflow)",
            ));
        }
    }
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
    with_flow(x.shape()[0], n, link, |flow| {
        read_out_backward_into(k, x, tape, du, flow, dx)
    })
}

/// Checks `link` for `t` tokens and `n` streams and runs `f` with it as a [`PreFlow`].
fn with_flow<F: Float, R>(
    t: usize,
    n: usize,
    link: ChainLink<'_, F>,
    f: impl FnOnce(PreFlow<'_, F>) -> Result<R>,
) -> Result<R> {
    let tn = [t, n];
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
            return Err(Error::NonFinite {
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
            let mut f = Some(f);
            let mut out = None;
            with_slice_mut(g, |g| {
                let flow = PreFlow {
                    ro,
                    pre_grad,
                    ro_grad: Some(g),
                };
                out = Some(f.take().expect("called once")(flow)?);
                Ok(())
            })?;
            Ok(out.expect("set on success"))
        }
        _ => f(PreFlow {
            ro,
            pre_grad,
            ro_grad: None,
        }),
    }
}

/// The block before a backward seam: its mapping kernel, input `x_l` (`[T, n, C]`), sublayer
/// output `y_l` (`[T, C]`), the read-out weights its sublayer input was read out with when they
/// are not its own `H_pre` (`[T, n]`), and the tape its write-in half fills.
pub(crate) struct SeamPrev<'a, F, K> {
    pub k: &'a K,
    pub x: ArrayView3<'a, F>,
    pub y: ArrayView2<'a, F>,
    pub ro: Option<ArrayView2<'a, F>>,
    pub tape: &'a mut Tape<F>,
}

/// An error of a backward seam, by the block it comes from.
#[derive(Debug)]
pub(crate) enum SeamError {
    /// From the read-out half of block `l + 1` (the seam's own block).
    This(Error),
    /// From the write-in half of block `l`.
    Prev(Error),
}

/// The backward seam between blocks `l` and `l + 1` of a chain: block `l + 1`'s read-out half
/// (as [`read_out_backward_linked_into`]) fused with block `l`'s write-in half (as
/// [`write_in_backward_into`] with `∂x_{l+1}` as its upstream gradient). Per sub-chunk of
/// tokens, `∂x_{l+1}` is completed in a task's scratch and consumed by block `l`'s write-in
/// half while it is in cache: it is never written to memory. The results are bitwise equal to
/// the two calls one after the other, errors included (block `l + 1`'s first).
pub(crate) fn backward_seam<F: Float, K0: MappingKernel<F>>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    tape: &mut Tape<F>,
    du: ArrayView2<F>,
    link: ChainLink<'_, F>,
    prev: SeamPrev<'_, F, K0>,
) -> std::result::Result<(Vec<F>, Vec<F>), SeamError> {
    let (n, c) = k.dims();
    check_x(x.shape(), n, c).map_err(SeamError::This)?;
    let t = x.shape()[0];
    let SeamPrev {
        k: kp,
        x: xp,
        y: yp,
        ro: rop,
        tape: tp,
    } = prev;
    // Block l's checks, as `write_in_backward_into` makes them (its upstream is block l+1's ∂x,
    // of block l+1's shape).
    let pre_checks = || -> Result<()> {
        check_same("previous block", &[n, c], &[kp.dims().0, kp.dims().1])?;
        check_same("x", &[t, n, c], xp.shape())?;
        check_write_in_side(t, n, c, yp, rop.as_ref())
    };
    let mut prev_err = pre_checks().err();
    let rop = rop.as_ref().map(|r| r.as_standard_layout());
    let rop = rop.as_ref().map(|r| r.as_slice().expect("standard layout"));
    let (rpt, m) = (kp.rows_per_token(), kp.width());
    if prev_err.is_none() {
        prev_err = tp.ensure(t, n, c, rpt, m).err();
    }
    let xp = xp.as_standard_layout();
    let yp = yp.as_standard_layout();
    let inp = WiIn {
        x: xp.as_slice().expect("standard layout"),
        y: yp.as_slice().expect("standard layout"),
        ro: rop,
    };
    let ntasks = t.div_ceil(par::TASK_TOKENS);
    // With block l's inputs wrong, block l+1's half runs alone and the error comes after its own.
    let sinks: Vec<Option<WiTask<'_, F>>> = if prev_err.is_none() {
        wi_tasks(tp, n, c, rpt, m).into_iter().map(Some).collect()
    } else {
        (0..ntasks).map(|_| None).collect()
    };
    let src = std::mem::take(&mut tape.dx);
    let r = with_flow(t, n, link, |flow| {
        read_out_backward_run(
            k,
            x,
            tape,
            du,
            Some(&src),
            flow,
            None,
            sinks,
            |w, t0, a, b, g| match w {
                Some(w) => wi_sub(kp, &inp, t0, a, b, g, w),
                None => Ok(()),
            },
        )
    });
    tape.dx = src;
    let (dw, acc, sink_err) = r.map_err(SeamError::This)?;
    match prev_err.or(sink_err) {
        Some(e) => Err(SeamError::Prev(e)),
        None => Ok((dw, acc)),
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
    let ntasks = x.shape()[0].div_ceil(par::TASK_TOKENS);
    let sinks = (0..ntasks).map(|_| ()).collect();
    let (dw, acc, _) = read_out_backward_run(
        k,
        x,
        tape,
        du,
        src,
        flow,
        Some(dx),
        sinks,
        |_, _, _, _, _| Ok(()),
    )?;
    Ok((dw, acc))
}

/// What the read-out half reads, for all `T` tokens: `x`, `∂u`, the write-in's part of `∂x`
/// (`src`, when it is not already in the destination), the [`PreFlow`]'s weights and gradient,
/// and the tape the write-in half filled.
#[derive(Clone, Copy)]
struct RoIn<'a, F> {
    x: &'a [F],
    du: &'a [F],
    src: Option<&'a [F]>,
    ro: Option<&'a [F]>,
    pre_grad: Option<&'a [F]>,
    pre: &'a [F],
    post: &'a [F],
    dpost: &'a [F],
    dres: &'a [F],
    args: &'a [F],
    inv_r: &'a [F],
}

/// One task's gradient partials (`∂W`, the kernel's accumulator), its share of the gradient of
/// the read-out weights, and its scratch.
struct RoTask<'a, F> {
    dw: &'a mut [F],
    acc: &'a mut [F],
    ro_grad: Option<&'a mut [F]>,
    dpre: Vec<F>,
    /// The whole task's `∂args`, for one `∂W` product per task ([`ro_dw`]).
    dargs: Vec<F>,
    ws: MapScratch<F>,
}

/// The read-out half for the task-local tokens `a..b` (at most [`SUB_TOKENS`]) of the task whose
/// first token is `t0`: adds their `∂x` into `dxs` (`[b − a, n, C]`; first a copy of `src` when
/// given) and fills the task's `∂args`.
#[inline(always)]
fn ro_sub<F: Float>(
    k: &impl MappingKernel<F>,
    inp: &RoIn<'_, F>,
    t0: usize,
    a: usize,
    b: usize,
    dxs: &mut [F],
    r: &mut RoTask<'_, F>,
) -> Result<()> {
    let (n, c) = k.dims();
    let (rpt, m) = (k.rows_per_token(), k.width());
    let kk = n * c / rpt;
    let RoIn {
        x,
        du,
        src,
        ro,
        pre_grad,
        pre,
        post,
        dpost,
        dres,
        args,
        inv_r,
    } = *inp;
    let (ga, gb) = (t0 + a, t0 + b);
    let xs = &x[ga * n * c..gb * n * c];
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
        let pt = ro.map_or(&pre[tg * n..(tg + 1) * n], |r| &r[tg * n..(tg + 1) * n]);
        read_out_backward_token(
            c,
            xt,
            pt,
            dut,
            &mut r.dpre[tl * n..(tl + 1) * n],
            &mut dxs[tl * n * c..(tl + 1) * n * c],
        );
    }
    let dpre = &mut r.dpre[..(b - a) * n];
    if ro.is_some() {
        // The read-out's weights are not this block's H_pre.
        if let Some(g) = r.ro_grad.as_deref_mut() {
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
    let da = &mut r.dargs[a * rpt * m..b * rpt * m];
    k.grads(
        ar,
        &pre[ga * n..gb * n],
        &post[ga * n..gb * n],
        dpre,
        &dpost[ga * n..gb * n],
        &dres[ga * n * n..gb * n * n],
        da,
        r.acc,
        &mut r.ws,
    )?;
    // RMS normalisation, args = (x·W) / r: ∂(x·W) = ∂args / r, and through r,
    // ∂x += (∂r / (K r)) x with ∂r = −(∂args · args) / r.
    let kf = F::from_usize(kk);
    for row in 0..rows {
        let ir = inv_r[ra + row];
        let (arow, drow) = (&ar[row * m..(row + 1) * m], &mut da[row * m..(row + 1) * m]);
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
    Ok(())
}

/// `∂W = x_taskᵀ · ∂(x·W)_task` for the `tc` tokens of the task whose first token is `t0`: one
/// product per task. Accumulating it per sub-chunk read and wrote the whole `[K, m]` `∂W` every
/// 16 tokens (2.6 MiB at n = 8, C = 1024), more traffic than the task's `x`.
#[inline(always)]
fn ro_dw<F: Float>(
    k: &impl MappingKernel<F>,
    x: &[F],
    t0: usize,
    tc: usize,
    r: &mut RoTask<'_, F>,
) {
    let (n, c) = k.dims();
    let (rpt, m) = (k.rows_per_token(), k.width());
    let kk = n * c / rpt;
    let rows = tc * rpt;
    let xr = faer::MatRef::from_row_major_slice(&x[t0 * n * c..(t0 + tc) * n * c], rows, kk);
    let draw = faer::MatRef::from_row_major_slice(&r.dargs[..rows * m], rows, m);
    F::gemm(
        faer::MatMut::from_row_major_slice_mut(r.dw, kk, m),
        false,
        xr.transpose(),
        draw,
        false,
    );
}

/// The read-out half's driver. `∂x` goes into `dx` when given; otherwise each sub-chunk's goes
/// into a task's scratch and is handed, complete, to `sink(state, t0, a, b, ∂x)` with the task's
/// `state` from `sinks` (one a task), while it is in cache: the seam of the backward pass. A
/// task's first `sink` error stops its sinks, not its read-out; the read-out's errors come
/// first (the lowest-indexed task's), then the sinks' (the lowest-indexed task's), as when the
/// two run one after the other. Returns `∂W`, the kernel's accumulator and the sinks' error.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn read_out_backward_run<F: Float, S: Send>(
    k: &impl MappingKernel<F>,
    x: ArrayView3<F>,
    tape: &mut Tape<F>,
    du: ArrayView2<F>,
    src: Option<&[F]>,
    flow: PreFlow<'_, F>,
    dx: Option<&mut [F]>,
    sinks: Vec<S>,
    sink: impl Fn(&mut S, usize, usize, usize, &[F]) -> Result<()> + Sync,
) -> Result<(Vec<F>, Vec<F>, Option<Error>)> {
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
    let tt = par::TASK_TOKENS;
    let ntasks = t.div_ceil(tt);
    assert_eq!(sinks.len(), ntasks, "one sink state a task");
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
    let inp = RoIn {
        x,
        du,
        src,
        ro,
        pre_grad,
        pre: maps.pre.as_slice().expect("owned"),
        post: maps.post.as_slice().expect("owned"),
        dpost,
        dres,
        args,
        inv_r,
    };
    let ro_grads: Vec<Option<&mut [F]>> = match ro_grad {
        Some(g) => g.chunks_mut(tt * n).map(Some).collect(),
        None => (0..ntasks).map(|_| None).collect(),
    };
    let dsts: Vec<Option<&mut [F]>> = match dx {
        Some(d) => d.chunks_mut(tt * n * c).map(Some).collect(),
        None => (0..ntasks).map(|_| None).collect(),
    };
    let mut errs: Vec<Option<Error>> = (0..ntasks).map(|_| None).collect();
    let tasks: Vec<_> = dsts
        .into_iter()
        .zip(parts.chunks_mut(part_len))
        .zip(ro_grads)
        .zip(sinks)
        .zip(errs.iter_mut())
        .collect();
    par::try_for_each(
        tasks,
        |i, ((((mut dst, part), ro_grad), mut state), err)| {
            par::vectorized(
                #[inline(always)]
                || {
                    let t0 = i * tt;
                    let tc = (t - t0).min(tt);
                    let (dw, acc) = part.split_at_mut(kk * m);
                    acc.fill(F::zero());
                    let mut r = RoTask {
                        dw,
                        acc,
                        ro_grad,
                        dpre: vec![F::zero(); SUB_TOKENS * n],
                        dargs: vec![F::zero(); tc * rpt * m],
                        ws: MapScratch::default(),
                    };
                    let mut scratch = match dst {
                        Some(_) => Vec::new(),
                        None => vec![F::zero(); SUB_TOKENS * n * c],
                    };
                    for a in (0..tc).step_by(SUB_TOKENS) {
                        let b = (a + SUB_TOKENS).min(tc);
                        let dxs = match dst.as_deref_mut() {
                            Some(d) => &mut d[a * n * c..b * n * c],
                            None => &mut scratch[..(b - a) * n * c],
                        };
                        ro_sub(k, &inp, t0, a, b, dxs, &mut r)?;
                        if err.is_none()
                            && let Err(e) = sink(&mut state, t0, a, b, dxs)
                        {
                            *err = Some(e);
                        }
                    }
                    ro_dw(k, x, t0, tc, &mut r);
                    Ok(())
                },
            )
        },
    )?;
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
    Ok((total, acc, errs.into_iter().flatten().next()))
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
