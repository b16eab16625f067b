//! Training a deep stack with a plain residual, HC and mHC connections, side by side.
//!
//! Run: `cargo run --release --example train` (flags: `--layers 32 --dim 32 --tokens 256
//! --steps 300 --lrs 0.001,0.003,0.01,0.03,0.1 --clip 0 --threads 2 --out target/plots`;
//! `--clip N` clips the global gradient norm at `N`, 0 turns clipping off; `--variants
//! residual,hc,mhc,mhc-id,mhc-shifted` picks the variants, `mhc-id` being mHC with the
//! identity-like bias and `mhc-shifted` an `MhcStack` under DeepSeek-V4.1's single-pass schedule,
//! read out at the top by the last block's `H_pre` instead of the mean of the streams)
//!
//! The task is generated here: regression onto a fixed random deep teacher network
//! (`y* = teacher(h)`, a 4-layer tanh MLP). The student is `expand → L blocks (MLP C → 4C → C
//! sublayers) → collapse (mean) → linear head`, with `n = 4` streams for HC and mHC and a plain
//! residual stack for the baseline, trained with Adam on fresh batches from the same seeds. For
//! each learning rate and variant it reports the loss curve, the gradient norm over steps, the
//! composite gains of the trained `H_res` and the final loss; plots go to `--out`.

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use mhc::gain::{composite_gains, mean_res};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{
    Collapse, HcBlock, HcConfig, HcParams, MhcBlock, MhcConfig, MhcParams, MhcStack, Mlp,
    ResidualBlock, Schedule, StackTape, collapse, expand,
};
use ndarray::{Array2, Array3, ArrayView2, Axis};
use plotters::prelude::*;
use rand_distr::{Distribution, Normal};
use std::cell::RefCell;

/// Training of deep residual / HC / mHC stacks over a grid of learning rates (see the module
/// docs).
#[derive(Parser)]
struct Args {
    /// Blocks in the stack.
    #[arg(long, default_value_t = 32)]
    layers: usize,
    /// Stream width C.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// Tokens a batch.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Optimiser steps a run.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Learning rates, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1e-3,3e-3,1e-2,3e-2,1e-1"
    )]
    lrs: Vec<f64>,
    /// Variants, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "residual,hc,mhc")]
    variants: Vec<String>,
    /// Gradient clipping norm (0: off).
    #[arg(long, default_value_t = 0.0)]
    clip: f32,
    /// Runs in parallel.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Folder of the plots.
    #[arg(long, default_value = "target/plots")]
    out: String,
}

const STREAMS: usize = 4;

/// The residual connection of each layer.
enum Mix {
    Residual,
    Hc(Box<HcBlock<f32>>),
    Mhc(Box<MhcBlock<f32>>),
}

/// What the backward pass needs: per layer the block input and the sublayer output, or for a
/// shifted stack its tape, `x_L` and the last `H_pre`.
enum Saved {
    Layers(Vec<(Array3<f32>, Array2<f32>)>),
    Stack(Box<StackTape<f32>>, Array3<f32>, Array2<f32>),
}

struct Net {
    mlps: Vec<Mlp<f32>>,
    mix: Vec<Mix>,
    /// The `mhc-shifted` variant's chain (then `mix` is empty).
    stack: Option<MhcStack<f32>>,
    head: Array2<f32>,
}

/// Gradients in the order of [`Net::tensors`].
type Grads = Vec<Vec<f32>>;

impl Net {
    fn new(kind: &str, layers: usize, c: usize, rng: &mut StdRng) -> Net {
        let mlps = (0..layers)
            .map(|_| Mlp::new(c, 4 * c, rng).expect("dims > 0"))
            .collect();
        let shifted = kind == "mhc-shifted";
        let mix: Vec<Mix> = (0..layers)
            .map(|k| match kind {
                "residual" => Mix::Residual,
                "hc" => {
                    let mut cfg = HcConfig::new(STREAMS, c);
                    cfg.layer = k;
                    Mix::Hc(Box::new(HcBlock::new(cfg).expect("valid")))
                }
                _ => {
                    let mut cfg = MhcConfig::new(STREAMS, c);
                    if kind == "mhc-id" {
                        cfg.bias_init = mhc::BiasInit::IdentityLike;
                    }
                    Mix::Mhc(Box::new(MhcBlock::new(cfg, rng).expect("valid")))
                }
            })
            .collect();
        let head = Array2::from_shape_simple_fn((c, c), || {
            Normal::new(0.0, (1.0 / c as f64).sqrt() as f32)
                .unwrap()
                .sample(rng)
        });
        let (mix, stack) = if shifted {
            let blocks = mix
                .into_iter()
                .map(|m| match m {
                    Mix::Mhc(b) => *b,
                    _ => unreachable!("mhc-shifted builds mHC blocks"),
                })
                .collect();
            (
                vec![],
                Some(MhcStack::new(blocks, Schedule::Shifted).expect("same n, C")),
            )
        } else {
            (mix, None)
        };
        Net {
            mlps,
            mix,
            stack,
            head,
        }
    }

