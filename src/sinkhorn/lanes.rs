//! The linear-domain Sinkhorn-Knopp kernel, `LANES` matrices side by side.
//!
//! Matrices are stored structure-of-arrays: entry `(i, j)` of lane `l` lives at
//! `buf[(i * n + j) * LANES + l]`, so every step is a loop over `LANES` independent values that
//! LLVM vectorises, while each lane performs exactly the scalar operation sequence of SPEC §2.
//! A lane's result therefore does not depend on which lane it ran in or on its neighbours: a
//! batch is bitwise identical to projecting its matrices one at a time.

use crate::Float;

/// Matrices processed side by side.
pub(crate) const LANES: usize = 8;

type Lane<F> = [F; LANES];

#[inline(always)]
fn lane<F: Float>(buf: &[F], e: usize) -> &Lane<F> {
    (&buf[e * LANES..(e + 1) * LANES]).try_into().unwrap()
}

#[inline(always)]
fn lane_mut<F: Float>(buf: &mut [F], e: usize) -> &mut Lane<F> {
    (&mut buf[e * LANES..(e + 1) * LANES]).try_into().unwrap()
}

/// What one run of the forward iteration needs: size, iteration count, epsilon, and the
/// threshold below which a denominator means the linear domain has lost accuracy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan<F> {
    pub n: usize,
    pub iters: usize,
    pub eps: F,
    /// `MIN_POSITIVE / EPSILON`: a normalising sum at least this large guarantees that every
    /// entry contributing more than one ulp to it is a normal number.
    pub threshold: F,
}

impl<F: Float> Plan<F> {
    pub fn new(n: usize, iters: usize, eps: f64) -> Self {
        Plan {
            n,
            iters,
            eps: F::from_f64(eps),
            threshold: F::min_positive_value() / F::epsilon(),
        }
    }

    /// Normalisation steps after the column softmax: rows, then `iters - 1` × (columns, rows).
    pub fn steps(&self) -> usize {
        2 * self.iters - 1
    }

    /// Scratch elements for [`forward`] with iterates stored (the VJP): the softmax, one matrix
    /// per step, one denominator vector per step.
    pub fn store_len(&self) -> usize {
        let nn = self.n * self.n;
        (nn * (1 + self.steps()) + self.n * self.steps()) * LANES
    }
}

