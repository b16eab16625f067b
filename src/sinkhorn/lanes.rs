//! The linear-domain Sinkhorn-Knopp kernel, `LANES` matrices side by side.
//!
//! Matrices are stored structure-of-arrays: entry `(i, j)` of lane `l` lives at
//! `buf[(i * n + j) * LANES + l]`, so every step is a loop over `LANES` independent values that
//! LLVM vectorises, while each lane performs the same scalar operation sequence.
//! A lane's result therefore does not depend on which lane it ran in or on its neighbours: a
//! batch is bitwise identical to projecting its matrices one at a time.
//!
//! The kernels take the size as a [`Dim`]: a compile-time constant for `n = 2, 4, 8` (see
//! [`with_dim!`]), so that the `n` loops unroll completely, every index is a constant and the
//! bounds checks vanish, or a run-time `usize` for any other `n`. The operations, and so the
//! bits, are the same either way.
//!
//! The iteration runs in factored form. Every iterate is `diag(a) · P' · diag(b)` with `P'` the
//! column softmax plus `eps`: a row step replaces `a_i` by `a_i / (a_i · Σ_j P'_ij b_j + eps)`,
//! which is the row normalisation `M_ij / (Σ_j M_ij + eps)` of SPEC §2 with the sum evaluated
//! as `a_i · (P' b)_i`; a column step does the same to `b`. A step thus costs one `n×n`
//! matrix-vector product and `n` divisions, with nothing written back: the first version,
//! which rescaled and stored all `n²` entries at every step, spent most of its time on those
//! loads and stores (7 M matrices/s, against 8.3 M factored; n = 4, f32, one group, one core).
//! The result is `(a_i · P'_ij) · b_j`: the same map, rounded differently from the unfactored
//! loop (a few ulp). The scalings are updated through their reciprocals (see [`normalise`]),
//! which takes a product and a sum off the chain from one step to the next.
//!
//! Cost, n = 4, f32, AVX2, one core of this Zen 3 (two FMA pipes, a ymm division every 3.3
//! cycles): a row of a step is 4 multiplies / multiply-adds and 1 division (with `eps > 0` one
//! more multiply-add), 4 loads of `P'`. Measured ≈ 0.7 ns a matrix-step (1.07 ns before the
//! reciprocal form, the local copy of the other scaling and the cheaper accuracy check, when
//! ≈ 180 loads a step of 32 matrices made the load ports the bottleneck). A hand-written AVX2
//! version of the steps alone (scalings in registers, 1–4 interleaved vectors, with and without
//! pairing the divisions) ran no faster (0.71–0.75 ns), so the remaining gap to the FMA-pipe
//! count (≈ 0.4 ns) is not LLVM's. The fixed part (transposes, 16 `exp`, softmax, final
//! products) is ≈ 17 ns; the projection is ≈ 42–48 ns a matrix.
//!
//! The VJP needs every iterate; it stores the `n` scalings each step changes and the `n`
//! reciprocals, and rebuilds `M` entry by entry from them.

use super::shuffle::Shuffler;
use crate::Float;

/// Matrices processed side by side in one group (two AVX2 registers of `f32`).
pub(crate) const LANES: usize = 16;

/// Independent groups of [`LANES`] matrices interleaved step by step. A normalisation step is
/// a chain `mat-vec → + eps · u_i → 1/u_i'` whose `n` divisions queue on the one divider; the
/// next step needs all of it. A second group's step has no dependence on the
/// first's, so the core overlaps them (1.4× measured against one group of 16; one group of 32
/// lanes made LLVM spill the lane arrays and ran 3× slower).
pub(crate) const GROUPS: usize = 2;
const _: () = assert!(
    GROUPS == 2,
    "forward_steps and backward_steps are written out for two"
);

/// Matrices per kernel call.
pub(crate) const BATCH: usize = GROUPS * LANES;

/// Scaling vectors a group keeps: `a`, `b` and their reciprocals (see [`normalise`]).
pub(crate) const SCALE: usize = 4;

type Lane<F> = [F; LANES];

