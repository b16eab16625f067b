//! Weights in safetensors files (feature `safetensors`, on by default): our own layout, and
//! DeepSeek-V4's `hc_*` hyper-connection weights.
//!
//! # Our layout
//!
//! A block saved under `prefix` is stored as tensors named after [`MhcParams`] / [`HcParams`]
//! fields, in the element type of the block (`F32` or `F64`), with its configuration in the
//! file's metadata, so that a load re-creates the block without guessing:
//!
//! | kind | tensors | metadata |
//! |---|---|---|
//! | mHC | `{prefix}.phi` `[n·C, n²+2n]`, `{prefix}.alpha` `[3]`, `{prefix}.bias` `[n²+2n]` | `{prefix}.config` = `kind=mhc;streams=…;dim=…;iters=…;eps=…;rms_eps=…;pre_eps=…` |
//! | HC | `{prefix}.theta_pre` `[C]`, `.theta_post` `[C]`, `.theta_res` `[n, C]`, `.alpha` `[3]`, `.b_pre` `[n]`, `.b_post` `[n]`, `.b_res` `[n, n]` | `{prefix}.config` = `kind=hc;streams=…;dim=…;rms_eps=…` |
//!
//! The metadata key `mhc.blocks` lists the prefixes in the order they were saved.
//!
//! # DeepSeek-V4's layout
//!
//! Per sublayer (`prefix` e.g. `layers.0.hc_attn`), rows ordered pre (`n`), post (`n`), comb
//! (`n²`), where `comb[m][k]` is the weight of source stream `m` in destination stream `k`:
//!
//! | V4 tensor | shape | becomes |
//! |---|---|---|
//! | `{prefix}_fn` | `[n(n+2), n·C]` | `phi = fnᵀ`, the comb block's `n×n` index transposed: column `2n + i·n + j` of `phi` is row `2n + j·n + i` of `fn` |
//! | `{prefix}_base` | `[n(n+2)]` | `bias`, comb block transposed likewise |
//! | `{prefix}_scale` | `[3]` | `alpha` (pre, post, comb) |
//! | `hc_head_fn`, `hc_head_base`, `hc_head_scale` | `[n, n·C]`, `[n]`, `[1]` | a [`LearnedCollapse`] |
//!
//! V4 computes the Sinkhorn projection with `eps = 1e-6` and adds `1e-6` to `H_pre`; the loader
//! sets `sinkhorn.eps = pre_eps = rms_eps = 1e-6` and 20 iterations, so a loaded layer
//! reproduces their computation.
//!
//! DeepSeek-V4.1 keeps these tensors per half layer (`{prefix}.{i}.hc_attn_*`,
//! `{prefix}.{i}.hc_ffn_*`), runs them as one chain under the single-pass schedule and uses
//! `rms_eps = 1e-20`: [`load_deepseek_v41`] returns that chain as an [`MhcStack`]. `f32`, `f64`, `bf16` and `f16` tensors load (converted).
//!
//! Loading reads the whole file, lets `safetensors` validate the header and every offset
//! against the file's length, and checks every shape before converting: no allocation is sized
//! by an unchecked header value, and no input panics.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::streams::LearnedCollapse;
use crate::{
    Float, HcBlock, HcConfig, HcParams, MhcBlock, MhcConfig, MhcParams, MhcStack, Schedule,
    SinkhornKnopp,
};

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn format_err(message: impl Into<String>) -> Error {
    Error::Format {
        message: message.into(),
    }
}

/// A file read into memory and parsed.
struct File {
    bytes: Vec<u8>,
}

impl File {
    fn read(path: &Path) -> Result<File> {
        Ok(File {
            bytes: std::fs::read(path).map_err(|e| io_err(path, e))?,
        })
    }

    fn parse(&self) -> Result<(SafeTensors<'_>, HashMap<String, String>)> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.bytes).map_err(|e| format_err(format!("{e:?}")))?;
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| format_err(format!("{e:?}")))?;
        Ok((st, meta.metadata().clone().unwrap_or_default()))
    }
}

