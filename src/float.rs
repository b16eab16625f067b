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
                tanh_impl(self)
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

#[inline(always)]
fn tanh_impl<T: TanhImpl>(x: T) -> T {
    x.tanh_impl()
}

trait TanhImpl {
    fn tanh_impl(self) -> Self;
}

impl TanhImpl for f64 {
    #[inline(always)]
    fn tanh_impl(self) -> f64 {
        self.tanh()
    }
}

impl TanhImpl for f32 {
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
}
