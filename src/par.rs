//! One code path for serial and parallel execution over fixed chunks.
//!
//! Work is cut into chunks whose boundaries depend only on the problem size, never on the number
//! of threads, and no reduction crosses a chunk: results are bitwise identical with any number of
//! rayon threads, and with the `rayon` feature off.

/// Runs `f(chunk_index, a_chunk, b_chunk)` over matching chunks of `a` (`a_len` items a chunk)
/// and `b` (`b_len` items a chunk), in parallel when the `rayon` feature is on.
pub(crate) fn zip_chunks<A: Sync, B: Send>(
    a: &[A],
    a_len: usize,
    b: &mut [B],
    b_len: usize,
    f: impl Fn(usize, &[A], &mut [B]) + Sync + Send,
) {
    debug_assert!(a_len > 0 && b_len > 0);
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        if b.len() > b_len {
            a.par_chunks(a_len)
                .zip(b.par_chunks_mut(b_len))
                .enumerate()
                .for_each(|(k, (a, b))| f(k, a, b));
            return;
        }
    }
    a.chunks(a_len)
        .zip(b.chunks_mut(b_len))
        .enumerate()
        .for_each(|(k, (a, b))| f(k, a, b));
}