/// The tensor `name` converted to `F`, checked to have `shape`.
fn tensor<F: Float>(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<F>> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::MissingTensor { name: name.into() })?;
    if t.shape() != shape {
        return Err(Error::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            got: t.shape().to_vec(),
        });
    }
    convert(name, &t)
}

/// The shape of tensor `name`.
fn shape_of(st: &SafeTensors<'_>, name: &str) -> Result<Vec<usize>> {
    Ok(st
        .tensor(name)
        .map_err(|_| Error::MissingTensor { name: name.into() })?
        .shape()
        .to_vec())
}

/// Little-endian data of a validated view (its length is `elements × size`) converted to `F`.
fn convert<F: Float>(name: &str, t: &TensorView<'_>) -> Result<Vec<F>> {
    let d = t.data();
    let v: Vec<F> = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| F::from_f64(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| {
                F::from_f64(f64::from_le_bytes([
                    b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                ]))
            })
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| F::from_f64(half::bf16::from_le_bytes([b[0], b[1]]).to_f64()))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| F::from_f64(half::f16::from_le_bytes([b[0], b[1]]).to_f64()))
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    };
    if let Some(p) = v.iter().position(|x| !x.is_finite()) {
        return Err(format_err(format!(
            "tensor `{name}` holds a non-finite value at flat index {p}"
        )));
    }
    Ok(v)
}

/// An owned tensor to serialise.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn owned<F: Float>(shape: Vec<usize>, values: impl Iterator<Item = F>) -> Owned {
    let (dtype, data) = if F::NAME == "f32" {
        (
            Dtype::F32,
            values
                .flat_map(|v| (v.as_f64() as f32).to_le_bytes())
                .collect(),
        )
    } else {
        (
            Dtype::F64,
            values.flat_map(|v| v.as_f64().to_le_bytes()).collect(),
        )
    };
    Owned { dtype, shape, data }
}

/// Parses `k=v;k=v` metadata.
fn parse_config(key: &str, text: &str) -> Result<HashMap<String, String>> {
    text.split(';')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format_err(format!("metadata `{key}`: `{kv}` is not key=value")))
        })
        .collect()
}

fn field<T: std::str::FromStr>(cfg: &HashMap<String, String>, key: &str, name: &str) -> Result<T> {
    cfg.get(name)
        .ok_or_else(|| format_err(format!("metadata `{key}` has no `{name}`")))?
        .parse()
        .map_err(|_| format_err(format!("metadata `{key}`: `{name}` is not a number")))
}

/// One block to save, with its prefix.
#[derive(Clone, Copy, Debug)]
pub enum Saved<'a, F: Float> {
    /// An mHC block.
    Mhc(&'a str, &'a MhcBlock<F>),
    /// An HC block.
    Hc(&'a str, &'a HcBlock<F>),
}

