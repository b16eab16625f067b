//! The cost of mHC and HC over a plain residual connection around the identical MLP sublayer.
//!
//! Run: `cargo bench --bench overhead` (all shapes), or one shape:
//! `MHC_BENCH_SHAPES=n4_c1024_t4096 cargo bench --bench overhead`.
//! At the end it prints (and writes to `target/criterion/overhead.md`) the table of median
//! times and overhead ratios `mhc / residual − 1`, all measured in the same run.
//!
//! The floor (n = 4, C = 1024, T = 4096, f32): the sublayer `C → 4C → C` does 68.7 GFLOP in
//! forward; mHC adds ~56 KiB of DRAM traffic per token (≈ 230 MiB, ≈ 11 ms at 21 GB/s) and a
//! `[T, 4096] × [4096, 24]` projection (0.8 GFLOP). Against the MLP's ≈ 340 ms on 2 cores that
//! is an overhead floor of ≈ 4–5 %.

use criterion::{BenchmarkId, Criterion, criterion_group};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{HcBlock, HcConfig, MhcBlock, MhcConfig, Mlp, ResidualBlock};
use ndarray::{Array2, Array3};
use rand_distr::{Distribution, StandardNormal};
use std::cell::RefCell;
use std::hint::black_box;

const SHAPES: &[(usize, usize, usize)] = &[
    (4, 1024, 4096),
    (2, 1024, 4096),
    (8, 1024, 4096),
    (4, 512, 4096),
    (4, 2048, 4096),
];

fn shapes() -> Vec<(usize, usize, usize)> {
    match std::env::var("MHC_BENCH_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|p| {
                let v: Vec<usize> = p
                    .split('_')
                    .map(|f| f[1..].parse().expect("n{n}_c{C}_t{T}"))
                    .collect();
                (v[0], v[1], v[2])
            })
            .collect(),
        Err(_) => SHAPES.to_vec(),
    }
}

fn randn(shape: (usize, usize), rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_simple_fn(shape, || {
        let z: f64 = StandardNormal.sample(rng);
        z as f32
    })
}

fn bench(c: &mut Criterion) {
    for (n, dim, t) in shapes() {
        let id = format!("n{n}_c{dim}_t{t}");
        let mut rng = StdRng::seed_from_u64(0);
        let mlp = Mlp::<f32>::new(dim, 4 * dim, &mut rng).unwrap();
        let h = randn((t, dim), &mut rng);
        let x = mhc::expand(h.view(), n).unwrap();
        let up3 =
            Array3::from_shape_fn((t, n, dim), |(i, j, k)| h[[i, k]] * (j as f32 + 1.0) * 0.1);
        let up2 = h.mapv(|v| v * 0.1);
        let residual = ResidualBlock::new(dim).unwrap();
        let mhc = MhcBlock::<f32>::new(MhcConfig::new(n, dim), &mut rng).unwrap();
        let hc = HcBlock::<f32>::new(HcConfig::new(n, dim)).unwrap();
        let mlp = &mlp;
        let f = |u: ndarray::ArrayView2<f32>| mlp.forward(u).unwrap();
        let grads = RefCell::new(None);
        let vjp = |u: ndarray::ArrayView2<f32>, dy: ndarray::ArrayView2<f32>| {
            let (du, g) = mlp.backward(u, dy).unwrap();
            *grads.borrow_mut() = Some(g);
            du
        };

        let mut g = c.benchmark_group("forward");
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("residual", &id), |b| {
            b.iter(|| residual.forward(black_box(h.view()), f).unwrap())
        });
        g.bench_function(BenchmarkId::new("hc", &id), |b| {
            b.iter(|| hc.forward(black_box(x.view()), f).unwrap())
        });
        g.bench_function(BenchmarkId::new("mhc", &id), |b| {
            b.iter(|| mhc.forward(black_box(x.view()), f).unwrap())
        });
        g.finish();

        let mut g = c.benchmark_group("forward_backward");
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("residual", &id), |b| {
            b.iter(|| {
                let out = residual.forward(black_box(h.view()), f).unwrap();
                let (du, gr) = mlp.backward(h.view(), up2.view()).unwrap();
                (out, &du + &up2, gr)
            })
        });
        g.bench_function(BenchmarkId::new("hc", &id), |b| {
            b.iter(|| {
                let (out, y) = hc.forward_train(black_box(x.view()), f).unwrap();
                (
                    out,
                    hc.backward(x.view(), y.view(), up3.view(), vjp).unwrap(),
                )
            })
        });
        g.bench_function(BenchmarkId::new("mhc", &id), |b| {
            b.iter(|| {
                let (out, y) = mhc.forward_train(black_box(x.view()), f).unwrap();
                (
                    out,
                    mhc.backward(x.view(), y.view(), up3.view(), vjp).unwrap(),
                )
            })
        });
        g.finish();

        let rounds = 7;
        let fw = paired(
            rounds,
            [
                &mut || drop(black_box(residual.forward(h.view(), f).unwrap())),
                &mut || drop(black_box(hc.forward(x.view(), f).unwrap())),
                &mut || drop(black_box(mhc.forward(x.view(), f).unwrap())),
            ],
        );
        let fb = paired(
            rounds,
            [
                &mut || {
                    let out = residual.forward(h.view(), f).unwrap();
                    drop(black_box((
                        out,
                        mlp.backward(h.view(), up2.view()).unwrap(),
                    )));
                },
                &mut || {
                    let (out, y) = hc.forward_train(x.view(), f).unwrap();
                    drop(black_box((
                        out,
                        hc.backward(x.view(), y.view(), up3.view(), vjp).unwrap(),
                    )));
                },
                &mut || {
                    let (out, y) = mhc.forward_train(x.view(), f).unwrap();
                    drop(black_box((
                        out,
                        mhc.backward(x.view(), y.view(), up3.view(), vjp).unwrap(),
                    )));
                },
            ],
        );
        PAIRED.lock().unwrap().push(format!(
            "| {id} | {:+.1} % | {:+.1} % | {:+.1} % | {:+.1} % |",
            fw.0 * 100.0,
            fw.1 * 100.0,
            fb.0 * 100.0,
            fb.1 * 100.0
        ));
    }
}