/// The matrix size `n`: a compile-time constant ([`Const`]) or a run-time value (`usize`).
pub(crate) trait Dim: Copy {
    /// `n`.
    fn get(self) -> usize;
}

/// `n = N` known at compile time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Const<const N: usize>;

impl<const N: usize> Dim for Const<N> {
    #[inline(always)]
    fn get(self) -> usize {
        N
    }
}

impl Dim for usize {
    #[inline(always)]
    fn get(self) -> usize {
        self
    }
}

/// Evaluates `$body` with `$d` bound to a [`Dim`] equal to `$n`: [`Const`] for the stream
/// counts models use (2, 4, 8), the run-time value otherwise.
macro_rules! with_dim {
    ($n:expr, $d:ident => $body:expr) => {
        match $n {
            2 => {
                let $d = $crate::sinkhorn::lanes::Const::<2>;
                $body
            }
            4 => {
                let $d = $crate::sinkhorn::lanes::Const::<4>;
                $body
            }
            8 => {
                let $d = $crate::sinkhorn::lanes::Const::<8>;
                $body
            }
            n => {
                let $d: usize = n;
                $body
            }
        }
    };
}
pub(crate) use with_dim;

#[inline(always)]
fn lane<F: Float>(buf: &[F], e: usize) -> &Lane<F> {
    (&buf[e * LANES..(e + 1) * LANES]).try_into().unwrap()
}

#[inline(always)]
fn lane_mut<F: Float>(buf: &mut [F], e: usize) -> &mut Lane<F> {
    (&mut buf[e * LANES..(e + 1) * LANES]).try_into().unwrap()
}

/// What one run of the forward iteration needs: size, iteration count, epsilon, and the bound
/// on the scalings beyond which the linear domain may have lost accuracy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan<F> {
    pub n: usize,
    pub iters: usize,
    pub eps: F,
    /// `sqrt(EPSILON / MIN_POSITIVE)`. A normalising sum at least `MIN_POSITIVE / EPSILON`
    /// guarantees that every entry contributing more than one ulp to it is a normal number.
    /// A denominator is the ratio `u_i' / u_i` of two successive reciprocal scalings, so if
    /// every scaling and its reciprocal stay at most `bound` (one running maximum a lane, off
    /// the critical path), every denominator is at least `1 / bound² = MIN_POSITIVE / EPSILON`.
    /// Stricter than checking each denominator, which cost a load and a multiply-add a row.
    pub bound: F,
}

impl<F: Float> Plan<F> {
    pub fn new(n: usize, iters: usize, eps: f64) -> Self {
        Plan {
            n,
            iters,
            eps: F::from_f64(eps),
            bound: (F::epsilon() / F::min_positive_value()).sqrt(),
        }
    }

    /// Normalisation steps after the column softmax: rows, then `iters - 1` × (columns, rows).
    pub fn steps(&self) -> usize {
        2 * self.iters - 1
    }

    /// Scratch elements for [`forward`] with iterates stored (the VJP): the softmax, then per
    /// step the reciprocal denominators and the scaling vector the step changed.
    pub fn store_len(&self) -> usize {
        self.step_at(self.steps())
    }

    /// Where step `k`'s reciprocals (`n` lanes) start in the store; its scalings follow.
    fn step_at(&self, k: usize) -> usize {
        (self.n * self.n + 2 * self.n * k) * LANES
    }
}

/// Copies `count ≤ LANES` row-major `n×n` matrices into structure-of-arrays form; lanes past
/// `count` are zero (a valid input whose result is discarded).
#[inline(always)]
pub(crate) fn gather<F: Float, D: Dim>(
    d: D,
    shuf: Shuffler,
    src: &[F],
    count: usize,
    buf: &mut [F],
) {
    let nn = d.get() * d.get();
    debug_assert!(count <= LANES && src.len() >= count * nn);
    let buf = &mut buf[..nn * LANES];
    if count == LANES {
        let src = &src[..nn * LANES];
        if transpose_blocks(shuf, src, nn, buf, LANES, LANES, nn) {
            return;
        }
        for e in 0..nn {
            let v = lane_mut(buf, e);
            for (l, v) in v.iter_mut().enumerate() {
                *v = src[l * nn + e];
            }
        }
    } else {
        for e in 0..nn {
            let v = lane_mut(buf, e);
            for (l, v) in v.iter_mut().enumerate() {
                *v = if l < count {
                    src[l * nn + e]
                } else {
                    F::zero()
                };
            }
        }
    }
}