/// Saves blocks (a whole stack, or one) to a safetensors file in our layout (see the module
/// docs), in the blocks' element type.
///
/// # Errors
///
/// [`Error::Format`] for an empty or repeated prefix (or one holding `;` or `,`);
/// [`Error::Io`] if the file cannot be written.
///
/// # Examples
///
/// ```
/// use mhc::io::{Saved, load_mhc, save};
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// let block = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(4, 8), &mut StdRng::seed_from_u64(0))?;
/// let path = std::env::temp_dir().join("mhc-doc-save.safetensors");
/// save(&path, &[Saved::Mhc("layers.0", &block)])?;
/// let back = load_mhc::<f32>(&path, "layers.0")?;
/// assert_eq!(back.params(), block.params());
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn save<F: Float>(path: impl AsRef<Path>, blocks: &[Saved<'_, F>]) -> Result<()> {
    save_with(path.as_ref(), blocks, &[])
}

/// [`save`] with extra metadata entries.
fn save_with<F: Float>(path: &Path, blocks: &[Saved<'_, F>], extra: &[(&str, &str)]) -> Result<()> {
    let mut tensors: Vec<(String, Owned)> = Vec::new();
    let mut meta = HashMap::new();
    let mut order = Vec::new();
    for b in blocks {
        let prefix = match b {
            Saved::Mhc(p, _) | Saved::Hc(p, _) => *p,
        };
        if prefix.is_empty() || prefix.contains([';', ',']) || order.contains(&prefix) {
            return Err(format_err(format!(
                "prefix `{prefix}` is empty, repeated or holds `;`/`,`"
            )));
        }
        order.push(prefix);
        let mut put = |name: &str, shape: Vec<usize>, v: Vec<F>| {
            tensors.push((format!("{prefix}.{name}"), owned(shape, v.into_iter())))
        };
        match b {
            Saved::Mhc(_, blk) => {
                let (c, p) = (blk.config(), blk.params());
                put(
                    "phi",
                    p.phi.shape().to_vec(),
                    p.phi.iter().copied().collect(),
                );
                put("alpha", vec![3], p.alpha.to_vec());
                put("bias", p.bias.shape().to_vec(), p.bias.to_vec());
                meta.insert(
                    format!("{prefix}.config"),
                    format!(
                        "kind=mhc;streams={};dim={};iters={};eps={:?};rms_eps={:?};pre_eps={:?}",
                        c.streams, c.dim, c.sinkhorn.iters, c.sinkhorn.eps, c.rms_eps, c.pre_eps
                    ),
                );
            }
            Saved::Hc(_, blk) => {
                let (c, p) = (blk.config(), blk.params());
                put(
                    "theta_pre",
                    p.theta_pre.shape().to_vec(),
                    p.theta_pre.to_vec(),
                );
                put(
                    "theta_post",
                    p.theta_post.shape().to_vec(),
                    p.theta_post.to_vec(),
                );
                put(
                    "theta_res",
                    p.theta_res.shape().to_vec(),
                    p.theta_res.iter().copied().collect(),
                );
                put("alpha", vec![3], p.alpha.to_vec());
                put("b_pre", p.b_pre.shape().to_vec(), p.b_pre.to_vec());
                put("b_post", p.b_post.shape().to_vec(), p.b_post.to_vec());
                put(
                    "b_res",
                    p.b_res.shape().to_vec(),
                    p.b_res.iter().copied().collect(),
                );
                meta.insert(
                    format!("{prefix}.config"),
                    format!(
                        "kind=hc;streams={};dim={};rms_eps={:?};layer={}",
                        c.streams, c.dim, c.rms_eps, c.layer
                    ),
                );
            }
        }
    }
    meta.insert("mhc.blocks".into(), order.join(","));
    for (k, v) in extra {
        meta.insert((*k).into(), (*v).into());
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| format_err(format!("{e:?}")))?;
    std::fs::write(path, bytes).map_err(|e| io_err(path, e))
}

fn config_of(
    meta: &HashMap<String, String>,
    prefix: &str,
    kind: &str,
) -> Result<HashMap<String, String>> {
    let key = format!("{prefix}.config");
    let text = meta
        .get(&key)
        .ok_or_else(|| format_err(format!("metadata `{key}` is missing")))?;
    let cfg = parse_config(&key, text)?;
    if cfg.get("kind").map(String::as_str) != Some(kind) {
        return Err(format_err(format!("metadata `{key}` is not kind={kind}")));
    }
    Ok(cfg)
}

fn mhc_from(
    st: &SafeTensors<'_>,
    meta: &HashMap<String, String>,
    prefix: &str,
) -> Result<MhcBlock<f64>> {
    let key = format!("{prefix}.config");
    let cfg = config_of(meta, prefix, "mhc")?;
    let mut config = MhcConfig::new(field(&cfg, &key, "streams")?, field(&cfg, &key, "dim")?);
    config.sinkhorn = SinkhornKnopp {
        iters: field(&cfg, &key, "iters")?,
        eps: field(&cfg, &key, "eps")?,
    };
    config.rms_eps = field(&cfg, &key, "rms_eps")?;
    config.pre_eps = field(&cfg, &key, "pre_eps")?;
    config.validate()?;
    let (n, c, m) = (config.streams, config.dim, config.mapping_width());
    let phi = tensor::<f64>(st, &format!("{prefix}.phi"), &[n * c, m])?;
    let alpha = tensor::<f64>(st, &format!("{prefix}.alpha"), &[3])?;
    let bias = tensor::<f64>(st, &format!("{prefix}.bias"), &[m])?;
    MhcBlock::from_params(
        config,
        MhcParams {
            phi: Array2::from_shape_vec((n * c, m), phi).expect("checked shape"),
            alpha: [alpha[0], alpha[1], alpha[2]],
            bias: Array1::from(bias),
        },
    )
}

fn cast_mhc<F: Float>(b: MhcBlock<f64>) -> Result<MhcBlock<F>> {
    let p = b.params();
    MhcBlock::from_params(
        *b.config(),
        MhcParams {
            phi: p.phi.mapv(F::from_f64),
            alpha: p.alpha.map(F::from_f64),
            bias: p.bias.mapv(F::from_f64),
        },
    )
}

/// Loads the mHC block saved under `prefix` by [`save`], converted to `F`.
///
/// # Errors
///
/// [`Error::Io`]; [`Error::Format`] for a malformed file or configuration metadata;
/// [`Error::MissingTensor`], [`Error::TensorShape`], [`Error::UnsupportedDtype`] naming the
/// tensor; the configuration and parameter errors of [`MhcBlock::from_params`].
///
/// # Examples
///
/// See [`save`].
pub fn load_mhc<F: Float>(path: impl AsRef<Path>, prefix: &str) -> Result<MhcBlock<F>> {
    let file = File::read(path.as_ref())?;
    let (st, meta) = file.parse()?;
    cast_mhc(mhc_from(&st, &meta, prefix)?)
}

/// Loads the HC block saved under `prefix` by [`save`], converted to `F`.
///
/// # Errors
///
/// As [`load_mhc`].
///
/// # Examples
///
/// ```
/// use mhc::io::{Saved, load_hc, save};
/// let block = mhc::HcBlock::<f64>::new(mhc::HcConfig::new(2, 4))?;
/// let path = std::env::temp_dir().join("mhc-doc-save-hc.safetensors");
/// save(&path, &[Saved::Hc("h", &block)])?;
/// assert_eq!(load_hc::<f64>(&path, "h")?.params(), block.params());
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn load_hc<F: Float>(path: impl AsRef<Path>, prefix: &str) -> Result<HcBlock<F>> {
    let file = File::read(path.as_ref())?;
    let (st, meta) = file.parse()?;
    let key = format!("{prefix}.config");
    let cfg = config_of(&meta, prefix, "hc")?;
    let mut config = HcConfig::new(field(&cfg, &key, "streams")?, field(&cfg, &key, "dim")?);
    config.rms_eps = field(&cfg, &key, "rms_eps")?;
    config.layer = field(&cfg, &key, "layer")?;
    config.validate()?;
    let (n, c) = (config.streams, config.dim);
    let t = |name: &str, shape: &[usize]| tensor::<F>(&st, &format!("{prefix}.{name}"), shape);
    let alpha = t("alpha", &[3])?;
    let params = HcParams {
        theta_pre: Array1::from(t("theta_pre", &[c])?),
        theta_post: Array1::from(t("theta_post", &[c])?),
        theta_res: Array2::from_shape_vec((n, c), t("theta_res", &[n, c])?).expect("checked shape"),
        alpha: [alpha[0], alpha[1], alpha[2]],
        b_pre: Array1::from(t("b_pre", &[n])?),
        b_post: Array1::from(t("b_post", &[n])?),
        b_res: Array2::from_shape_vec((n, n), t("b_res", &[n, n])?).expect("checked shape"),
    };
    HcBlock::from_params(config, params)
}

/// Loads every mHC block of a file saved by [`save`], in the saved order, with its prefix.
///
/// # Errors
///
/// As [`load_mhc`]; [`Error::Format`] if the file lists no blocks or holds an HC block.
///
/// # Examples
///
/// ```
/// use mhc::io::{Saved, load_mhc_stack, save};
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// let mut rng = StdRng::seed_from_u64(0);
/// let a = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(2, 4), &mut rng)?;
/// let b = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(2, 4), &mut rng)?;
/// let path = std::env::temp_dir().join("mhc-doc-stack.safetensors");
/// save(&path, &[Saved::Mhc("l0", &a), Saved::Mhc("l1", &b)])?;
/// let stack = load_mhc_stack::<f32>(&path)?;
/// assert_eq!(stack[1].0, "l1");
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn load_mhc_stack<F: Float>(path: impl AsRef<Path>) -> Result<Vec<(String, MhcBlock<F>)>> {
    let file = File::read(path.as_ref())?;
    let (st, meta) = file.parse()?;
    let order = meta
        .get("mhc.blocks")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format_err("metadata `mhc.blocks` is missing"))?;
    order
        .split(',')
        .map(|p| Ok((p.to_string(), cast_mhc(mhc_from(&st, &meta, p)?)?)))
        .collect()
}

/// `n` from `n(n+2)` mapping rows, if it is of that form.
fn streams_from_rows(rows: usize) -> Option<usize> {
    let n = ((rows as f64 + 1.0).sqrt() - 1.0).round() as usize;
    (n > 0 && n.checked_mul(n + 2) == Some(rows)).then_some(n)
}

/// DeepSeek-V4's `{prefix}_fn` (`[rows, n·C]`, `n = streams(rows)`, `form` describing that
/// shape for the error message), `{prefix}_base` (`[rows]`) and `{prefix}_scale`
/// (`[scales]`).
fn v4_tensors<F: Float>(
    st: &SafeTensors<'_>,
    prefix: &str,
    form: &str,
    streams: impl Fn(usize) -> Option<usize>,
    scales: usize,
) -> Result<V4Tensors<F>> {
    let fn_name = format!("{prefix}_fn");
    let shape = shape_of(st, &fn_name)?;
    let bad_shape = || {
        format_err(format!(
            "tensor `{fn_name}` has shape {shape:?}: expected {form} for integers n, C >= 1"
        ))
    };
    let [rows, nc] = shape[..] else {
        return Err(bad_shape());
    };
    let n = streams(rows).ok_or_else(bad_shape)?;
    if nc == 0 || nc % n != 0 {
        return Err(bad_shape());
    }
    let w = tensor::<F>(st, &fn_name, &[rows, nc])?;
    let base = tensor::<F>(st, &format!("{prefix}_base"), &[rows])?;
    let scale = tensor::<F>(st, &format!("{prefix}_scale"), &[scales])?;
    Ok(V4Tensors {
        n,
        nc,
        w,
        base,
        scale,
    })
}

/// What [`v4_tensors`] reads.
struct V4Tensors<F> {
    n: usize,
    nc: usize,
    w: Vec<F>,
    base: Vec<F>,
    scale: Vec<F>,
}

/// Loads one DeepSeek-V4 hyper-connection layer (tensors `{prefix}_fn`, `{prefix}_base`,
/// `{prefix}_scale`, e.g. `prefix = "layers.0.hc_attn"`) as an [`MhcBlock`] that reproduces
/// V4's computation: `n` and `C` from the shapes, the comb block transposed into `H_res`
/// (see the module docs), Sinkhorn `eps = 1e-6`, 20 iterations, `pre_eps = rms_eps = 1e-6`.
///
/// # Errors
///
/// [`Error::Io`]; [`Error::Format`] for a malformed file, or when `{prefix}_fn` is not
/// `[n(n+2), n·C]` for integers `n, C ≥ 1` (the message names the tensor);
/// [`Error::MissingTensor`]; [`Error::TensorShape`] when `_base` / `_scale` do not match `_fn`;
/// [`Error::UnsupportedDtype`].
///
/// # Examples
///
/// ```no_run
/// let block = mhc::io::load_deepseek_v4::<f32>("model.safetensors", "layers.0.hc_attn")?;
/// assert_eq!(block.config().sinkhorn.eps, 1e-6);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn load_deepseek_v4<F: Float>(path: impl AsRef<Path>, prefix: &str) -> Result<MhcBlock<F>> {
    let file = File::read(path.as_ref())?;
    let (st, _) = file.parse()?;
    v4_block(&st, prefix, 1e-6)
}

