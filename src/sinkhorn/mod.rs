//! The Sinkhorn-Knopp projector onto the Birkhoff polytope (paper Eq. 9, SPEC §2).
//!
//! [`SinkhornKnopp`] maps a square matrix of logits to a doubly-stochastic matrix exactly as the
//! mHC paper and DeepSeek's released kernel do: a column softmax (`= T_c(exp(L))`), `+ eps` when
//! `eps > 0`, a row normalisation, then `iters − 1` times (columns, rows). Rows are normalised
//! last, so every row of the result sums to 1 (to rounding, for `eps = 0`); the column sums carry
//! the truncation error of the finite iteration.
//!
//! The iteration runs in the linear domain, in factored form (`diag(a) · P · diag(b)`), 32
//! matrices side by side so that it vectorises and keeps the divider busy (see `lanes`). A matrix
//! whose scalings or their reciprocals exceed `sqrt(EPSILON / MIN_POSITIVE)` at any step (≈ 3e15
//! in `f32`: logits spread so widely that the linear domain could lose accuracy; this bounds
//! every normalising sum below by `MIN_POSITIVE / EPSILON`) is recomputed in log space, the same
//! map with `logsumexp` normalisations, and its VJP goes through the log-space iterates too.

mod lanes;
mod log;
mod shuffle;

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::error::{Error, Result, check_finite, check_same, reuse, try_zeroed};
use crate::{Float, par};
use lanes::{BATCH, GROUPS, Plan};

/// The Sinkhorn-Knopp projector of SPEC §2 (paper Eq. 9).
///
/// `iters` is the number of (column, row) normalisation rounds, counting the column softmax as
/// the first column step; `eps` is added to the entries after the softmax and to every
/// normalising sum (DeepSeek's kernel uses `1e-6`; the paper's definition is `0`).
///
/// # Examples
///
/// ```
/// use mhc::SinkhornKnopp;
/// use ndarray::array;
///
/// let h_res = SinkhornKnopp::default().project(array![[1.0, 0.0], [0.0, 2.0f64]].view())?;
/// for row in h_res.rows() {
///     assert!((row.sum() - 1.0).abs() < 1e-12);
/// }
/// # Ok::<(), mhc::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinkhornKnopp {
    /// Normalisation rounds (default 20, as in the paper). Must be at least 1.
    pub iters: usize,
    /// Added after the softmax and to every normalising sum (default 0, the paper's map;
    /// `1e-6` reproduces DeepSeek's kernel). Must be finite and non-negative.
    pub eps: f64,
}

impl Default for SinkhornKnopp {
    fn default() -> Self {
        SinkhornKnopp {
            iters: 20,
            eps: 0.0,
        }
    }
}

/// Matrices per parallel task: about 2^20 element updates, so a task outweighs its start-up.
fn task_len(nn: usize, iters: usize) -> usize {
    let per = (nn * iters.min(1 << 20)).max(1);
    ((1usize << 20) / per).max(1).div_ceil(BATCH) * BATCH
}

fn shape_of(s: &[usize]) -> Vec<usize> {
    s.to_vec()
}

impl SinkhornKnopp {
    /// A projector with `iters` rounds and `eps`, validated.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIterations`] if `iters == 0`; [`Error::InvalidEpsilon`] if `eps` is
    /// negative or not finite.
    ///
    /// # Examples
    ///
    /// ```
    /// let deepseek = mhc::SinkhornKnopp::new(20, 1e-6)?;
    /// assert_eq!(deepseek.eps, 1e-6);
    /// assert!(mhc::SinkhornKnopp::new(0, 0.0).is_err());
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn new(iters: usize, eps: f64) -> Result<Self> {
        let sk = SinkhornKnopp { iters, eps };
        sk.validate()?;
        Ok(sk)
    }

