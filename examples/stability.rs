//! The paper's stability claim (Fig. 3 and 7) in miniature: gains of the residual mixing
//! across a deep stack, HC against mHC.
//!
//! Run: `cargo run --release --example stability` (flags: `--layers 64 --dim 64 --tokens 128
//! --drift 0,0.1,0.3 --schedule both --out target/plots`; `--schedule current|shifted|both`
//! picks the mHC schedules: `shifted` runs the same mHC blocks as one `MhcStack` under
//! DeepSeek-V4.1's single pass, where block `l` reads out with block `l−1`'s `H_pre`)
//!
//! A stack of `L` blocks with `n = 4` streams, each around its own MLP, is run on one sequence of
//! tokens. For every layer the token-averaged `H_res` gives the single-layer Amax gains and, over
//! the stack, the composite gains (forward: `H_l ⋯ H_1`; backward: `H_L ⋯ H_l`). This is done at
//! initialisation and after a random drift of every parameter by `N(0, σ²)` (what training does
//! to the parameters, without training): products of unconstrained matrices drift
//! exponentially; products of doubly-stochastic ones cannot grow.

use clap::{Parser, ValueEnum};
use mhc::gain::{amax_gain, composite_gains, mean_res};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{HcBlock, HcConfig, HcParams, MhcBlock, MhcConfig, MhcParams, MhcStack, Mlp, Schedule};
use ndarray::{Array, Array2, Array3, Dimension};
use plotters::prelude::*;
use rand_distr::{Distribution, Normal};

/// Gains of the residual mixing across a deep stack, HC against mHC (see the module docs).
#[derive(Parser)]
struct Args {
    /// Blocks in the stack.
    #[arg(long, default_value_t = 64)]
    layers: usize,
    /// Stream width C.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Tokens in the sequence.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Standard deviations of the random parameter drift, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.3")]
    drift: Vec<f64>,
    /// Which mHC schedules to run.
    #[arg(long, value_enum, default_value_t = Schedules::Both)]
    schedule: Schedules,
    /// Folder of the plots.
    #[arg(long, default_value = "target/plots")]
    out: String,
}

/// `--schedule`: the paper's, DeepSeek-V4.1's single pass, or both.
#[derive(Clone, Copy, ValueEnum)]
enum Schedules {
    Current,
    Shifted,
    Both,
}

fn drift<D: Dimension>(a: &mut Array<f32, D>, sigma: f64, rng: &mut StdRng) {
    if sigma > 0.0 {
        let d = Normal::new(0.0, sigma).expect("sigma ≥ 0");
        a.mapv_inplace(|v| v + d.sample(rng) as f32);
    }
}

/// One layer: the block's output and its token-averaged `H_res`.
type Layer = Box<dyn Fn(&Array3<f32>) -> (Array3<f32>, Array2<f32>)>;

/// What the stack needs of HC and mHC blocks alike.
trait Mixer: 'static {
    fn maps(&self, x: &Array3<f32>) -> mhc::Mappings<f32>;
    fn run(&self, x: &Array3<f32>, mlp: &Mlp<f32>) -> Array3<f32>;
}

impl Mixer for HcBlock<f32> {
    fn maps(&self, x: &Array3<f32>) -> mhc::Mappings<f32> {
        self.mappings(x.view()).expect("finite")
    }
    fn run(&self, x: &Array3<f32>, mlp: &Mlp<f32>) -> Array3<f32> {
        self.forward(x.view(), |u| mlp.forward(u).expect("[T, C]"))
            .expect("finite")
    }
}

impl Mixer for MhcBlock<f32> {
    fn maps(&self, x: &Array3<f32>) -> mhc::Mappings<f32> {
        self.mappings(x.view()).expect("finite")
    }
    fn run(&self, x: &Array3<f32>, mlp: &Mlp<f32>) -> Array3<f32> {
        self.forward(x.view(), |u| mlp.forward(u).expect("[T, C]"))
            .expect("finite")
    }
}

fn layer(b: impl Mixer, mlp: Mlp<f32>) -> Layer {
    Box::new(move |x| (b.run(x, &mlp), mean_res(&b.maps(x)).expect("T > 0")))
}

/// Per-layer token-averaged H_res of a stack, from one forward pass.
fn run_stack(blocks: &[Layer], x0: &Array3<f32>) -> Vec<Array2<f32>> {
    let mut x = x0.clone();
    let mut res = Vec::new();
    for b in blocks {
        let (next, h) = b(&x);
        res.push(h);
        x = next;
    }
    res
}

/// Per-layer token-averaged H_res of the same blocks chained under the shifted schedule.
fn shifted_res(
    chain: Vec<MhcBlock<f32>>,
    mlps: &[Mlp<f32>],
    x0: &Array3<f32>,
) -> Result<Vec<Array2<f32>>, mhc::Error> {
    let stack = MhcStack::new(chain, Schedule::Shifted)?;
    let (_, _, tape) =
        stack.forward_train(x0.view(), |l, u| mlps[l].forward(u).expect("[T, C]"))?;
    stack
        .blocks()
        .iter()
        .zip(tape.inputs())
        .map(|(b, x)| mean_res(&b.mappings(x.view())?))
        .collect()
}