/// One V4-layout layer of a parsed file as a block (V4's and V4.1's constants but `rms_eps`).
fn v4_block<F: Float>(st: &SafeTensors<'_>, prefix: &str, rms_eps: f64) -> Result<MhcBlock<F>> {
    let V4Tensors {
        n,
        nc,
        w,
        base,
        scale,
    } = v4_tensors::<F>(st, prefix, "[n(n+2), n·C]", streams_from_rows, 3)?;
    let (m, c) = (n * (n + 2), nc / n);
    // Our column `col` is V4's row `v4_row(col)`: pre and post in place, comb transposed.
    let v4_row = |col: usize| {
        if col < 2 * n {
            col
        } else {
            2 * n + ((col - 2 * n) % n) * n + (col - 2 * n) / n
        }
    };
    let phi = Array2::from_shape_fn((nc, m), |(k, col)| w[v4_row(col) * nc + k]);
    let bias = Array1::from_shape_fn(m, |col| base[v4_row(col)]);
    let mut config = MhcConfig::new(n, c);
    config.sinkhorn = SinkhornKnopp {
        iters: 20,
        eps: 1e-6,
    };
    config.pre_eps = 1e-6;
    config.rms_eps = rms_eps;
    MhcBlock::from_params(
        config,
        MhcParams {
            phi,
            alpha: [scale[0], scale[1], scale[2]],
            bias,
        },
    )
}