    /// Forward; returns the prediction and what the backward pass needs per layer.
    fn forward(&self, h: &Array2<f32>) -> (Array2<f32>, Saved, Array2<f32>) {
        if let Some(stack) = &self.stack {
            let x = expand(h.view(), STREAMS).expect("n > 0");
            let (xl, pre, tape) = stack
                .forward_train(x.view(), |l, u| self.mlps[l].forward(u).expect("[T, C]"))
                .expect("finite");
            // V4.1: the last block's H_pre reads out the final hidden state.
            let z = mhc::mixing::read_out(xl.view(), pre.view()).expect("shapes");
            return (z.dot(&self.head), Saved::Stack(Box::new(tape), xl, pre), z);
        }
        let residual = matches!(self.mix[0], Mix::Residual);
        let mut x = if residual {
            h.clone().insert_axis(Axis(1))
        } else {
            expand(h.view(), STREAMS).expect("n > 0")
        };
        let mut saved = Vec::new();
        for (mlp, mix) in self.mlps.iter().zip(&self.mix) {
            let f = |u: ArrayView2<f32>| mlp.forward(u).expect("[T, C]");
            let (next, y) = match mix {
                Mix::Residual => {
                    let x2 = x.index_axis(Axis(1), 0);
                    let y = f(x2);
                    // The same sum as ResidualBlock::forward, keeping y for the backward pass.
                    let out = ResidualBlock::new(x2.ncols())
                        .expect("C > 0")
                        .forward(x2, |_| y.clone())
                        .expect("finite");
                    (out.insert_axis(Axis(1)), y)
                }
                Mix::Hc(b) => b.forward_train(x.view(), f).expect("finite"),
                Mix::Mhc(b) => b.forward_train(x.view(), f).expect("finite"),
            };
            saved.push((x, y));
            x = next;
        }
        let z = collapse(x.view(), Collapse::Mean).expect("n > 0");
        (z.dot(&self.head), Saved::Layers(saved), z)
    }

