//! Sinkhorn-Knopp in burn tensor ops (SPEC §2): the linear-domain iteration where it is exact,
//! the log domain otherwise.
//!
//! Like the core, the projection runs the linear-domain iteration (a sum and a division per
//! step: 2–3 tensor ops) and falls back to the log domain where the linear domain would lose
//! accuracy. The test is one reduction of the batch: when every matrix's logits span at most
//! [`LINEAR_SPREAD`] (`max − min`), every entry of every iterate stays a normal float far from
//! under- and overflow, and the linear domain is as accurate as the log domain; otherwise (or
//! for a non-finite logit) the whole batch takes the log domain, which is finite for every
//! finite logit (±1e4 tested) and costs 7 tensor ops a step. The check reads one scalar back
//! from the device (a synchronisation per call on a GPU). With `eps > 0` (DeepSeek's kernel)
//! every denominator is at least `eps` and the linear domain is taken for any finite logits.
//! burn's autodiff differentiates the unrolled iteration exactly.
//!
//! The iteration runs on token-minor `[n, n, B]` tensors, so that every reduction and broadcast
//! is along contiguous rows of `B` values. Measured on Flex, 2 cores, a `[2048, 4, 4]` batch,
//! 20 iterations, forward + backward: 3.2 ms token-minor in the linear domain against
//! 8.5–13 ms token-major; an mHC training step of the `lm` example (C = 128, 24 blocks, 2048
//! tokens) went from 2.25 s (token-major, log domain) to 2.0 s.

use burn::prelude::*;

/// `log Σ exp(x)` along `dim`, kept as a size-1 dimension. The shift by the maximum is detached:
/// the result does not depend on it, so its gradient is exact.
fn logsumexp<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let m = x.clone().detach().max_dim(dim);
    (x - m.clone()).exp().sum_dim(dim).log() + m
}

/// `log(exp(a) + c)` elementwise for a constant `c > 0`, stably.
fn log_add_const<const D: usize>(a: Tensor<D>, log_c: f64) -> Tensor<D> {
    let m = a.clone().detach().clamp_min(log_c);
    m.clone() + ((a - m.clone()).exp() + (m.neg() + log_c).exp()).log()
}

/// The Sinkhorn-Knopp projection of a batch of logits `[B, n, n]` (SPEC §2: column softmax, then
/// rows, then `iters − 1` column and row steps, rows last; with `eps > 0`, DeepSeek's kernel:
/// `M + eps` after the softmax and `+ eps` in every denominator).
///
/// # Shapes
///
/// - `logits`: `[B, n, n]`; returns `[B, n, n]`
///
/// # Panics
///
/// If `iters == 0` (the modules validate it once, at `init`).
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let device = Device::flex();
/// let logits = Tensor::<3>::from_floats([[[1.0, 0.0], [0.0, 3.0]]], &device);
/// let m = mhc_burn::sinkhorn(logits, 20, 0.0);
/// let rows: Vec<f32> = m.sum_dim(2).into_data().try_to_vec().unwrap();
/// assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-6));
/// ```
pub fn sinkhorn(logits: Tensor<3>, iters: usize, eps: f64) -> Tensor<3> {
    assert!(iters > 0, "Sinkhorn-Knopp needs at least one iteration");
    // Token-minor `[n, n, B]`: every reduction and broadcast below runs along contiguous rows
    // of `B` values (2–3× faster on Flex than the token-major layout's `n`-long rows).
    let t = logits.permute([1, 2, 0]);
    let d = t.clone().detach();
    let spread: f64 = (d.clone().max_dim(0).max_dim(1) - d.min_dim(0).min_dim(1))
        .max()
        .into_scalar();
    let m = if spread.is_finite() && (eps > 0.0 || spread <= LINEAR_SPREAD) {
        linear(t, iters, eps)
    } else {
        log_domain(t, iters, eps)
    };
    m.permute([2, 0, 1])
}

/// The largest spread of a matrix's logits (`max − min`) for which [`sinkhorn`] takes the
/// linear domain with `eps = 0`. The column softmax leaves every entry in `[e^{−20}, 1]`, and the
/// iterates' entries stay within a few powers of `e^{20}` of that, far inside `f32`'s normal
/// range (`e^{±87}`): no entry under- or overflows, and the linear domain's relative error is the
/// log domain's (a few ulps a step; the parity tests compare both against the core).
pub const LINEAR_SPREAD: f64 = 20.0;

/// The linear-domain iteration on token-minor logits `[n, n, B]` (dim 0: the row index `i`, so
/// a column sum runs over it): column softmax, `+ eps`, then row and column normalisations with
/// `+ eps` in each denominator.
fn linear(logits: Tensor<3>, iters: usize, eps: f64) -> Tensor<3> {
    let norm = |m: Tensor<3>, dim: usize| {
        let s = m.clone().sum_dim(dim);
        let s = if eps > 0.0 { s + eps } else { s };
        m / s
    };
    let shifted = logits.clone() - logits.detach().max_dim(0);
    let mut m = norm(shifted.exp(), 0);
    if eps > 0.0 {
        m = m + eps;
    }
    m = norm(m, 1);
    for _ in 1..iters {
        m = norm(m, 0);
        m = norm(m, 1);
    }
    m
}

/// The log-domain iteration, the same steps as [`linear`] on `log M` (same layout).
fn log_domain(logits: Tensor<3>, iters: usize, eps: f64) -> Tensor<3> {
    let log_eps = (eps > 0.0).then(|| eps.ln());
    let norm = |lm: Tensor<3>, dim: usize| {
        let s = logsumexp(lm.clone(), dim);
        let s = match log_eps {
            Some(le) => log_add_const(s, le),
            None => s,
        };
        lm - s
    };
    let mut lm = logits.clone() - logsumexp(logits, 0);
    if let Some(le) = log_eps {
        lm = log_add_const(lm, le);
    }
    lm = norm(lm, 1);
    for _ in 1..iters {
        lm = norm(lm, 0);
        lm = norm(lm, 1);
    }
    lm.exp()
}
