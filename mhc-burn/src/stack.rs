//! Chains of mHC blocks under both schedules of SPEC §8, as a burn module.

use burn::prelude::*;

use crate::MhcBlock;
use crate::mixing::{Mappings, read_out, write_in};

pub use mhc::Schedule;

/// A chain of [`MhcBlock`]s (SPEC §8, §9) under a [`Schedule`]: the paper's (each block reads
/// out with its own `H_pre`) or DeepSeek-V4.1's single pass (block `l` reads out with block
/// `l−1`'s `H_pre`, block 0 with `e_0`).
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// use mhc_burn::{MhcBlockConfig, MhcStack, Schedule};
/// let device = Device::flex();
/// let blocks = (0..4).map(|_| MhcBlockConfig::new(4, 8).init(&device)).collect();
/// let stack = MhcStack::new(blocks, Schedule::Shifted);
/// let x = Tensor::<4>::ones([2, 3, 4, 8], &device);
/// let (out, pre) = stack.forward(x, |_l, u| u.tanh());
/// let h = mhc_burn::read_out(out, pre); // V4.1's final read-out
/// assert_eq!(h.dims(), [2, 3, 8]);
/// ```
#[derive(Module, Debug)]
pub struct MhcStack {
    /// The blocks, block 0 first.
    pub blocks: Vec<MhcBlock>,
    /// The schedule.
    #[module(skip)]
    pub schedule: Schedule,
}

impl MhcStack {
    /// A chain of `blocks` under `schedule`.
    ///
    /// # Panics
    ///
    /// If `blocks` is empty or their `n` and `C` differ (use [`try_new`](Self::try_new) for the
    /// error instead).
    pub fn new(blocks: Vec<MhcBlock>, schedule: Schedule) -> Self {
        Self::try_new(blocks, schedule).unwrap_or_else(|e| panic!("invalid MhcStack: {e}"))
    }

    /// A chain of `blocks` under `schedule`, checked.
    ///
    /// # Errors
    ///
    /// As [`mhc::MhcStack::new`]: [`mhc::Error::Empty`] for no blocks,
    /// [`mhc::Error::BlockMismatch`] for a block with another `n` or `C` than block 0.
    pub fn try_new(blocks: Vec<MhcBlock>, schedule: Schedule) -> mhc::Result<Self> {
        let first = blocks.first().ok_or(mhc::Error::Empty { what: "blocks" })?;
        let expected = [first.streams, first.dim];
        if let Some((index, b)) = blocks
            .iter()
            .enumerate()
            .find(|(_, b)| [b.streams, b.dim] != expected)
        {
            return Err(mhc::Error::BlockMismatch {
                index,
                expected,
                got: [b.streams, b.dim],
            });
        }
        Ok(MhcStack { blocks, schedule })
    }

