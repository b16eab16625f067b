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
//! mappings and read-out, in one pass over the streams.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

use crate::backward::reuse2;
use crate::error::check_same;
use crate::error::{Error, Result, checked_size, try_zeroed};
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
        if self.x.dim() != (t, n, c) || !self.x.is_standard_layout() {
            let len = checked_size("stage x", &[t, n, c])?;
            self.x = Array3::from_shape_vec((t, n, c), try_zeroed("stage x", len)?).expect("t·n·c");
        }
        self.maps.ensure(t, n)?;
        reuse2(&mut self.u, "u", t, c)
    }
}

/// What [`MhcStack::forward_train`] keeps for the backward pass: per block its input `x_l` and
/// sublayer output `y_l` (the paper's recompute strategy, §4.3.2), and its `H_pre` (`n` values a
/// token, so that under the shifted schedule block `l` need not recompute block `l−1`'s
/// mappings).
#[derive(Clone, Debug)]
pub struct StackTape<F> {
    xs: Vec<Array3<F>>,
    ys: Vec<Array2<F>>,
    pres: Vec<Array2<F>>,
}

impl<F: Float> StackTape<F> {
    /// The input `x_l` of every block: `[T, n, C]` each.
    pub fn inputs(&self) -> &[Array3<F>] {
        &self.xs
    }

    /// The sublayer output `y_l` of every block: `[T, C]` each.
    pub fn outputs(&self) -> &[Array2<F>] {
        &self.ys
    }
}

/// What a run of the chain gives: `x_L`, `pre_{L−1}`, and the tape when training.
type Run<F> = (Array3<F>, Array2<F>, Option<StackTape<F>>);

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
        let (out, pre, _) = self.run(x, sublayer, false)?;
        Ok((out, pre))
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
        let (out, pre, tape) = self.run(x, sublayer, true)?;
        Ok((out, pre, tape.expect("kept when training")))
    }

    fn run(
        &self,
        x: ArrayView3<F>,
        mut sublayer: impl FnMut(usize, ArrayView2<F>) -> Array2<F>,
        train: bool,
    ) -> Result<Run<F>> {
        let (n, c) = self.dims();
        let inb = Error::in_block;
        check_x(x.shape(), n, c).map_err(inb(0))?;
        let t = x.shape()[0];
        let shifted = self.schedule == Schedule::Shifted;
        let mut cur = Stage::default();
        cur.ensure(t, n, c).map_err(inb(0))?;
        cur.x.assign(&x);
        let e0 = shifted.then(|| initial_pre::<F>(t, n));
        let b0 = &self.blocks[0];
        b0.read_out_linked_into(
            x,
            e0.as_ref().map(|e| e.view()),
            &mut cur.maps,
            cur.u.view_mut(),
        )
        .map_err(inb(0))?;
        let mut next = Stage::default();
        let mut tape = train.then(|| StackTape {
            xs: Vec::with_capacity(self.blocks.len()),
            ys: Vec::with_capacity(self.blocks.len()),
            pres: Vec::with_capacity(self.blocks.len()),
        });
        let last = self.blocks.len() - 1;
        for (l, block) in self.blocks.iter().enumerate() {
            let y = sublayer(l, cur.u.view());
            check_same("sublayer output", &[t, c], y.shape()).map_err(inb(l))?;
            if l == last {
                let out = block
                    .write_in(cur.x.view(), &cur.maps, y.view())
                    .map_err(inb(l))?;
                let pre = cur.maps.pre.clone();
                if let Some(tp) = tape.as_mut() {
                    tp.pres.push(cur.maps.pre);
                    tp.xs.push(cur.x);
                    tp.ys.push(y);
                }
                return Ok((out, pre, tape));
            }
            block
                .write_in_seam_into(
                    cur.x.view(),
                    &cur.maps,
                    y.view(),
                    &self.blocks[l + 1],
                    self.schedule,
                    &mut next,
                )
                .map_err(|e| match e {
                    // The write-in's errors are block l's, the read-out's block l+1's.
                    e @ Error::NonFinite { what, .. } if what.starts_with("mapping") => {
                        inb(l + 1)(e)
                    }
                    e => inb(l)(e),
                })?;
            match tape.as_mut() {
                Some(tp) => {
                    // Keep x_l, y_l and pre_l; the next stage gets fresh buffers.
                    let done = std::mem::replace(&mut cur, std::mem::take(&mut next));
                    tp.xs.push(done.x);
                    tp.ys.push(y);
                    tp.pres.push(done.maps.pre);
                }
                None => std::mem::swap(&mut cur, &mut next),
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
    /// `∂pre_l[j] = ⟨∂u_{l+1}, x_{l+1}[j]⟩` (SPEC §8).
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
        mut sublayer_vjp: impl FnMut(usize, ArrayView2<F>, ArrayView2<F>) -> Array2<F>,
    ) -> Result<(Array3<F>, Vec<MhcParams<F>>)> {
        let (n, c) = self.dims();
        let nb = self.blocks.len();
        check_same("tape", &[nb], &[tape.xs.len()])?;
        let (t, _, _) = tape.xs[0].dim();
        check_same("upstream", &[t, n, c], upstream.shape())?;
        if let Some(p) = &upstream_pre {
            check_same("upstream_pre", &[t, n], p.shape())?;
        }
        let shifted = self.schedule == Schedule::Shifted;
        let e0 = shifted.then(|| initial_pre::<F>(t, n));
        let mut ws = Tape::default();
        let (mut g, mut dx) = (upstream.to_owned(), Array3::zeros((t, n, c)));
        // ∂ of the current block's own H_pre from further down the chain.
        let mut dpre: Option<Array2<F>> = upstream_pre.map(|p| p.to_owned());
        let mut dprev = Array2::zeros((t, n));
        let mut grads = Vec::with_capacity(nb);
        for l in (0..nb).rev() {
            let inb = Error::in_block(l);
            let block = &self.blocks[l];
            let (xl, yl) = (tape.xs[l].view(), tape.ys[l].view());
            let prev = match (shifted, l) {
                (false, _) => None,
                (true, 0) => e0.as_ref().map(|e| e.view()),
                (true, _) => Some(tape.pres[l - 1].view()),
            };
            block
                .write_in_backward_linked_into(xl, yl, g.view(), prev, &mut ws)
                .map_err(inb)?;
            let du = sublayer_vjp(l, ws.u.view(), ws.dy.view());
            let link = ChainLink {
                prev_pre: prev,
                dpre: dpre.as_ref().map(|d| d.view()),
                dprev_pre: (shifted && l > 0).then(|| dprev.view_mut()),
            };
            let p = block
                .read_out_backward_linked_into(xl, &mut ws, du.view(), link, dx.view_mut())
                .map_err(Error::in_block(l))?;
            grads.push(p);
            std::mem::swap(&mut g, &mut dx);
            dpre = match (shifted, l > 0, dpre) {
                (true, true, Some(mut d)) => {
                    std::mem::swap(&mut d, &mut dprev);
                    Some(d)
                }
                (true, true, None) => Some(std::mem::replace(&mut dprev, Array2::zeros((t, n)))),
                _ => None,
            };
        }
        grads.reverse();
        Ok((g, grads))
    }
}
