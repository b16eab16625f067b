//! Reductions over the `C` (or `n·C`) values of one token, vectorisable and deterministic.
//!
//! A plain `for x in v { s += x }` is a chain of dependent additions that LLVM may not
//! reorder, so it runs one element per add latency. These helpers keep [`LANES`] independent
//! partial sums (element `k` goes to lane `k % LANES`) and combine them in a fixed tree, so the
//! loops vectorise and the result is the same on every machine and instruction set.

use crate::Float;

/// Partial sums per reduction: 32 `f32` are four AVX registers, enough to hide the add latency.
pub(crate) const LANES: usize = 32;

/// Sums the lanes pairwise in a fixed order.
#[inline(always)]
fn combine<F: Float>(mut acc: [F; LANES]) -> F {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `Σ_k f(a[k], b[k])` over two equally long slices.
#[inline(always)]
fn fold2<F: Float>(a: &[F], b: &[F], f: impl Fn(F, F) -> F) -> F {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [F::zero(); LANES];
    let (ac, ar) = a.split_at(n - n % LANES);
    let (bc, br) = b.split_at(n - n % LANES);
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    for (l, (&x, &y)) in ar.iter().zip(br).enumerate() {
        acc[l] += f(x, y);
    }
    combine(acc)
}

/// `Σ_k a[k]·b[k]`.
#[inline(always)]
pub(crate) fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    fold2(a, b, |x, y| x * y)
}

/// `Σ_k a[k]²`.
#[inline(always)]
pub(crate) fn sum_sq<F: Float>(a: &[F]) -> F {
    fold2(a, a, |x, _| x * x)
}

/// `true` when every value is finite (`v − v` is NaN exactly for NaN and ±∞; the order of the
/// additions does not matter for that).
#[inline(always)]
pub(crate) fn all_finite<F: Float>(v: &[F]) -> bool {
    #[allow(clippy::eq_op)] // x − x is 0 for finite x and NaN otherwise: the point
    let s = fold2(v, v, |x, _| x - x);
    s == F::zero()
}

/// Runs `f` on `view` as a contiguous slice, through a temporary when it is not contiguous.
pub(crate) fn with_slice_mut<F: Float, D: ndarray::Dimension, E>(
    mut view: ndarray::ArrayViewMut<F, D>,
    f: impl FnOnce(&mut [F]) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(s) = view.as_slice_mut() {
        return f(s);
    }
    let mut tmp = view.as_standard_layout().into_owned();
    f(tmp.as_slice_mut().expect("standard layout"))?;
    view.assign(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_plain_sums_and_detects_non_finite() {
        for n in [0usize, 1, 5, 31, 32, 33, 100, 1000] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let d: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - d).abs() < 1e-12);
            assert!((sum_sq(&a) - a.iter().map(|x| x * x).sum::<f64>()).abs() < 1e-12);
            assert!(all_finite(&a));
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut c = a.clone();
                c.push(bad);
                assert!(!all_finite(&c));
            }
        }
    }
}