/// `dst[c · ds + r] = src[r · ss + c]` for the `rows × cols` block, in 8×8 shuffles; `false`,
/// having done nothing, unless `F` is `f32`, both sizes are multiples of 8 and the CPU can.
#[inline(always)]
fn transpose_blocks<F: Float>(
    shuf: Shuffler,
    src: &[F],
    ss: usize,
    dst: &mut [F],
    ds: usize,
    rows: usize,
    cols: usize,
) -> bool {
    if rows % 8 != 0 || cols % 8 != 0 {
        return false;
    }
    let (Some(src), Some(dst)) = (F::as_f32s(src), F::as_f32s_mut(dst)) else {
        return false;
    };
    for r in (0..rows).step_by(8) {
        for c in (0..cols).step_by(8) {
            if !shuf.transpose8(&src[r * ss + c..], ss, &mut dst[c * ds + r..], ds) {
                return false;
            }
        }
    }
    true
}

/// [`gather`] of `count ≤ BATCH` matrices into the [`GROUPS`] groups.
#[inline(always)]
pub(crate) fn gather_batch<F: Float, D: Dim>(
    d: D,
    shuf: Shuffler,
    src: &[F],
    count: usize,
    buf: &mut [F],
) {
    let nn = d.get() * d.get();
    for g in 0..GROUPS {
        let c = count.saturating_sub(g * LANES).min(LANES);
        let src = src.get(g * LANES * nn..).unwrap_or(&[]);
        gather(
            d,
            shuf,
            src,
            c,
            &mut buf[g * nn * LANES..(g + 1) * nn * LANES],
        );
    }
}

/// [`scatter`] of the first `count ≤ BATCH` matrices out of the groups.
#[inline(always)]
pub(crate) fn scatter_batch<F: Float, D: Dim>(
    d: D,
    shuf: Shuffler,
    buf: &[F],
    count: usize,
    dst: &mut [F],
) {
    let nn = d.get() * d.get();
    for g in 0..GROUPS {
        let c = count.saturating_sub(g * LANES).min(LANES);
        if c > 0 {
            let b = &buf[g * nn * LANES..(g + 1) * nn * LANES];
            scatter(d, shuf, b, c, &mut dst[g * LANES * nn..]);
        }
    }
}

/// The inverse of [`gather`] for the first `count` lanes.
#[inline(always)]
pub(crate) fn scatter<F: Float, D: Dim>(
    d: D,
    shuf: Shuffler,
    buf: &[F],
    count: usize,
    dst: &mut [F],
) {
    let nn = d.get() * d.get();
    let buf = &buf[..nn * LANES];
    if count == LANES {
        let dst = &mut dst[..LANES * nn];
        if transpose_blocks(shuf, buf, LANES, dst, nn, nn, LANES) {
            return;
        }
        for e in 0..nn {
            let v = lane(buf, e);
            for l in 0..LANES {
                dst[l * nn + e] = v[l];
            }
        }
    } else {
        let dst = &mut dst[..count * nn];
        for e in 0..nn {
            let v = lane(buf, e);
            for l in 0..count {
                dst[l * nn + e] = v[l];
            }
        }
    }
}

