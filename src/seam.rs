//! The seam between two chained blocks (SPEC §8): the write-in of block `l` fused with the
//! read-out of block `l + 1`.
//!
//! Per chunk of [`SUB_TOKENS`] tokens, one pass writes `x_{l+1} = H_res·x_l + H_post·y_l`, and
//! while that chunk of `x_{l+1}` is still in cache, projects it (`x_{l+1}·φ_{l+1}`, RMS), computes
//! block `l+1`'s mappings and reads out `u_{l+1}`: with block `l`'s `H_pre` under the shifted
//! schedule (DeepSeek-V4.1's single pass), with block `l+1`'s own under the current one. Each
//! token's `n·C` values of `x_{l+1}` are written once and read back from cache instead of DRAM.
//!
//! Every token goes through the same per-token kernels, in the same chunks, as a write-in
//! followed by a read-out: the results are bitwise equal to the two separate passes.

use crate::Float;
use crate::error::Result;
use crate::mappings::{
    MappingKernel, SUB_TOKENS, Scratch, project_maps, read_out_tokens, sub_maps,
};
use crate::mixing::{all_finite, blame, write_in_token};
use crate::par;

/// Block `l`'s side of a seam: its input and what its write-in needs, all token-major slices.
pub(crate) struct WriteIn<'a, F> {
    /// `x_l`: `[T, n, C]`.
    pub x: &'a [F],
    /// `H_post` of block `l`: `[T, n]`.
    pub post: &'a [F],
    /// `H_res` of block `l`: `[T, n, n]`.
    pub res: &'a [F],
    /// `y_l`: `[T, C]`.
    pub y: &'a [F],
    /// `H_pre` of block `l`, the read-out weights of block `l + 1` under the shifted schedule;
    /// `None` under the current one.
    pub ro: Option<&'a [F]>,
}

/// Block `l+1`'s side of a seam: where its input, mappings and sublayer input go.
pub(crate) struct ReadOut<'a, F> {
    /// `x_{l+1}`: `[T, n, C]`.
    pub x: &'a mut [F],
    /// `H_pre`, `H_post` (`[T, n]`) and `H_res` (`[T, n, n]`) of block `l + 1`.
    pub pre: &'a mut [F],
    pub post: &'a mut [F],
    pub res: &'a mut [F],
    /// `u_{l+1}`: `[T, C]`.
    pub u: &'a mut [F],
}

/// Writes `x_{l+1}`, block `l+1`'s mappings and `u_{l+1}` (see the module docs); `next` is the
/// mapping kernel of block `l+1`, with the same `n` and `C` as block `l`.
pub(crate) fn seam<F: Float>(
    next: &impl MappingKernel<F>,
    w: WriteIn<'_, F>,
    r: ReadOut<'_, F>,
) -> Result<()> {
    let (n, c) = next.dims();
    let nc = n * c;
    let tt = par::TASK_TOKENS;
    let ReadOut {
        x: xo,
        pre,
        post,
        res,
        u,
    } = r;
    let tasks: Vec<_> = xo
        .chunks_mut(tt * nc)
        .zip(pre.chunks_mut(tt * n))
        .zip(post.chunks_mut(tt * n))
        .zip(res.chunks_mut(tt * n * n))
        .zip(u.chunks_mut(tt * c))
        .collect();
    par::try_for_each(tasks, |i, ((((xo, pre), post), res), u)| {
        let t0 = i * tt;
        let mut s = Scratch::new(next)?;
        par::vectorized(
            #[inline(always)]
            || {
                for (k, xs) in xo.chunks_mut(SUB_TOKENS * nc).enumerate() {
                    let a = k * SUB_TOKENS;
                    let tc = xs.len() / nc;
                    // Write-in of block l for these tokens.
                    for (tl, o) in xs.chunks_mut(nc).enumerate() {
                        let t = t0 + a + tl;
                        let xt = &w.x[t * nc..(t + 1) * nc];
                        let (pt, rt) = (
                            &w.post[t * n..(t + 1) * n],
                            &w.res[t * n * n..(t + 1) * n * n],
                        );
                        let yt = &w.y[t * c..(t + 1) * c];
                        write_in_token(c, xt, pt, rt, yt, o);
                        if !all_finite(o) {
                            let inputs = [
                                ("sublayer output", yt),
                                ("x", xt),
                                ("post", pt),
                                ("res", rt),
                            ];
                            return Err(blame(t, &inputs, "out"));
                        }
                    }
                    // Read-out of block l + 1 from the chunk just written.
                    let xs = &*xs;
                    let (pre, post, res) = sub_maps(n, a, tc, pre, post, res);
                    project_maps(next, t0 + a, xs, pre, post, res, &mut s)?;
                    let wts = w.ro.map_or(&*pre, |r| &r[(t0 + a) * n..(t0 + a + tc) * n]);
                    read_out_tokens(n, c, xs, wts, &mut u[a * c..(a + tc) * c]);
                }
                Ok(())
            },
        )
    })
}
