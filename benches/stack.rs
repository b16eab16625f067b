//! Chains of blocks (SPEC §8): the seam kernel, and a chain of 4 blocks under both schedules
//! against the same blocks called one by one.
//!
//! Run: `cargo bench --bench stack -- --warm-up-time 1 --measurement-time 4`; one shape:
//! `MHC_BENCH_SHAPES=n4_c1024_t4096 cargo bench --bench stack`. At the end it prints the medians
//! and ratios of the run.
//!
//! The sublayer is a copy (`y = u`), so the chain's own kernels dominate. Predictions
//! (n = 4, C = 1024, T = 4096, f32, 2 threads; BENCHMARKS.md's triad ≈ 19–26 GiB/s and faer GEMM
//! ≈ 76 GFLOP/s): a seam reads `x_l` and `y_l` and writes `x_{l+1}` and `u_{l+1}`,
//! `(2n + 2)·C` values a token = 168 MB (≈ 6.5–8.5 ms), and projects `x_{l+1}` through φ
//! (`[T, 4096] × [4096, 24]`, 0.8 GFLOP, ≈ 10.5 ms): its floor is the projection. One by one, a
//! block's fused read-out (≈ 10.5 ms, projection-bound) and write-in (≈ 7–8 ms of traffic) run
//! back to back: ≈ 18 ms a block against ≈ 10.5 ms a seam.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{MhcBlock, MhcConfig, MhcStack, Schedule, Stage};
use ndarray::{Array2, Array3, ArrayView2};
use std::hint::black_box;

#[path = "common/mod.rs"]
mod common;

const BLOCKS: usize = 4;

fn copy(_: usize, u: ArrayView2<f32>) -> Array2<f32> {
    u.to_owned()
}

fn bench(c: &mut Criterion) {
    for (n, dim, t) in common::shapes(&[(4, 1024, 4096)]) {
        let id = format!("n{n}_c{dim}_t{t}");
        let mut rng = StdRng::seed_from_u64(0);
        let blocks: Vec<MhcBlock<f32>> = (0..BLOCKS)
            .map(|_| MhcBlock::new(MhcConfig::new(n, dim), &mut rng).unwrap())
            .collect();
        let x = Array3::from_shape_fn((t, n, dim), |(a, b, k)| {
            ((a * 13 + b * 7 + k) % 101) as f32 / 101.0 - 0.5
        });
        let current = MhcStack::new(blocks.clone(), Schedule::Current).unwrap();
        let shifted = MhcStack::new(blocks.clone(), Schedule::Shifted).unwrap();

        let mut g = c.benchmark_group("chain_forward");
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("blocks_one_by_one", &id), |b| {
            b.iter(|| {
                let mut h = x.clone();
                for (l, blk) in blocks.iter().enumerate() {
                    h = blk.forward(h.view(), |u| copy(l, u)).unwrap();
                }
                black_box(h)
            })
        });
        g.bench_function(BenchmarkId::new("stack_current", &id), |b| {
            b.iter(|| black_box(current.forward(x.view(), copy).unwrap()))
        });
        g.bench_function(BenchmarkId::new("stack_shifted", &id), |b| {
            b.iter(|| black_box(shifted.forward(x.view(), copy).unwrap()))
        });
        g.finish();

        // One seam, and the two passes it replaces, with their bytes.
        let (u, maps) = blocks[0].read_out(x.view()).unwrap();
        let y = u.clone();
        let mut stage = Stage::default();
        let mut g = c.benchmark_group("seam");
        g.sample_size(20);
        let bytes = ((2 * n + 2) * dim * t * 4) as u64;
        g.throughput(Throughput::Bytes(bytes));
        for (name, sched) in [
            ("seam_shifted", Schedule::Shifted),
            ("seam_current", Schedule::Current),
        ] {
            g.bench_function(BenchmarkId::new(name, &id), |b| {
                b.iter(|| {
                    blocks[0]
                        .write_in_seam_into(
                            x.view(),
                            &maps,
                            y.view(),
                            &blocks[1],
                            sched,
                            &mut stage,
                        )
                        .unwrap();
                    black_box(&stage);
                })
            });
        }
        let mut out = Array3::zeros((t, n, dim));
        let (mut m2, mut u2) = (mhc::Mappings::zeros(t, n), Array2::zeros((t, dim)));
        g.bench_function(BenchmarkId::new("write_in_then_read_out", &id), |b| {
            b.iter(|| {
                mhc::mixing::write_in_into(x.view(), &maps, y.view(), out.view_mut()).unwrap();
                blocks[1]
                    .read_out_into(out.view(), &mut m2, u2.view_mut())
                    .unwrap();
                black_box(&u2);
            })
        });
        g.finish();
        report(&id);
    }
}

fn median(group: &str, name: &str, id: &str) -> Option<f64> {
    common::median_ns(group, name, id).map(|ns| ns / 1e6)
}

fn report(id: &str) {
    println!("\n| {id} | median (ms) | ratio |\n|---|---|---|");
    let base = median("chain_forward", "blocks_one_by_one", id);
    for name in ["blocks_one_by_one", "stack_current", "stack_shifted"] {
        if let (Some(m), Some(b)) = (median("chain_forward", name, id), base) {
            println!(
                "| chain of {BLOCKS}: {name} | {m:.2} | {:.3}× one by one |",
                m / b
            );
        }
    }
    let base = median("seam", "write_in_then_read_out", id);
    for name in ["write_in_then_read_out", "seam_current", "seam_shifted"] {
        if let (Some(m), Some(b)) = (median("seam", name, id), base) {
            println!("| {name} | {m:.2} | {:.3}× two passes |", m / b);
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