/// `buf = softmax over each column` in place (stable: shifted by the column max). Returns, per
/// lane, `Σ (x − x)` over the logits: `0` when all are finite, NaN otherwise (an `-inf`
/// logit would otherwise pass as a zero entry).
///
/// Every lane is computed in a local array and stored whole: written in place through the
/// slice, with the sums accumulated beside it, LLVM versioned the exponential loop on a
/// run-time alias check and ran the scalar version (18 ns a matrix of the projection's 58).
#[inline(always)]
#[allow(clippy::eq_op)] // x − x is 0 for finite x and NaN otherwise: the point
fn column_softmax<F: Float, D: Dim>(d: D, buf: &mut [F]) -> Lane<F> {
    let n = d.get();
    let buf = &mut buf[..n * n * LANES];
    let mut fin = [F::zero(); LANES];
    for j in 0..n {
        let mut mx = *lane(buf, j);
        for i in 0..n {
            let v = *lane(buf, i * n + j);
            for l in 0..LANES {
                // A plain comparison (`maxps`): a NaN logit is caught through `fin`.
                mx[l] = if v[l] > mx[l] { v[l] } else { mx[l] };
                fin[l] += v[l] - v[l];
            }
        }
        let mut s = [F::zero(); LANES];
        for i in 0..n {
            let v = *lane(buf, i * n + j);
            let mut e = [F::zero(); LANES];
            for l in 0..LANES {
                e[l] = (v[l] - mx[l]).exp_fast();
                s[l] += e[l];
            }
            *lane_mut(buf, i * n + j) = e;
        }
        let mut r = [F::zero(); LANES];
        for l in 0..LANES {
            r[l] = F::one() / s[l];
        }
        for i in 0..n {
            let mut v = *lane(buf, i * n + j);
            for l in 0..LANES {
                v[l] *= r[l];
            }
            *lane_mut(buf, i * n + j) = v;
        }
    }
    fin
}

/// One normalisation of the factored iterate `diag(a) · p · diag(b)`: with `rows`, each `a_i`
/// becomes `a_i / (a_i · Σ_j p_ij b_j + eps)`; otherwise each `b_j` the same with the roles
/// swapped. `scale` holds `a`, `b`, then their reciprocals `u = 1/a`, `v = 1/b` (`n` lanes
/// each). Writes the reciprocals of the denominators to `rec` when given, and raises `spread`
/// to the largest of the new scalings and their reciprocals (see [`Plan::bound`]).
///
/// The update runs on the reciprocal: `1/a_i' = (a_i t_i + eps) / a_i = t_i + eps · u_i` with
/// `t = p b`, so `u_i' = fma(eps, u_i, t_i)` and `a_i' = 1 / u_i'`. The chain from one step to
/// the next is the mat-vec, one fused multiply-add and one division, and a row reads only
/// `p`'s row and its own `u_i`: with the `n` lanes of `b` copied to locals first (through the
/// slices LLVM must assume the stores to `a` may change `b`, and reloaded all of `b` for every
/// row), the loads no longer outnumber what the two load ports take in the time of the
/// arithmetic. Without `EPS` (`eps = 0`, the default) `u_i' = t_i`, and `u` is neither read nor
/// written unless the VJP needs the reciprocals.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn normalise<F: Float, D: Dim, const EPS: bool>(
    d: D,
    rows: bool,
    eps: F,
    p: &[F],
    scale: &mut [F],
    rec: Option<&mut [F]>,
    spread: &mut Lane<F>,
) {
    let n = d.get();
    let p = &p[..n * n * LANES];
    let scale = &mut scale[..SCALE * n * LANES];
    let (outer, inner) = if rows { (n, 1) } else { (1, n) };
    let (ab, uv) = scale.split_at_mut(2 * n * LANES);
    let (a, b) = ab.split_at_mut(n * LANES);
    let (u, v) = uv.split_at_mut(n * LANES);
    let (this, other, inv) = if rows { (a, &*b, u) } else { (b, &*a, v) };
    let mut local = [[F::zero(); LANES]; LOCAL];
    if n <= LOCAL {
        for (j, o) in local.iter_mut().enumerate().take(n) {
            *o = *lane(other, j);
        }
    }
    let mut rec = rec.map(|r| &mut r[..n * LANES]);
    let keep = EPS || rec.is_some();
    // With `eps = 0` a column step needs no check: `P'` is column-stochastic, so
    // `v_j' = Σ_i P'_ij a_i` lies between the smallest and largest `a_i`, which the row steps
    // checked, and so do `b_j' = 1/v_j'` and the denominator `v_j'/v_j`. Skipping it saves
    // ≈ 3 ns a matrix.
    let check = rows || EPS;
    for i in 0..n {
        // `Σ_j p_ij · other_j` in two interleaved partial sums (even and odd `j`), halving the
        // chain of dependent additions.
        let mut t = mul(lane(p, i * outer), pick(&local, other, n, 0));
        if n > 1 {
            let mut t1 = mul(lane(p, i * outer + inner), pick(&local, other, n, 1));
            for j in 2..n {
                let (pv, ov) = (lane(p, i * outer + j * inner), pick(&local, other, n, j));
                let acc = if j % 2 == 0 { &mut t } else { &mut t1 };
                for l in 0..LANES {
                    acc[l] = pv[l].mul_add(ov[l], acc[l]);
                }
            }
            for l in 0..LANES {
                t[l] += t1[l];
            }
        }
        // Computed in locals and stored whole: through two `&mut` lanes LLVM cannot rule out
        // aliasing after inlining, and falls back to scalar code.
        let w = if keep { *lane(inv, i) } else { t };
        let mut s1 = [F::zero(); LANES];
        let mut w1 = [F::zero(); LANES];
        for l in 0..LANES {
            w1[l] = if EPS { eps.mul_add(w[l], t[l]) } else { t[l] };
            s1[l] = F::one() / w1[l];
        }
        if check {
            let mut sp = *spread;
            for l in 0..LANES {
                // Plain comparisons (`maxps`): a NaN is caught by the final range check.
                let m = if w1[l] > s1[l] { w1[l] } else { s1[l] };
                sp[l] = if m > sp[l] { m } else { sp[l] };
            }
            *spread = sp;
        }
        *lane_mut(this, i) = s1;
        if keep {
            *lane_mut(inv, i) = w1;
        }
        if let Some(rec) = rec.as_deref_mut() {
            *lane_mut(rec, i) = mul(&w, &s1);
        }
    }
}

