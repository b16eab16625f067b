//! 8×8 transposes of `f32` blocks with AVX shuffles: the moves between the row-major matrices
//! of the public API and the structure-of-arrays layout of [`super::lanes`].
//!
//! Done one element at a time, each move is a scalar load and a scalar store per entry: for
//! n = 4 that was 512 memory operations a group of 16 matrices each way, ≈ 5 ns a matrix of
//! the projection's ≈ 70. Eight rows of eight loaded as vectors, transposed in 24 shuffles and
//! stored as vectors take 16 memory operations and 24 shuffles per 64 entries. Safe code: the
//! intrinsics come through `pulp`'s `V3` token, which proves AVX2 is present, and the vectors
//! through `bytemuck` casts. Pure data movement, so the bits are those of the scalar moves.

/// The means to transpose 8×8 `f32` blocks, when the CPU has them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shuffler {
    #[cfg(target_arch = "x86_64")]
    simd: Option<pulp::x86::V3>,
}

impl Shuffler {
    /// Detects AVX2 (cached by the standard library after the first call).
    pub(crate) fn detect() -> Self {
        Shuffler {
            #[cfg(target_arch = "x86_64")]
            simd: pulp::x86::V3::try_new(),
        }
    }

    /// A shuffler that never transposes (the scalar moves then run): for tests.
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Shuffler {
            #[cfg(target_arch = "x86_64")]
            simd: None,
        }
    }

    /// Writes the transpose of the 8×8 block whose row `r` is `src[r * ss..][..8]` to
    /// `dst[c * ds..][..8]` (`dst[c * ds + r] = src[r * ss + c]`). Returns `false`, having
    /// done nothing, when the CPU lacks AVX2.
    #[inline(always)]
    pub(crate) fn transpose8(self, src: &[f32], ss: usize, dst: &mut [f32], ds: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.simd {
            transpose8_avx(simd, src, ss, dst, ds);
            return true;
        }
        let _ = (src, ss, dst, ds);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8_avx(simd: pulp::x86::V3, src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
    use core::arch::x86_64::__m256;
    use pulp::bytemuck::cast;
    let avx = simd.avx;
    #[inline(always)]
    fn load(s: &[f32], at: usize) -> __m256 {
        let a: [f32; 8] = s[at..at + 8].try_into().unwrap();
        cast(a)
    }
    #[inline(always)]
    fn store(d: &mut [f32], at: usize, v: __m256) {
        let a: [f32; 8] = cast(v);
        d[at..at + 8].copy_from_slice(&a);
    }
    let (r0, r1, r2, r3) = (
        load(src, 0),
        load(src, ss),
        load(src, 2 * ss),
        load(src, 3 * ss),
    );
    let (r4, r5, r6, r7) = (
        load(src, 4 * ss),
        load(src, 5 * ss),
        load(src, 6 * ss),
        load(src, 7 * ss),
    );
    // Pairs of rows interleaved: t0 = r0_0 r1_0 r0_1 r1_1 | r0_4 r1_4 r0_5 r1_5, …
    let t0 = avx._mm256_unpacklo_ps(r0, r1);
    let t1 = avx._mm256_unpackhi_ps(r0, r1);
    let t2 = avx._mm256_unpacklo_ps(r2, r3);
    let t3 = avx._mm256_unpackhi_ps(r2, r3);
    let t4 = avx._mm256_unpacklo_ps(r4, r5);
    let t5 = avx._mm256_unpackhi_ps(r4, r5);
    let t6 = avx._mm256_unpacklo_ps(r6, r7);
    let t7 = avx._mm256_unpackhi_ps(r6, r7);
    // Quadruples: u0 = column 0 of rows 0–3 | column 4 of rows 0–3, …
    let u0 = avx._mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = avx._mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = avx._mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = avx._mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = avx._mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = avx._mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = avx._mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = avx._mm256_shuffle_ps::<0xEE>(t5, t7);
    // Halves joined: column c of rows 0–7.
    store(dst, 0, avx._mm256_permute2f128_ps::<0x20>(u0, u4));
    store(dst, ds, avx._mm256_permute2f128_ps::<0x20>(u1, u5));
    store(dst, 2 * ds, avx._mm256_permute2f128_ps::<0x20>(u2, u6));
    store(dst, 3 * ds, avx._mm256_permute2f128_ps::<0x20>(u3, u7));
    store(dst, 4 * ds, avx._mm256_permute2f128_ps::<0x31>(u0, u4));
    store(dst, 5 * ds, avx._mm256_permute2f128_ps::<0x31>(u1, u5));
    store(dst, 6 * ds, avx._mm256_permute2f128_ps::<0x31>(u2, u6));
    store(dst, 7 * ds, avx._mm256_permute2f128_ps::<0x31>(u3, u7));
}

#[cfg(test)]
mod tests {
    use super::Shuffler;

    #[test]
    fn transpose8_transposes_with_strides() {
        let (ss, ds) = (11, 9);
        let src: Vec<f32> = (0..8 * ss).map(|k| k as f32).collect();
        let mut dst = vec![-1.0f32; 8 * ds];
        if !Shuffler::detect().transpose8(&src, ss, &mut dst, ds) {
            return; // no AVX2: nothing to test
        }
        for r in 0..8 {
            for c in 0..8 {
                assert_eq!(dst[c * ds + r], src[r * ss + c], "r {r} c {c}");
            }
            // Past the block's eight columns nothing is written.
            assert_eq!(dst[r * ds + 8], -1.0);
        }
        assert!(!Shuffler::none().transpose8(&src, ss, &mut dst, ds));
    }
}