    /// Checks the configuration (every projecting method calls this first).
    ///
    /// # Errors
    ///
    /// As [`SinkhornKnopp::new`].
    pub fn validate(&self) -> Result<()> {
        if self.iters == 0 {
            return Err(Error::InvalidIterations { got: self.iters });
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::InvalidEpsilon {
                what: "eps",
                expected: "finite and >= 0",
                got: self.eps,
            });
        }
        Ok(())
    }

    /// Checks `[B, n, n]` logits (with `B` the leading dims), returning `n`.
    fn check_logits(&self, shape: &[usize]) -> Result<usize> {
        self.validate()?;
        let (r, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        if r != c {
            return Err(Error::NotSquare {
                what: "logits",
                got: shape_of(shape),
            });
        }
        if r == 0 {
            return Err(Error::Empty { what: "logits" });
        }
        Ok(r)
    }

    /// Projects one `n×n` matrix of logits onto the doubly-stochastic matrices.
    ///
    /// # Shapes
    ///
    /// - `logits`: `[n, n]`, any layout
    /// - returns: `[n, n]`, rows summing to 1 (to `s_i / (s_i + eps)` when `eps > 0`)
    ///
    /// # Errors
    ///
    /// [`Error::NotSquare`], [`Error::Empty`], [`Error::NonFinite`] (with index 0) for a NaN
    /// or infinite logit, and the configuration errors of [`SinkhornKnopp::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array2;
    /// let m = mhc::SinkhornKnopp::default().project(Array2::<f32>::zeros((4, 4)).view())?;
    /// assert!(m.iter().all(|&v| (v - 0.25).abs() < 1e-6));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn project<F: Float>(&self, logits: ArrayView2<F>) -> Result<Array2<F>> {
        let n = self.check_logits(logits.shape())?;
        let mut out = Array2::zeros((n, n));
        self.project_into(logits, out.view_mut())?;
        Ok(out)
    }

    /// [`project`](Self::project) into a caller-provided `[n, n]` array.
    ///
    /// # Shapes
    ///
    /// - `logits`: `[n, n]`; `out`: `[n, n]`
    ///
    /// # Errors
    ///
    /// As [`project`](Self::project), plus [`Error::ShapeMismatch`] if `out` is not `[n, n]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    /// let mut out = Array2::zeros((2, 2));
    /// mhc::SinkhornKnopp::default().project_into(array![[0.0, 1.0], [2.0, 3.0]].view(), out.view_mut())?;
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn project_into<F: Float>(
        &self,
        logits: ArrayView2<F>,
        out: ArrayViewMut2<F>,
    ) -> Result<()> {
        self.project_batch_into(
            logits.insert_axis(ndarray::Axis(0)),
            out.insert_axis(ndarray::Axis(0)),
        )
        .map_err(single_matrix)
    }

    /// Projects a batch of matrices, in parallel over chunks of the batch.
    ///
    /// The result is bitwise identical to calling [`project`](Self::project) on each matrix,
    /// with any number of threads.
    ///
    /// # Shapes
    ///
    /// - `logits`: `[B, n, n]`
    /// - returns: `[B, n, n]` (`B = 0` gives an empty result)
    ///
    /// # Errors
    ///
    /// As [`project`](Self::project); [`Error::NonFinite`] names the first batch entry holding
    /// a NaN or infinity.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let logits = Array3::<f64>::from_shape_fn((16, 4, 4), |(b, i, j)| (b + 3 * i + j) as f64 * 0.1);
    /// let h = mhc::SinkhornKnopp::default().project_batch(logits.view())?;
    /// assert_eq!(h.shape(), &[16, 4, 4]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn project_batch<F: Float>(&self, logits: ArrayView3<F>) -> Result<Array3<F>> {
        let mut out = Array3::zeros(logits.raw_dim());
        self.project_batch_into(logits, out.view_mut())?;
        Ok(out)
    }

    /// [`project_batch`](Self::project_batch) into a caller-provided `[B, n, n]` array.
    ///
    /// # Shapes
    ///
    /// - `logits`, `out`: `[B, n, n]`
    ///
    /// # Errors
    ///
    /// As [`project_batch`](Self::project_batch), plus [`Error::ShapeMismatch`] for `out`. After
    /// an [`Error::NonFinite`], `out` holds partial results (finiteness is checked inside the
    /// kernel, not in a pass over the logits before it).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let logits = Array3::<f32>::zeros((3, 2, 2));
    /// let mut out = Array3::zeros((3, 2, 2));
    /// mhc::SinkhornKnopp::default().project_batch_into(logits.view(), out.view_mut())?;
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn project_batch_into<F: Float>(
        &self,
        logits: ArrayView3<F>,
        mut out: ArrayViewMut3<F>,
    ) -> Result<()> {
        let n = self.check_logits(logits.shape())?;
        check_same("out", logits.shape(), out.shape())?;
        let l = logits.as_standard_layout();
        let l = l.as_slice().expect("standard layout");
        match out.as_slice_mut() {
            Some(o) => self.project_batch_slices(n, l, o)?,
            None => {
                let mut o = try_zeroed("out", l.len())?;
                self.project_batch_slices(n, l, &mut o)?;
                out.assign(&ArrayView3::from_shape(logits.raw_dim(), &o).expect("same shape"));
            }
        }
        Ok(())
    }

    /// Contiguous batch, parallel over fixed chunks. Shapes already validated; a non-finite
    /// matrix is [`Error::NonFinite`] with its batch index (the lowest, on any thread count).
    pub(crate) fn project_batch_slices<F: Float>(
        &self,
        n: usize,
        logits: &[F],
        out: &mut [F],
    ) -> Result<()> {
        let nn = n * n;
        let chunk = task_len(nn, self.iters) * nn;
        let tasks: Vec<_> = logits.chunks(chunk).zip(out.chunks_mut(chunk)).collect();
        par::try_for_each(tasks, |k, (l, o)| {
            self.project_slices(n, l, o, &mut Scratch::default())
                .map_err(|e| match e {
                    Error::NonFinite { what, index } => Error::NonFinite {
                        what,
                        index: index + k * chunk / nn,
                    },
                    e => e,
                })
        })
    }

    /// Projects the contiguous row-major matrices in `logits` into `out`, sequentially.
    /// Shapes already validated. The kernel flags a matrix with a non-finite logit as it flags
    /// one the linear domain cannot handle, so finiteness costs no pass of its own: such a
    /// matrix is [`Error::NonFinite`] (`"logits"`, its index in `logits`, the first one) when
    /// the flagged matrices are looked at, after `out` has been written.
    pub(crate) fn project_slices<F: Float>(
        &self,
        n: usize,
        logits: &[F],
        out: &mut [F],
        scratch: &mut Scratch<F>,
    ) -> Result<()> {
        let nn = n * n;
        let plan = Plan::<F>::new(n, self.iters, self.eps);
        scratch.ensure(&plan, false)?;
        let (buf, scale) = (aligned(&mut scratch.buf), aligned(&mut scratch.scale));
        let fallback = &mut scratch.fallback;
        fallback.clear();
        let shuf = shuffle::Shuffler::detect();
        // Linear domain, vectorised; remember the matrices that need the log domain.
        par::vectorized(
            #[inline(always)]
            || {
                lanes::with_dim!(n, d => {
                    for (ci, (l, o)) in logits
                        .chunks(nn * BATCH)
                        .zip(out.chunks_mut(nn * BATCH))
                        .enumerate()
                    {
                        let count = l.len() / nn;
                        lanes::gather_batch(d, shuf, l, count, buf);
                        let ok = lanes::forward(d, &plan, buf, scale, None);
                        lanes::scatter_batch(d, shuf, buf, count, o);
                        fallback.extend((0..count).filter(|&k| !ok[k]).map(|k| ci * BATCH + k));
                    }
                })
            },
        );
        if fallback.is_empty() {
            return Ok(());
        }
        if let Some(&m) = fallback
            .iter()
            .find(|&&m| !crate::reduce::all_finite(&logits[m * nn..(m + 1) * nn]))
        {
            return Err(Error::NonFinite {
                what: "logits",
                index: m,
            });
        }
        let mut log_store = log::scratch(n, self.iters, fallback.len())?;
        for &m in fallback.iter() {
            let range = m * nn..(m + 1) * nn;
            log::project_one(
                n,
                self.iters,
                plan.eps,
                &logits[range.clone()],
                &mut log_store,
                &mut out[range],
            );
        }
        Ok(())
    }

    /// The vector-Jacobian product of [`project`](Self::project): the gradient of
    /// `Σ upstream ⊙ project(logits)` with respect to `logits`.
    ///
    /// This is the exact derivative of the unrolled iteration for the configured `iters` and
    /// `eps` (what autograd gives on the same code), not the implicit-function approximation.
    /// The iterates are recomputed from the logits, not stored by the forward pass.
    ///
    /// # Shapes
    ///
    /// - `logits`, `upstream`: `[n, n]`
    /// - returns: `[n, n]`
    ///
    /// # Errors
    ///
    /// As [`project`](Self::project), plus [`Error::ShapeMismatch`] if `upstream` is not
    /// `[n, n]` and [`Error::NonFinite`] for a non-finite upstream gradient.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array2};
    /// let sk = mhc::SinkhornKnopp::default();
    /// // Rows always sum to one, so a gradient that weights every entry alike gives zero.
    /// let g = sk.vjp(array![[0.3, -1.0], [2.0, 0.5f64]].view(), Array2::ones((2, 2)).view())?;
    /// assert!(g.iter().all(|v| v.abs() < 1e-12));
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn vjp<F: Float>(
        &self,
        logits: ArrayView2<F>,
        upstream: ArrayView2<F>,
    ) -> Result<Array2<F>> {
        let b = self.vjp_batch(
            logits.insert_axis(ndarray::Axis(0)),
            upstream.insert_axis(ndarray::Axis(0)),
        );
        let b = b.map_err(single_matrix)?;
        Ok(b.index_axis_move(ndarray::Axis(0), 0))
    }

    /// [`vjp`](Self::vjp) for a batch, in parallel over chunks of the batch; bitwise identical
    /// to calling [`vjp`](Self::vjp) on each matrix.
    ///
    /// # Shapes
    ///
    /// - `logits`, `upstream`: `[B, n, n]`
    /// - returns: `[B, n, n]`
    ///
    /// # Errors
    ///
    /// As [`vjp`](Self::vjp); [`Error::NonFinite`] names the first batch entry at fault.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let logits = Array3::<f32>::zeros((5, 3, 3));
    /// let up = Array3::<f32>::ones((5, 3, 3));
    /// let g = mhc::SinkhornKnopp::default().vjp_batch(logits.view(), up.view())?;
    /// assert_eq!(g.shape(), &[5, 3, 3]);
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn vjp_batch<F: Float>(
        &self,
        logits: ArrayView3<F>,
        upstream: ArrayView3<F>,
    ) -> Result<Array3<F>> {
        let out = try_zeroed("vjp", logits.len())?;
        let mut out = Array3::from_shape_vec(logits.raw_dim(), out).expect("same shape");
        self.vjp_batch_into(logits, upstream, out.view_mut())?;
        Ok(out)
    }

    /// [`vjp_batch`](Self::vjp_batch) into a caller-provided `[B, n, n]` array.
    ///
    /// # Shapes
    ///
    /// - `logits`, `upstream`, `grad`: `[B, n, n]`
    ///
    /// # Errors
    ///
    /// As [`vjp_batch`](Self::vjp_batch), plus [`Error::ShapeMismatch`] if `grad` is not
    /// `[B, n, n]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array3;
    /// let logits = Array3::<f32>::zeros((5, 3, 3));
    /// let mut grad = Array3::zeros((5, 3, 3));
    /// mhc::SinkhornKnopp::default().vjp_batch_into(logits.view(), logits.view(), grad.view_mut())?;
    /// # Ok::<(), mhc::Error>(())
    /// ```
    pub fn vjp_batch_into<F: Float>(
        &self,
        logits: ArrayView3<F>,
        upstream: ArrayView3<F>,
        grad: ArrayViewMut3<F>,
    ) -> Result<()> {
        let n = self.check_logits(logits.shape())?;
        check_same("upstream", logits.shape(), upstream.shape())?;
        check_same("grad", logits.shape(), grad.shape())?;
        let l = logits.as_standard_layout();
        let l = l.as_slice().expect("standard layout");
        let u = upstream.as_standard_layout();
        let u = u.as_slice().expect("standard layout");
        check_finite("logits", n * n, l)?;
        check_finite("upstream", n * n, u)?;
        crate::reduce::with_slice_mut(grad, |g| self.vjp_batch_slices(n, l, u, g))
    }

    /// Contiguous batch VJP, parallel over fixed chunks. Inputs already validated and finite.
    pub(crate) fn vjp_batch_slices<F: Float>(
        &self,
        n: usize,
        logits: &[F],
        upstream: &[F],
        grad: &mut [F],
    ) -> Result<()> {
        let nn = n * n;
        let chunk = task_len(nn, self.iters) * nn;
        let tasks: Vec<_> = logits
            .chunks(chunk)
            .zip(upstream.chunks(chunk))
            .zip(grad.chunks_mut(chunk))
            .collect();
        par::try_for_each(tasks, |_, ((l, u), g)| {
            self.vjp_slices(n, l, u, g, &mut Scratch::default())
        })
    }

    /// Sequential VJP of contiguous matrices. Inputs already validated and finite.
    pub(crate) fn vjp_slices<F: Float>(
        &self,
        n: usize,
        logits: &[F],
        upstream: &[F],
        grad: &mut [F],
        scratch: &mut Scratch<F>,
    ) -> Result<()> {
        let nn = n * n;
        let plan = Plan::<F>::new(n, self.iters, self.eps);
        scratch.ensure(&plan, true)?;
        let (buf, scale) = (aligned(&mut scratch.buf), aligned(&mut scratch.scale));
        let (ones, pe) = (aligned(&mut scratch.ones), aligned(&mut scratch.pe));
        let (store, fallback) = (aligned(&mut scratch.store), &mut scratch.fallback);
        fallback.clear();
        let shuf = shuffle::Shuffler::detect();
        par::vectorized(
            #[inline(always)]
            || {
                lanes::with_dim!(n, d => {
                    for (ci, ((l, u), g)) in logits
                        .chunks(nn * BATCH)
                        .zip(upstream.chunks(nn * BATCH))
                        .zip(grad.chunks_mut(nn * BATCH))
                        .enumerate()
                    {
                        let count = l.len() / nn;
                        lanes::gather_batch(d, shuf, l, count, buf);
                        let ok = lanes::forward(d, &plan, buf, scale, Some(store));
                        lanes::gather_batch(d, shuf, u, count, buf);
                        lanes::backward(d, &plan, store, pe, ones, buf);
                        lanes::scatter_batch(d, shuf, buf, count, g);
                        fallback.extend((0..count).filter(|&k| !ok[k]).map(|k| ci * BATCH + k));
                    }
                })
            },
        );
        if fallback.is_empty() {
            return Ok(());
        }
        let mut log_store = log::scratch(n, self.iters, fallback.len())?;
        for &m in fallback.iter() {
            let range = m * nn..(m + 1) * nn;
            let (l, u) = (&logits[range.clone()], &upstream[range.clone()]);
            log::vjp_one(
                n,
                self.iters,
                plan.eps,
                l,
                u,
                &mut log_store,
                &mut grad[range],
            );
        }
        Ok(())
    }
}

