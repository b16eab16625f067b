//! Chains of mHC blocks under the paper's schedule and DeepSeek-V4.1's single pass (SPEC §8).
//!
//! Block `l` computes its mappings from its own input `x_l`. The schedule decides which read-out
//! weights feed sublayer `l`:
//!
//! - [`Schedule::Current`] (paper, DeepSeek-V4): `u_l = Σ_j pre_l[j] · x_l[j]`;
//! - [`Schedule::Shifted`] (DeepSeek-V4.1): `u_l = Σ_j pre_{l−1}[j] · x_l[j]`, `pre_{−1} = e_0`.
//!
//! Between two blocks the stack runs the fused seam kernel
//! ([`MhcBlock::write_in_seam_into`]): block `l`'s write-in, and block `l+1`'s projection,
//! mappings and read-out, in one pass over the streams; backward, the backward seam
//! ([`MhcBlock::read_out_backward_seam_into`]): block `l+1`'s read-out half and block `l`'s
//! write-in half, in one pass.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::backward::{SeamError, SeamPrev, backward_seam, reuse2, reuse3};
use crate::error::check_same;
use crate::error::{Error, Result};
use crate::mixing::check_x;
use crate::{ChainLink, Float, Mappings, MhcBlock, MhcParams, Tape};

/// Which read-out weights feed a chained block's sublayer (SPEC §8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Schedule {
    /// The paper's and DeepSeek-V4's: block `l` reads out with its own `H_pre`.
    #[default]
    Current,
    /// DeepSeek-V4.1's single pass: block `l` reads out with block `l−1`'s `H_pre` (the first
    /// block with `e_0`, stream 0 alone); the chain's last `H_pre` reads out the final hidden
    /// state.
    Shifted,
}

/// `pre_{−1} = e_0` for `t` tokens and `n` streams: the read-out weights of the first block of a
/// shifted chain (one-hot on stream 0).
///
/// # Shapes
///
/// - returns `[t, n]`
///
/// # Examples
///
/// ```
/// let e0 = mhc::initial_pre::<f32>(2, 4);
/// assert_eq!(e0.row(1).to_vec(), vec![1.0, 0.0, 0.0, 0.0]);
/// ```
pub fn initial_pre<F: Float>(t: usize, n: usize) -> Array2<F> {
    Array2::from_shape_fn((t, n), |(_, j)| if j == 0 { F::one() } else { F::zero() })
}

/// What a chained block starts from: its input `x`, its mappings, and its sublayer's input `u`.
/// [`MhcBlock::write_in_seam_into`] writes one; [`MhcStack`] keeps two and alternates.
///
/// # Shapes
///
/// - `x`: `[T, n, C]`; `maps`: for `T` tokens and `n` streams; `u`: `[T, C]`
#[derive(Clone, Debug)]
pub struct Stage<F> {
    /// The block input `x_l`.
    pub x: Array3<F>,
    /// The block's mappings, computed from `x_l`.
    pub maps: Mappings<F>,
    /// The sublayer input `u_l` (read out as the schedule says).
    pub u: Array2<F>,
}

impl<F: Float> Default for Stage<F> {
    /// An empty stage, sized on first use.
    fn default() -> Self {
        Stage {
            x: Array3::zeros((0, 0, 0)),
            maps: Mappings::zeros(0, 0),
            u: Array2::zeros((0, 0)),
        }
    }
}

impl<F: Float> Stage<F> {
    /// Sizes every buffer for `t` tokens, reusing them when the shapes are unchanged.
    pub(crate) fn ensure(&mut self, t: usize, n: usize, c: usize) -> Result<()> {
        reuse3(&mut self.x, "stage x", t, n, c)?;
        self.maps.ensure(t, n)?;
        reuse2(&mut self.u, "u", t, c)
    }
}