    /// Loss (MSE) and gradients in [`Net::tensors`] order, or `None` if the loss is not finite.
    fn loss_and_grads(&self, h: &Array2<f32>, target: &Array2<f32>) -> (f32, Option<Grads>) {
        let (pred, saved, z) = self.forward(h);
        let diff = &pred - target;
        let loss = diff.mapv(|v| v * v).mean().unwrap_or(f32::NAN);
        if !loss.is_finite() {
            return (loss, None);
        }
        let dpred = diff * (2.0 / pred.len() as f32);
        let dhead = z.t().dot(&dpred);
        let dz = dpred.dot(&self.head.t());
        let saved = match saved {
            Saved::Layers(s) => s,
            Saved::Stack(tape, xl, pre) => {
                let stack = self.stack.as_ref().expect("a stack saved it");
                // h = Σ_j pre[j] x_L[j]: ∂x_L[j] = pre[j] ∂h, ∂pre[j] = ⟨∂h, x_L[j]⟩.
                let dz3 = dz.view().insert_axis(Axis(1));
                let dxl = &pre.view().insert_axis(Axis(2)) * &dz3;
                let dpre = (&xl * &dz3).sum_axis(Axis(2));
                let mgs = RefCell::new(vec![None; self.mlps.len()]);
                let vjp = |l: usize, u: ArrayView2<f32>, dy: ArrayView2<f32>| {
                    let (du, g) = self.mlps[l].backward(u, dy).expect("shapes");
                    mgs.borrow_mut()[l] = Some(g);
                    du
                };
                let Ok((_, bgs)) = stack.backward(&tape, dxl.view(), Some(dpre.view()), vjp) else {
                    return (f32::NAN, None);
                };
                let mut grads: Grads = Vec::new();
                for (g, b) in mgs.into_inner().into_iter().zip(&bgs) {
                    let g = g.expect("the VJP ran");
                    grads.extend([
                        g.w1.into_raw_vec_and_offset().0,
                        g.b1.to_vec(),
                        g.w2.into_raw_vec_and_offset().0,
                        g.b2.to_vec(),
                    ]);
                    grads.extend(flat_mhc(b));
                }
                grads.push(dhead.into_raw_vec_and_offset().0);
                return (loss, Some(grads));
            }
        };
        let n = saved[0].0.shape()[1];
        let mut dx = expand(dz.view(), n).expect("n > 0") / n as f32;
        let mut grads_rev: Vec<Grads> = Vec::new();
        for ((mlp, mix), (x, y)) in self.mlps.iter().zip(&self.mix).zip(&saved).rev() {
            let mg = RefCell::new(None);
            let vjp = |u: ArrayView2<f32>, dy: ArrayView2<f32>| {
                let (du, g) = mlp.backward(u, dy).expect("shapes");
                *mg.borrow_mut() = Some(g);
                du
            };
            let (dx_new, mut block_grads) = match mix {
                Mix::Residual => {
                    let g = dx.index_axis(Axis(1), 0).to_owned();
                    let du = vjp(x.index_axis(Axis(1), 0), g.view());
                    ((&g + &du).insert_axis(Axis(1)), vec![])
                }
                Mix::Hc(b) => {
                    let (d, g) = match b.backward(x.view(), y.view(), dx.view(), vjp) {
                        Ok(r) => r,
                        Err(_) => return (f32::NAN, None),
                    };
                    (d, flat_hc(&g))
                }
                Mix::Mhc(b) => {
                    let (d, g) = match b.backward(x.view(), y.view(), dx.view(), vjp) {
                        Ok(r) => r,
                        Err(_) => return (f32::NAN, None),
                    };
                    (d, flat_mhc(&g))
                }
            };
            let g = mg.into_inner().expect("the VJP ran");
            let mut all = vec![
                g.w1.into_raw_vec_and_offset().0,
                g.b1.to_vec(),
                g.w2.into_raw_vec_and_offset().0,
                g.b2.to_vec(),
            ];
            all.append(&mut block_grads);
            grads_rev.push(all);
            dx = dx_new;
        }
        let mut grads: Grads = grads_rev.into_iter().rev().flatten().collect();
        grads.push(dhead.into_raw_vec_and_offset().0);
        (loss, Some(grads))
    }

    /// Applies `f` to every parameter tensor, in gradient order.
    fn update(&mut self, f: &mut dyn FnMut(&mut [f32])) {
        if let Some(stack) = &mut self.stack {
            for (mlp, b) in self.mlps.iter_mut().zip(stack.blocks_mut()) {
                update_mlp(mlp, f);
                update_mhc(b, f);
            }
            f(self.head.as_slice_mut().expect("contiguous"));
            return;
        }
        for (mlp, mix) in self.mlps.iter_mut().zip(self.mix.iter_mut()) {
            update_mlp(mlp, f);
            match mix {
                Mix::Residual => {}
                Mix::Hc(b) => {
                    let mut p = b.params().clone();
                    for t in [
                        p.theta_pre.as_slice_mut(),
                        p.theta_post.as_slice_mut(),
                        p.theta_res.as_slice_mut(),
                        Some(&mut p.alpha[..]),
                        p.b_pre.as_slice_mut(),
                        p.b_post.as_slice_mut(),
                        p.b_res.as_slice_mut(),
                    ] {
                        f(t.expect("contiguous"));
                    }
                    b.set_params(p).expect("finite");
                }
                Mix::Mhc(b) => update_mhc(b, f),
            }
        }
        f(self.head.as_slice_mut().expect("contiguous"));
    }

    /// Token-averaged `H_res` of every layer on `h`.
    fn res(&self, h: &Array2<f32>) -> Vec<Array2<f32>> {
        let (_, saved, _) = self.forward(h);
        let saved = match saved {
            Saved::Layers(s) => s,
            Saved::Stack(tape, _, _) => {
                let stack = self.stack.as_ref().expect("a stack saved it");
                return stack
                    .blocks()
                    .iter()
                    .zip(tape.inputs())
                    .filter_map(|(b, x)| mean_res(&b.mappings(x.view()).ok()?).ok())
                    .collect();
            }
        };
        self.mix
            .iter()
            .zip(&saved)
            .filter_map(|(m, (x, _))| match m {
                Mix::Residual => None,
                Mix::Hc(b) => Some(mean_res(&b.mappings(x.view()).ok()?).ok()?),
                Mix::Mhc(b) => Some(mean_res(&b.mappings(x.view()).ok()?).ok()?),
            })
            .collect()
    }
}