/// Copies `count ≤ LANES` row-major `n×n` matrices into structure-of-arrays form; lanes past
/// `count` are zero (a valid input whose result is discarded).
#[inline(always)]
pub(crate) fn gather<F: Float>(nn: usize, src: &[F], count: usize, buf: &mut [F]) {
    debug_assert!(count <= LANES && src.len() >= count * nn && buf.len() >= nn * LANES);
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

/// The inverse of [`gather`] for the first `count` lanes.
#[inline(always)]
pub(crate) fn scatter<F: Float>(nn: usize, buf: &[F], count: usize, dst: &mut [F]) {
    for e in 0..nn {
        let v = lane(buf, e);
        for l in 0..count {
            dst[l * nn + e] = v[l];
        }
    }
}

/// `buf[e] = softmax over each column` in place (stable: shifted by the column max).
#[inline(always)]
fn column_softmax<F: Float>(n: usize, buf: &mut [F]) {
    for j in 0..n {
        let mut mx = *lane(buf, j);
        for i in 1..n {
            let v = lane(buf, i * n + j);
            for l in 0..LANES {
                mx[l] = mx[l].max(v[l]);
            }
        }
        let mut s = [F::zero(); LANES];
        for i in 0..n {
            let v = lane_mut(buf, i * n + j);
            for l in 0..LANES {
                v[l] = (v[l] - mx[l]).exp();
                s[l] += v[l];
            }
        }
        for s in s.iter_mut() {
            *s = F::one() / *s;
        }
        for i in 0..n {
            let v = lane_mut(buf, i * n + j);
            for l in 0..LANES {
                v[l] *= s[l];
            }
        }
    }
}

/// Divides each row (`rows == true`) or column by its sum plus `eps`. Writes the denominators
/// to `den` (`n` lanes) and lowers `min_den` to the smallest of them.
#[inline(always)]
fn normalise<F: Float>(
    n: usize,
    rows: bool,
    eps: F,
    buf: &mut [F],
    den: &mut [F],
    min_den: &mut Lane<F>,
) {
    let (outer, inner) = if rows { (n, 1) } else { (1, n) };
    for a in 0..n {
        let mut s = [F::zero(); LANES];
        for b in 0..n {
            let v = lane(buf, a * outer + b * inner);
            for l in 0..LANES {
                s[l] += v[l];
            }
        }
        let d = lane_mut(den, a);
        for l in 0..LANES {
            d[l] = s[l] + eps;
            min_den[l] = min_den[l].min(d[l]);
            s[l] = F::one() / d[l];
        }
        for b in 0..n {
            let v = lane_mut(buf, a * outer + b * inner);
            for l in 0..LANES {
                v[l] *= s[l];
            }
        }
    }
}

/// Runs SPEC §2 in place on `buf` (logits in, projection out). With `store`, keeps what the VJP
/// needs (see [`Plan::store_len`]); `den` is `n·LANES` scratch otherwise. Returns, per lane,
/// whether the linear domain was accurate (every denominator ≥ the plan's threshold).
#[inline(always)]
pub(crate) fn forward<F: Float>(
    plan: &Plan<F>,
    buf: &mut [F],
    den: &mut [F],
    mut store: Option<&mut [F]>,
) -> [bool; LANES] {
    let n = plan.n;
    let nn = n * n;
    column_softmax(n, buf);
    if let Some(st) = store.as_deref_mut() {
        st[..nn * LANES].copy_from_slice(&buf[..nn * LANES]);
    }
    if plan.eps > F::zero() {
        for v in buf[..nn * LANES].iter_mut() {
            *v += plan.eps;
        }
    }
    let mut min_den = [F::infinity(); LANES];
    for k in 0..plan.steps() {
        let rows = k % 2 == 0;
        match store.as_deref_mut() {
            Some(st) => {
                let (mats, dens) = st.split_at_mut(nn * LANES * (1 + plan.steps()));
                let d = &mut dens[k * n * LANES..(k + 1) * n * LANES];
                normalise(n, rows, plan.eps, buf, d, &mut min_den);
                mats[(k + 1) * nn * LANES..(k + 2) * nn * LANES]
                    .copy_from_slice(&buf[..nn * LANES]);
            }
            None => normalise(n, rows, plan.eps, buf, den, &mut min_den),
        }
    }
    let mut ok = [true; LANES];
    for l in 0..LANES {
        ok[l] = min_den[l] >= plan.threshold;
    }
    ok
}

/// The VJP of [`forward`], given its `store` and the upstream gradient in `g` (SoA); leaves the
/// gradient with respect to the logits in `g`.
///
/// Each normalisation `y = x / d` with `d = Σ x + eps` along a row (or column) has
/// `∂x = (∂y − Σ ∂y ⊙ y) / d` along the same row; the column softmax `p` has
/// `∂L = p ⊙ (∂p − Σ_col p ⊙ ∂p)`; adding `eps` passes the gradient through.
#[inline(always)]
pub(crate) fn backward<F: Float>(plan: &Plan<F>, store: &[F], g: &mut [F]) {
    let n = plan.n;
    let nn = n * n;
    let (mats, dens) = store.split_at(nn * LANES * (1 + plan.steps()));
    for k in (0..plan.steps()).rev() {
        let (outer, inner) = if k % 2 == 0 { (n, 1) } else { (1, n) };
        let y = &mats[(k + 1) * nn * LANES..(k + 2) * nn * LANES];
        let den = &dens[k * n * LANES..(k + 1) * n * LANES];
        for a in 0..n {
            let mut dot = [F::zero(); LANES];
            for b in 0..n {
                let e = a * outer + b * inner;
                let (gv, yv) = (lane(g, e), lane(y, e));
                for l in 0..LANES {
                    dot[l] += gv[l] * yv[l];
                }
            }
            let d = *lane(den, a);
            for b in 0..n {
                let gv = lane_mut(g, a * outer + b * inner);
                for l in 0..LANES {
                    gv[l] = (gv[l] - dot[l]) / d[l];
                }
            }
        }
    }
    let p = &mats[..nn * LANES];
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