/// Loads DeepSeek-V4.1's hyper-connections as a chain under [`Schedule::Shifted`] (SPEC §8):
/// the layers `{prefix}.{i}.hc_attn_{fn,base,scale}` then `{prefix}.{i}.hc_ffn_{fn,base,scale}`
/// for `i = 0, 1, …` while present, chained attn₀, ffn₀, attn₁, …, each converted as
/// [`load_deepseek_v4`] does, with V4.1's constants: `rms_eps = 1e-20`, Sinkhorn
/// `eps = pre_eps = 1e-6`, 20 iterations. V4.1 has no learned head: the final hidden state is
/// the read-out with the chain's last `H_pre`.
///
/// # Errors
///
/// As [`load_deepseek_v4`], naming the tensor; [`Error::MissingTensor`] when layer 0 is
/// missing or a layer has one half only (naming the missing `_fn`); [`Error::Format`] when a
/// layer index beyond the first missing one is present (a gap); [`Error::BlockMismatch`]
/// when layers differ in `n` or `C`.
///
/// # Examples
///
/// ```no_run
/// let stack = mhc::io::load_deepseek_v41::<f32>("model.safetensors", "layers")?;
/// assert_eq!(stack.schedule(), mhc::Schedule::Shifted);
/// assert_eq!(stack.blocks()[0].config().rms_eps, 1e-20);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn load_deepseek_v41<F: Float>(path: impl AsRef<Path>, prefix: &str) -> Result<MhcStack<F>> {
    let file = File::read(path.as_ref())?;
    let (st, _) = file.parse()?;
    let names: std::collections::HashSet<String> =
        st.names().into_iter().map(String::from).collect();
    let half = |i: usize, kind: &str| format!("{prefix}.{i}.hc_{kind}");
    let mut blocks = Vec::new();
    let mut i = 0;
    loop {
        let (attn, ffn) = (half(i, "attn"), half(i, "ffn"));
        let has = |p: &str| names.contains(&format!("{p}_fn"));
        match (has(&attn), has(&ffn)) {
            (true, true) => {
                blocks.push(v4_block(&st, &attn, 1e-20)?);
                blocks.push(v4_block(&st, &ffn, 1e-20)?);
            }
            (false, false) if i > 0 => break,
            (_, true) | (false, false) => {
                return Err(Error::MissingTensor {
                    name: format!("{attn}_fn"),
                });
            }
            (true, false) => {
                return Err(Error::MissingTensor {
                    name: format!("{ffn}_fn"),
                });
            }
        }
        i += 1;
    }
    // A layer after the first missing index: a gap in the chain.
    let dot = format!("{prefix}.");
    if let Some(name) = names.iter().find(|name| {
        name.strip_prefix(&dot)
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(idx, tail)| {
                tail.starts_with("hc_") && idx.parse::<usize>().is_ok_and(|j| j >= i)
            })
    }) {
        return Err(format_err(format!(
            "tensor `{name}` follows a gap: layer {i} of `{prefix}` is missing"
        )));
    }
    MhcStack::new(blocks, Schedule::Shifted)
}

