//! Chains of blocks (SPEC §8): the seam kernel, and a chain of 4 blocks under both schedules
//! against the same blocks called one by one.
//!
//! Run: `cargo bench --bench stack -- --warm-up-time 1 --measurement-time 4`; one shape:
//! `MHC_BENCH_SHAPES=n4_c1024_t4096 cargo bench --bench stack`. At the end it prints the medians
//! and ratios of the run, and the ratios of the pairs compared in interleaved rounds (the two
//! schedules' chains and seams, each seam against the two passes, the backward chains and seam
//! against their unfused forms), which the machine's drift between benches does not bias.
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
use mhc::{
    ChainLink, MhcBlock, MhcConfig, MhcParams, MhcStack, PrevBlock, Schedule, StackTape,
    StackWorkspace, Stage, Tape,
};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};
use std::hint::black_box;

#[path = "common/mod.rs"]
mod common;

const BLOCKS: usize = 4;
/// Interleaved rounds of the paired comparisons (`common::paired_ratio`).
const PAIRED_ROUNDS: usize = 15;

fn copy(_: usize, u: ArrayView2<f32>) -> Array2<f32> {
    u.to_owned()
}

/// `stack.forward_into` on `x` with buffers of its own, for the paired rounds.
fn forward_into<'a>(stack: &'a MhcStack<f32>, x: ArrayView3<'a, f32>) -> impl FnMut() + 'a {
    let (t, n, dim) = x.dim();
    let mut ws = StackWorkspace::default();
    let (mut out, mut pre) = (Array3::zeros((t, n, dim)), Array2::zeros((t, n)));
    move || {
        stack
            .forward_into(x, copy, &mut ws, out.view_mut(), pre.view_mut())
            .unwrap();
        black_box(&out);
    }
}

