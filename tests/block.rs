//! The mHC and HC blocks' forward pass against the float64 reference, properties, bad inputs.

mod common;

use common::*;
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::streams::{Collapse, collapse, expand};
use mhc::{
    BiasInit, Error, Float, HcBlock, HcConfig, HcParams, Mappings, MhcBlock, MhcConfig, MhcParams,
    ResidualBlock,
};
use ndarray::{Array1, Array2, Array3, Axis, s};
use proptest::prelude::*;

/// Checks a block's mappings and output against one reference file; `run` builds the block
/// from a case and returns `(mappings, output)` for its `x` and sublayer.
fn reference<F: Float>(
    file: &str,
    tol: f64,
    run: impl Fn(&serde_json::Value, &Array3<F>, &Array2<F>) -> (Mappings<F>, Array3<F>),
) {
    for (k, c) in cases(file).iter().enumerate() {
        let (x, w) = (a3::<F>(&c["x"]), a2::<F>(&c["sublayer_w"]));
        let (maps, out) = run(c, &x, &w);
        let what = |s: &str| format!("{} {file} case {k} {s}", F::NAME);
        assert_close(&what("pre"), &dyn_f64(&maps.pre), &arr(&c["pre"]), tol);
        assert_close(&what("post"), &dyn_f64(&maps.post), &arr(&c["post"]), tol);
        assert_close(&what("res"), &dyn_f64(&maps.res), &arr(&c["res"]), tol);
        assert_close(&what("output"), &dyn_f64(&out), &arr(&c["output"]), tol);
    }
}

fn mhc_reference<F: Float>(tol: f64) {
    reference::<F>("mhc_block", tol, |c, x, w| {
        let (cfg, params) = mhc_case::<F>(c);
        let block = MhcBlock::from_params(cfg, params).unwrap();
        (
            block.mappings(x.view()).unwrap(),
            block.forward(x.view(), |u| tanh_layer(u, w)).unwrap(),
        )
    });
}

fn hc_reference<F: Float>(tol: f64) {
    reference::<F>("hc_block", tol, |c, x, w| {
        let (cfg, params) = hc_case::<F>(c);
        let block = HcBlock::from_params(cfg, params).unwrap();
        (
            block.mappings(x.view()).unwrap(),
            block.forward(x.view(), |u| tanh_layer(u, w)).unwrap(),
        )
    });
}

#[test]
fn mhc_reference_vectors_f64() {
    mhc_reference::<f64>(1e-9);
}

#[test]
fn mhc_reference_vectors_f32() {
    mhc_reference::<f32>(1e-4);
}

#[test]
fn hc_reference_vectors_f64() {
    hc_reference::<f64>(1e-9);
}

#[test]
fn hc_reference_vectors_f32() {
    hc_reference::<f32>(1e-4);
}

fn random_block(n: usize, c: usize, seed: u64, init: BiasInit) -> MhcBlock<f64> {
    let mut cfg = MhcConfig::new(n, c);
    cfg.bias_init = init;
    cfg.phi_std = 0.3;
    MhcBlock::new(cfg, &mut StdRng::seed_from_u64(seed)).unwrap()
}

fn random_x(t: usize, n: usize, c: usize, seed: u64) -> Array3<f64> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    Array3::from_shape_fn((t, n, c), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
    })
}

#[test]
fn split_halves_equal_forward_and_mixing_is_shared() {
    let block = random_block(4, 24, 1, BiasInit::Zero);
    let x = random_x(700, 4, 24, 2);
    let w = Array2::from_shape_fn((24, 24), |(i, j)| ((i * 7 + j) as f64).sin() * 0.2);
    let (u, maps) = block.read_out(x.view()).unwrap();
    assert_eq!(maps, block.mappings(x.view()).unwrap());
    assert_eq!(u, mhc::mixing::read_out(x.view(), maps.pre.view()).unwrap());
    let y = tanh_layer(u.view(), &w);
    let out = block.write_in(x.view(), &maps, y.view()).unwrap();
    assert_eq!(out, block.forward(x.view(), |u| tanh_layer(u, &w)).unwrap());
    // A naive per-token loop gives the same numbers.
    for t in [0, 255, 256, 699] {
        for i in 0..4 {
            for ch in 0..24 {
                let mut v = maps.post[[t, i]] * y[[t, ch]];
                for j in 0..4 {
                    v += maps.res[[t, i, j]] * x[[t, j, ch]];
                }
                assert!((v - out[[t, i, ch]]).abs() < 1e-12);
            }
        }
    }
    // `*_into` into reused and non-contiguous buffers.
    let mut maps2 = Mappings::zeros(3, 1); // wrong shape: reallocated
    let mut u2 = Array2::zeros((24, 700));
    block
        .read_out_into(x.view(), &mut maps2, u2.view_mut().reversed_axes())
        .unwrap();
    assert_eq!(maps2, maps);
    assert_eq!(u2.t(), u);
}

