//! The cost of mHC and HC over a plain residual connection around the identical MLP sublayer.
//!
//! Run: `cargo bench --bench overhead` (all shapes), or one shape:
//! `MHC_BENCH_SHAPES=n4_c1024_t4096 cargo bench --bench overhead`.
//! At the end it prints (and writes to `target/criterion/overhead.md`) the table of median
//! times and overhead ratios `mhc / residual − 1`, all measured in the same run.
//!
//! Two groups, both by default, one with `MHC_BENCH_GROUPS=blocks` or `=stack`: single blocks
//! (residual, HC, mHC) and chains of 4 blocks (a residual chain against `MhcStack` under both
//! schedules; table in `target/criterion/overhead_stack.md`, shapes n ∈ {2, 4, 8} at C = 1024,
//! T = 4096 unless `MHC_BENCH_SHAPES` says otherwise).
//!
//! The floor (n = 4, C = 1024, T = 4096, f32): the sublayer `C → 4C → C` does 68.7 GFLOP in
//! forward; mHC adds ~56 KiB of DRAM traffic per token (≈ 230 MiB, ≈ 11 ms at 21 GB/s) and a
//! `[T, 4096] × [4096, 24]` projection (0.8 GFLOP). Against the MLP's ≈ 340 ms on 2 cores that
//! is an overhead floor of ≈ 4–5 %.

use criterion::{BenchmarkId, Criterion, criterion_group};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{
    HcBlock, HcConfig, MhcBlock, MhcConfig, MhcStack, Mlp, ResidualBlock, Schedule, StackTape,
    StackWorkspace,
};
use ndarray::{Array2, Array3, ArrayView2};
use rand_distr::{Distribution, StandardNormal};
use std::cell::RefCell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;
use common::median_ns;

const SHAPES: &[(usize, usize, usize)] = &[
    (4, 1024, 4096),
    (2, 1024, 4096),
    (8, 1024, 4096),
    (4, 512, 4096),
    (4, 2048, 4096),
];

fn shapes() -> Vec<(usize, usize, usize)> {
    common::shapes(SHAPES)
}

fn randn(shape: (usize, usize), rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_simple_fn(shape, || {
        let z: f64 = StandardNormal.sample(rng);
        z as f32
    })
}

/// What every bench shape starts from: the MLP `C → 4C → C`, a residual-stream input `h`, its
/// `n` streams `x`, upstream gradients for both, and the residual block.
struct Setup {
    id: String,
    rng: StdRng,
    mlp: Mlp<f32>,
    h: Array2<f32>,
    x: Array3<f32>,
    up3: Array3<f32>,
    up2: Array2<f32>,
    residual: ResidualBlock,
}

fn setup(n: usize, dim: usize, t: usize) -> Setup {
    let mut rng = StdRng::seed_from_u64(0);
    let mlp = Mlp::<f32>::new(dim, 4 * dim, &mut rng).unwrap();
    let h = randn((t, dim), &mut rng);
    let x = mhc::expand(h.view(), n).unwrap();
    let up3 = Array3::from_shape_fn((t, n, dim), |(i, j, k)| h[[i, k]] * (j as f32 + 1.0) * 0.1);
    let up2 = h.mapv(|v| v * 0.1);
    Setup {
        id: format!("n{n}_c{dim}_t{t}"),
        rng,
        mlp,
        h,
        x,
        up3,
        up2,
        residual: ResidualBlock::new(dim).unwrap(),
    }
}

/// Whether the group `name` (`blocks` or `stack`) runs: `MHC_BENCH_GROUPS=stack` picks one;
/// both by default.
fn runs(name: &str) -> bool {
    std::env::var("MHC_BENCH_GROUPS").map_or(true, |g| g.split(',').any(|v| v == name))
}