/// The reusable buffers of [`SinkhornKnopp::project_slices`] and
/// [`SinkhornKnopp::vjp_slices`]: grown on first use, then reused, so a task that projects
/// many small batches allocates once.
#[derive(Debug, Default)]
pub(crate) struct Scratch<F> {
    buf: Vec<F>,
    scale: Vec<F>,
    ones: Vec<F>,
    pe: Vec<F>,
    store: Vec<F>,
    fallback: Vec<usize>,
}

impl<F: Float> Scratch<F> {
    /// Makes room for `plan` (and its VJP's stored iterates when `vjp`).
    fn ensure(&mut self, plan: &Plan<F>, vjp: bool) -> Result<()> {
        // Room for the shift to an `ALIGN`ed start (see `aligned`).
        fn grow<F: Float>(v: &mut Vec<F>, what: &'static str, len: usize) -> Result<()> {
            reuse(v, what, len + ALIGN / std::mem::size_of::<F>())
        }
        let n = plan.n;
        grow(&mut self.buf, "sinkhorn scratch", n * n * BATCH)?;
        grow(
            &mut self.scale,
            "sinkhorn scratch",
            lanes::SCALE * n * BATCH,
        )?;
        if vjp {
            grow(&mut self.ones, "sinkhorn scratch", n * BATCH)?;
            grow(&mut self.pe, "sinkhorn scratch", n * n * BATCH)?;
            let len = crate::error::checked_size(
                "sinkhorn vjp scratch",
                &[n * n + 2 * n, 2 * plan.iters, BATCH],
            )?;
            debug_assert!(len >= GROUPS * plan.store_len());
            grow(
                &mut self.store,
                "sinkhorn vjp scratch",
                GROUPS * plan.store_len(),
            )?;
        }
        Ok(())
    }
}