/// Saves a whole stack in our layout (blocks under `blocks.0`, `blocks.1`, …, the schedule in
/// the metadata key `mhc.schedule`), for [`load_stack`].
///
/// # Errors
///
/// [`Error::Io`] if the file cannot be written.
///
/// # Examples
///
/// ```
/// use mhc::rand::{SeedableRng, rngs::StdRng};
/// use mhc::{MhcBlock, MhcConfig, MhcStack, Schedule};
/// let mut rng = StdRng::seed_from_u64(0);
/// let blocks = (0..3).map(|_| MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut rng)).collect::<Result<_, _>>()?;
/// let stack = MhcStack::new(blocks, Schedule::Shifted)?;
/// let path = std::env::temp_dir().join("mhc-doc-save-stack.safetensors");
/// mhc::io::save_stack(&path, &stack)?;
/// let back = mhc::io::load_stack::<f32>(&path)?;
/// assert_eq!(back.schedule(), Schedule::Shifted);
/// assert_eq!(back.blocks()[2].params(), stack.blocks()[2].params());
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn save_stack<F: Float>(path: impl AsRef<Path>, stack: &MhcStack<F>) -> Result<()> {
    let names: Vec<String> = (0..stack.blocks().len())
        .map(|i| format!("blocks.{i}"))
        .collect();
    let saved: Vec<Saved<'_, F>> = names
        .iter()
        .zip(stack.blocks())
        .map(|(p, b)| Saved::Mhc(p, b))
        .collect();
    let schedule = match stack.schedule() {
        Schedule::Shifted => "shifted",
        _ => "current",
    };
    save_with(path.as_ref(), &saved, &[("mhc.schedule", schedule)])
}

