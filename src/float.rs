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