    /// The burn twin of a core stack, on `device`.
    ///
    /// # Examples
    ///
    /// ```
    /// use burn::prelude::*;
    /// let b = mhc::MhcBlock::<f32>::from_params(mhc::MhcConfig::new(2, 4), mhc::MhcParams::zeros(2, 4))?;
    /// let core = mhc::MhcStack::new(vec![b.clone(), b], mhc::Schedule::Shifted)?;
    /// let stack = mhc_burn::MhcStack::from_core(&core, &Device::flex());
    /// assert_eq!(stack.to_core()?.schedule(), mhc::Schedule::Shifted);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn from_core(stack: &mhc::MhcStack<f32>, device: &Device) -> Self {
        MhcStack {
            blocks: stack
                .blocks()
                .iter()
                .map(|b| MhcBlock::from_core(b, device))
                .collect(),
            schedule: stack.schedule(),
        }
    }

    /// The core stack with these parameters.
    ///
    /// # Errors
    ///
    /// The errors of [`MhcBlock::to_core`] and [`mhc::MhcStack::new`].
    pub fn to_core(&self) -> mhc::Result<mhc::MhcStack<f32>> {
        let blocks = self
            .blocks
            .iter()
            .map(MhcBlock::to_core)
            .collect::<mhc::Result<Vec<_>>>()?;
        mhc::MhcStack::new(blocks, self.schedule)
    }

    /// Runs the chain: `sublayer(l, u_l)` gives `y_l`. Returns `x_L` and `pre_{L−1}` (f32).
    ///
    /// # Shapes
    ///
    /// - `x`: `[batch, seq, n, C]`; `sublayer(l, [batch, seq, C]) -> [batch, seq, C]`
    /// - returns `x_L: [batch, seq, n, C]` and `pre_{L−1}: [batch, seq, n]`
    ///
    /// # Panics
    ///
    /// If `x` is not `[.., .., n, C]`.
    ///
    /// # Examples
    ///
    /// See [`MhcStack`].
    pub fn forward(
        &self,
        x: Tensor<4>,
        sublayer: impl FnMut(usize, Tensor<3>) -> Tensor<3>,
    ) -> (Tensor<4>, Tensor<3>) {
        let (x, pre, _) = self.forward_traced(x, sublayer);
        (x, pre)
    }

    /// [`forward`](Self::forward), also returning every block's mappings (e.g. for the gain
    /// diagnostics of [`mhc::gain`] on a trained model).
    ///
    /// # Shapes
    ///
    /// As [`forward`](Self::forward); one [`Mappings`] a block, for `[batch, seq]` tokens.
    ///
    /// # Panics
    ///
    /// If `x` is not `[.., .., n, C]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use burn::prelude::*;
    /// use mhc_burn::{MhcBlockConfig, MhcStack, Schedule};
    /// let device = Device::flex();
    /// let stack = MhcStack::new((0..3).map(|_| MhcBlockConfig::new(4, 8).init(&device)).collect(), Schedule::Current);
    /// let (_, _, maps) = stack.forward_traced(Tensor::ones([1, 2, 4, 8], &device), |_l, u| u);
    /// assert_eq!((maps.len(), maps[0].res.dims()), (3, [1, 2, 4, 4]));
    /// ```
    pub fn forward_traced(
        &self,
        x: Tensor<4>,
        mut sublayer: impl FnMut(usize, Tensor<3>) -> Tensor<3>,
    ) -> (Tensor<4>, Tensor<3>, Vec<Mappings>) {
        let [b, s, n, _] = x.dims();
        let device = x.device();
        let shifted = self.schedule == Schedule::Shifted;
        let mut prev = shifted.then(|| initial_pre(b, s, n, &device));
        let mut x = x;
        let mut all = Vec::with_capacity(self.blocks.len());
        for (l, block) in self.blocks.iter().enumerate() {
            let maps = block.mappings(x.clone());
            let w = match prev.take() {
                Some(p) => p,
                None => maps.pre.clone(),
            };
            let y = sublayer(l, read_out(x.clone(), w));
            x = write_in(x, &maps, y);
            if shifted {
                prev = Some(maps.pre.clone());
            }
            all.push(maps);
        }
        let pre = all
            .last()
            .expect("a stack has at least one block")
            .pre
            .clone();
        (x, pre, all)
    }
}

/// `pre_{−1} = e_0` (one-hot on stream 0) for every token.
///
/// # Shapes
///
/// - returns `[batch, seq, n]`
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let e0 = mhc_burn::initial_pre(1, 2, 3, &Device::flex());
/// assert_eq!(e0.into_data().try_to_vec::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
/// ```
pub fn initial_pre(batch: usize, seq: usize, n: usize, device: &Device) -> Tensor<3> {
    let one = Tensor::<3>::ones([batch, seq, 1], device);
    if n == 1 {
        return one;
    }
    Tensor::cat(vec![one, Tensor::zeros([batch, seq, n - 1], device)], 2)
}