/// What [`MhcStack::forward_train`] keeps for the backward pass: per block its input `x_l` and
/// sublayer output `y_l` (the paper's recompute strategy, §4.3.2), and its mappings (`n² + 2n`
/// values a token, so that under the shifted schedule block `l` need not recompute block
/// `l−1`'s `H_pre`) and sublayer input `u_l` (`C` values a token: the seam kernel writes block
/// `l+1`'s whole [`Stage`] in place). Reused by [`MhcStack::forward_train_into`]: after the first
/// step it allocates nothing proportional to the number of tokens.
///
/// # Examples
///
/// ```
/// let tape = mhc::StackTape::<f32>::default();
/// assert!(tape.is_empty());
/// ```
#[derive(Clone, Debug)]
pub struct StackTape<F> {
    stages: Vec<Stage<F>>,
    ys: Vec<Array2<F>>,
    /// `e_0` for the shifted schedule's first block (empty under `Current`).
    e0: Array2<F>,
}

impl<F: Float> Default for StackTape<F> {
    /// An empty tape, sized by the first [`MhcStack::forward_train_into`].
    fn default() -> Self {
        StackTape {
            stages: vec![],
            ys: vec![],
            e0: Array2::zeros((0, 0)),
        }
    }
}

impl<F: Float> StackTape<F> {
    /// The number of blocks recorded.
    pub fn len(&self) -> usize {
        self.ys.len()
    }

    /// Whether no block is recorded.
    pub fn is_empty(&self) -> bool {
        self.ys.is_empty()
    }

    /// The input `x_l` of every block: `[T, n, C]` each.
    pub fn inputs(&self) -> impl ExactSizeIterator<Item = ArrayView3<'_, F>> {
        self.stages[..self.ys.len()].iter().map(|s| s.x.view())
    }

    /// The sublayer output `y_l` of every block: `[T, C]` each.
    pub fn outputs(&self) -> &[Array2<F>] {
        &self.ys
    }
}

/// Reusable buffers of [`MhcStack::forward_into`] and [`MhcStack::backward_into`]: two stages for
/// the forward (alternating), and two block tapes (alternating) and the `H_pre` gradients of the
/// backward. Sized on
/// first use; after it the calls allocate nothing proportional to the number of tokens (the
/// sublayer closures' results and the parameter gradients aside).
///
/// # Examples
///
/// See [`MhcStack::backward_into`].
#[derive(Clone, Debug)]
pub struct StackWorkspace<F> {
    stages: [Stage<F>; 2],
    e0: Array2<F>,
    /// Block tapes of the backward pass: the seam fills one while the other is read.
    tapes: [Tape<F>; 2],
    dpre: Array2<F>,
    dprev: Array2<F>,
}

impl<F: Float> Default for StackWorkspace<F> {
    /// An empty workspace, sized on first use.
    fn default() -> Self {
        StackWorkspace {
            stages: [Stage::default(), Stage::default()],
            e0: Array2::zeros((0, 0)),
            tapes: [Tape::default(), Tape::default()],
            dpre: Array2::zeros((0, 0)),
            dprev: Array2::zeros((0, 0)),
        }
    }
}

/// `(&s[cur], &mut s[next])` for `cur != next`.
fn split<F>(s: &mut [Stage<F>], cur: usize, next: usize) -> (&Stage<F>, &mut Stage<F>) {
    if cur < next {
        let (a, b) = s.split_at_mut(next);
        (&a[cur], &mut b[0])
    } else {
        let (a, b) = s.split_at_mut(cur);
        (&b[0], &mut a[next])
    }
}

/// Fills `e0` with `e_0` for `t` tokens and `n` streams, reusing it when the shape is unchanged.
fn ensure_e0<F: Float>(e0: &mut Array2<F>, t: usize, n: usize) -> Result<()> {
    if e0.dim() != (t, n) {
        reuse2(e0, "e0", t, n)?;
        e0.assign(&initial_pre::<F>(1, n).row(0));
    }
    Ok(())
}