#[test]
fn every_res_row_sums_to_one_and_is_nonnegative() {
    for (n, c) in [(1, 3), (2, 8), (4, 16), (6, 5), (8, 4)] {
        let block = random_block(n, c, 3, BiasInit::IdentityLike);
        let maps = block.mappings(random_x(37, n, c, 4).view()).unwrap();
        for m in maps.res.outer_iter() {
            for row in m.rows() {
                assert!((row.sum() - 1.0).abs() < 1e-12);
                assert!(row.iter().all(|&v| v >= 0.0));
            }
        }
        assert!(maps.pre.iter().all(|&v| v > 0.0 && v < 1.0));
        assert!(maps.post.iter().all(|&v| v > 0.0 && v < 2.0));
    }
}

#[test]
fn single_stream_zero_bias_is_x_plus_gated_sublayer() {
    // n = 1: H_res = [1], out = x + 2σ(α₁ h₁) F(σ(α₀ h₀) x).
    let c = 6;
    let block = random_block(1, c, 5, BiasInit::Zero);
    let p = block.params();
    let x = random_x(9, 1, c, 6);
    let f = |u: ndarray::ArrayView2<f64>| u.mapv(|v| (1.7 * v).sin());
    let out = block.forward(x.view(), f).unwrap();
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    for t in 0..9 {
        let xt = x.slice(s![t, 0, ..]);
        let r = (xt.mapv(|v| v * v).mean().unwrap() + 1e-6).sqrt();
        let h: Vec<f64> = (0..3)
            .map(|k| (0..c).map(|i| xt[i] * p.phi[[i, k]]).sum::<f64>() / r)
            .collect();
        let (pre, post) = (sig(p.alpha[0] * h[0]), 2.0 * sig(p.alpha[1] * h[1]));
        for ch in 0..c {
            let want = xt[ch] + post * (1.7 * pre * xt[ch]).sin();
            assert!((out[[t, 0, ch]] - want).abs() < 1e-12);
        }
    }
}

#[test]
fn zero_bias_keeps_replicated_streams_equal() {
    let (n, c) = (4, 16);
    let mut cfg = MhcConfig::new(n, c);
    cfg.phi_std = 0.5;
    let block = MhcBlock::<f64>::new(cfg, &mut StdRng::seed_from_u64(9)).unwrap();
    // φ's res columns differ per (i, j), so only H_res = J/n (zero φ, zero bias) keeps equality:
    // zero φ, the paper's initial state before training moves it.
    let zero = MhcBlock::from_params(
        cfg,
        MhcParams {
            phi: Array2::zeros((n * c, n * n + 2 * n)),
            ..block.params().clone()
        },
    )
    .unwrap();
    let h = random_x(5, 1, c, 10).index_axis_move(Axis(1), 0);
    let mut x = expand(h.view(), n).unwrap();
    for _ in 0..3 {
        x = zero.forward(x.view(), |u| u.mapv(f64::tanh)).unwrap();
        for t in 0..5 {
            for i in 1..n {
                assert_eq!(x.slice(s![t, i, ..]), x.slice(s![t, 0, ..]));
            }
        }
    }
    // ... and then the block is a residual connection with the sublayer on u = (n/2)·x.
    let x0 = expand(h.view(), n).unwrap();
    let out = zero.forward(x0.view(), |u| u.mapv(f64::tanh)).unwrap();
    let want = &h + &(&h * 2.0).mapv(f64::tanh);
    let got = collapse(out.view(), Collapse::Mean).unwrap();
    assert!(
        got.iter()
            .zip(want.iter())
            .all(|(a, b)| (a - b).abs() < 1e-12)
    );
}

#[test]
fn parallel_result_is_bitwise_equal_to_single_threaded() {
    let block = random_block(4, 32, 11, BiasInit::Zero);
    let hc = HcBlock::from_params(
        HcConfig::new(4, 32),
        HcParams {
            theta_pre: Array1::from_shape_fn(32, |i| (i as f64).cos()),
            ..HcParams::init(4, 32, 1, 0.3)
        },
    )
    .unwrap();
    let x = random_x(1500, 4, 32, 12);
    let f = |u: ndarray::ArrayView2<f64>| u.mapv(|v| v.tanh() * 0.5);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                (
                    block.forward(x.view(), f).unwrap(),
                    block.mappings(x.view()).unwrap(),
                    hc.forward(x.view(), f).unwrap(),
                )
            })
    };
    let one = run(1);
    for threads in [2, 3, 4] {
        assert!(run(threads) == one, "{threads} threads");
    }
}