/// Median (ns) of one benchmark from criterion's `estimates.json`.
fn median_ns(group: &str, function: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{function}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// Interleaved, paired timing: each round times residual, HC and mHC back to back, so that
/// the machine's load drifts alike for the three; returns the median ratios over the rounds.
fn paired(rounds: usize, mut f: [&mut dyn FnMut(); 3]) -> (f64, f64) {
    let mut hc = Vec::new();
    let mut mhc = Vec::new();
    for _ in 0..rounds {
        let mut t = [0.0; 3];
        for (k, g) in f.iter_mut().enumerate() {
            let s = std::time::Instant::now();
            g();
            t[k] = s.elapsed().as_secs_f64();
        }
        hc.push(t[1] / t[0] - 1.0);
        mhc.push(t[2] / t[0] - 1.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut hc), median(&mut mhc))
}

fn report() {
    let mut out = String::from(
        "| group | shape | residual (ms) | hc (ms) | mhc (ms) | hc overhead | mhc overhead |\n|---|---|---|---|---|---|---|\n",
    );
    for group in ["forward", "forward_backward"] {
        for (n, dim, t) in shapes() {
            let id = format!("n{n}_c{dim}_t{t}");
            let (Some(r), Some(h), Some(m)) = (
                median_ns(group, "residual", &id),
                median_ns(group, "hc", &id),
                median_ns(group, "mhc", &id),
            ) else {
                continue;
            };
            out += &format!(
                "| {group} | {id} | {:.1} | {:.1} | {:.1} | {:+.1} % | {:+.1} % |\n",
                r / 1e6,
                h / 1e6,
                m / 1e6,
                (h / r - 1.0) * 100.0,
                (m / r - 1.0) * 100.0
            );
        }
    }
    out += "\nPaired, interleaved rounds (median of 7 ratios to the residual block):\n\n";
    out +=
        "| shape | hc forward | mhc forward | hc fwd+bwd | mhc fwd+bwd |\n|---|---|---|---|---|\n";
    for row in PAIRED.lock().unwrap().iter() {
        out += row;
        out += "\n";
    }
    println!("\n{out}");
    let _ = std::fs::write("target/criterion/overhead.md", &out);
}

static PAIRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

criterion_group!(benches, bench);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    report();
}
