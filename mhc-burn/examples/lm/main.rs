//! The paper's claims on a real language model: a character-level transformer trained on
//! Shakespeare, with a plain residual, Hyper-Connections, mHC (paper / V4 schedule) and mHC under
//! DeepSeek-V4.1's single pass, side by side.
//!
//! ```sh
//! cargo run --release -p mhc-burn --example lm -- --smoke        # all four variants, a few steps
//! cargo run --release -p mhc-burn --example lm                   # defaults: C = 128, 12 layers
//! cargo run --release -p mhc-burn --example lm -- --layers 24 --seeds 0   # 48 sublayers
//! ```
//!
//! Data: eight plays (1.04 MB, `mhc-burn/data/shakespeare/`, see its NOTICE), a character
//! vocabulary, the first 90 % of the text for training and the last 10 % for validation. The
//! model: token and position embeddings → `n = 4` streams (replicated) → `L` layers of two
//! sublayers, causal multi-head attention and an MLP `C → 4C → C`, each with its own pre-norm and
//! wrapped by the connection → collapse (mean of the streams; the last `H_pre` for
//! `mhc-shifted`) → norm → linear head. AdamW, linear warm-up then cosine decay to a tenth,
//! gradient-norm clipping (`--clip`, 0 turns it off), fixed seeds.
//!
//! Output (in `--out`): per run a progress bar; train and validation loss curves, the gradient
//! norm, and the composite forward / backward Amax gains of the trained `H_res` over depth
//! (paper Fig. 3/7: each block's `H_res` averaged over a validation batch's tokens), as SVG; the
//! final table (validation loss, bits per character, max composite gains, wall time) as
//! markdown in `lm.md`; the curves and the gains as CSV (`lm_curves.csv`, `lm_gains.csv`), so
//! that runs made in separate processes can be plotted together.

#[path = "model.rs"]
mod model;

use std::time::Instant;

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use mhc::rand::rngs::StdRng;
use mhc::rand::{RngExt, SeedableRng};
use model::{Lm, Shape, Variant, grad_norm};
use plotters::prelude::*;

#[derive(Parser, Debug, Clone)]
#[command(about = "residual vs HC vs mHC (both schedules) on a char-level transformer")]
struct Args {
    /// Variants to train, comma-separated: residual, hc, mhc, mhc-shifted.
    #[arg(
        long,
        default_value = "residual,hc,mhc,mhc-shifted",
        value_delimiter = ','
    )]
    variants: Vec<String>,
    /// Model width `C`.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Transformer layers (each two sublayers: attention, MLP).
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Context length (characters).
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Sequences a step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Optimiser steps (the default fits 10 minutes a variant on 2 cores: mHC ≈ 2 s a step at
    /// the default size on Flex, the residual ≈ 1 s).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Peak learning rates (a sweep when several), comma-separated.
    #[arg(long, default_value = "0.003", value_delimiter = ',')]
    lrs: Vec<f64>,
    /// Warm-up steps.
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    /// Gradient-norm clipping threshold (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Seeds, comma-separated (initialisation and batches).
    #[arg(long, default_value = "0,1", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Validate every this many steps.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Validation batches (the same ones at every evaluation and for every run).
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Where the plots and the table go.
    #[arg(long, default_value = "target/plots")]
    out: String,
    /// A tiny model and a few steps of every variant (for tests and a quick look).
    #[arg(long)]
    smoke: bool,
}

/// The corpus as character ids, and the vocabulary.
struct Corpus {
    train: Vec<u32>,
    valid: Vec<u32>,
    vocab: Vec<char>,
}