/// Alignment of the kernel's buffers, in bytes: a cache line.
const ALIGN: usize = 64;

/// The part of `v` that starts on an [`ALIGN`]-byte boundary ([`Scratch::ensure`] leaves room
/// for the shift). A 32-byte vector store that straddles two cache lines cannot be forwarded
/// to the load that reads it back in the next normalisation step, which then waits for the
/// store to retire.
fn aligned<F: Float>(v: &mut [F]) -> &mut [F] {
    let off = v.as_ptr().align_offset(ALIGN);
    let off = if off < ALIGN / std::mem::size_of::<F>() {
        off
    } else {
        0
    };
    &mut v[off..]
}

/// An error of a one-matrix batch, reported as for the single matrix (without the batch axis).
fn single_matrix(e: Error) -> Error {
    match e {
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => Error::ShapeMismatch {
            what,
            expected: expected[1..].to_vec(),
            got: got[1..].to_vec(),
        },
        Error::NotSquare { what, got } => Error::NotSquare {
            what,
            got: got[1..].to_vec(),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The linear-domain kernel, wherever its accuracy check lets it answer, agrees with the
    /// log domain computed in `f64` (the fallback, an independent evaluation of the same map):
    /// for logits spread up to 120 (uniform, so a batch mixes both domains), in `f32`, in full
    /// groups (shuffled moves) and a partial one, with `eps = 0` (column steps unchecked) and
    /// `eps = 1e-6`. Entries are in `[0, 1]`; the
    /// bound is 16 ulp of 1 (1.9e-6) for 39 normalisations of a few roundings each on a
    /// contraction; measured 2 ulp.
    #[test]
    fn linear_domain_agrees_with_log_domain_where_it_answers() {
        let (n, b) = (4usize, 77usize);
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut worst = 0.0f64;
        for (sk, spread) in [
            SinkhornKnopp::default(),
            SinkhornKnopp::new(20, 1e-6).unwrap(),
        ]
        .into_iter()
        .flat_map(|sk| [0.5f32, 4.0, 12.0, 24.0, 32.0, 40.0, 60.0, 80.0, 120.0].map(|v| (sk, v)))
        {
            let l: Vec<f32> = (0..b * n * n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * spread
                })
                .collect();
            let mut out = vec![0.0f32; l.len()];
            let mut sc = Scratch::default();
            sk.project_slices(n, &l, &mut out, &mut sc).unwrap();
            // Measured: none up to a spread of 40, 2 / 7 / 8 of 77 at 60 / 80 / 120 (`eps = 0`),
            // none with `eps = 1e-6`.
            if spread <= 40.0 {
                assert!(sc.fallback.is_empty(), "spread {spread}: {:?}", sc.fallback);
            }
            let mut store = log::scratch(n, sk.iters, 1).unwrap();
            let mut want = vec![0.0f32; n * n];
            for m in 0..b {
                let r = m * n * n..(m + 1) * n * n;
                let eps = sk.eps as f32;
                log::project_one(n, sk.iters, eps, &l[r.clone()], &mut store, &mut want);
                for (g, w) in out[r].iter().zip(&want) {
                    let e = (*g as f64 - *w as f64).abs();
                    worst = worst.max(e);
                    assert!(
                        e <= 16.0 * f32::EPSILON as f64,
                        "spread {spread} m {m}: {g} vs {w}"
                    );
                }
            }
        }
        assert!(worst > 0.0, "the two evaluations round differently");
    }
}
