//! The crate's single error type.

use std::fmt;

use crate::float::Float;

/// Everything that can go wrong in `mhc`: bad shapes, bad configuration, non-finite data.
///
/// Every fallible function in the crate returns `Result<_, mhc::Error>`; none of them panics on
/// user input. Variants are structured (what was checked, what was expected, what was found) so
/// that callers can match on them; the [`Display`](fmt::Display) text is written for a person.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An array's shape is not the one required.
    ShapeMismatch {
        /// Which argument (e.g. `"upstream"`, `"x"`, `"phi"`).
        what: &'static str,
        /// The required shape, with the dimensions the call fixes.
        expected: Vec<usize>,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// A matrix that must be square is not.
    NotSquare {
        /// Which argument.
        what: &'static str,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// A matrix or dimension that must be non-empty is empty (e.g. `0×0` logits).
    Empty {
        /// Which argument.
        what: &'static str,
    },
    /// A size is zero where it must be positive (e.g. `streams`, `dim`).
    InvalidDimension {
        /// Which field.
        what: &'static str,
        /// The value that was passed.
        got: usize,
    },
    /// The Sinkhorn-Knopp iteration count is zero.
    InvalidIterations {
        /// The value that was passed.
        got: usize,
    },
    /// An epsilon is negative, non-finite, or (where it must be positive) zero.
    InvalidEpsilon {
        /// Which field (`"eps"`, `"rms_eps"`, `"pre_eps"`).
        what: &'static str,
        /// What the field must satisfy, e.g. `"finite and >= 0"`.
        expected: &'static str,
        /// The value that was passed.
        got: f64,
    },
    /// Input data holds a NaN or an infinity.
    NonFinite {
        /// Which argument (e.g. `"logits"`, `"x"`, `"sublayer output"`).
        what: &'static str,
        /// The batch entry or token that holds it (0 for a single matrix).
        index: usize,
    },
    /// A requested size does not fit in memory addressing (`usize` overflow).
    SizeOverflow {
        /// What was being sized.
        what: &'static str,
    },
    /// A file could not be read or written.
    Io {
        /// The file.
        path: String,
        /// The operating system's message.
        message: String,
    },
    /// A weights file is malformed (bad header, bad metadata, truncated data).
    Format {
        /// What is wrong, naming the tensor or metadata key where there is one.
        message: String,
    },
    /// A tensor a loader needs is not in the file.
    MissingTensor {
        /// The tensor's full name.
        name: String,
    },
    /// A tensor in a file has another shape than the one required.
    TensorShape {
        /// The tensor's full name.
        name: String,
        /// The required shape.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor in a file has an element type the loader does not convert.
    UnsupportedDtype {
        /// The tensor's full name.
        name: String,
        /// The element type in the file.
        dtype: String,
    },
    /// A block of a chain has another number of streams or channels than the first block
    /// ([`MhcStack::new`](crate::MhcStack::new)).
    BlockMismatch {
        /// The block's position in the chain.
        index: usize,
        /// `[n, C]` of the first block.
        expected: [usize; 2],
        /// `[n, C]` of this block.
        got: [usize; 2],
    },
    /// An error in one block of a chain ([`MhcStack`](crate::MhcStack)): which block, and what
    /// went wrong there.
    InBlock {
        /// The block's position in the chain (0 first).
        index: usize,
        /// The block's error.
        source: Box<Error>,
    },
    /// A buffer could not be allocated.
    AllocationFailed {
        /// What was being allocated.
        what: &'static str,
        /// How many bytes were asked for.
        bytes: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch {
                what,
                expected,
                got,
            } => {
                write!(f, "`{what}` has shape {got:?}, expected {expected:?}")
            }
            Error::NotSquare { what, got } => {
                write!(f, "`{what}` must be square (n x n), got shape {got:?}")
            }
            Error::Empty { what } => write!(f, "`{what}` must not be empty"),
            Error::InvalidDimension { what, got } => {
                write!(f, "`{what}` must be at least 1, got {got}")
            }
            Error::InvalidIterations { got } => {
                write!(f, "Sinkhorn-Knopp `iters` must be at least 1, got {got}")
            }
            Error::InvalidEpsilon {
                what,
                expected,
                got,
            } => {
                write!(f, "`{what}` must be {expected}, got {got}")
            }
            Error::NonFinite { what, index } => {
                write!(
                    f,
                    "`{what}` holds a non-finite value (NaN or infinity) at entry {index}"
                )
            }
            Error::SizeOverflow { what } => {
                write!(f, "the size of `{what}` overflows usize")
            }
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::Format { message } => write!(f, "malformed weights file: {message}"),
            Error::MissingTensor { name } => write!(f, "tensor `{name}` is not in the file"),
            Error::TensorShape {
                name,
                expected,
                got,
            } => {
                write!(
                    f,
                    "tensor `{name}` has shape {got:?}, expected {expected:?}"
                )
            }
            Error::UnsupportedDtype { name, dtype } => write!(
                f,
                "tensor `{name}` has element type {dtype}; f32, f64, bf16 and f16 are supported"
            ),
            Error::AllocationFailed { what, bytes } => {
                write!(f, "could not allocate {bytes} bytes for `{what}`")
            }
            Error::BlockMismatch {
                index,
                expected,
                got,
            } => write!(
                f,
                "block {index} has (streams, dim) = {got:?}, expected {expected:?} like block 0"
            ),
            Error::InBlock { index, source } => write!(f, "block {index}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::InBlock { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl Error {
    /// Wraps the error of block `index` of a chain (an error already wrapped stays as it is).
    pub(crate) fn in_block(index: usize) -> impl FnOnce(Error) -> Error {
        move |e| match e {
            e @ Error::InBlock { .. } => e,
            e => Error::InBlock {
                index,
                source: Box::new(e),
            },
        }
    }
}

/// `Result<T, mhc::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// `a * b * ...` with overflow reported as [`Error::SizeOverflow`].
pub(crate) fn checked_size(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(Error::SizeOverflow { what })
}

/// A zeroed buffer of `len` elements, with allocation failure reported as an error, not an abort.
pub(crate) fn try_zeroed<F: Copy + Default>(what: &'static str, len: usize) -> Result<Vec<F>> {
    // Ask first, fallibly; then allocate with `vec!`, which for a zero float takes zeroed
    // memory from the allocator (`calloc`: fresh pages are already zero) instead of writing
    // every element, one pass over the buffer fewer before the kernels fill it.
    let mut probe = Vec::<F>::new();
    probe
        .try_reserve_exact(len)
        .map_err(|_| Error::AllocationFailed {
            what,
            bytes: len.saturating_mul(std::mem::size_of::<F>()),
        })?;
    drop(probe);
    Ok(vec![F::default(); len])
}

/// Makes `v` hold `len` elements, allocating (zeroed, fallibly) only when its capacity is too
/// small. The kernels overwrite what they use, so old contents may remain.
pub(crate) fn reuse<F: Copy + Default>(
    v: &mut Vec<F>,
    what: &'static str,
    len: usize,
) -> Result<()> {
    if v.capacity() >= len {
        v.resize(len, F::default());
    } else {
        *v = try_zeroed(what, len)?;
    }
    Ok(())
}

/// [`Error::ShapeMismatch`] unless `got == expected`.
pub(crate) fn check_same(what: &'static str, expected: &[usize], got: &[usize]) -> Result<()> {
    if expected != got {
        return Err(Error::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// [`Error::NonFinite`] naming the first `entry_len`-sized entry of `data` holding a NaN or
/// infinity.
pub(crate) fn check_finite<F: Float>(
    what: &'static str,
    entry_len: usize,
    data: &[F],
) -> Result<()> {
    if crate::reduce::all_finite(data) {
        return Ok(());
    }
    match data.iter().position(|v| !v.is_finite()) {
        Some(p) => Err(Error::NonFinite {
            what,
            index: p / entry_len.max(1),
        }),
        None => Ok(()),
    }
}

/// [`Error::InvalidEpsilon`] unless `v` is finite and positive.
pub(crate) fn positive(what: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidEpsilon {
            what,
            expected: "finite and > 0",
            got: v,
        })
    }
}

/// [`Error::InvalidEpsilon`] unless `v` is finite and non-negative.
pub(crate) fn non_negative(what: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidEpsilon {
            what,
            expected: "finite and >= 0",
            got: v,
        })
    }
}
