//! The sealed floating-point trait: the crate is generic over `f32` and `f64` and nothing else.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// `f32` or `f64`: the element types `mhc` computes in.
///
/// The trait is sealed: it cannot be implemented outside this crate, so new methods can be added
/// without breaking anyone.
///
/// ```
/// fn zero<F: mhc::Float>() -> F { F::from_f64(0.0) }
/// assert_eq!(zero::<f32>(), 0.0);
/// ```
pub trait Float:
    sealed::Sealed
    + num_traits::Float
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + Send
    + Sync
    + Debug
    + Display
    + Default
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + 'static
{
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// Conversion from `f64` (rounding to nearest for `f32`).
    fn from_f64(x: f64) -> Self;
    /// Conversion to `f64` (exact).
    fn as_f64(self) -> f64;
    /// Conversion from `usize` (rounding to nearest).
    fn from_usize(x: usize) -> Self {
        Self::from_f64(x as f64)
    }
    /// `tanh`, vectorisable: for `f32` a rational minimax approximation accurate to a few ulp
    /// (the one Eigen uses), for `f64` the standard library's. Not part of the stable API.
    #[doc(hidden)]
    fn tanh_fast(self) -> Self;
    /// `exp`, vectorisable: for `f32` a range reduction and a degree-7 polynomial (Cephes'
    /// `expf`) accurate to 2 ulp, results below `MIN_POSITIVE` flushed to zero; for `f64` the
    /// standard library's. Branch-free and made of `+ − ×` and fused multiply-adds only, so
    /// every SIMD copy gives the same bits. Not part of the stable API.
    #[doc(hidden)]
    fn exp_fast(self) -> Self;
    /// `s` as `f32`s when `Self` is `f32`, else `None` (for kernels with an `f32`-only SIMD
    /// path). Not part of the stable API.
    #[doc(hidden)]
    fn as_f32s(s: &[Self]) -> Option<&[f32]>;
    /// [`as_f32s`](Self::as_f32s) for a mutable slice. Not part of the stable API.
    #[doc(hidden)]
    fn as_f32s_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// `dst (+)= lhs · rhs` through faer, on rayon's pool when `parallel`. Not part of the
    /// stable API.
    #[doc(hidden)]
    fn gemm(
        dst: faer::MatMut<'_, Self>,
        accumulate: bool,
        lhs: faer::MatRef<'_, Self>,
        rhs: faer::MatRef<'_, Self>,
        parallel: bool,
    );
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const NAME: &'static str = stringify!($t);
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn as_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn tanh_fast(self) -> Self {
                self.tanh_impl()
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                self.exp_impl()
            }
            #[inline(always)]
            fn as_f32s(s: &[Self]) -> Option<&[f32]> {
                Self::f32s(s)
            }
            #[inline(always)]
            fn as_f32s_mut(s: &mut [Self]) -> Option<&mut [f32]> {
                Self::f32s_mut(s)
            }
            fn gemm(
                dst: faer::MatMut<'_, Self>,
                accumulate: bool,
                lhs: faer::MatRef<'_, Self>,
                rhs: faer::MatRef<'_, Self>,
                parallel: bool,
            ) {
                let accum = if accumulate {
                    faer::Accum::Add
                } else {
                    faer::Accum::Replace
                };
                faer::linalg::matmul::matmul(
                    dst,
                    accum,
                    lhs,
                    rhs,
                    1.0,
                    crate::linalg::par(parallel),
                );
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// The per-type approximations behind [`Float::tanh_fast`] and [`Float::exp_fast`].
trait FastImpl: Sized {
    fn tanh_impl(self) -> Self;
    fn exp_impl(self) -> Self;
    fn f32s(s: &[Self]) -> Option<&[f32]>;
    fn f32s_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl FastImpl for f64 {
    #[inline(always)]
    fn tanh_impl(self) -> f64 {
        self.tanh()
    }
    #[inline(always)]
    fn exp_impl(self) -> f64 {
        self.exp()
    }
    #[inline(always)]
    fn f32s(_: &[f64]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn f32s_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

impl FastImpl for f32 {
    #[inline(always)]
    fn f32s(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn f32s_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }

    /// Rational approximation `x·p(x²)/q(x²)` on `[−7.905, 7.905]` (saturated outside), as in
    /// Eigen's `generic_fast_tanh_float`: max error a few ulp, branch-free so it vectorises.
    #[inline(always)]
    fn tanh_impl(self) -> f32 {
        const A: [f32; 7] = [
            4.893_524_6e-3,
            6.372_619_3e-4,
            1.485_722_4e-5,
            5.122_297e-8,
            -8.604_672e-11,
            2.000_188e-13,
            -2.760_768_5e-16,
        ];
        const B: [f32; 4] = [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
        let x = self.clamp(-7.905_311, 7.905_311);
        let x2 = x * x;
        let p = x
            * (A[0]
                + x2 * (A[1] + x2 * (A[2] + x2 * (A[3] + x2 * (A[4] + x2 * (A[5] + x2 * A[6]))))));
        let q = B[0] + x2 * (B[1] + x2 * (B[2] + x2 * B[3]));
        let t = p / q;
        if self.abs() < 4e-4 { self } else { t }
    }

    /// `exp(x) = 2^k · e^r` with `k = round(x / ln 2)` and `|r| ≤ ln 2 / 2` (Cody-Waite: `ln 2`
    /// split in two), `e^r` by Cephes' minimax polynomial, `2^k` built in the
    /// exponent bits. `k` comes out of the float's bits after adding `1.5 · 2^23`, so no
    /// conversion instruction is involved. Inputs are clamped to the range where `2^k` is a
    /// normal number: results for `x < ln(MIN_POSITIVE)` are `0`, for `x > 88` `e^88`.
    #[inline(always)]
    fn exp_impl(self) -> f32 {
        const LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE)
        const HI: f32 = 88.0; // 2^k stays finite (k ≤ 127)
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
        const P: [f32; 6] = [
            1.987_569_2e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ];
        let x = self.clamp(LO, HI);
        let t = x.mul_add(LOG2E, MAGIC);
        let k = t - MAGIC;
        let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, x));
        // `q(r) = P5 + P4 r + … + P0 r⁵` by Estrin's scheme (three independent pairs, then two
        // multiply-adds): 4 dependent operations instead of Horner's 5 multiply-adds, 6 products
        // and sums without FMA. The softmax evaluates 16 of these a matrix, and with Horner's
        // chain the scheduler filled with waiting operations long before the FMA pipes did.
        let r2 = r * r;
        let r4 = r2 * r2;
        let lo = r.mul_add(P[4], P[5]);
        let mid = r.mul_add(P[2], P[3]);
        let hi = r.mul_add(P[0], P[1]);
        let q = hi.mul_add(r4, mid.mul_add(r2, lo));
        let p = r2.mul_add(q, r) + 1.0;
        // t's low mantissa bits hold k (|k| ≤ 127 ≪ 2^22): k + 127 is the biased exponent.
        let ki = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        let scale = f32::from_bits(((ki + 127) << 23) as u32);
        let y = p * scale;
        if self < LO { 0.0 } else { y }
    }
}

#[cfg(test)]
mod tests {
    use super::Float;

    /// `exp_fast` for `f32` against `f64::exp` over the whole useful range: within 2 ulp where
    /// the result is normal, zero below, NaN kept.
    #[test]
    fn exp_fast_f32_is_accurate() {
        let mut worst = 0.0f64;
        let steps = 2_000_000;
        for k in 0..=steps {
            let x = -90.0 + 178.0 * k as f32 / steps as f32;
            let got = x.exp_fast() as f64;
            let want = (x as f64).exp();
            if x < -87.336_55 {
                assert_eq!(got, 0.0, "x = {x}");
            } else if x <= 88.0 {
                let ulp = f32::EPSILON as f64 * want;
                worst = worst.max((got - want).abs() / ulp);
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert!(f32::NAN.exp_fast().is_nan());
        assert_eq!(0.0f32.exp_fast(), 1.0);
        assert!((100.0f32).exp_fast().is_finite());
    }
}