/// A chain of mHC blocks (SPEC §8) under a [`Schedule`]: attention and FFN sublayers alike,
/// each block with its own parameters.
///
/// [`forward`](Self::forward) returns `x_L` and `pre_{L−1}`; under the shifted schedule a
/// DeepSeek-V4.1 model reads its final hidden state out as `h = Σ_j pre_{L−1}[j] · x_L[j]`
/// ([`mixing::read_out`](crate::mixing::read_out)).
///
/// # Examples
///
/// ```
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// use mhc::{MhcBlock, MhcConfig, MhcStack, Schedule};
/// use ndarray::Array3;
/// let mut rng = StdRng::seed_from_u64(0);
/// let blocks = (0..4)
///     .map(|_| MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut rng))
///     .collect::<Result<Vec<_>, _>>()?;
/// let stack = MhcStack::new(blocks, Schedule::Shifted)?;
/// let x = Array3::from_elem((3, 4, 8), 0.1f32);
/// let (out, pre) = stack.forward(x.view(), |_l, u| u.mapv(f32::tanh))?;
/// let h = mhc::mixing::read_out(out.view(), pre.view())?; // V4.1's final read-out
/// assert_eq!(h.shape(), &[3, 8]);
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MhcStack<F: Float> {
    blocks: Vec<MhcBlock<F>>,
    schedule: Schedule,
}