fn corpus() -> Corpus {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/data/shakespeare");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("mhc-burn/data/shakespeare")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    names.sort();
    let text: String = names
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("UTF-8 text"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut vocab: Vec<char> = text.chars().collect();
    vocab.sort_unstable();
    vocab.dedup();
    let ids: Vec<u32> = text
        .chars()
        .map(|ch| vocab.binary_search(&ch).expect("in the vocabulary") as u32)
        .collect();
    let split = ids.len() * 9 / 10;
    Corpus {
        train: ids[..split].to_vec(),
        valid: ids[split..].to_vec(),
        vocab,
    }
}

/// `b` windows of `s + 1` characters at random offsets: inputs and next-character targets.
fn batch(
    data: &[u32],
    b: usize,
    s: usize,
    rng: &mut StdRng,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let (mut x, mut y) = (Vec::with_capacity(b * s), Vec::with_capacity(b * s));
    for _ in 0..b {
        let o = rng.random_range(0..data.len() - s - 1);
        x.extend(data[o..o + s].iter().map(|&v| v as i64));
        y.extend(data[o + 1..o + s + 1].iter().map(|&v| v as i64));
    }
    (
        Tensor::from_data(TensorData::new(x, [b, s]), device),
        Tensor::from_data(TensorData::new(y, [b, s]), device),
    )
}

/// The learning rate at `step`: linear warm-up, then cosine decay to `peak / 10`.
fn lr_at(step: usize, args: &Args, peak: f64) -> f64 {
    if step < args.warmup {
        return peak * (step + 1) as f64 / args.warmup as f64;
    }
    let p = (step - args.warmup) as f64 / (args.steps - args.warmup).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

struct Run {
    variant: Variant,
    seed: u64,
    lr: f64,
    train: Vec<(usize, f32)>,
    valid: Vec<(usize, f32)>,
    grad_norm: Vec<(usize, f32)>,
    composite: Vec<(f64, f64)>,
    diverged: Option<usize>,
    secs: f64,
}

fn evaluate(model: &Lm, data: &[u32], args: &Args, device: &Device) -> f32 {
    let mut rng = StdRng::seed_from_u64(12345);
    let mut total = 0.0;
    for _ in 0..args.eval_batches {
        let (x, y) = batch(data, args.batch, args.context, &mut rng, device);
        total += model.loss(x, y).into_scalar::<f32>();
    }
    total / args.eval_batches as f32
}

/// Composite (forward, backward) gains over depth of the trained `H_res`, each averaged over the
/// tokens of one validation batch.
fn composite(model: &Lm, data: &[u32], args: &Args, device: &Device) -> Vec<(f64, f64)> {
    let mut rng = StdRng::seed_from_u64(999);
    let (x, _) = batch(data, args.batch, args.context, &mut rng, device);
    let (_, maps) = model.forward_traced(x, true);
    let layers: Vec<ndarray::Array2<f64>> = maps
        .iter()
        .map(|m| {
            let [b, s, n, _] = m.res.dims();
            let mean = m
                .res
                .clone()
                .reshape([b * s, n, n])
                .mean_dim(0)
                .reshape([n, n]);
            mhc_burn::array_from_tensor(&mean)
                .mapv(f64::from)
                .into_dimensionality()
                .expect("[n, n]")
        })
        .collect();
    if layers.is_empty() {
        return vec![];
    }
    mhc::gain::composite_gains(&layers).expect("finite H_res")
}

fn train(
    args: &Args,
    corpus: &Corpus,
    variant: Variant,
    seed: u64,
    lr: f64,
    bar: &ProgressBar,
) -> Run {
    let device = Device::flex().autodiff();
    device.seed(seed);
    let shape = Shape {
        vocab: corpus.vocab.len(),
        dim: args.dim,
        layers: args.layers,
        heads: args.heads,
        context: args.context,
        streams: 4,
    };
    let mut model = Lm::new(shape, variant, &device);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping((args.clip > 0.0).then_some(GradientClippingConfig::Norm(args.clip)))
        .init();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(7919).wrapping_add(1));
    let mut run = Run {
        variant,
        seed,
        lr,
        train: vec![],
        valid: vec![],
        grad_norm: vec![],
        composite: vec![],
        diverged: None,
        secs: 0.0,
    };
    let start = Instant::now();
    for step in 0..args.steps {
        bar.inc(1);
        let (x, y) = batch(&corpus.train, args.batch, args.context, &mut rng, &device);
        let loss = model.loss(x, y);
        let value: f32 = loss.clone().into_scalar();
        if !value.is_finite() {
            run.diverged = Some(step);
            bar.inc((args.steps - step - 1) as u64);
            break;
        }
        let grads = loss.backward();
        run.grad_norm.push((step, grad_norm(&model, &grads)));
        run.train.push((step, value));
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(lr_at(step, args, lr), model, grads);
        if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            let v = evaluate(&model, &corpus.valid, args, &device);
            run.valid.push((step + 1, v));
            bar.set_message(format!(
                "{:11} seed {seed} lr {lr:.0e}: val {v:.3}",
                variant.name()
            ));
        }
    }
    run.secs = start.elapsed().as_secs_f64();
    if run.diverged.is_none() {
        run.composite = composite(&model, &corpus.valid, args, &device);
    }
    run
}

