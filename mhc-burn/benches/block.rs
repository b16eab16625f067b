//! The cost of a burn mHC block over a burn residual block around the same burn MLP, forward
//! and forward + backward (burn's autodiff), on the CPU backend (Flex), with the core's fused
//! kernels at the same shape for comparison.
//!
//! Run: `cargo bench -p mhc-burn --bench block` (or with `MHC_BURN_BENCH_DEVICE=cuda` and
//! `--features cuda` on a GPU). At the end it prints the median times and the ratios
//! `mhc / residual − 1`, all measured in the same run.
//!
//! The floor (n = 4, C = 256, T = 1024 tokens, f32): the MLP `C → 4C → C` does
//! 4·T·C·4C = 1.07 GFLOP forward (≈ 3.2 GFLOP forward + backward); mHC adds the `[T, n·C] ×
//! [n·C, 24]` projection (0.05 GFLOP), the read-out and write-in (≈ 3n + 2 = 14 values of `C`
//! a token: 14.7 MB) and 20 Sinkhorn iterations on `4×4` matrices. On the core's fused kernels
//! that is ≈ +3–5 % over the residual; burn runs it as ≈ 100 small tensor ops a block (the
//! Sinkhorn unrolled in the log domain alone is ≈ 40 ops a step, 20 steps), each a pass over a
//! `[T, n, n]` or `[T, n, C]` tensor.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{BenchmarkId, Criterion, criterion_group};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc_burn::{MhcBlock, MhcBlockConfig, ResidualBlock, expand};
use std::hint::black_box;
use std::time::Duration;

const N: usize = 4;
const C: usize = 256;
const BATCH: usize = 4;
const SEQ: usize = 256;

fn device() -> Device {
    match std::env::var("MHC_BURN_BENCH_DEVICE").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => Device::cuda(0),
        _ => Device::flex(),
    }
}

/// A burn MLP `C → 4C → C` (GELU), the same for every connection.
struct Mlp {
    w1: Tensor<2>,
    w2: Tensor<2>,
}

impl Mlp {
    fn new(device: &Device, train: bool) -> Self {
        let w = |a: usize, b: usize| {
            let std = (1.0 / a as f64).sqrt();
            let t = Tensor::random([a, b], Distribution::Normal(0.0, std), device);
            if train { t.require_grad() } else { t }
        };
        Mlp {
            w1: w(C, 4 * C),
            w2: w(4 * C, C),
        }
    }

    fn forward(&self, u: Tensor<3>) -> Tensor<3> {
        let h = burn::tensor::activation::gelu(u.matmul(self.w1.clone().unsqueeze()));
        h.matmul(self.w2.clone().unsqueeze())
    }
}

fn sync(t: Tensor<1>) -> f32 {
    t.into_scalar()
}

fn bench(c: &mut Criterion) {
    let dev = device();
    let ad = dev.clone().autodiff();
    let id = format!("n{N}_c{C}_t{}", BATCH * SEQ);
    let mut g = c.benchmark_group("burn_block");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for (mode, d) in [("forward", &dev), ("forward_backward", &ad)] {
        let train = mode == "forward_backward";
        let mlp = Mlp::new(d, train);
        let block: MhcBlock = MhcBlockConfig::new(N, C).init(d);
        let h = Tensor::<3>::random([BATCH, SEQ, C], Distribution::Normal(0.0, 1.0), d);
        let x = expand(h.clone(), N);
        g.bench_function(BenchmarkId::new(format!("residual_{mode}"), &id), |b| {
            b.iter(|| {
                let out = ResidualBlock.forward(h.clone(), |u| mlp.forward(u));
                let loss = out.sum();
                if train {
                    black_box(loss.backward());
                } else {
                    black_box(sync(loss));
                }
            })
        });
        g.bench_function(BenchmarkId::new(format!("mhc_{mode}"), &id), |b| {
            b.iter(|| {
                let out = block.forward(x.clone(), |u| mlp.forward(u));
                let loss = out.sum();
                if train {
                    black_box(loss.backward());
                } else {
                    black_box(sync(loss));
                }
            })
        });
    }
    g.finish();
    // The core's fused kernels at the same shape (ndarray, faer, hand-written backward).
    let mut g = c.benchmark_group("core_block");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    let mut rng = StdRng::seed_from_u64(0);
    let mlp = mhc::Mlp::<f32>::new(C, 4 * C, &mut rng).unwrap();
    let block = mhc::MhcBlock::<f32>::new(mhc::MhcConfig::new(N, C), &mut rng).unwrap();
    let t = BATCH * SEQ;
    let hh = ndarray::Array2::from_shape_fn((t, C), |(i, j)| {
        ((i * 31 + j * 7) % 97) as f32 / 97.0 - 0.5
    });
    let xx = mhc::expand(hh.view(), N).unwrap();
    let res = mhc::ResidualBlock::new(C).unwrap();
    g.bench_function(BenchmarkId::new("residual_forward_backward", &id), |b| {
        b.iter(|| {
            let y = mlp.forward(hh.view()).unwrap();
            let out = res.forward(hh.view(), |_| y.clone()).unwrap();
            let (du, _) = mlp
                .backward(hh.view(), ndarray::Array2::ones(out.raw_dim()).view())
                .unwrap();
            black_box(du);
        })
    });
    g.bench_function(BenchmarkId::new("mhc_forward_backward", &id), |b| {
        b.iter(|| {
            let (out, y) = block
                .forward_train(xx.view(), |u| mlp.forward(u).unwrap())
                .unwrap();
            let up = ndarray::Array3::ones(out.raw_dim());
            let r = block
                .backward(xx.view(), y.view(), up.view(), |u, dy| {
                    mlp.backward(u, dy).unwrap().0
                })
                .unwrap();
            black_box(r);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report();
}

/// Reads the medians back from criterion's files and prints the ratios.
fn report() {
    let id = format!("n{N}_c{C}_t{}", BATCH * SEQ);
    let median = |group: &str, name: &str| -> Option<f64> {
        let dir = std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
        let p = format!("{dir}/criterion/{group}/{name}/{id}/new/estimates.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["median"]["point_estimate"].as_f64().map(|ns| ns / 1e6)
    };
    println!("\n| {id} | residual (ms) | mHC (ms) | mHC / residual − 1 |\n|---|---|---|---|");
    for (group, mode) in [
        ("burn_block", "forward"),
        ("burn_block", "forward_backward"),
        ("core_block", "forward_backward"),
    ] {
        if let (Some(r), Some(m)) = (
            median(group, &format!("residual_{mode}")),
            median(group, &format!("mhc_{mode}")),
        ) {
            println!(
                "| {group} {mode} | {r:.2} | {m:.2} | {:+.1} % |",
                (m / r - 1.0) * 100.0
            );
        }
    }
}