struct Curve {
    label: String,
    single: Vec<(f64, f64)>,
    composite: Vec<(f64, f64)>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let (n, c, l, t) = (4usize, a.dim, a.layers, a.tokens);
    std::fs::create_dir_all(&a.out)?;
    let mut rng = StdRng::seed_from_u64(0);
    let mlps: Vec<Mlp<f32>> = (0..l)
        .map(|_| Mlp::new(c, 4 * c, &mut rng))
        .collect::<Result<_, _>>()?;
    let h = Array2::from_shape_simple_fn((t, c), || {
        Normal::new(0.0f32, 1.0).unwrap().sample(&mut rng)
    });
    let x0 = mhc::expand(h.view(), n)?;

    let mut curves = Vec::new();
    println!(
        "L = {l} layers, n = {n} streams, C = {c}, T = {t} tokens; gains of the token-averaged H_res\n"
    );
    println!(
        "| variant | drift σ | max single fwd | max single bwd | max composite fwd | max composite bwd | min composite fwd |"
    );
    println!("|---|---|---|---|---|---|---|");
    let variants: &[&str] = match a.schedule {
        Schedules::Current => &["HC", "mHC"],
        Schedules::Shifted => &["HC", "mHC-shifted"],
        Schedules::Both => &["HC", "mHC", "mHC-shifted"],
    };
    for &sigma in &a.drift {
        for &variant in variants {
            let mut rng = StdRng::seed_from_u64(1 + (sigma * 1e6) as u64);
            let mut blocks: Vec<Layer> = Vec::new();
            let mut chain: Vec<MhcBlock<f32>> = Vec::new();
            for (k, mlp) in mlps.iter().enumerate() {
                let mlp = mlp.clone();
                if variant == "HC" {
                    let mut cfg = HcConfig::new(n, c);
                    cfg.layer = k;
                    let mut p = HcParams::<f32>::init(n, c, k, 0.01);
                    drift(&mut p.theta_pre, sigma, &mut rng);
                    drift(&mut p.theta_post, sigma, &mut rng);
                    drift(&mut p.theta_res, sigma, &mut rng);
                    drift(&mut p.b_pre, sigma, &mut rng);
                    drift(&mut p.b_post, sigma, &mut rng);
                    drift(&mut p.b_res, sigma, &mut rng);
                    blocks.push(layer(HcBlock::from_params(cfg, p)?, mlp));
                } else {
                    let cfg = MhcConfig::new(n, c);
                    let b = MhcBlock::<f32>::new(cfg, &mut rng)?;
                    let mut p: MhcParams<f32> = b.params().clone();
                    drift(&mut p.phi, sigma, &mut rng);
                    drift(&mut p.bias, sigma, &mut rng);
                    // The same parameters for both schedules (the same seeds).
                    chain.push(MhcBlock::from_params(cfg, p.clone())?);
                    blocks.push(layer(MhcBlock::from_params(cfg, p)?, mlp));
                }
            }
            let res = if variant == "mHC-shifted" {
                shifted_res(chain, &mlps, &x0)?
            } else {
                run_stack(&blocks, &x0)
            };
            let single: Vec<(f64, f64)> = res
                .iter()
                .map(|m| amax_gain(m.view()).map(|g| (g.forward, g.backward)))
                .collect::<Result<_, _>>()?;
            let composite = composite_gains(&res)?;
            let max = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
                v.iter().map(f).fold(0.0f64, f64::max)
            };
            let min_fwd = composite.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
            println!(
                "| {variant} | {sigma} | {:.3} | {:.3} | {:.3e} | {:.3e} | {:.3e} |",
                max(&single, |p| p.0),
                max(&single, |p| p.1),
                max(&composite, |p| p.0),
                max(&composite, |p| p.1),
                min_fwd
            );
            curves.push(Curve {
                label: format!("{variant}, σ = {sigma}"),
                single,
                composite,
            });
        }
    }

    for (name, pick, what) in [
        (
            "composite_forward",
            0usize,
            "composite forward gain of H_l ⋯ H_1",
        ),
        (
            "composite_backward",
            1,
            "composite backward gain of H_L ⋯ H_l",
        ),
        ("single_forward", 2, "single-layer forward gain"),
    ] {
        let path = format!("{}/stability_{name}.svg", a.out);
        plot(&path, what, l, &curves, pick)?;
        println!("wrote {path}");
    }
    Ok(())
}

fn plot(
    path: &str,
    title: &str,
    layers: usize,
    curves: &[Curve],
    pick: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let value = |c: &Curve, i: usize| match pick {
        0 => c.composite[i].0,
        1 => c.composite[i].1,
        _ => c.single[i].0,
    };
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for c in curves {
        for i in 0..layers {
            let v = value(c, i).max(1e-12);
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    let (lo, hi) = (lo.min(0.5) * 0.8, hi.max(2.0) * 1.25);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} (log scale)"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(1usize..layers, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("layer l")
        .y_desc("Amax gain")
        .draw()?;
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (k, c) in curves.iter().enumerate() {
        let color = palette[k % palette.len()];
        let style = if c.label.starts_with("HC") {
            color.stroke_width(1)
        } else {
            color.stroke_width(3)
        };
        chart
            .draw_series(LineSeries::new(
                (0..layers).map(|i| (i + 1, value(c, i).max(1e-12))),
                style,
            ))?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
