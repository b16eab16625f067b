//! Memory-bound kernels in GB/s (bytes read + written), next to the machine's triad bandwidth
//! measured in the same run.
//!
//! Run: `cargo bench --bench kernels`
//!
//! - `triad`: `a = b + s·c` over 3 × 64 MiB, the bandwidth reference;
//! - `read_out`: mHC's fused mappings + read-out, reads `x` (`T·n·C`), writes `u` (`T·C`) and
//!   the mappings;
//! - `read_out_mixing`: the read-out alone (`mixing::read_out_into`, given `H_pre`): reads `x`
//!   and `H_pre`, writes `u`: the memory-bound half of `read_out`;
//! - `write_in`: reads `x`, `y`, mappings, writes `out` (`T·n·C`);
//! - `mappings`: the mappings alone (reads `x`);
//! - `write_in_backward`: the write-in half of the backward pass into a reused tape: reads `x`,
//!   `y` and `∂out`, writes `u`, `∂y` and the write-in's part of `∂x` (and recomputes the
//!   mappings: the same projection as `read_out`);
//! - `read_out_backward`: the read-out half into a caller's `∂x`: reads `x`, `∂u` and the
//!   tape's `∂x`, writes `∂x`, and runs the projection's two backward products.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{MhcBlock, MhcConfig};
use ndarray::{Array1, Array2, Array3};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernels");
    g.sample_size(20);
    let len = 16 << 20; // 16 Mi f32 = 64 MiB per array
    let b = Array1::<f32>::from_elem(len, 1.0);
    let cc = Array1::<f32>::from_elem(len, 2.0);
    let mut a = Array1::<f32>::zeros(len);
    g.throughput(Throughput::Bytes((3 * len * 4) as u64));
    g.bench_function("triad", |bch| {
        bch.iter(|| {
            ndarray::Zip::from(&mut a)
                .and(&b)
                .and(&cc)
                .par_for_each(|a, &b, &c| *a = b + 0.5 * c);
        })
    });
    for &(n, dim, t) in &[
        (4usize, 1024usize, 4096usize),
        (4, 256, 16384),
        (8, 1024, 4096),
    ] {
        let id = format!("n{n}_c{dim}_t{t}");
        let block =
            MhcBlock::<f32>::new(MhcConfig::new(n, dim), &mut StdRng::seed_from_u64(0)).unwrap();
        let x = Array3::<f32>::from_shape_fn((t, n, dim), |(i, j, k)| {
            ((i + 3 * j + 7 * k) % 13) as f32 * 0.1 - 0.6
        });
        let y = Array2::<f32>::from_elem((t, dim), 0.3);
        let (tn, f) = ((t * n * dim) as u64, 4u64);
        let maps_bytes = (t * (2 * n + n * n)) as u64 * f;
        let mut maps = mhc::Mappings::zeros(t, n);
        let mut u = Array2::zeros((t, dim));
        g.throughput(Throughput::Bytes(
            tn * f + (t * dim) as u64 * f + maps_bytes,
        ));
        g.bench_function(BenchmarkId::new("read_out", &id), |bch| {
            bch.iter(|| {
                block
                    .read_out_into(black_box(x.view()), &mut maps, u.view_mut())
                    .unwrap()
            })
        });
        g.throughput(Throughput::Bytes(
            tn * f + (t * dim) as u64 * f + (t * n) as u64 * f,
        ));
        g.bench_function(BenchmarkId::new("read_out_mixing", &id), |bch| {
            bch.iter(|| {
                mhc::mixing::read_out_into(black_box(x.view()), maps.pre.view(), u.view_mut())
                    .unwrap()
            })
        });
        let mut out = Array3::zeros((t, n, dim));
        g.throughput(Throughput::Bytes(
            2 * tn * f + (t * dim) as u64 * f + maps_bytes,
        ));
        g.bench_function(BenchmarkId::new("write_in", &id), |bch| {
            bch.iter(|| {
                mhc::mixing::write_in_into(black_box(x.view()), &maps, y.view(), out.view_mut())
                    .unwrap()
            })
        });
        g.throughput(Throughput::Bytes(tn * f + maps_bytes));
        g.bench_function(BenchmarkId::new("mappings", &id), |bch| {
            bch.iter(|| block.mappings(black_box(x.view())).unwrap())
        });
        let up = Array3::<f32>::from_elem((t, n, dim), 0.01);
        let mut tape = mhc::Tape::default();
        let tc = (t * dim) as u64;
        g.throughput(Throughput::Bytes((3 * tn + 3 * tc) * f + maps_bytes));
        g.bench_function(BenchmarkId::new("write_in_backward", &id), |bch| {
            bch.iter(|| {
                block
                    .write_in_backward_into(black_box(x.view()), y.view(), up.view(), &mut tape)
                    .unwrap()
            })
        });
        // Filled here too, so that the read-out half can be benchmarked on its own
        // (`-- read_out_backward`).
        block
            .write_in_backward_into(x.view(), y.view(), up.view(), &mut tape)
            .unwrap();
        let du = tape.dy.clone();
        let mut dx = Array3::zeros((t, n, dim));
        g.throughput(Throughput::Bytes((3 * tn + tc) * f));
        g.bench_function(BenchmarkId::new("read_out_backward", &id), |bch| {
            bch.iter(|| {
                block
                    .read_out_backward_into(
                        black_box(x.view()),
                        &mut tape,
                        du.view(),
                        dx.view_mut(),
                    )
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