#[test]
fn empty_batch_gives_empty_results() {
    let block = random_block(4, 8, 1, BiasInit::Zero);
    let x = Array3::<f64>::zeros((0, 4, 8));
    let out = block.forward(x.view(), |u| u.to_owned()).unwrap();
    assert_eq!(out.shape(), &[0, 4, 8]);
    let maps = block.mappings(x.view()).unwrap();
    assert_eq!(maps.res.shape(), &[0, 4, 4]);
    let hc = HcBlock::<f64>::new(HcConfig::new(4, 8)).unwrap();
    assert_eq!(
        hc.forward(x.view(), |u| u.to_owned()).unwrap().shape(),
        &[0, 4, 8]
    );
}

#[test]
fn all_zero_token_gives_finite_mappings() {
    let block = random_block(4, 8, 1, BiasInit::IdentityLike);
    let maps = block.mappings(Array3::zeros((2, 4, 8)).view()).unwrap();
    assert!(
        maps.res
            .iter()
            .chain(maps.pre.iter())
            .chain(maps.post.iter())
            .all(|v| v.is_finite())
    );
}

#[test]
fn identity_like_init_is_near_identity() {
    let mut cfg = MhcConfig::new(4, 64);
    cfg.bias_init = BiasInit::IdentityLike;
    let block = MhcBlock::<f32>::new(cfg, &mut StdRng::seed_from_u64(0)).unwrap();
    let maps = block
        .mappings(random_x(8, 4, 64, 1).mapv(|v| v as f32).view())
        .unwrap();
    for m in maps.res.outer_iter() {
        for i in 0..4 {
            assert!(m[[i, i]] > 0.99, "{m:?}");
        }
    }
    assert!(maps.pre.iter().all(|&p| (p - 0.25).abs() < 0.01));
    assert!(maps.post.iter().all(|&p| (p - 1.0).abs() < 0.02));
    let zero = MhcBlock::<f32>::new(MhcConfig::new(4, 64), &mut StdRng::seed_from_u64(0)).unwrap();
    let maps = zero
        .mappings(random_x(8, 4, 64, 1).mapv(|v| v as f32).view())
        .unwrap();
    assert!(maps.res.iter().all(|&v| (v - 0.25).abs() < 0.01));
    assert!(maps.pre.iter().all(|&p| (p - 0.5).abs() < 0.01));
}

#[test]
fn expand_collapse_round_trip() {
    let h = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as f32);
    let x = expand(h.view(), 4).unwrap();
    assert_eq!(collapse(x.view(), Collapse::Mean).unwrap(), h);
    assert_eq!(collapse(x.view(), Collapse::Sum).unwrap(), &h * 4.0);
    assert_eq!(
        expand(h.view(), 0),
        Err(Error::InvalidDimension {
            what: "streams",
            got: 0
        })
    );
    assert_eq!(
        collapse(Array3::<f32>::zeros((2, 0, 3)).view(), Collapse::Sum),
        Err(Error::Empty { what: "streams" })
    );
}

#[test]
fn residual_block_is_x_plus_f() {
    let r = ResidualBlock::new(3).unwrap();
    let x = Array2::from_shape_fn((4, 3), |(i, j)| (i + j) as f64);
    assert_eq!(
        r.forward(x.view(), |u| u.mapv(|v| v * v)).unwrap(),
        &x + &x.mapv(|v| v * v)
    );
    assert_eq!(
        ResidualBlock::new(0),
        Err(Error::InvalidDimension {
            what: "dim",
            got: 0
        })
    );
    assert_eq!(
        r.forward(x.view(), |_| Array2::zeros((4, 2))),
        Err(Error::ShapeMismatch {
            what: "sublayer output",
            expected: vec![4, 3],
            got: vec![4, 2]
        })
    );
    assert_eq!(
        r.forward(x.view(), |u| u.mapv(|v| if v == 5.0 {
            f64::NAN
        } else {
            v
        })),
        Err(Error::NonFinite {
            what: "sublayer output",
            index: 3
        })
    );
}