fn bench(c: &mut Criterion) {
    if !runs("blocks") {
        return;
    }
    for (n, dim, t) in shapes() {
        let Setup {
            id,
            mut rng,
            mlp,
            h,
            x,
            up3,
            up2,
            residual,
        } = setup(n, dim, t);
        let mhc = MhcBlock::<f32>::new(MhcConfig::new(n, dim), &mut rng).unwrap();
        let hc = HcBlock::<f32>::new(HcConfig::new(n, dim)).unwrap();
        let mlp = &mlp;
        // The sublayer's forward and backward, timed (see `sublayer`).
        let f = |u: ndarray::ArrayView2<f32>| sublayer(|| mlp.forward(u).unwrap());
        let grads = RefCell::new(None);
        let vjp = |u: ndarray::ArrayView2<f32>, dy: ndarray::ArrayView2<f32>| {
            let (du, g) = sublayer(|| mlp.backward(u, dy).unwrap());
            *grads.borrow_mut() = Some(g);
            du
        };

        // The steady state of a training loop: one tape per block, `out` and `∂x` buffers
        // reused (the `*_into` methods), the residual's `∂x` accumulated in place.
        let state = || {
            RefCell::new((
                mhc::Tape::default(),
                Array3::zeros((t, n, dim)),
                Array3::zeros((t, n, dim)),
            ))
        };
        let (st_hc, st_mhc) = (state(), state());
        let mut fwd_res = || drop(black_box(residual.forward(h.view(), f).unwrap()));
        let mut fwd_hc = || {
            let (tape, out, _) = &mut *st_hc.borrow_mut();
            let y = hc.forward_train_into(x.view(), f, tape, out.view_mut());
            drop(black_box(y.unwrap()));
        };
        let mut fwd_mhc = || {
            let (tape, out, _) = &mut *st_mhc.borrow_mut();
            let y = mhc.forward_train_into(x.view(), f, tape, out.view_mut());
            drop(black_box(y.unwrap()));
        };
        g_bench(c, "forward", &id, [&mut fwd_res, &mut fwd_hc, &mut fwd_mhc]);

        let mut fb_res = || {
            let out = residual.forward(h.view(), f).unwrap();
            let (mut du, gr) = sublayer(|| mlp.backward(h.view(), up2.view()).unwrap());
            du += &up2;
            drop(black_box((out, du, gr)));
        };
        let mut fb_hc = || {
            let (tape, out, dx) = &mut *st_hc.borrow_mut();
            let y = hc
                .forward_train_into(x.view(), f, tape, out.view_mut())
                .unwrap();
            let g = hc.backward_into(x.view(), y.view(), up3.view(), vjp, tape, dx.view_mut());
            drop(black_box(g.unwrap()));
        };
        let mut fb_mhc = || {
            let (tape, out, dx) = &mut *st_mhc.borrow_mut();
            let y = mhc
                .forward_train_into(x.view(), f, tape, out.view_mut())
                .unwrap();
            let g = mhc.backward_into(x.view(), y.view(), up3.view(), vjp, tape, dx.view_mut());
            drop(black_box(g.unwrap()));
        };
        g_bench(
            c,
            "forward_backward",
            &id,
            [&mut fb_res, &mut fb_hc, &mut fb_mhc],
        );

        let rounds = 7;
        let fw = paired(rounds, &mut [&mut fwd_res, &mut fwd_hc, &mut fwd_mhc]);
        let fb = paired(rounds, &mut [&mut fb_res, &mut fb_hc, &mut fb_mhc]);
        // The allocating methods (fresh `out`, `u`, tape and `∂x` every call), for comparison.
        let fb_alloc = paired(
            rounds,
            &mut [
                &mut fb_res,
                &mut || {
                    let (out, y) = hc.forward_train(x.view(), f).unwrap();
                    let g = hc.backward(x.view(), y.view(), up3.view(), vjp).unwrap();
                    drop(black_box((out, g)));
                },
                &mut || {
                    let (out, y) = mhc.forward_train(x.view(), f).unwrap();
                    let g = mhc.backward(x.view(), y.view(), up3.view(), vjp).unwrap();
                    drop(black_box((out, g)));
                },
            ],
        );
        let pct = |v: f64| format!("{:+.1} %", v * 100.0);
        let ms = |o: &Overhead| {
            let v: Vec<String> = o.sublayer_ms.iter().map(|m| format!("{m:.0}")).collect();
            v.join(" / ")
        };
        // One table row per variant (HC = 0, mHC = 1).
        for (v, rows) in PAIRED.lock().unwrap().iter_mut().enumerate() {
            rows.push(format!(
                "| {id} | {} | {} | {} | {} | {} | {} | {} | {} |",
                pct(fw.ratio[v]),
                pct(fw.attributed[v]),
                pct(fb.ratio[v]),
                pct(fb.attributed[v]),
                pct(fb_alloc.ratio[v]),
                pct(fb_alloc.attributed[v]),
                ms(&fw),
                ms(&fb),
            ));
        }
    }
}

/// One criterion group with the three variants of one shape.
fn g_bench(c: &mut Criterion, group: &str, id: &str, f: [&mut dyn FnMut(); 3]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for (name, f) in ["residual", "hc", "mhc"].into_iter().zip(f) {
        g.bench_function(BenchmarkId::new(name, id), |b| b.iter(&mut *f));
    }
    g.finish();
}

/// Nanoseconds spent inside the sublayer (the MLP's forward and backward) since the last reset.
static SUBLAYER_NS: AtomicU64 = AtomicU64::new(0);