/// Lanes copied to locals by [`normalise`]: every `n` it is specialised for (see
/// [`with_dim!`]); a larger run-time `n` reads the slice.
const LOCAL: usize = 8;

/// Lane `j` of the other scaling: the local copy when there is one.
#[inline(always)]
fn pick<'a, F: Float>(
    local: &'a [Lane<F>; LOCAL],
    other: &'a [F],
    n: usize,
    j: usize,
) -> &'a Lane<F> {
    if n <= LOCAL {
        &local[j]
    } else {
        lane(other, j)
    }
}

/// `x ⊙ y`.
#[inline(always)]
fn mul<F: Float>(x: &Lane<F>, y: &Lane<F>) -> Lane<F> {
    let mut t = [F::zero(); LANES];
    for l in 0..LANES {
        t[l] = x[l] * y[l];
    }
    t
}

/// Entry `(i, j)` of the iterate `diag(a) · p · diag(b)`, as [`forward`] writes it.
#[inline(always)]
fn entry<F: Float>(a: &Lane<F>, p: &Lane<F>, b: &Lane<F>) -> Lane<F> {
    let mut y = [F::zero(); LANES];
    for l in 0..LANES {
        y[l] = a[l] * p[l] * b[l];
    }
    y
}

/// Step `k` of [`forward`] (rows when `rows`), keeping its reciprocals and the scaling it
/// changed in `store` when given.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_step<F: Float, D: Dim, const EPS: bool>(
    d: D,
    plan: &Plan<F>,
    k: usize,
    rows: bool,
    p: &[F],
    scale: &mut [F],
    store: Option<&mut [F]>,
    spread: &mut Lane<F>,
) {
    let n = d.get();
    match store {
        Some(st) => {
            let at = plan.step_at(k);
            let (r, changed) = st[at..at + 2 * n * LANES].split_at_mut(n * LANES);
            normalise::<F, D, EPS>(d, rows, plan.eps, p, scale, Some(r), spread);
            let from = if rows { 0 } else { n * LANES };
            changed.copy_from_slice(&scale[from..from + n * LANES]);
        }
        None => normalise::<F, D, EPS>(d, rows, plan.eps, p, scale, None, spread),
    }
}