#[test]
fn bad_inputs_give_typed_errors() {
    let block = random_block(4, 8, 1, BiasInit::Zero);
    let x = Array3::<f64>::zeros((3, 4, 8));
    assert_eq!(
        block
            .forward(Array3::zeros((3, 2, 8)).view(), |u| u.to_owned())
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "x",
            expected: vec![3, 4, 8],
            got: vec![3, 2, 8]
        }
    );
    assert_eq!(
        block
            .forward(x.view(), |_| Array2::zeros((3, 7)))
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "sublayer output",
            expected: vec![3, 8],
            got: vec![3, 7]
        }
    );
    let mut bad = random_x(600, 4, 8, 1);
    bad[[300, 2, 5]] = f64::NAN;
    bad[[400, 0, 0]] = f64::INFINITY;
    assert_eq!(
        block.mappings(bad.view()).unwrap_err(),
        Error::NonFinite {
            what: "x",
            index: 300
        }
    );
    assert_eq!(
        block.forward(bad.view(), |u| u.to_owned()).unwrap_err(),
        Error::NonFinite {
            what: "x",
            index: 300
        }
    );
    let hc = HcBlock::<f64>::new(HcConfig::new(4, 8)).unwrap();
    assert_eq!(
        hc.forward(bad.view(), |u| u.to_owned()).unwrap_err(),
        Error::NonFinite {
            what: "x",
            index: 300
        }
    );
    let good = random_x(600, 4, 8, 2);
    let nan_at_7 = |u: ndarray::ArrayView2<f64>| {
        let mut y = u.to_owned();
        y[[7, 3]] = f64::NAN;
        y[[500, 3]] = f64::NEG_INFINITY;
        y
    };
    assert_eq!(
        block.forward(good.view(), nan_at_7).unwrap_err(),
        Error::NonFinite {
            what: "sublayer output",
            index: 7
        }
    );
    // Configuration and parameter errors.
    let mut rng = StdRng::seed_from_u64(0);
    assert_eq!(
        MhcBlock::<f32>::new(MhcConfig::new(0, 8), &mut rng).unwrap_err(),
        Error::InvalidDimension {
            what: "streams",
            got: 0
        }
    );
    assert_eq!(
        MhcBlock::<f32>::new(MhcConfig::new(4, 0), &mut rng).unwrap_err(),
        Error::InvalidDimension {
            what: "dim",
            got: 0
        }
    );
    for rms_eps in [0.0, -1.0, f64::NAN] {
        let mut cfg = MhcConfig::new(4, 8);
        cfg.rms_eps = rms_eps;
        let e = MhcBlock::<f32>::new(cfg, &mut rng).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidEpsilon {
                    what: "rms_eps",
                    expected: "finite and > 0",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    let mut cfg = MhcConfig::new(4, 8);
    cfg.pre_eps = -1e-6;
    assert!(matches!(
        MhcBlock::<f32>::new(cfg, &mut rng).unwrap_err(),
        Error::InvalidEpsilon {
            what: "pre_eps",
            ..
        }
    ));
    let mut cfg = MhcConfig::new(4, 8);
    cfg.sinkhorn.iters = 0;
    assert_eq!(
        MhcBlock::<f32>::new(cfg, &mut rng).unwrap_err(),
        Error::InvalidIterations { got: 0 }
    );
    assert_eq!(
        MhcBlock::<f32>::new(MhcConfig::new(1 << 40, 1 << 30), &mut rng).unwrap_err(),
        Error::SizeOverflow { what: "phi" }
    );
    let cfg = MhcConfig::new(4, 8);
    assert_eq!(
        MhcBlock::from_params(cfg, MhcParams::<f32>::zeros(4, 7)).unwrap_err(),
        Error::ShapeMismatch {
            what: "phi",
            expected: vec![32, 24],
            got: vec![28, 24]
        }
    );
    let mut p = MhcParams::<f32>::zeros(4, 8);
    p.bias = Array1::zeros(23);
    assert_eq!(
        MhcBlock::from_params(cfg, p).unwrap_err(),
        Error::ShapeMismatch {
            what: "bias",
            expected: vec![24],
            got: vec![23]
        }
    );
    let mut p = MhcParams::<f32>::zeros(4, 8);
    p.alpha[2] = f32::NAN;
    assert_eq!(
        MhcBlock::from_params(cfg, p).unwrap_err(),
        Error::NonFinite {
            what: "alpha",
            index: 2
        }
    );
    let mut p = HcParams::<f32>::init(4, 8, 0, 0.01);
    p.theta_res = Array2::zeros((3, 8));
    assert_eq!(
        HcBlock::from_params(HcConfig::new(4, 8), p).unwrap_err(),
        Error::ShapeMismatch {
            what: "theta_res",
            expected: vec![4, 8],
            got: vec![3, 8]
        }
    );
    // Mixing functions check their own shapes.
    let maps = Mappings::<f64>::identity(3, 4);
    assert_eq!(
        mhc::mixing::write_in(x.view(), &maps, Array2::zeros((2, 8)).view()).unwrap_err(),
        Error::ShapeMismatch {
            what: "y",
            expected: vec![3, 8],
            got: vec![2, 8]
        }
    );
    assert_eq!(
        mhc::mixing::read_out(x.view(), Array2::zeros((3, 3)).view()).unwrap_err(),
        Error::ShapeMismatch {
            what: "pre",
            expected: vec![3, 4],
            got: vec![3, 3]
        }
    );
}

#[test]
fn huge_but_finite_tokens_are_not_reported_as_non_finite() {
    let block = random_block(4, 8, 1, BiasInit::Zero);
    let mut x = random_x(2, 4, 8, 3).mapv(|v| v as f32);
    x.mapv_inplace(|v| v * 1e30); // squares overflow f32
    let b32 = MhcBlock::<f32>::from_params(
        *block.config(),
        MhcParams {
            phi: block.params().phi.mapv(|v| v as f32),
            alpha: block.params().alpha.map(|v| v as f32),
            bias: block.params().bias.mapv(|v| v as f32),
        },
    )
    .unwrap();
    let maps = b32.mappings(x.view()).unwrap();
    let small = b32.mappings((&x * 1e-30).view()).unwrap();
    // RMS normalisation is scale-invariant (up to rms_eps): the mappings agree.
    for (a, b) in maps.res.iter().zip(small.res.iter()) {
        assert!((a - b).abs() < 1e-5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn block_properties(n in 1usize..=5, c in 1usize..=12, t in 0usize..40, seed in any::<u64>()) {
        let block = random_block(n, c, seed, BiasInit::IdentityLike);
        let x = random_x(t, n, c, seed ^ 1);
        let maps = block.mappings(x.view()).unwrap();
        for m in maps.res.outer_iter() {
            for row in m.rows() {
                prop_assert!((row.sum() - 1.0).abs() < 1e-12);
            }
        }
        // With a zero sublayer the block is the mixing alone: out_i = Σ_j H_res[i][j] x_j, and
        // since rows sum to 1, a token whose streams are equal is left unchanged.
        let h = random_x(t, 1, c, seed ^ 2).index_axis_move(Axis(1), 0);
        let xe = expand(h.view(), n).unwrap();
        let out = block.forward(xe.view(), |u| Array2::zeros(u.raw_dim())).unwrap();
        for (a, b) in out.iter().zip(xe.iter()) {
            prop_assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0));
        }
    }
}

#[test]
fn extreme_but_valid_inputs_give_finite_results() {
    let mut cfg = MhcConfig::new(4, 16);
    cfg.phi_std = 0.05;
    let block = MhcBlock::<f32>::new(cfg, &mut StdRng::seed_from_u64(1)).unwrap();
    let hc = HcBlock::<f32>::from_params(
        HcConfig::new(4, 16),
        HcParams {
            theta_pre: Array1::from_elem(16, 0.1),
            ..HcParams::init(4, 16, 0, 0.5)
        },
    )
    .unwrap();
    let pattern = random_x(6, 4, 16, 9).mapv(|v| v as f32);
    for scale in [f32::MAX / 1e3 / 2.0, 1e-30, 0.0, 1e20] {
        let x = &pattern * scale;
        let zero = |u: ndarray::ArrayView2<f32>| Array2::zeros(u.raw_dim());
        let out = block.forward(x.view(), zero).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "scale {scale}");
        let maps = block.mappings(x.view()).unwrap();
        for row in maps.res.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-5, "scale {scale}: {row:?}");
        }
        assert!(
            hc.forward(x.view(), zero)
                .unwrap()
                .iter()
                .all(|v| v.is_finite()),
            "hc scale {scale}"
        );
        let (o, y) = block.forward_train(x.view(), zero).unwrap();
        let up = Array3::from_elem(o.raw_dim(), 1e-3f32);
        let (dx, g) = block
            .backward(x.view(), y.view(), up.view(), |_, dy| dy.to_owned())
            .unwrap();
        assert!(
            dx.iter().chain(g.phi.iter()).all(|v| v.is_finite()),
            "backward scale {scale}"
        );
    }
}

#[test]
fn repeated_runs_are_bitwise_identical() {
    let block = random_block(4, 16, 3, BiasInit::IdentityLike);
    let x = random_x(700, 4, 16, 4);
    let f = |u: ndarray::ArrayView2<f64>| u.mapv(f64::sin);
    let first = block.forward(x.view(), f).unwrap();
    for _ in 0..3 {
        assert!(block.forward(x.view(), f).unwrap() == first);
    }
}