/// Runs `f` (a call of the sublayer) and adds its time to [`SUBLAYER_NS`].
fn sublayer<R>(f: impl FnOnce() -> R) -> R {
    let s = Instant::now();
    let r = f();
    SUBLAYER_NS.fetch_add(s.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Two estimates of the overhead of each variant over the first (the residual).
struct Overhead {
    /// Median over rounds of `t_variant / t_residual − 1`, one a variant after the first.
    ratio: Vec<f64>,
    /// Median over rounds of `(own_variant − own_residual) / t_residual`, where `own` is a
    /// call's time minus the time spent inside the sublayer in that call.
    attributed: Vec<f64>,
    /// Median time inside the sublayer per call (ms), one a variant (the residual first).
    sublayer_ms: Vec<f64>,
}

/// Interleaved, paired timing: each round times the residual and every variant back to back,
/// so that the machine's load drifts alike for all of them.
///
/// The plain ratio carries the sublayer's own run-to-run noise (±10 % on the shared machine,
/// larger than what is being measured); the attributed estimate subtracts, call by call, the
/// time spent inside the identical sublayer, leaving each block's own work, and divides the
/// difference by the residual block's total time. The two agree in expectation when the
/// sublayer costs the same under every block, which is what "identical sublayer" means.
fn paired(rounds: usize, f: &mut [&mut dyn FnMut()]) -> Overhead {
    let k = f.len();
    let (mut ratio, mut attr) = (vec![Vec::new(); k - 1], vec![Vec::new(); k - 1]);
    let mut sub = vec![Vec::new(); k];
    for _ in 0..rounds {
        let mut t = vec![0.0; k];
        let mut own = vec![0.0; k];
        for (i, g) in f.iter_mut().enumerate() {
            SUBLAYER_NS.store(0, Ordering::Relaxed);
            let s = Instant::now();
            g();
            t[i] = s.elapsed().as_secs_f64();
            let inside = SUBLAYER_NS.load(Ordering::Relaxed) as f64 * 1e-9;
            own[i] = t[i] - inside;
            sub[i].push(inside * 1e3);
        }
        for v in 0..k - 1 {
            ratio[v].push(t[v + 1] / t[0] - 1.0);
            attr[v].push((own[v + 1] - own[0]) / t[0]);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Overhead {
        ratio: ratio.into_iter().map(median).collect(),
        attributed: attr.into_iter().map(median).collect(),
        sublayer_ms: sub.into_iter().map(median).collect(),
    }
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
    out += "\nPaired, interleaved rounds (median of 7): `ratio` is `t / t_residual − 1`, \
        `attributed` is `(own − own_residual) / t_residual` with `own` = time outside the \
        sublayer. `*_into` methods with a reused tape, except the `alloc` columns.\n";
    let header = "| shape | forward ratio | forward attributed | fwd+bwd ratio | fwd+bwd attributed \
        | fwd+bwd ratio (alloc) | fwd+bwd attributed (alloc) | sublayer fwd ms (res / hc / mhc) \
        | sublayer fwd+bwd ms |\n|---|---|---|---|---|---|---|---|---|\n";
    let paired = PAIRED.lock().unwrap();
    for (name, rows) in [("mHC", &paired[1]), ("HC", &paired[0])] {
        out += &format!("\n{name}:\n\n{header}");
        for row in rows.iter() {
            out += row;
            out += "\n";
        }
    }
    println!("\n{out}");
    let _ = std::fs::write("target/criterion/overhead.md", &out);
}

/// The paired tables' rows, HC's then mHC's.
static PAIRED: std::sync::Mutex<[Vec<String>; 2]> = std::sync::Mutex::new([Vec::new(), Vec::new()]);

/// Blocks a chain in the stack benches.
const BLOCKS: usize = 4;

/// The stack benches' shapes (issue 13: n ∈ {2, 4, 8} at C = 1024, T = 4096).
const STACK_SHAPES: &[(usize, usize, usize)] = &[(4, 1024, 4096), (2, 1024, 4096), (8, 1024, 4096)];

/// Chains of [`BLOCKS`] blocks around the same MLP in every sublayer: a residual chain against
/// `MhcStack` under both schedules, forward (`forward_into`) and forward + backward
/// (`forward_train_into` + `backward_into`), every buffer reused.
fn bench_stack(c: &mut Criterion) {
    if !runs("stack") {
        return;
    }
    for (n, dim, t) in common::shapes(STACK_SHAPES) {
        let Setup {
            id,
            mut rng,
            mlp,
            h,
            x,
            up3,
            up2,
            residual,
        } = setup(n, dim, t);
        let blocks: Vec<MhcBlock<f32>> = (0..BLOCKS)
            .map(|_| MhcBlock::new(MhcConfig::new(n, dim), &mut rng).unwrap())
            .collect();
        let current = MhcStack::new(blocks.clone(), Schedule::Current).unwrap();
        let shifted = MhcStack::new(blocks, Schedule::Shifted).unwrap();
        let mlp = &mlp;
        let f = |_l: usize, u: ArrayView2<f32>| sublayer(|| mlp.forward(u).unwrap());
        let vjp = |_l: usize, u: ArrayView2<f32>, dy: ArrayView2<f32>| {
            sublayer(|| mlp.backward(u, dy).unwrap()).0
        };

        let mut fwd_res = || {
            let mut a = h.clone();
            for l in 0..BLOCKS {
                a = residual.forward(a.view(), |u| f(l, u)).unwrap();
            }
            drop(black_box(a));
        };
        let mut fb_res = || {
            let mut hs = Vec::with_capacity(BLOCKS + 1);
            hs.push(h.clone());
            for l in 0..BLOCKS {
                let next = residual.forward(hs[l].view(), |u| f(l, u)).unwrap();
                hs.push(next);
            }
            let mut g = up2.clone();
            for l in (0..BLOCKS).rev() {
                let du = vjp(l, hs[l].view(), g.view());
                g += &du;
            }
            drop(black_box(g));
        };
        let state = || {
            RefCell::new((
                StackTape::default(),
                StackWorkspace::default(),
                Array3::zeros((t, n, dim)),
                Array2::zeros((t, n)),
                Array3::zeros((t, n, dim)),
            ))
        };
        let (st_cur, st_sh) = (state(), state());
        let fwd = |stack: &MhcStack<f32>, st: &StackState| {
            let (_, ws, out, pre, _) = &mut *st.borrow_mut();
            stack
                .forward_into(x.view(), f, ws, out.view_mut(), pre.view_mut())
                .unwrap();
            black_box(&out);
        };
        let fb = |stack: &MhcStack<f32>, st: &StackState| {
            let (tape, ws, out, pre, dx) = &mut *st.borrow_mut();
            stack
                .forward_train_into(x.view(), f, tape, out.view_mut(), pre.view_mut())
                .unwrap();
            let g = stack.backward_into(tape, up3.view(), None, vjp, ws, dx.view_mut());
            drop(black_box(g.unwrap()));
        };
        let mut fwd_cur = || fwd(&current, &st_cur);
        let mut fwd_sh = || fwd(&shifted, &st_sh);
        let mut fb_cur = || fb(&current, &st_cur);
        let mut fb_sh = || fb(&shifted, &st_sh);
        for (group, fs) in [
            (
                "stack_forward",
                [&mut fwd_res as &mut dyn FnMut(), &mut fwd_cur, &mut fwd_sh],
            ),
            (
                "stack_forward_backward",
                [&mut fb_res, &mut fb_cur, &mut fb_sh],
            ),
        ] {
            let mut g = c.benchmark_group(group);
            g.sample_size(10);
            for (name, f) in ["residual", "current", "shifted"].into_iter().zip(fs) {
                g.bench_function(BenchmarkId::new(name, &id), |b| b.iter(&mut *f));
            }
            g.finish();
        }
        let rounds = 5;
        let fw = paired(rounds, &mut [&mut fwd_res, &mut fwd_cur, &mut fwd_sh]);
        let fbo = paired(rounds, &mut [&mut fb_res, &mut fb_cur, &mut fb_sh]);
        let pct = |v: f64| format!("{:+.1} %", v * 100.0);
        STACK_ROWS.lock().unwrap().push(format!(
            "| {id} | {} | {} | {} | {} | {} | {} | {} | {} |",
            pct(fw.ratio[0]),
            pct(fw.attributed[0]),
            pct(fw.ratio[1]),
            pct(fw.attributed[1]),
            pct(fbo.ratio[0]),
            pct(fbo.attributed[0]),
            pct(fbo.ratio[1]),
            pct(fbo.attributed[1]),
        ));
    }
}

/// A stack bench's reused buffers: tape, workspace, `x_L`, `pre_{L−1}`, `∂x_0`.
type StackState = RefCell<(
    StackTape<f32>,
    StackWorkspace<f32>,
    Array3<f32>,
    Array2<f32>,
    Array3<f32>,
)>;

/// The stack benches' paired rows.
static STACK_ROWS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn report_stack() {
    let rows = STACK_ROWS.lock().unwrap();
    if rows.is_empty() {
        return;
    }
    let mut out = format!(
        "Chains of {BLOCKS} blocks around the same MLP, over a residual chain (paired rounds, median \
         of 5; `attributed` subtracts the time inside the MLP):\n\n\
         | shape | Current fwd ratio | Current fwd attributed | Shifted fwd ratio | Shifted fwd \
         attributed | Current fwd+bwd ratio | Current fwd+bwd attributed | Shifted fwd+bwd ratio \
         | Shifted fwd+bwd attributed |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows.iter() {
        out += r;
        out += "\n";
    }
    println!("\n{out}");
    let _ = std::fs::write("target/criterion/overhead_stack.md", &out);
}

criterion_group!(benches, bench, bench_stack);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    report();
    report_stack();
}