fn bench(c: &mut Criterion) {
    for (n, dim, t) in common::shapes(&[(4, 1024, 4096)]) {
        let id = format!("n{n}_c{dim}_t{t}");
        let mut paired = Vec::new();
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
        // The same with every buffer reused: fresh `[T, n, C]` buffers are paid in page faults
        // (≈ 0.5–1.5 µs a 4 KiB page here), which the allocating forms above include.
        for (name, stack) in [("current", &current), ("shifted", &shifted)] {
            let mut run = forward_into(stack, x.view());
            g.bench_function(BenchmarkId::new(format!("stack_{name}_into"), &id), |b| {
                b.iter(&mut run)
            });
        }
        g.finish();
        // The schedules against each other in interleaved rounds: their medians above swing by
        // ±10 % between runs on a shared machine.
        let xv = x.view();
        let r = common::paired_ratio(
            PAIRED_ROUNDS,
            &mut forward_into(&current, xv),
            &mut forward_into(&shifted, xv),
        );
        paired.push(format!(
            "| forward of {BLOCKS}, reused buffers: shifted / current, paired (median of {PAIRED_ROUNDS}) | | {r:.3} |"
        ));

        // One seam, and the two passes it replaces, with their bytes.
        let (u, maps) = blocks[0].read_out(x.view()).unwrap();
        let y = u.clone();
        let (b0, b1, maps, yv) = (&blocks[0], &blocks[1], &maps, y.view());
        let seam = |sched: Schedule| {
            let mut stage = Stage::default();
            move || {
                b0.write_in_seam_into(xv, maps, yv, b1, sched, &mut stage)
                    .unwrap();
                black_box(&stage);
            }
        };
        let mut g = c.benchmark_group("seam");
        g.sample_size(20);
        let bytes = ((2 * n + 2) * dim * t * 4) as u64;
        g.throughput(Throughput::Bytes(bytes));
        for (name, sched) in [
            ("seam_shifted", Schedule::Shifted),
            ("seam_current", Schedule::Current),
        ] {
            let mut run = seam(sched);
            g.bench_function(BenchmarkId::new(name, &id), |b| b.iter(&mut run));
        }
        let mut out = Array3::zeros((t, n, dim));
        let (mut m2, mut u2) = (mhc::Mappings::zeros(t, n), Array2::zeros((t, dim)));
        let mut two_passes = || {
            mhc::mixing::write_in_into(xv, maps, yv, out.view_mut()).unwrap();
            blocks[1]
                .read_out_into(out.view(), &mut m2, u2.view_mut())
                .unwrap();
            black_box(&u2);
        };
        g.bench_function(BenchmarkId::new("write_in_then_read_out", &id), |b| {
            b.iter(&mut two_passes)
        });
        g.finish();
        for (name, sched) in [
            ("shifted", Schedule::Shifted),
            ("current", Schedule::Current),
        ] {
            let r = common::paired_ratio(PAIRED_ROUNDS, &mut two_passes, &mut seam(sched));
            paired.push(format!(
                "| forward seam {name} / two passes, paired (median of {PAIRED_ROUNDS}) | | {r:.3} |"
            ));
        }
        let r = common::paired_ratio(
            PAIRED_ROUNDS,
            &mut seam(Schedule::Current),
            &mut seam(Schedule::Shifted),
        );
        paired.push(format!(
            "| forward seam shifted / current, paired (median of {PAIRED_ROUNDS}) | | {r:.3} |"
        ));

        // Backward: the chain with the backward seam (`backward_into`) against the same blocks'
        // linked halves one after the other, every buffer reused; and one seam against its two
        // halves. The sublayer VJP is a copy too.
        let up = Array3::from_shape_fn((t, n, dim), |(a, b, k)| {
            ((a * 7 + b * 3 + k) % 89) as f32 / 89.0 - 0.5
        });
        let vjp = |_: usize, _: ArrayView2<f32>, dy: ArrayView2<f32>| dy.to_owned();
        let mut g = c.benchmark_group("chain_backward");
        g.sample_size(10);
        for (name, stack) in [("shifted", &shifted), ("current", &current)] {
            let mut tape = StackTape::default();
            let (mut out, mut pre) = (Array3::zeros((t, n, dim)), Array2::zeros((t, n)));
            stack
                .forward_train_into(x.view(), copy, &mut tape, out.view_mut(), pre.view_mut())
                .unwrap();
            let mut ws = StackWorkspace::default();
            let mut dx = Array3::zeros((t, n, dim));
            g.bench_function(BenchmarkId::new(format!("stack_{name}"), &id), |b| {
                b.iter(|| {
                    black_box(
                        stack
                            .backward_into(&tape, up.view(), None, vjp, &mut ws, dx.view_mut())
                            .unwrap(),
                    )
                })
            });
            let mut un = Unfused::default();
            g.bench_function(BenchmarkId::new(format!("unfused_{name}"), &id), |b| {
                b.iter(|| black_box(un.run(stack, &tape, up.view())))
            });
            let r = common::paired_ratio(
                PAIRED_ROUNDS,
                &mut || {
                    black_box(un.run(stack, &tape, up.view()));
                },
                &mut || {
                    black_box(
                        stack
                            .backward_into(&tape, up.view(), None, vjp, &mut ws, dx.view_mut())
                            .unwrap(),
                    );
                },
            );
            paired.push(format!(
                "| backward of {BLOCKS}, {name}: stack / unfused, paired (median of {PAIRED_ROUNDS}) | | {r:.3} |"
            ));
        }
        g.finish();

        let mut g = c.benchmark_group("backward_seam");
        g.sample_size(20);
        // Block 0 with a copy sublayer: y_0 = u_0, x_1 its output.
        let (y0, m0) = blocks[0].read_out(x.view()).unwrap();
        let x1 = blocks[0].write_in(x.view(), &m0, y0.view()).unwrap();
        let mut t1 = Tape::default();
        blocks[1]
            .write_in_backward_into(x1.view(), y0.view(), up.view(), &mut t1)
            .unwrap();
        let du = t1.dy.clone();
        // One backward seam, and the two halves it fuses (the read-out half's ∂x_1 into `dx1`).
        let seam = |t1: &mut Tape<f32>, t0: &mut Tape<f32>| {
            let prev = PrevBlock {
                block: &blocks[0],
                x: x.view(),
                y: y0.view(),
                prev_pre: None,
            };
            blocks[1]
                .read_out_backward_seam_into(
                    x1.view(),
                    t1,
                    du.view(),
                    ChainLink::default(),
                    prev,
                    t0,
                )
                .unwrap()
        };
        let read_out_half = |t1: &mut Tape<f32>, dx1: &mut Array3<f32>| {
            blocks[1]
                .read_out_backward_into(x1.view(), t1, du.view(), dx1.view_mut())
                .unwrap()
        };
        let write_in_half = |t0: &mut Tape<f32>, dx1: &Array3<f32>| {
            blocks[0]
                .write_in_backward_into(x.view(), y0.view(), dx1.view(), t0)
                .unwrap()
        };
        let (mut t0, mut dx1) = (Tape::default(), Array3::zeros((t, n, dim)));
        g.bench_function(BenchmarkId::new("seam", &id), |b| {
            b.iter(|| black_box(seam(&mut t1, &mut t0)))
        });
        g.bench_function(
            BenchmarkId::new("read_out_half_then_write_in_half", &id),
            |b| {
                b.iter(|| {
                    let p = read_out_half(&mut t1, &mut dx1);
                    write_in_half(&mut t0, &dx1);
                    black_box(p)
                })
            },
        );
        g.bench_function(BenchmarkId::new("read_out_half", &id), |b| {
            b.iter(|| black_box(read_out_half(&mut t1, &mut dx1)))
        });
        g.bench_function(BenchmarkId::new("write_in_half", &id), |b| {
            b.iter(|| {
                write_in_half(&mut t0, &dx1);
                black_box(&t0);
            })
        });
        let (mut t1b, mut t0b) = (t1.clone(), Tape::default());
        let r = common::paired_ratio(
            PAIRED_ROUNDS,
            &mut || {
                black_box(read_out_half(&mut t1, &mut dx1));
                write_in_half(&mut t0, &dx1);
            },
            &mut || {
                black_box(seam(&mut t1b, &mut t0b));
            },
        );
        paired.push(format!(
            "| backward seam / two halves, paired (median of {PAIRED_ROUNDS}) | | {r:.3} |"
        ));
        g.finish();
        report(&id);
        for line in &paired {
            println!("{line}");
        }
    }
}