impl<F: Float> MhcStack<F> {
    /// A chain of `blocks` (block 0 first) under `schedule`.
    ///
    /// # Errors
    ///
    /// [`Error::Empty`] (`"blocks"`) for no blocks; [`Error::BlockMismatch`] for a block whose
    /// `n` or `C` differs from block 0's.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::{MhcBlock, MhcConfig, MhcParams, MhcStack, Schedule};
    /// let a = MhcBlock::<f64>::from_params(MhcConfig::new(4, 8), MhcParams::zeros(4, 8))?;
    /// let b = MhcBlock::<f64>::from_params(MhcConfig::new(4, 16), MhcParams::zeros(4, 16))?;
    /// assert!(matches!(
    ///     MhcStack::new(vec![a, b], Schedule::Current),
    ///     Err(mhc::Error::BlockMismatch { index: 1, expected: [4, 8], got: [4, 16] })
    /// ));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn new(blocks: Vec<MhcBlock<F>>, schedule: Schedule) -> Result<Self> {
        let first = blocks.first().ok_or(Error::Empty { what: "blocks" })?;
        let dims = |b: &MhcBlock<F>| [b.config().streams, b.config().dim];
        let expected = dims(first);
        if let Some((index, b)) = blocks.iter().enumerate().find(|(_, b)| dims(b) != expected) {
            return Err(Error::BlockMismatch {
                index,
                expected,
                got: dims(b),
            });
        }
        Ok(MhcStack { blocks, schedule })
    }

    /// The blocks, block 0 first.
    pub fn blocks(&self) -> &[MhcBlock<F>] {
        &self.blocks
    }

    /// The blocks, mutably (e.g. for an optimiser step through
    /// [`MhcBlock::set_params`]); their `n` and `C` cannot change.
    pub fn blocks_mut(&mut self) -> &mut [MhcBlock<F>] {
        &mut self.blocks
    }

    /// The schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// `(n, C)` of every block.
    pub fn dims(&self) -> (usize, usize) {
        let c = self.blocks[0].config();
        (c.streams, c.dim)
    }

    /// Runs the chain: `sublayer(l, u_l)` gives `y_l`. Returns `x_L` and `pre_{L−1}`.
    ///
    /// Under [`Schedule::Current`] the result is bitwise equal to calling the blocks'
    /// [`forward`](MhcBlock::forward) one after the other.
    ///
    /// # Shapes
    ///
    /// - `x`: `[T, n, C]`; `sublayer(l, u: [T, C]) -> y: [T, C]`
    /// - returns `x_L: [T, n, C]` and `pre_{L−1}: [T, n]`
    ///
    /// # Errors
    ///
    /// [`Error::InBlock`] naming the block, around the errors of
    /// [`MhcBlock::forward`] (bad `x`, a sublayer output of the wrong shape or non-finite).
    ///
    /// # Examples
    ///
    /// See [`MhcStack`].
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnMut(usize, ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, Array2<F>)> {
        let (mut out, mut pre) = self.outputs(x.shape()[0])?;
        let mut ws = StackWorkspace::default();
        self.forward_into(x, sublayer, &mut ws, out.view_mut(), pre.view_mut())?;
        Ok((out, pre))
    }

    /// [`forward`](Self::forward) into caller buffers, with a reusable [`StackWorkspace`]: after
    /// the first call with a given `T` it allocates nothing proportional to the number of tokens.
    /// Bitwise equal to [`forward`](Self::forward).
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward); `out`: `[T, n, C]`, `pre`: `[T, n]`.
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward), plus [`Error::ShapeMismatch`] for `out` or `pre`.
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use mhc::{MhcBlock, MhcConfig, MhcStack, Schedule, StackWorkspace};
    /// use ndarray::{Array2, Array3};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let blocks = (0..3)
    ///     .map(|_| MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut rng))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let stack = MhcStack::new(blocks, Schedule::Shifted)?;
    /// let x = Array3::from_elem((5, 4, 8), 0.1f32);
    /// let (mut out, mut pre) = (Array3::zeros((5, 4, 8)), Array2::zeros((5, 4)));
    /// let mut ws = StackWorkspace::default();
    /// for _ in 0..2 {
    ///     stack.forward_into(x.view(), |_l, u| u.mapv(f32::tanh), &mut ws, out.view_mut(), pre.view_mut())?;
    /// }
    /// assert_eq!((out, pre), stack.forward(x.view(), |_l, u| u.mapv(f32::tanh))?);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn forward_into(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnMut(usize, ArrayView2<F>) -> Array2<F>,
        ws: &mut StackWorkspace<F>,
        out: ArrayViewMut3<F>,
        pre: ArrayViewMut2<F>,
    ) -> Result<()> {
        self.run(x, sublayer, &mut ws.stages, None, &mut ws.e0, out, pre)
    }

    /// [`forward`](Self::forward) for training: also returns a [`StackTape`] with each block's
    /// input and sublayer output, for [`backward`](Self::backward).
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward).
    ///
    /// # Errors
    ///
    /// As [`forward`](Self::forward).
    ///
    /// # Examples
    ///
    /// See [`backward`](Self::backward).
    pub fn forward_train(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnMut(usize, ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, Array2<F>, StackTape<F>)> {
        let (mut out, mut pre) = self.outputs(x.shape()[0])?;
        let mut tape = StackTape::default();
        self.forward_train_into(x, sublayer, &mut tape, out.view_mut(), pre.view_mut())?;
        Ok((out, pre, tape))
    }

    /// [`forward_train`](Self::forward_train) into caller buffers, reusing `tape`'s: after the
    /// first step with a given `T` it allocates nothing proportional to the number of tokens.
    /// Bitwise equal to [`forward_train`](Self::forward_train).
    ///
    /// # Shapes
    ///
    /// As [`forward_into`](Self::forward_into).
    ///
    /// # Errors
    ///
    /// As [`forward_into`](Self::forward_into).
    ///
    /// # Examples
    ///
    /// See [`backward_into`](Self::backward_into).
    pub fn forward_train_into(
        &self,
        x: ArrayView3<F>,
        sublayer: impl FnMut(usize, ArrayView2<F>) -> Array2<F>,
        tape: &mut StackTape<F>,
        out: ArrayViewMut3<F>,
        pre: ArrayViewMut2<F>,
    ) -> Result<()> {
        let nb = self.blocks.len();
        tape.stages.resize_with(nb, Stage::default);
        tape.ys.clear();
        let StackTape { stages, ys, e0 } = tape;
        let r = self.run(x, sublayer, stages, Some(ys), e0, out, pre);
        if r.is_err() {
            ys.clear();
        }
        r
    }

    /// Zeroed `x_L` and `pre` buffers for `t` tokens.
    fn outputs(&self, t: usize) -> Result<(Array3<F>, Array2<F>)> {
        let (n, c) = self.dims();
        let (mut out, mut pre) = (Array3::zeros((0, 0, 0)), Array2::zeros((0, 0)));
        reuse3(&mut out, "out", t, n, c)?;
        reuse2(&mut pre, "pre", t, n)?;
        Ok((out, pre))
    }

    /// The chain forward. `stages` holds two stages (inference: they alternate) or one per block
    /// (training, with `ys`: every stage is kept).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: ArrayView3<F>,
        mut sublayer: impl FnMut(usize, ArrayView2<F>) -> Array2<F>,
        stages: &mut [Stage<F>],
        mut ys: Option<&mut Vec<Array2<F>>>,
        e0: &mut Array2<F>,
        mut out: ArrayViewMut3<F>,
        mut pre: ArrayViewMut2<F>,
    ) -> Result<()> {
        let (n, c) = self.dims();
        let inb = Error::in_block;
        check_x(x.shape(), n, c).map_err(inb(0))?;
        let t = x.shape()[0];
        check_same("out", &[t, n, c], out.shape())?;
        check_same("pre", &[t, n], pre.shape())?;
        let shifted = self.schedule == Schedule::Shifted;
        let keep = ys.is_some();
        let idx = move |l: usize| if keep { l } else { l % 2 };
        let first = &mut stages[0];
        first.ensure(t, n, c).map_err(inb(0))?;
        // Training keeps `x_0` on the tape; inference reads block 0's input from `x` itself
        // (a copy of `[T, n, C]` less: ≈ 5 ms at n = 4, C = 1024, T = 4096).
        if keep {
            first.x.assign(&x);
        }
        if shifted {
            ensure_e0(e0, t, n).map_err(inb(0))?;
        }
        self.blocks[0]
            .read_out_linked_into(
                x,
                shifted.then(|| e0.view()),
                &mut first.maps,
                first.u.view_mut(),
            )
            .map_err(inb(0))?;
        let last = self.blocks.len() - 1;
        // Block l's input: the caller's `x` for block 0 (not copied in inference), a stage after.
        fn input<'a, F>(l: usize, x: &'a ArrayView3<F>, st: &'a Stage<F>) -> ArrayView3<'a, F> {
            if l == 0 { x.view() } else { st.x.view() }
        }
        for (l, block) in self.blocks.iter().enumerate() {
            let y = sublayer(l, stages[idx(l)].u.view());
            check_same("sublayer output", &[t, c], y.shape()).map_err(inb(l))?;
            if l == last {
                let cur = &stages[idx(l)];
                crate::mixing::write_in_into(
                    input(l, &x, cur),
                    &cur.maps,
                    y.view(),
                    out.view_mut(),
                )
                .map_err(inb(l))?;
                pre.assign(&cur.maps.pre);
                if let Some(ys) = ys.as_mut() {
                    ys.push(y);
                }
                return Ok(());
            }
            let (cur, next) = split(stages, idx(l), idx(l + 1));
            block
                .write_in_seam_into(
                    input(l, &x, cur),
                    &cur.maps,
                    y.view(),
                    &self.blocks[l + 1],
                    self.schedule,
                    next,
                )
                .map_err(|e| match e {
                    // The write-in's errors are block l's, the read-out's block l+1's.
                    e @ Error::NonFinite { what, .. } if what.starts_with("mapping") => {
                        inb(l + 1)(e)
                    }
                    e => inb(l)(e),
                })?;
            if let Some(ys) = ys.as_mut() {
                ys.push(y);
            }
        }
        unreachable!("the loop returns at the last block")
    }

    /// The backward pass of the chain, blocks `L−1 … 0`: from the tape, `upstream = ∂x_L` and
    /// the optional `upstream_pre = ∂pre_{L−1}`, returns `∂x_0` and every block's parameter
    /// gradients. `sublayer_vjp(l, u_l, ∂y_l) -> ∂u_l` is called once per block.
    ///
    /// Each block recomputes its mappings and `u_l` from the kept `x_l`. Under the shifted
    /// schedule, block `l`'s `H_pre` gradient arrives from block `l+1`'s read-out:
    /// `∂pre_l[j] = ⟨∂u_{l+1}, x_{l+1}[j]⟩` (SPEC §8). Between two blocks the stack runs the
    /// backward seam ([`MhcBlock::read_out_backward_seam_into`]): block `l+1`'s read-out half and
    /// block `l`'s write-in half in one pass, so `∂x_{l+1}` never leaves the cache. Under
    /// [`Schedule::Current`] the result is bitwise equal to the blocks'
    /// [`backward`](MhcBlock::backward) called one after the other.
    ///
    /// # Shapes
    ///
    /// - `upstream`: `[T, n, C]`; `upstream_pre`: `[T, n]`;
    ///   `sublayer_vjp(l, u: [T, C], ∂y: [T, C]) -> ∂u: [T, C]`
    /// - returns `∂x_0: [T, n, C]` and one [`MhcParams`] a block
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for `upstream` or `upstream_pre` (`"upstream_pre"`) of the
    /// wrong shape, or a tape from a chain of another length (`"tape"`); [`Error::InBlock`]
    /// around the errors of [`MhcBlock::backward`] (a VJP output of the wrong shape or
    /// non-finite).
    ///
    /// # Examples
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use mhc::{MhcBlock, MhcConfig, MhcStack, Schedule};
    /// use ndarray::{Array2, Array3};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let blocks = (0..3)
    ///     .map(|_| MhcBlock::<f64>::new(MhcConfig::new(4, 8), &mut rng))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let stack = MhcStack::new(blocks, Schedule::Shifted)?;
    /// let x = Array3::from_shape_fn((5, 4, 8), |(t, i, c)| ((t + i * c) as f64).sin());
    /// let (out, pre, tape) = stack.forward_train(x.view(), |_l, u| u.mapv(f64::tanh))?;
    /// // Loss Σ x_L + Σ pre_{L−1}; the sublayers' VJP: ∂u = ∂y ⊙ (1 − tanh²(u)).
    /// let up = Array3::ones(out.raw_dim());
    /// let up_pre = Array2::ones(pre.raw_dim());
    /// let (dx, grads) = stack.backward(&tape, up.view(), Some(up_pre.view()), |_l, u, dy| {
    ///     &dy * &u.mapv(|v| 1.0 - v.tanh().powi(2))
    /// })?;
    /// assert_eq!((dx.shape(), grads.len()), (x.shape(), 3));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn backward(
        &self,
        tape: &StackTape<F>,
        upstream: ArrayView3<F>,
        upstream_pre: Option<ArrayView2<F>>,
        sublayer_vjp: impl FnMut(usize, ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, Vec<MhcParams<F>>)> {
        let (n, c) = self.dims();
        let t = upstream.shape()[0];
        let mut dx = Array3::zeros((0, 0, 0));
        reuse3(&mut dx, "dx", t, n, c)?;
        let mut ws = StackWorkspace::default();
        let grads = self.backward_into(
            tape,
            upstream,
            upstream_pre,
            sublayer_vjp,
            &mut ws,
            dx.view_mut(),
        )?;
        Ok((dx, grads))
    }

    /// [`backward`](Self::backward) into a caller buffer `dx` (`∂x_0`), with a reusable
    /// [`StackWorkspace`]: after the first call with a given `T` it allocates nothing
    /// proportional to the number of tokens (the parameter gradients, `O(n·C·m)` a block, are
    /// returned owned). Bitwise equal to [`backward`](Self::backward).
    ///
    /// # Shapes
    ///
    /// As [`backward`](Self::backward); `dx`: `[T, n, C]`.
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward), plus [`Error::ShapeMismatch`] for `dx`.
    ///
    /// # Examples
    ///
    /// A training loop that allocates nothing per token after its first step:
    ///
    /// ```
    /// use mhc::rand::{SeedableRng, rngs::StdRng};
    /// use mhc::{MhcBlock, MhcConfig, MhcStack, Schedule, StackTape, StackWorkspace};
    /// use ndarray::{Array2, Array3};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let blocks = (0..3)
    ///     .map(|_| MhcBlock::<f64>::new(MhcConfig::new(4, 8), &mut rng))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let stack = MhcStack::new(blocks, Schedule::Shifted)?;
    /// let x = Array3::from_shape_fn((5, 4, 8), |(t, i, c)| ((t + i * c) as f64).sin());
    /// let (mut out, mut pre, mut dx) = (Array3::zeros((5, 4, 8)), Array2::zeros((5, 4)), Array3::zeros((5, 4, 8)));
    /// let (mut tape, mut ws) = (StackTape::default(), StackWorkspace::default());
    /// let up = Array3::ones((5, 4, 8));
    /// for _step in 0..2 {
    ///     stack.forward_train_into(x.view(), |_l, u| u.mapv(f64::tanh), &mut tape, out.view_mut(), pre.view_mut())?;
    ///     let grads = stack.backward_into(&tape, up.view(), None, |_l, u, dy| {
    ///         &dy * &u.mapv(|v| 1.0 - v.tanh().powi(2))
    ///     }, &mut ws, dx.view_mut())?;
    ///     assert_eq!(grads.len(), 3);
    /// }
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn backward_into(
        &self,
        tape: &StackTape<F>,
        upstream: ArrayView3<F>,
        upstream_pre: Option<ArrayView2<F>>,
        mut sublayer_vjp: impl FnMut(usize, ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
        ws: &mut StackWorkspace<F>,
        mut dx: ArrayViewMut3<F>,
    ) -> Result<Vec<MhcParams<F>>> {
        let (n, c) = self.dims();
        let nb = self.blocks.len();
        check_same("tape", &[nb], &[tape.len()])?;
        let (t, _, _) = tape.stages[0].x.dim();
        check_same("upstream", &[t, n, c], upstream.shape())?;
        if let Some(p) = &upstream_pre {
            check_same("upstream_pre", &[t, n], p.shape())?;
        }
        check_same("dx", &[t, n, c], dx.shape())?;
        let shifted = self.schedule == Schedule::Shifted;
        let StackWorkspace {
            tapes: [ta, tb],
            dpre,
            dprev,
            ..
        } = ws;
        let (mut wt, mut wp) = (ta, tb);
        if shifted && nb > 1 {
            reuse2(dpre, "dpre", t, n)?;
            reuse2(dprev, "dprev", t, n)?;
        }
        // The weights block l's sublayer input was read out with, when not its own H_pre.
        let read_with = |l: usize| match (shifted, l) {
            (false, _) => None,
            (true, 0) => Some(tape.e0.view()),
            (true, _) => Some(tape.stages[l - 1].maps.pre.view()),
        };
        let last = nb - 1;
        self.blocks[last]
            .write_in_backward_linked_into(
                tape.stages[last].x.view(),
                tape.ys[last].view(),
                upstream,
                read_with(last),
                wt,
            )
            .map_err(Error::in_block(last))?;
        let mut grads = Vec::with_capacity(nb);
        for l in (0..nb).rev() {
            // `wt` holds block l's write-in half, filled by the seam with block l+1 (or above).
            let block = &self.blocks[l];
            let xl = tape.stages[l].x.view();
            let du = sublayer_vjp(l, wt.u.view(), wt.dy.view());
            // ∂ of block l's own H_pre from further down the chain: the caller's for the last
            // block (under both schedules its H_pre is the chain's output), else under `Shifted`
            // what block l+1's read-out wrote into `dpre`.
            let own = match (l == last, shifted) {
                (true, _) => upstream_pre,
                (false, true) => Some(dpre.view()),
                (false, false) => None,
            };
            let link = ChainLink {
                prev_pre: read_with(l),
                dpre: own,
                dprev_pre: (shifted && l > 0).then(|| dprev.view_mut()),
            };
            let p = if l == 0 {
                block
                    .read_out_backward_linked_into(xl, wt, du.view(), link, dx.view_mut())
                    .map_err(Error::in_block(0))?
            } else {
                // The backward seam: block l's read-out half and block l−1's write-in half.
                let kp = self.blocks[l - 1].kernel();
                let side = SeamPrev {
                    k: &kp,
                    x: tape.stages[l - 1].x.view(),
                    y: tape.ys[l - 1].view(),
                    ro: read_with(l - 1),
                    tape: wp,
                };
                match backward_seam(&block.kernel(), xl, wt, du.view(), link, side) {
                    Ok((dw, acc)) => block.grads(dw, acc),
                    Err(SeamError::This(e)) => return Err(Error::in_block(l)(e)),
                    Err(SeamError::Prev(e)) => return Err(Error::in_block(l - 1)(e)),
                }
            };
            grads.push(p);
            std::mem::swap(&mut wt, &mut wp);
            std::mem::swap(dpre, dprev);
        }
        grads.reverse();
        Ok(grads)
    }
}
