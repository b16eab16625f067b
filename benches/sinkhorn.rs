//! Sinkhorn-Knopp throughput: `project_batch_into` and `vjp_batch_into` (reused output
//! buffers, so that the kernel and not the page faults of a fresh output is measured),
//! matrices per second.
//!
//! Run: `cargo bench --bench sinkhorn` (all threads) or
//! `RAYON_NUM_THREADS=1 cargo bench --bench sinkhorn -- f32/forward/n4` (per core).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mhc::{Float, SinkhornKnopp};
use ndarray::Array3;
use std::hint::black_box;

fn logits<F: Float>(b: usize, n: usize) -> Array3<F> {
    let mut s = 0x2545F4914F6CDD1Du64;
    Array3::from_shape_fn((b, n, n), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        F::from_f64(((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0)
    })
}

fn bench<F: Float>(c: &mut Criterion) {
    let sk = SinkhornKnopp::default();
    for dir in ["forward", "vjp"] {
        let mut g = c.benchmark_group(format!("{}/{dir}", F::NAME));
        g.sample_size(20);
        for &n in &[2usize, 4, 8] {
            for &b in &[4096usize, 65536] {
                let l = logits::<F>(b, n);
                let up = logits::<F>(b, n);
                let mut out = Array3::<F>::zeros((b, n, n));
                g.throughput(Throughput::Elements(b as u64));
                let id = BenchmarkId::new(format!("n{n}"), format!("b{b}"));
                if dir == "forward" {
                    g.bench_function(id, |bch| {
                        bch.iter(|| {
                            sk.project_batch_into(black_box(l.view()), out.view_mut())
                                .unwrap()
                        })
                    });
                } else {
                    g.bench_function(id, |bch| {
                        bch.iter(|| {
                            sk.vjp_batch_into(black_box(l.view()), up.view(), out.view_mut())
                                .unwrap()
                        })
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench::<f32>, bench::<f64>);
criterion_main!(benches);