/// Applies `f` to an MLP's parameters, in gradient order.
fn update_mlp(mlp: &mut Mlp<f32>, f: &mut dyn FnMut(&mut [f32])) {
    for t in [
        &mut mlp.w1.as_slice_mut(),
        &mut mlp.b1.as_slice_mut(),
        &mut mlp.w2.as_slice_mut(),
        &mut mlp.b2.as_slice_mut(),
    ] {
        f(t.as_deref_mut().expect("contiguous"));
    }
}

/// Applies `f` to an mHC block's parameters, in gradient order.
fn update_mhc(b: &mut MhcBlock<f32>, f: &mut dyn FnMut(&mut [f32])) {
    let mut p = b.params().clone();
    for t in [
        p.phi.as_slice_mut(),
        Some(&mut p.alpha[..]),
        p.bias.as_slice_mut(),
    ] {
        f(t.expect("contiguous"));
    }
    b.set_params(p).expect("finite");
}

fn flat_hc(g: &HcParams<f32>) -> Grads {
    vec![
        g.theta_pre.to_vec(),
        g.theta_post.to_vec(),
        g.theta_res.iter().copied().collect(),
        g.alpha.to_vec(),
        g.b_pre.to_vec(),
        g.b_post.to_vec(),
        g.b_res.iter().copied().collect(),
    ]
}

fn flat_mhc(g: &MhcParams<f32>) -> Grads {
    vec![
        g.phi.iter().copied().collect(),
        g.alpha.to_vec(),
        g.bias.to_vec(),
    ]
}

/// The teacher: a fixed random 4-layer tanh MLP, `C → C`.
struct Teacher(Vec<Array2<f32>>);

impl Teacher {
    fn new(c: usize, rng: &mut StdRng) -> Teacher {
        let d = Normal::new(0.0, (1.5 / c as f64).sqrt() as f32).unwrap();
        Teacher(
            (0..4)
                .map(|_| Array2::from_shape_simple_fn((c, c), || d.sample(rng)))
                .collect(),
        )
    }
    fn apply(&self, h: &Array2<f32>) -> Array2<f32> {
        self.0
            .iter()
            .fold(h.clone(), |a, w| a.dot(w).mapv(f32::tanh))
    }
}

/// Adam (β = 0.9, 0.999, ε = 1e-8); `scale` multiplies the gradient (global-norm clipping).
struct Adam {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: i32,
}

impl Adam {
    fn step(&mut self, net: &mut Net, grads: &Grads, lr: f32, scale: f32) {
        self.t += 1;
        if self.m.is_empty() {
            self.m = grads.iter().map(|g| vec![0.0; g.len()]).collect();
            self.v = self.m.clone();
        }
        let (b1, b2) = (0.9f32, 0.999f32);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        let mut k = 0;
        net.update(&mut |p: &mut [f32]| {
            let (g, m, v) = (&grads[k], &mut self.m[k], &mut self.v[k]);
            for i in 0..p.len() {
                let gi = g[i] * scale;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
            }
            k += 1;
        });
    }
}

struct Run {
    kind: String,
    lr: f64,
    loss: Vec<f32>,
    grad_norm: Vec<f32>,
    diverged: Option<usize>,
    gains: (f64, f64),
}