/// The column softmax, `+ eps` and unit scalings of one group, keeping the softmax in `store`.
/// Returns [`column_softmax`]'s finiteness lane.
#[inline(always)]
fn prepare<F: Float, D: Dim>(
    d: D,
    plan: &Plan<F>,
    buf: &mut [F],
    scale: &mut [F],
    store: Option<&mut [F]>,
) -> Lane<F> {
    let n = d.get();
    let nn = n * n;
    let buf = &mut buf[..nn * LANES];
    let fin = column_softmax(d, buf);
    if let Some(st) = store {
        st[..nn * LANES].copy_from_slice(buf);
    }
    if plan.eps > F::zero() {
        for v in buf.iter_mut() {
            *v += plan.eps;
        }
    }
    scale[..SCALE * n * LANES].fill(F::one());
    fin
}

/// Step `k` of [`forward`] for both groups, written out (not a loop: LLVM does not unroll a
/// loop over bodies this large, and a loop left rolled kept the denominators' minima in memory
/// with masked stores, 2× slower).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_steps<F: Float, D: Dim, const EPS: bool>(
    d: D,
    plan: &Plan<F>,
    k: usize,
    rows: bool,
    buf: &[F],
    scale: &mut [F],
    store: Option<&mut [F]>,
    sp0: &mut Lane<F>,
    sp1: &mut Lane<F>,
) {
    let n = d.get();
    let (bl, sl, stl) = (n * n * LANES, SCALE * n * LANES, plan.store_len());
    let (b0, b1) = (&buf[..bl], &buf[bl..2 * bl]);
    let (s0, s1) = scale[..2 * sl].split_at_mut(sl);
    match store {
        Some(st) => {
            let (t0, t1) = st[..2 * stl].split_at_mut(stl);
            forward_step::<F, D, EPS>(d, plan, k, rows, b0, s0, Some(t0), sp0);
            forward_step::<F, D, EPS>(d, plan, k, rows, b1, s1, Some(t1), sp1);
        }
        None => {
            forward_step::<F, D, EPS>(d, plan, k, rows, b0, s0, None, sp0);
            forward_step::<F, D, EPS>(d, plan, k, rows, b1, s1, None, sp1);
        }
    }
}

/// The projection `(a_i · P'_ij) · b_j` of one group into `buf`, and per lane whether the
/// linear domain was accurate.
#[inline(always)]
fn finish<F: Float, D: Dim>(
    d: D,
    plan: &Plan<F>,
    buf: &mut [F],
    scale: &[F],
    spread: &Lane<F>,
    fin: &Lane<F>,
) -> [bool; LANES] {
    let n = d.get();
    let buf = &mut buf[..n * n * LANES];
    let (a, b) = scale[..2 * n * LANES].split_at(n * LANES);
    let (lo, hi) = (F::one() / plan.bound, plan.bound);
    let mut ok = [true; LANES];
    for l in 0..LANES {
        ok[l] = (spread[l] <= hi) & (fin[l] == F::zero());
    }
    for e in 0..n {
        let (av, bv) = (lane(a, e), lane(b, e));
        for l in 0..LANES {
            // `&`, not `&&`: no short circuit, so the comparisons vectorise. Also false for a
            // NaN, which the running maximum passes over.
            ok[l] &= (av[l] >= lo) & (av[l] <= hi) & (bv[l] >= lo) & (bv[l] <= hi);
        }
    }
    for i in 0..n {
        for j in 0..n {
            let y = entry(lane(a, i), lane(buf, i * n + j), lane(b, j));
            *lane_mut(buf, i * n + j) = y;
        }
    }
    ok
}

