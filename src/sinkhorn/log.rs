//! The log-domain Sinkhorn-Knopp iteration: the same map as [`super::lanes`], with every
//! normalisation computed as a `logsumexp`, for the rare matrices whose linear-domain sums
//! underflow. One matrix at a time, row-major; slow and exact.

use crate::Float;

/// `log(Σ exp(v))` over `len` values at `v[start + k * stride]`, plus `eps` inside the log when
/// `ln_eps` is `Some(ln eps)`.
fn lse<F: Float>(v: &[F], start: usize, stride: usize, len: usize, ln_eps: Option<F>) -> F {
    let mut mx = F::neg_infinity();
    for k in 0..len {
        mx = mx.max(v[start + k * stride]);
    }
    if let Some(le) = ln_eps {
        mx = mx.max(le);
    }
    let mut s = F::zero();
    for k in 0..len {
        s += (v[start + k * stride] - mx).exp();
    }
    if let Some(le) = ln_eps {
        s += (le - mx).exp();
    }
    mx + s.ln()
}

/// `log(exp(a) + exp(b))`.
fn log_add_exp<F: Float>(a: F, b: F) -> F {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Subtracts the row (or column) `lse` from each row (column) of the `n×n` matrix `y`.
fn normalise<F: Float>(n: usize, rows: bool, ln_eps: Option<F>, y: &mut [F]) {
    let (outer, inner) = if rows { (n, 1) } else { (1, n) };
    for a in 0..n {
        let z = lse(y, a * outer, inner, n, ln_eps);
        for b in 0..n {
            y[a * outer + b * inner] -= z;
        }
    }
}

/// Number of `n×n` log-iterates [`iterates`] writes: the log-softmax, the `+ eps` step when
/// `eps > 0`, and one per normalisation step.
pub(crate) fn iterates_len(n: usize, iters: usize) -> usize {
    n * n * (2 + 2 * iters - 1)
}

/// The f64 scratch of [`project_one`] / [`vjp_one`], empty when no matrix needs the log domain.
pub(crate) fn scratch(n: usize, iters: usize, matrices: usize) -> crate::Result<Vec<f64>> {
    if matrices == 0 {
        return Ok(Vec::new());
    }
    crate::error::try_zeroed("sinkhorn log scratch", iterates_len(n, iters))
}

/// Runs SPEC §2 in log space on `logits` (row-major `n×n`), writing every log-iterate to
/// `store` (length [`iterates_len`]) and the projection to `out`.
pub(crate) fn forward<F: Float>(
    n: usize,
    iters: usize,
    eps: F,
    logits: &[F],
    store: &mut [F],
    out: &mut [F],
) {
    let nn = n * n;
    let ln_eps = (eps > F::zero()).then(|| eps.ln());
    let mut y = logits[..nn].to_vec();
    normalise(n, false, None, &mut y); // log of the column softmax
    store[..nn].copy_from_slice(&y);
    if let Some(le) = ln_eps {
        for v in y.iter_mut() {
            *v = log_add_exp(*v, le);
        }
    }
    store[nn..2 * nn].copy_from_slice(&y);
    for k in 0..2 * iters - 1 {
        normalise(n, k % 2 == 0, ln_eps, &mut y);
        store[(k + 2) * nn..(k + 3) * nn].copy_from_slice(&y);
    }
    for (o, v) in out[..nn].iter_mut().zip(&y) {
        *o = v.exp();
    }
}

/// The VJP of [`forward`] from its `store`: `g` holds the upstream gradient and receives the
/// gradient with respect to the logits.
///
/// Working with `∂/∂y` for each log-iterate `y`: a normalisation `y = x − log(Σ exp x + eps)`
/// has `∂x = ∂y − exp(y) Σ ∂y` along the row (column); `y = log(exp x + eps)` has
/// `∂x = ∂y ⊙ exp(x − y)`; the log-softmax `y = L − lse_col(L)` has `∂L = ∂y − exp(y) Σ_col ∂y`.
pub(crate) fn backward<F: Float>(n: usize, iters: usize, eps: F, store: &[F], g: &mut [F]) {
    let nn = n * n;
    let steps = 2 * iters - 1;
    let y_last = &store[(steps + 1) * nn..(steps + 2) * nn];
    for (g, y) in g[..nn].iter_mut().zip(y_last) {
        *g *= y.exp();
    }
    let back = |rows: bool, y: &[F], g: &mut [F]| {
        let (outer, inner) = if rows { (n, 1) } else { (1, n) };
        for a in 0..n {
            let mut s = F::zero();
            for b in 0..n {
                s += g[a * outer + b * inner];
            }
            for b in 0..n {
                let e = a * outer + b * inner;
                g[e] -= y[e].exp() * s;
            }
        }
    };
    for k in (0..steps).rev() {
        back(k % 2 == 0, &store[(k + 2) * nn..(k + 3) * nn], g);
    }
    if eps > F::zero() {
        let (x, y) = (&store[..nn], &store[nn..2 * nn]);
        for e in 0..nn {
            g[e] *= (x[e] - y[e]).exp();
        }
    }
    back(false, &store[..nn], g);
}

/// [`forward`] in f64 whatever `F` is (an `f32` log-iterate of magnitude ~400 keeps only
/// 1e-5 absolute accuracy; f64 keeps the rows summing to 1 within `f32` rounding), with `eps`
/// as `F` represents it. `store` is [`iterates_len`] f64 scratch.
pub(crate) fn project_one<F: Float>(
    n: usize,
    iters: usize,
    eps: F,
    logits: &[F],
    store: &mut [f64],
    out: &mut [F],
) {
    let nn = n * n;
    let l: Vec<f64> = logits[..nn].iter().map(|v| v.as_f64()).collect();
    let mut p = vec![0.0f64; nn];
    forward(n, iters, eps.as_f64(), &l, store, &mut p);
    for (o, v) in out[..nn].iter_mut().zip(p) {
        *o = F::from_f64(v);
    }
}

/// The VJP of [`project_one`], in f64.
pub(crate) fn vjp_one<F: Float>(
    n: usize,
    iters: usize,
    eps: F,
    logits: &[F],
    upstream: &[F],
    store: &mut [f64],
    grad: &mut [F],
) {
    let nn = n * n;
    let mut p = vec![F::zero(); nn];
    project_one(n, iters, eps, logits, store, &mut p);
    let mut g: Vec<f64> = upstream[..nn].iter().map(|v| v.as_f64()).collect();
    backward(n, iters, eps.as_f64(), store, &mut g);
    for (o, v) in grad[..nn].iter_mut().zip(g) {
        *o = F::from_f64(v);
    }
}
