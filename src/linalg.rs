//! Matrix products on ndarray views through faer (pure Rust, sharing rayon's pool).

use ndarray::{Array2, ArrayView2};

use crate::Float;

/// faer's parallelism switch: rayon's current pool, or sequential.
pub(crate) fn par(parallel: bool) -> faer::Par {
    #[cfg(feature = "rayon")]
    if parallel && rayon::current_num_threads() > 1 {
        return faer::Par::rayon(rayon::current_num_threads());
    }
    let _ = parallel;
    faer::Par::Seq
}

/// A faer view of `a` when it is row- or column-major contiguous.
fn as_faer<'a, F: Float>(a: ArrayView2<'a, F>) -> Option<faer::MatRef<'a, F>> {
    let (r, c) = a.dim();
    if let Some(s) = a.to_slice() {
        return Some(faer::MatRef::from_row_major_slice(s, r, c));
    }
    let t = a.reversed_axes();
    t.to_slice()
        .map(|s| faer::MatRef::from_row_major_slice(s, c, r).transpose())
}

/// `c (+)= a · b` through faer; `a` and `b` may be transposed views (copied first only when
/// neither row- nor column-major). Shapes are the caller's invariant.
pub(crate) fn matmul_into<F: Float>(
    c: &mut Array2<F>,
    accumulate: bool,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    parallel: bool,
) {
    debug_assert_eq!(
        (c.nrows(), c.ncols(), a.ncols()),
        (a.nrows(), b.ncols(), b.nrows())
    );
    let (ao, bo);
    let fa = match as_faer(a) {
        Some(f) => f,
        None => {
            ao = a.as_standard_layout().into_owned();
            faer::MatRef::from_row_major_slice(
                ao.as_slice().expect("standard"),
                a.nrows(),
                a.ncols(),
            )
        }
    };
    let fb = match as_faer(b) {
        Some(f) => f,
        None => {
            bo = b.as_standard_layout().into_owned();
            faer::MatRef::from_row_major_slice(
                bo.as_slice().expect("standard"),
                b.nrows(),
                b.ncols(),
            )
        }
    };
    let (r, k) = c.dim();
    // Below ~8 M multiply-adds (≈ 0.2 ms on one core) a parallel product costs more in rayon
    // wake-ups than it saves.
    let parallel = parallel && r * k * a.ncols() >= 1 << 23;
    let dst =
        faer::MatMut::from_row_major_slice_mut(c.as_slice_mut().expect("owned standard"), r, k);
    F::gemm(dst, accumulate, fa, fb, parallel);
}

/// `a · b` through faer, in parallel.
pub(crate) fn matmul<F: Float>(a: ArrayView2<F>, b: ArrayView2<F>) -> Array2<F> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    matmul_into(&mut c, false, a, b, true);
    c
}