/// The normalisation steps of [`forward`]: rows, then `iters - 1` × (columns, rows).
#[inline(always)]
fn iterate<F: Float, D: Dim, const EPS: bool>(
    d: D,
    plan: &Plan<F>,
    buf: &[F],
    scale: &mut [F],
    mut store: Option<&mut [F]>,
    sp0: &mut Lane<F>,
    sp1: &mut Lane<F>,
) {
    // `rows` is a literal at every call, so each direction is compiled with constant indices.
    let st = store.as_deref_mut();
    forward_steps::<F, D, EPS>(d, plan, 0, true, buf, scale, st, sp0, sp1);
    for it in 1..plan.iters {
        let st = store.as_deref_mut();
        forward_steps::<F, D, EPS>(d, plan, 2 * it - 1, false, buf, scale, st, sp0, sp1);
        let st = store.as_deref_mut();
        forward_steps::<F, D, EPS>(d, plan, 2 * it, true, buf, scale, st, sp0, sp1);
    }
}

/// Runs SPEC §2 in place on the [`GROUPS`] groups in `buf` (logits in, projection out), the
/// groups' steps interleaved. `scale` (`GROUPS ·` [`SCALE`] `· n · LANES`) is scratch. With
/// `store` (`GROUPS ·` [`Plan::store_len`]), keeps what the VJP needs. Returns, per matrix,
/// whether the logits were finite and the linear domain accurate: every scaling, at every
/// step, and its reciprocal at most the plan's bound, and no NaN.
#[inline(always)]
pub(crate) fn forward<F: Float, D: Dim>(
    d: D,
    plan: &Plan<F>,
    buf: &mut [F],
    scale: &mut [F],
    mut store: Option<&mut [F]>,
) -> [bool; BATCH] {
    debug_assert_eq!(d.get(), plan.n);
    let n = d.get();
    let (bl, sl, stl) = (n * n * LANES, SCALE * n * LANES, plan.store_len());
    let mut fin = [[F::zero(); LANES]; GROUPS];
    for (g, fin) in fin.iter_mut().enumerate() {
        let st = store
            .as_deref_mut()
            .map(|st| &mut st[g * stl..(g + 1) * stl]);
        *fin = prepare(
            d,
            plan,
            &mut buf[g * bl..(g + 1) * bl],
            &mut scale[g * sl..(g + 1) * sl],
            st,
        );
    }
    let (mut sp0, mut sp1) = ([F::zero(); LANES], [F::zero(); LANES]);
    if plan.eps > F::zero() {
        iterate::<F, D, true>(d, plan, buf, scale, store, &mut sp0, &mut sp1);
    } else {
        iterate::<F, D, false>(d, plan, buf, scale, store, &mut sp0, &mut sp1);
    }
    let spread = [sp0, sp1];
    let mut ok = [true; BATCH];
    for (g, sp) in spread.iter().enumerate() {
        let o = finish(
            d,
            plan,
            &mut buf[g * bl..(g + 1) * bl],
            &scale[g * sl..(g + 1) * sl],
            sp,
            &fin[g],
        );
        ok[g * LANES..(g + 1) * LANES].copy_from_slice(&o);
    }
    ok
}

/// The VJP of normalisation step `k` (rows when `rows`) of [`forward`]: the step maps `x` to
/// `y = x · r` along each row (or column) with `r = 1 / (Σ x + eps)`, so
/// `∂x = (∂y − Σ ∂y ⊙ y) · r` along the same row. `y` is rebuilt from the stored scalings.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_step<F: Float, D: Dim>(
    d: D,
    plan: &Plan<F>,
    k: usize,
    rows: bool,
    pe: &[F],
    ones: &[F],
    store: &[F],
    g: &mut [F],
) {
    let n = d.get();
    let g = &mut g[..n * n * LANES];
    let pe = &pe[..n * n * LANES];
    let at = plan.step_at(k);
    let rec = &store[at..at + n * LANES];
    let this = &store[at + n * LANES..at + 2 * n * LANES];
    // The other scaling is the one the previous step changed (all ones before step 1).
    let other = if k == 0 {
        &ones[..n * LANES]
    } else {
        let at = plan.step_at(k - 1) + n * LANES;
        &store[at..at + n * LANES]
    };
    let (a, b) = if rows { (this, other) } else { (other, this) };
    let (outer, inner) = if rows { (n, 1) } else { (1, n) };
    for x in 0..n {
        let mut dot = [F::zero(); LANES];
        for z in 0..n {
            let (i, j) = if rows { (x, z) } else { (z, x) };
            let e = x * outer + z * inner;
            let y = entry(lane(a, i), lane(pe, e), lane(b, j));
            let gv = lane(g, e);
            for l in 0..LANES {
                dot[l] += gv[l] * y[l];
            }
        }
        let r = *lane(rec, x);
        for z in 0..n {
            let e = x * outer + z * inner;
            let mut gv = *lane(g, e);
            for l in 0..LANES {
                gv[l] = (gv[l] - dot[l]) * r[l];
            }
            *lane_mut(g, e) = gv;
        }
    }
}