fn main() {
    let mut args = Args::parse();
    if args.smoke {
        args = Args {
            dim: 32,
            layers: 2,
            heads: 2,
            context: 32,
            batch: 8,
            steps: 12,
            warmup: 2,
            seeds: vec![0],
            eval_every: 6,
            eval_batches: 1,
            ..args
        };
    }
    let variants: Vec<Variant> = args
        .variants
        .iter()
        .map(|v| Variant::parse(v).unwrap_or_else(|| panic!("--variants: unknown {v}")))
        .collect();
    std::fs::create_dir_all(&args.out).expect("output folder");
    let corpus = corpus();
    println!(
        "{} characters ({} train, {} validation), vocabulary {}; C = {}, {} layers ({} sublayers), {} heads, context {}, batch {}, {} steps",
        corpus.train.len() + corpus.valid.len(),
        corpus.train.len(),
        corpus.valid.len(),
        corpus.vocab.len(),
        args.dim,
        args.layers,
        2 * args.layers,
        args.heads,
        args.context,
        args.batch,
        args.steps
    );
    let total = (variants.len() * args.seeds.len() * args.lrs.len() * args.steps) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .expect("template"),
    );
    let mut runs = Vec::new();
    for &lr in &args.lrs {
        for &seed in &args.seeds {
            for &v in &variants {
                runs.push(train(&args, &corpus, v, seed, lr, &bar));
            }
        }
    }
    bar.finish();
    let table = report(&runs);
    println!("\n{table}");
    let path = format!("{}/lm.md", args.out);
    std::fs::write(&path, &table).expect("write the table");
    println!("wrote {path}");
    for (name, what) in [
        ("lm_train_loss", 0),
        ("lm_valid_loss", 1),
        ("lm_grad_norm", 2),
    ] {
        let path = format!("{}/{name}.svg", args.out);
        plot_curves(&path, &runs, what).expect("plot");
        println!("wrote {path}");
    }
    let path = format!("{}/lm_composite_gain.svg", args.out);
    plot_gains(&path, &runs).expect("plot");
    println!("wrote {path}");
    for (name, text) in [
        ("lm_curves.csv", curves_csv(&runs)),
        ("lm_gains.csv", gains_csv(&runs)),
    ] {
        let path = format!("{}/{name}", args.out);
        std::fs::write(&path, text).expect("write the csv");
        println!("wrote {path}");
    }
}

/// Every run's curves as CSV (`variant,seed,lr,series,step,value`; `series` is `train`,
/// `valid` or `grad_norm`), so that runs made in separate processes can be plotted together.
fn curves_csv(runs: &[Run]) -> String {
    let mut s = String::from("variant,seed,lr,series,step,value\n");
    for r in runs {
        for (series, pts) in [
            ("train", &r.train),
            ("valid", &r.valid),
            ("grad_norm", &r.grad_norm),
        ] {
            for (step, v) in pts {
                s += &format!(
                    "{},{},{},{series},{step},{v}\n",
                    r.variant.name(),
                    r.seed,
                    r.lr
                );
            }
        }
    }
    s
}

/// Every run's composite gains after training as CSV (`variant,seed,lr,layer,forward,backward`;
/// none for the residual baseline).
fn gains_csv(runs: &[Run]) -> String {
    let mut s = String::from("variant,seed,lr,layer,forward,backward\n");
    for r in runs {
        for (l, (f, b)) in r.composite.iter().enumerate() {
            s += &format!("{},{},{},{l},{f},{b}\n", r.variant.name(), r.seed, r.lr);
        }
    }
    s
}