fn main() {
    let a = Args::parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .expect("one global pool");
    std::fs::create_dir_all(&a.out).expect("output folder");
    let (c, l, t) = (a.dim, a.layers, a.tokens);
    let mut rng = StdRng::seed_from_u64(0);
    let teacher = Teacher::new(c, &mut rng);
    let input = Normal::new(0.0f32, 1.0).unwrap();
    let eval_h = Array2::from_shape_simple_fn((t, c), || input.sample(&mut rng));
    let eval_y = teacher.apply(&eval_h);

    let kinds = a.variants.clone();
    let total = (kinds.len() * a.lrs.len() * a.steps) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .expect("template"),
    );
    let mut runs = Vec::new();
    for &lr in &a.lrs {
        for kind in &kinds {
            bar.set_message(format!("{kind:8} lr {lr:.0e}"));
            let mut net = Net::new(kind, l, c, &mut StdRng::seed_from_u64(1));
            let mut adam = Adam {
                m: vec![],
                v: vec![],
                t: 0,
            };
            let mut data = StdRng::seed_from_u64(2);
            let mut run = Run {
                kind: kind.clone(),
                lr,
                loss: vec![],
                grad_norm: vec![],
                diverged: None,
                gains: (f64::NAN, f64::NAN),
            };
            for step in 0..a.steps {
                bar.inc(1);
                if run.diverged.is_some() {
                    continue;
                }
                let h = Array2::from_shape_simple_fn((t, c), || input.sample(&mut data));
                let y = teacher.apply(&h);
                let (loss, grads) = net.loss_and_grads(&h, &y);
                let Some(grads) = grads else {
                    run.diverged = Some(step);
                    continue;
                };
                let norm = grads.iter().flatten().map(|g| g * g).sum::<f32>().sqrt();
                if !norm.is_finite() {
                    run.diverged = Some(step);
                    continue;
                }
                run.loss.push(loss);
                run.grad_norm.push(norm);
                let scale = if a.clip > 0.0 {
                    a.clip / norm.max(a.clip)
                } else {
                    1.0
                };
                adam.step(&mut net, &grads, lr as f32, scale);
            }
            if run.diverged.is_none() {
                let (pred, _, _) = net.forward(&eval_h);
                let eval = (&pred - &eval_y).mapv(|v| v * v).mean().unwrap_or(f32::NAN);
                run.loss.push(eval);
                let res = net.res(&eval_h);
                if let Ok(g) = composite_gains(&res) {
                    run.gains = (
                        g.iter().map(|p| p.0).fold(0.0, f64::max),
                        g.iter().map(|p| p.1).fold(0.0, f64::max),
                    );
                }
            }
            runs.push(run);
        }
    }
    bar.finish_with_message("done");

    let base = eval_y.mapv(|v| v * v).mean().unwrap_or(0.0);
    println!(
        "\nL = {l} layers, C = {c}, n = {STREAMS} (HC, mHC), T = {t} tokens a batch, {} Adam steps; predicting 0 has loss {base:.4}\n",
        a.steps
    );
    println!(
        "| lr | variant | final eval loss | max grad norm | max composite fwd gain | max composite bwd gain |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        let fin = match r.diverged {
            Some(s) => format!("diverged at step {s}"),
            None => format!("{:.4}", r.loss.last().copied().unwrap_or(f32::NAN)),
        };
        let gmax = r.grad_norm.iter().copied().fold(0.0f32, f32::max);
        let gains = if r.kind == "residual" {
            "—".to_string()
        } else {
            format!("{:.3} | {:.3}", r.gains.0, r.gains.1)
        };
        let gains = if r.kind == "residual" {
            format!("{gains} | —")
        } else {
            gains
        };
        println!(
            "| {:.0e} | {} | {fin} | {gmax:.3} | {gains} |",
            r.lr, r.kind
        );
    }
    for (what, pick) in [("loss", 0), ("grad_norm", 1)] {
        let path = format!("{}/train_{what}.svg", a.out);
        plot(&path, what, a.steps, &runs, pick, &a.lrs).expect("plot");
        println!("wrote {path}");
    }
}

fn plot(
    path: &str,
    what: &str,
    steps: usize,
    runs: &[Run],
    pick: usize,
    lrs: &[f64],
) -> Result<(), Box<dyn std::error::Error>> {
    let series = |r: &Run| -> Vec<(usize, f64)> {
        let v = if pick == 0 {
            &r.loss[..r
                .loss
                .len()
                .saturating_sub(if r.diverged.is_none() { 1 } else { 0 })]
        } else {
            &r.grad_norm[..]
        };
        v.iter()
            .enumerate()
            .map(|(i, &y)| (i, (y as f64).max(1e-6)))
            .collect()
    };
    let root = SVGBackend::new(path, (1200, 360 * lrs.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, &lr) in root.split_evenly((lrs.len(), 1)).iter().zip(lrs) {
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for r in runs.iter().filter(|r| r.lr == lr) {
            for (_, y) in series(r) {
                lo = lo.min(y);
                hi = hi.max(y);
            }
        }
        if !(lo.is_finite() && hi > 0.0) {
            (lo, hi) = (1e-3, 1.0);
        }
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{what}, lr = {lr:.0e} (log scale)"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0..steps, (lo * 0.8..hi * 1.25).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()?;
        for (r, color) in runs
            .iter()
            .filter(|r| r.lr == lr)
            .zip([BLACK, RED, BLUE, GREEN])
        {
            chart
                .draw_series(LineSeries::new(series(r), color.stroke_width(2)))?
                .label(r.kind.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