/// [`backward_step`] `k` for both groups, written out (see [`forward_steps`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_steps<F: Float, D: Dim>(
    d: D,
    plan: &Plan<F>,
    k: usize,
    rows: bool,
    pe: &[F],
    ones: &[F],
    store: &[F],
    g: &mut [F],
) {
    let n = d.get();
    let (bl, stl) = (n * n * LANES, plan.store_len());
    let (g0, g1) = g[..2 * bl].split_at_mut(bl);
    let (p0, p1) = (&pe[..bl], &pe[bl..2 * bl]);
    let (t0, t1) = (&store[..stl], &store[stl..2 * stl]);
    backward_step(d, plan, k, rows, p0, ones, t0, g0);
    backward_step(d, plan, k, rows, p1, ones, t1, g1);
}

/// The VJP of [`forward`], given its `store` and the upstream gradients in `g` (SoA, the
/// groups one after the other); leaves the gradients with respect to the logits in `g`. `pe`
/// (`GROUPS·n²·LANES`) receives `P + eps`; `ones` is `n·LANES` scratch.
///
/// Each normalisation is undone by [`backward_step`], the groups interleaved; the column
/// softmax `p` has `∂L = p ⊙ (∂p − Σ_col p ⊙ ∂p)`; adding `eps` passes the gradient through.
#[inline(always)]
pub(crate) fn backward<F: Float, D: Dim>(
    d: D,
    plan: &Plan<F>,
    store: &[F],
    pe: &mut [F],
    ones: &mut [F],
    g: &mut [F],
) {
    debug_assert_eq!(d.get(), plan.n);
    let n = d.get();
    let nn = n * n;
    let (bl, stl) = (nn * LANES, plan.store_len());
    let ones = &mut ones[..n * LANES];
    ones.fill(F::one());
    for grp in 0..GROUPS {
        let pe = &mut pe[grp * bl..(grp + 1) * bl];
        pe.copy_from_slice(&store[grp * stl..grp * stl + bl]);
        if plan.eps > F::zero() {
            for v in pe.iter_mut() {
                *v += plan.eps;
            }
        }
    }
    let pe = &*pe;
    for it in (1..plan.iters).rev() {
        backward_steps(d, plan, 2 * it, true, pe, ones, store, g);
        backward_steps(d, plan, 2 * it - 1, false, pe, ones, store, g);
    }
    backward_steps(d, plan, 0, true, pe, ones, store, g);
    for grp in 0..GROUPS {
        let p = &store[grp * stl..grp * stl + bl];
        let g = &mut g[grp * bl..(grp + 1) * bl];
        for j in 0..n {
            let mut dot = [F::zero(); LANES];
            for i in 0..n {
                let (gv, pv) = (lane(g, i * n + j), lane(p, i * n + j));
                for l in 0..LANES {
                    dot[l] += gv[l] * pv[l];
                }
            }
            for i in 0..n {
                let pv = *lane(p, i * n + j);
                let gv = lane_mut(g, i * n + j);
                for l in 0..LANES {
                    gv[l] = pv[l] * (gv[l] - dot[l]);
                }
            }
        }
    }
}