/// Loads a stack saved by [`save_stack`], converted to `F`.
///
/// # Errors
///
/// As [`load_mhc_stack`]; [`Error::Format`] for a missing or unknown `mhc.schedule`; the
/// errors of [`MhcStack::new`].
///
/// # Examples
///
/// See [`save_stack`].
pub fn load_stack<F: Float>(path: impl AsRef<Path>) -> Result<MhcStack<F>> {
    let file = File::read(path.as_ref())?;
    let (_, meta) = file.parse()?;
    let schedule = match meta.get("mhc.schedule").map(String::as_str) {
        Some("shifted") => Schedule::Shifted,
        Some("current") => Schedule::Current,
        other => {
            return Err(format_err(format!(
                "metadata `mhc.schedule` is {other:?}, expected \"current\" or \"shifted\""
            )));
        }
    };
    let blocks = load_mhc_stack::<F>(path)?
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    MhcStack::new(blocks, schedule)
}

/// Loads DeepSeek-V4's final collapse (`{prefix}_fn` `[n, n·C]`, `{prefix}_base` `[n]`,
/// `{prefix}_scale` `[1]`, e.g. `prefix = "hc_head"`) as a [`LearnedCollapse`] with
/// `rms_eps = pre_eps = 1e-6`.
///
/// # Errors
///
/// As [`load_deepseek_v4`].
///
/// # Examples
///
/// ```no_run
/// let head = mhc::io::load_deepseek_v4_head::<f32>("model.safetensors", "hc_head")?;
/// let out = head.collapse(ndarray::Array3::zeros((1, 4, 7168)).view())?;
/// assert_eq!(out.shape(), &[1, 7168]);
/// # Ok::<(), mhc::Error>(())
/// ```
pub fn load_deepseek_v4_head<F: Float>(
    path: impl AsRef<Path>,
    prefix: &str,
) -> Result<LearnedCollapse<F>> {
    let file = File::read(path.as_ref())?;
    let (st, _) = file.parse()?;
    let V4Tensors {
        n,
        nc,
        w,
        base,
        scale,
    } = v4_tensors::<F>(&st, prefix, "[n, n·C]", |n| (n > 0).then_some(n), 1)?;
    let phi = Array2::from_shape_fn((nc, n), |(k, j)| w[j * nc + k]);
    LearnedCollapse::new(n, nc / n, phi, scale[0], Array1::from(base), 1e-6, 1e-6)
}
