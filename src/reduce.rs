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

/// The element-wise term of a reduction, in scalar and (on x86-64) AVX2 form: both round the
/// same way (one IEEE operation per element), so the two paths give the same bits.
#[derive(Clone, Copy)]
enum Term {
    /// `a·b`.
    Product,
    /// `a²`.
    Square,
    /// `a − a`: 0 for finite `a`, NaN otherwise.
    SelfDiff,
}

impl Term {
    #[inline(always)]
    fn scalar<F: Float>(self, x: F, y: F) -> F {
        match self {
            Term::Product => x * y,
            Term::Square => x * x,
            #[allow(clippy::eq_op)] // x − x is 0 for finite x and NaN otherwise: the point
            Term::SelfDiff => x - x,
        }
    }
}

/// `Σ_k t(a[k], b[k])` over two equally long slices (`b` is not read for one-slice terms).
#[inline(always)]
fn fold2<F: Float>(a: &[F], b: &[F], t: Term) -> F {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if let (Some(simd), Some(a32), Some(b32)) =
        (pulp::x86::V3::try_new(), F::as_f32s(a), F::as_f32s(b))
    {
        // Its own AVX2 context, so that callers outside `par::vectorized` get the vector code
        // too (inside one, LLVM inlines it).
        let r = pulp::Simd::vectorize(
            simd,
            Avx {
                simd,
                a: a32,
                b: b32,
                t,
            },
        );
        return F::from_f64(f64::from(r));
    }
    fold2_lanes(a, b, t)
}

/// [`fold2`] in portable code: partial sum `l` takes the elements `k ≡ l (mod LANES)`.
#[inline(always)]
fn fold2_lanes<F: Float>(a: &[F], b: &[F], t: Term) -> F {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [F::zero(); LANES];
    let (ac, ar) = a.split_at(n - n % LANES);
    let (bc, br) = b.split_at(n - n % LANES);
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += t.scalar(x[l], y[l]);
        }
    }
    for (l, (&x, &y)) in ar.iter().zip(br).enumerate() {
        acc[l] += t.scalar(x, y);
    }
    combine(acc)
}

/// [`fold2_avx`] as a `pulp` operation, run in an AVX2 context of its own.
#[cfg(target_arch = "x86_64")]
struct Avx<'a> {
    simd: pulp::x86::V3,
    a: &'a [f32],
    b: &'a [f32],
    t: Term,
}

#[cfg(target_arch = "x86_64")]
impl pulp::WithSimd for Avx<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> f32 {
        fold2_avx(self.simd, self.a, self.b, self.t)
    }
}

/// [`fold2`] for `f32` with AVX2: the same [`LANES`] partial sums, eight to a register (lane `l`
/// of register `g` is partial sum `8g + l`), the same additions in the same order. LLVM compiles
/// the scalar loop's 32-element array into pairs of lanes shuffled between registers (≈ 0.8 µs
/// for 4096 values, where four independent vector chains take ≈ 0.1 µs), so the registers are
/// spelled out.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fold2_avx(simd: pulp::x86::V3, a: &[f32], b: &[f32], t: Term) -> f32 {
    use pulp::bytemuck::cast;
    use pulp::f32x8;
    const R: usize = LANES / 8;
    let n = a.len();
    #[inline(always)]
    fn load(s: &[f32]) -> f32x8 {
        let v: [f32; 8] = s[..8].try_into().unwrap();
        cast(v)
    }
    let mut acc = [simd.splat_f32x8(0.0); R];
    let (ac, ar) = a.split_at(n - n % LANES);
    let (bc, br) = b.split_at(n - n % LANES);
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for g in 0..R {
            let xv = load(&x[8 * g..]);
            let v = match t {
                Term::Product => simd.mul_f32x8(xv, load(&y[8 * g..])),
                Term::Square => simd.mul_f32x8(xv, xv),
                Term::SelfDiff => simd.sub_f32x8(xv, xv),
            };
            acc[g] = simd.add_f32x8(acc[g], v);
        }
    }
    let mut acc: [f32; LANES] = cast(acc);
    for (l, (&x, &y)) in ar.iter().zip(br).enumerate() {
        acc[l] += t.scalar(x, y);
    }
    combine(acc)
}

/// `Σ_k a[k]·b[k]`.
#[inline(always)]
pub(crate) fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    fold2(a, b, Term::Product)
}

/// `Σ_k a[k]²`.
#[inline(always)]
pub(crate) fn sum_sq<F: Float>(a: &[F]) -> F {
    fold2(a, a, Term::Square)
}

/// `true` when every value is finite (`v − v` is NaN exactly for NaN and ±∞; the order of the
/// additions does not matter for that).
#[inline(always)]
pub(crate) fn all_finite<F: Float>(v: &[F]) -> bool {
    fold2(v, v, Term::SelfDiff) == F::zero()
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

    /// The AVX2 path must give the portable path's bits, for every term and length (full
    /// groups of [`LANES`], a tail, both), with values over many binades and non-finite ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx_path_equals_portable_lanes_bitwise() {
        let Some(simd) = pulp::x86::V3::try_new() else {
            return;
        };
        for n in [0usize, 1, 7, 8, 31, 32, 33, 63, 64, 100, 1000, 4096, 4099] {
            let a: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i as i32 % 13 - 6))
                .collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            let mut bad = a.clone();
            if n > 0 {
                bad[n / 2] = f32::INFINITY;
            }
            for t in [Term::Product, Term::Square, Term::SelfDiff] {
                for x in [&a, &bad] {
                    let want = fold2_lanes(x, &b, t);
                    let got = fold2_avx(simd, x, &b, t);
                    assert_eq!(got.to_bits(), want.to_bits(), "n = {n}");
                    assert_eq!(fold2(x, &b, t).to_bits(), want.to_bits(), "n = {n}");
                }
            }
        }
    }

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