/// A chain's backward pass without the backward seam: each block's linked write-in half, the
/// VJP and its linked read-out half one after the other, with reused buffers.
#[derive(Default)]
struct Unfused {
    tape: Tape<f32>,
    g: Array3<f32>,
    dx: Array3<f32>,
    dpre: Array2<f32>,
    dprev: Array2<f32>,
    e0: Array2<f32>,
    pres: Vec<Array2<f32>>,
}

impl Unfused {
    fn ro(&self, shifted: bool, l: usize) -> Option<ndarray::ArrayView2<'_, f32>> {
        match (shifted, l) {
            (false, _) => None,
            (true, 0) => Some(self.e0.view()),
            (true, _) => Some(self.pres[l - 1].view()),
        }
    }

    fn run(
        &mut self,
        stack: &MhcStack<f32>,
        tape: &StackTape<f32>,
        up: ndarray::ArrayView3<f32>,
    ) -> Vec<MhcParams<f32>> {
        let xs: Vec<_> = tape.inputs().collect();
        let (nb, (t, n, c)) = (xs.len(), xs[0].dim());
        let shifted = stack.schedule() == Schedule::Shifted;
        if self.g.dim() != (t, n, c) {
            self.g = Array3::zeros((t, n, c));
            self.dx = Array3::zeros((t, n, c));
            (self.dpre, self.dprev) = (Array2::zeros((t, n)), Array2::zeros((t, n)));
            self.e0 = mhc::initial_pre(t, n);
            // The H_pre the forward pass computed (the tape keeps them; recomputed once here).
            self.pres = (0..nb)
                .map(|l| stack.blocks()[l].mappings(xs[l]).unwrap().pre)
                .collect();
        }
        let mut grads = vec![];
        for l in (0..nb).rev() {
            let b = &stack.blocks()[l];
            let gin = if l == nb - 1 { up } else { self.g.view() };
            let mut tp = std::mem::take(&mut self.tape);
            b.write_in_backward_linked_into(
                xs[l],
                tape.outputs()[l].view(),
                gin,
                self.ro(shifted, l),
                &mut tp,
            )
            .unwrap();
            let du = tp.dy.clone();
            let (mut dpre, mut dprev) = (
                std::mem::take(&mut self.dpre),
                std::mem::take(&mut self.dprev),
            );
            let mut dx = std::mem::take(&mut self.dx);
            let link = ChainLink {
                prev_pre: self.ro(shifted, l),
                dpre: (shifted && l < nb - 1).then(|| dpre.view()),
                dprev_pre: (shifted && l > 0).then(|| dprev.view_mut()),
            };
            grads.push(
                b.read_out_backward_linked_into(xs[l], &mut tp, du.view(), link, dx.view_mut())
                    .unwrap(),
            );
            std::mem::swap(&mut dpre, &mut dprev);
            (self.tape, self.dpre, self.dprev) = (tp, dpre, dprev);
            self.dx = std::mem::replace(&mut self.g, dx);
        }
        grads
    }
}

fn median(group: &str, name: &str, id: &str) -> Option<f64> {
    common::median_ns(group, name, id).map(|ns| ns / 1e6)
}

/// Rows `| {label}{name} | median | ratio{unit} |` of `group`'s `names`, each against `base`.
fn rows(group: &str, id: &str, base: &str, names: &[&str], label: &str, unit: &str) {
    let Some(b) = median(group, base, id) else {
        return;
    };
    for name in names {
        if let Some(m) = median(group, name, id) {
            println!("| {label}{name} | {m:.2} | {:.3}{unit} |", m / b);
        }
    }
}

fn report(id: &str) {
    println!("\n| {id} | median (ms) | ratio |\n|---|---|---|");
    let chain = [
        "blocks_one_by_one",
        "stack_current",
        "stack_shifted",
        "stack_current_into",
        "stack_shifted_into",
    ];
    let label = format!("chain of {BLOCKS}: ");
    rows(
        "chain_forward",
        id,
        chain[0],
        &chain,
        &label,
        "× one by one",
    );
    for name in ["shifted", "current"] {
        let (un, st) = (format!("unfused_{name}"), format!("stack_{name}"));
        let label = format!("backward of {BLOCKS}, {name}: ");
        rows("chain_backward", id, &un, &[&un, &st], &label, "× unfused");
    }
    let halves = [
        "read_out_half",
        "write_in_half",
        "read_out_half_then_write_in_half",
        "seam",
    ];
    let label = "backward seam: ";
    rows(
        "backward_seam",
        id,
        halves[2],
        &halves,
        label,
        "× two halves",
    );
    let label = format!("chain of {BLOCKS}, reused buffers, shifted / current: ");
    let into = ["stack_shifted_into"];
    rows("chain_forward", id, "stack_current_into", &into, &label, "");
    let seams = ["write_in_then_read_out", "seam_current", "seam_shifted"];
    rows("seam", id, seams[0], &seams, "", "× two passes");
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
