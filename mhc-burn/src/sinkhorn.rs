//! Sinkhorn-Knopp in burn tensor ops (SPEC §2), in the log domain.
//!
//! The core runs the linear-domain iteration and falls back to the log domain where it would
//! lose accuracy; here every matrix takes the log domain, which is finite for every finite
//! logit (the linear domain gives NaN or infinity once `exp` under- or overflows, e.g. for logits
//! spread over ±1e3) and costs one `exp` and one `log` per entry and step, cheap next to the
//! dispatch of many small ops. burn's autodiff differentiates the unrolled iteration exactly.

use burn::prelude::*;

/// `log Σ exp(x)` along `dim`, kept as a size-1 dimension. The shift by the maximum is detached:
/// the result does not depend on it, so its gradient is exact.
pub(crate) fn logsumexp<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
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
    let log_eps = (eps > 0.0).then(|| eps.ln());
    let norm = |lm: Tensor<3>, dim: usize| {
        let s = logsumexp(lm.clone(), dim);
        let s = match log_eps {
            Some(le) => log_add_const(s, le),
            None => s,
        };
        lm - s
    };
    let mut lm = logits.clone() - logsumexp(logits, 1);
    if let Some(le) = log_eps {
        lm = log_add_const(lm, le);
    }
    lm = norm(lm, 2);
    for _ in 1..iters {
        lm = norm(lm, 1);
        lm = norm(lm, 2);
    }
    lm.exp()
}