fn report(runs: &[Run]) -> String {
    let mut s = String::from(
        "| variant | seed | lr | final val loss (nats) | bits per char | max composite fwd gain | max composite bwd gain | max grad norm | wall (s) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let val = r.valid.last().map_or(f32::NAN, |v| v.1);
        let max = |f: fn(&(f64, f64)) -> f64| r.composite.iter().map(f).fold(f64::NAN, f64::max);
        let gain = |g: f64| {
            if g.is_nan() {
                "—".to_string()
            } else {
                format!("{g:.3}")
            }
        };
        let gmax = r.grad_norm.iter().map(|g| g.1).fold(0.0f32, f32::max);
        let val = match r.diverged {
            Some(step) => format!("diverged at step {step}"),
            None => format!("{val:.4}"),
        };
        let bpc = r.valid.last().map_or(f32::NAN, |v| v.1) / std::f32::consts::LN_2;
        s += &format!(
            "| {} | {} | {:.0e} | {val} | {bpc:.3} | {} | {} | {gmax:.2} | {:.0} |\n",
            r.variant.name(),
            r.seed,
            r.lr,
            gain(max(|p| p.0)),
            gain(max(|p| p.1)),
            r.secs
        );
    }
    s
}

const COLORS: [RGBColor; 4] = [BLACK, RED, BLUE, GREEN];

fn color(v: Variant) -> RGBColor {
    COLORS[Variant::ALL
        .iter()
        .position(|&x| x == v)
        .expect("a variant")]
}

fn plot_curves(path: &str, runs: &[Run], what: usize) -> Result<(), Box<dyn std::error::Error>> {
    let series = |r: &Run| match what {
        0 => r.train.clone(),
        1 => r.valid.clone(),
        _ => r.grad_norm.clone(),
    };
    let (mut lo, mut hi, mut steps) = (f32::INFINITY, 0.0f32, 1usize);
    for r in runs {
        for (s, v) in series(r) {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
                steps = steps.max(s);
            }
        }
    }
    let title = [
        "training loss (nats)",
        "validation loss (nats)",
        "gradient norm",
    ][what];
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(
            0f32..steps as f32,
            (lo.max(1e-3) * 0.95)..(hi * 1.05).max(lo * 1.1),
        )?;
    chart.configure_mesh().x_desc("step").draw()?;
    for r in runs {
        let c = color(r.variant);
        let pts: Vec<(f32, f32)> = series(r).into_iter().map(|(s, v)| (s as f32, v)).collect();
        let style = c.stroke_width(if r.seed == 0 { 2 } else { 1 });
        // The two mHC schedules train alike; the shifted one is dashed so that the other shows
        // through where the curves coincide.
        let series = if r.variant == Variant::MhcShifted {
            chart.draw_series(DashedLineSeries::new(pts, 8, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(pts, style))?
        };
        series
            .label(format!(
                "{} (seed {}, lr {:.0e})",
                r.variant.name(),
                r.seed,
                r.lr
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_gains(path: &str, runs: &[Run]) -> Result<(), Box<dyn std::error::Error>> {
    let depth = runs
        .iter()
        .map(|r| r.composite.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let hi = runs
        .iter()
        .flat_map(|r| r.composite.iter().flat_map(|&(f, b)| [f, b]))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "composite Amax gain of the trained H_res (solid: forward, dashed: backward)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..depth as f64, 0f64..hi * 1.1)?;
    chart.configure_mesh().x_desc("sublayer l").draw()?;
    for r in runs.iter().filter(|r| !r.composite.is_empty()) {
        let c = color(r.variant);
        let fwd: Vec<(f64, f64)> = r
            .composite
            .iter()
            .enumerate()
            .map(|(l, g)| (l as f64, g.0))
            .collect();
        let bwd: Vec<(f64, f64)> = r
            .composite
            .iter()
            .enumerate()
            .map(|(l, g)| (l as f64, g.1))
            .collect();
        chart
            .draw_series(LineSeries::new(fwd.iter().copied(), c.stroke_width(2)))?
            .label(format!("{} (seed {})", r.variant.name(), r.seed))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        chart.draw_series(DashedLineSeries::new(
            bwd.iter().copied(),
            6,
            4,
            c.stroke_width(1),
        ))?;
        // mHC's two schedules both stay near 1: a marker per point tells them apart where the
        // lines coincide (triangles for the shifted schedule, circles for the others).
        let pts = fwd.iter().chain(&bwd).copied();
        if r.variant == Variant::MhcShifted {
            chart.draw_series(pts.map(|p| TriangleMarker::new(p, 5, c.filled())))?;
        } else {
            chart.draw_series(pts.map(|p| Circle::new(p, 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
