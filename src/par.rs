//! One code path for serial and parallel execution over fixed chunks.
//!
//! Work is cut into chunks whose boundaries depend only on the problem size, never on the number
//! of threads, and no reduction crosses a chunk: results are bitwise identical with any number of
//! rayon threads, and with the `rayon` feature off.

use crate::Result;

/// Tokens per parallel task: starting a rayon job costs 10–65 µs on the target machines, and a
/// token of an `n = 4, C = 1024` block costs ~0.1–1 µs of kernel time.
pub(crate) const TASK_TOKENS: usize = 256;

/// Runs `f(index, task)` for every task, in parallel when the `rayon` feature is on, and returns
/// the error of the lowest-indexed failing task (the same error whatever the thread count).
pub(crate) fn try_for_each<T: Send>(
    tasks: Vec<T>,
    f: impl Fn(usize, T) -> Result<()> + Sync + Send,
) -> Result<()> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        // One thread: run here. Handing the tasks to a one-thread pool costs a wake-up of its
        // worker per call (≈ 70 µs measured: a 4096-matrix Sinkhorn batch took 64 ns a matrix
        // instead of 46).
        if tasks.len() > 1 && rayon::current_num_threads() > 1 {
            let first = std::sync::Mutex::new(None::<(usize, crate::Error)>);
            tasks.into_par_iter().enumerate().for_each(|(k, t)| {
                if let Err(e) = f(k, t) {
                    let mut g = first.lock().unwrap_or_else(|p| p.into_inner());
                    if g.as_ref().is_none_or(|(j, _)| k < *j) {
                        *g = Some((k, e));
                    }
                }
            });
            return match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some((_, e)) => Err(e),
                None => Ok(()),
            };
        }
    }
    tasks.into_iter().enumerate().try_for_each(|(k, t)| f(k, t))
}

/// Runs `f` compiled for the best instruction set this CPU has (AVX2+FMA, AVX-512, NEON…),
/// chosen at run time by `pulp`, the SIMD layer faer uses. The kernels called inside are
/// `#[inline(always)]`, so they are compiled into the dispatched copy. LLVM does not contract
/// `a * b + c`, and an explicit `mul_add` is fused (one rounding) in every copy: the FMA
/// instruction where the copy has it, the C library's exact `fma` otherwise. So every copy gives
/// the same bits.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}
