//! Backward passes of the mHC and HC blocks: against autograd (the reference vectors) and
//! central finite differences in f64, for every parameter and the input.

mod common;

use common::*;
use mhc::rand::{RngExt, SeedableRng, rngs::StdRng};
use mhc::{
    Error, Float, HcBlock, HcConfig, HcParams, MhcBlock, MhcConfig, MhcParams, SinkhornKnopp,
};
use ndarray::{Array1, Array2, Array3, ArrayView2};
use std::cell::RefCell;

/// `F(u) = tanh(u·W)` and its VJP, recording `∂W` (the reference vectors' sublayer).
fn tanh_vjp<F: Float>(
    w: &Array2<F>,
    dw: &RefCell<Option<Array2<F>>>,
) -> impl FnOnce(ArrayView2<F>, ArrayView2<F>) -> Array2<F> {
    move |u, dy| {
        let y = tanh_layer(u, w);
        let dz = &dy * &y.mapv(|v| F::one() - v * v);
        *dw.borrow_mut() = Some(u.t().dot(&dz));
        dz.dot(&w.t())
    }
}

fn mhc_reference<F: Float>(tol: f64) {
    for (k, c) in cases("mhc_block").iter().enumerate() {
        let (cfg, params) = mhc_case::<F>(c);
        let block = MhcBlock::from_params(cfg, params).unwrap();
        let x = a3::<F>(&c["x"]);
        let w = a2::<F>(&c["sublayer_w"]);
        let up = a3::<F>(&c["upstream"]);
        let (out, y) = block
            .forward_train(x.view(), |u| tanh_layer(u, &w))
            .unwrap();
        let what = |s: &str| format!("{} mhc case {k} {s}", F::NAME);
        assert_close(&what("output"), &dyn_f64(&out), &arr(&c["output"]), tol);
        let dw = RefCell::new(None);
        let (dx, g) = block
            .backward(x.view(), y.view(), up.view(), tanh_vjp(&w, &dw))
            .unwrap();
        assert_close(&what("grad_x"), &dyn_f64(&dx), &arr(&c["grad_x"]), tol);
        assert_close(
            &what("grad_phi"),
            &dyn_f64(&g.phi),
            &arr(&c["grad_phi"]),
            tol,
        );
        assert_close(
            &what("grad_alpha"),
            &dyn_f64(&Array1::from(g.alpha.to_vec())),
            &arr(&c["grad_alpha"]),
            tol,
        );
        assert_close(
            &what("grad_bias"),
            &dyn_f64(&g.bias),
            &arr(&c["grad_bias"]),
            tol,
        );
        let dw = dw.into_inner().expect("the VJP was called");
        assert_close(
            &what("grad_sublayer_w"),
            &dyn_f64(&dw),
            &arr(&c["grad_sublayer_w"]),
            tol,
        );
    }
}

#[test]
fn mhc_gradients_match_autograd_f64() {
    mhc_reference::<f64>(1e-8);
}

#[test]
fn mhc_gradients_match_autograd_f32() {
    mhc_reference::<f32>(1e-3);
}

/// A loss `Σ upstream ⊙ block(x)` with a fixed smooth sublayer, and its gradient from the
/// backward pass, for finite differences.
struct Problem {
    x: Array3<f64>,
    up: Array3<f64>,
    w: Array2<f64>,
}

impl Problem {
    fn new(t: usize, n: usize, c: usize, rng: &mut StdRng) -> Self {
        let mut r = |s: f64| s * (rng.random::<f64>() * 2.0 - 1.0);
        Problem {
            x: Array3::from_shape_simple_fn((t, n, c), || r(1.5)),
            up: Array3::from_shape_simple_fn((t, n, c), || r(1.0)),
            w: Array2::from_shape_simple_fn((c, c), || r(1.0 / (c as f64).sqrt())),
        }
    }
}

/// Central differences with step `h`: relative error ≤ `tol` against `grad`, elementwise
/// relative to the largest gradient entry of that tensor.
fn fd_check(
    what: &str,
    grad: &[f64],
    values: &mut dyn FnMut(usize, f64) -> f64,
    base: &[f64],
    tol: f64,
) {
    let h = 1e-5;
    let scale = grad.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (i, (&g, &b)) in grad.iter().zip(base).enumerate() {
        let fd = (values(i, b + h) - values(i, b - h)) / (2.0 * h);
        worst = worst.max((fd - g).abs() / scale);
        assert!(
            (fd - g).abs() <= tol * scale,
            "{what}[{i}]: fd {fd:e} vs backward {g:e} (scale {scale:e})"
        );
    }
    let _ = worst;
}

fn mhc_fd(
    n: usize,
    c: usize,
    t: usize,
    cfg_mod: impl Fn(&mut MhcConfig),
    params_mod: impl Fn(&mut MhcParams<f64>),
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cfg = MhcConfig::new(n, c);
    cfg.phi_std = 0.2;
    cfg.alpha_init = 0.7;
    cfg_mod(&mut cfg);
    let mut params = MhcBlock::<f64>::new(cfg, &mut rng)
        .unwrap()
        .params()
        .clone();
    for b in params.bias.iter_mut() {
        *b = rng.random::<f64>() - 0.5;
    }
    params_mod(&mut params);
    let p = Problem::new(t, n, c, &mut rng);
    let loss = |params: &MhcParams<f64>, x: &Array3<f64>| {
        let b = MhcBlock::from_params(cfg, params.clone()).unwrap();
        (&b.forward(x.view(), |u| tanh_layer(u, &p.w)).unwrap() * &p.up).sum()
    };
    let block = MhcBlock::from_params(cfg, params.clone()).unwrap();
    let (_, y) = block
        .forward_train(p.x.view(), |u| tanh_layer(u, &p.w))
        .unwrap();
    let dw = RefCell::new(None);
    let (dx, g) = block
        .backward(p.x.view(), y.view(), p.up.view(), tanh_vjp(&p.w, &dw))
        .unwrap();
    let tol = 1e-6;
    let tag = format!("mhc n={n} c={c} t={t}");
    fd_check(
        &format!("{tag} x"),
        dx.as_slice().unwrap(),
        &mut |i, v| {
            let mut x = p.x.clone();
            x.as_slice_mut().unwrap()[i] = v;
            loss(&params, &x)
        },
        p.x.as_slice().unwrap(),
        tol,
    );
    fd_check(
        &format!("{tag} phi"),
        g.phi.as_slice().unwrap(),
        &mut |i, v| {
            let mut q = params.clone();
            q.phi.as_slice_mut().unwrap()[i] = v;
            loss(&q, &p.x)
        },
        params.phi.as_slice().unwrap(),
        tol,
    );
    fd_check(
        &format!("{tag} alpha"),
        &g.alpha,
        &mut |i, v| {
            let mut q = params.clone();
            q.alpha[i] = v;
            loss(&q, &p.x)
        },
        &params.alpha,
        tol,
    );
    fd_check(
        &format!("{tag} bias"),
        g.bias.as_slice().unwrap(),
        &mut |i, v| {
            let mut q = params.clone();
            q.bias[i] = v;
            loss(&q, &p.x)
        },
        params.bias.as_slice().unwrap(),
        tol,
    );
}

#[test]
fn mhc_gradients_match_finite_differences() {
    for (k, &(n, c, t)) in [
        (1, 5, 3),
        (2, 8, 4),
        (3, 7, 2),
        (4, 16, 5),
        (6, 4, 3),
        (4, 64, 2),
        (2, 33, 8),
    ]
    .iter()
    .enumerate()
    {
        mhc_fd(n, c, t, |_| {}, |_| {}, k as u64);
    }
}

#[test]
fn mhc_gradients_with_deepseek_eps_and_pre_eps() {
    mhc_fd(
        4,
        12,
        3,
        |cfg| {
            cfg.sinkhorn = SinkhornKnopp {
                iters: 20,
                eps: 1e-6,
            };
            cfg.pre_eps = 1e-6;
        },
        |_| {},
        11,
    );
    mhc_fd(
        3,
        6,
        2,
        |cfg| {
            cfg.sinkhorn = SinkhornKnopp {
                iters: 3,
                eps: 1e-2,
            }
        },
        |_| {},
        12,
    );
}

#[test]
fn mhc_gradients_with_saturated_sigmoids_and_near_permutation_res() {
    // Sigmoid biases of ±8 (σ' ≈ 3e-4) and H_res logits of ±12 around a permutation.
    mhc_fd(
        4,
        8,
        3,
        |_| {},
        |p| {
            let n = 4;
            for j in 0..n {
                p.bias[j] = if j % 2 == 0 { 8.0 } else { -8.0 };
                p.bias[n + j] = if j % 2 == 0 { -8.0 } else { 8.0 };
                for i in 0..n {
                    p.bias[2 * n + i * n + j] = if (i + 1) % n == j { 12.0 } else { -12.0 };
                }
            }
        },
        13,
    );
}

#[test]
fn hc_gradients_match_finite_differences() {
    for (k, &(n, c, t)) in [(1, 5, 3), (2, 8, 4), (4, 16, 3), (3, 9, 2)]
        .iter()
        .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(100 + k as u64);
        let mut r = |s: f64| s * (rng.random::<f64>() * 2.0 - 1.0);
        let params = HcParams {
            theta_pre: Array1::from_shape_simple_fn(c, || r(0.5)),
            theta_post: Array1::from_shape_simple_fn(c, || r(0.5)),
            theta_res: Array2::from_shape_simple_fn((n, c), || r(0.5)),
            alpha: [r(1.0), r(1.0), r(1.0)],
            b_pre: Array1::from_shape_simple_fn(n, || r(1.0)),
            b_post: Array1::from_shape_simple_fn(n, || r(1.0)),
            b_res: Array2::from_shape_simple_fn((n, n), || r(1.0)),
        };
        let cfg = HcConfig::new(n, c);
        let p = Problem::new(t, n, c, &mut rng);
        let loss = |params: &HcParams<f64>, x: &Array3<f64>| {
            let b = HcBlock::from_params(cfg, params.clone()).unwrap();
            (&b.forward(x.view(), |u| tanh_layer(u, &p.w)).unwrap() * &p.up).sum()
        };
        let block = HcBlock::from_params(cfg, params.clone()).unwrap();
        let (_, y) = block
            .forward_train(p.x.view(), |u| tanh_layer(u, &p.w))
            .unwrap();
        let dw = RefCell::new(None);
        let (dx, g) = block
            .backward(p.x.view(), y.view(), p.up.view(), tanh_vjp(&p.w, &dw))
            .unwrap();
        let tol = 1e-6;
        let tag = format!("hc n={n} c={c} t={t}");
        fd_check(
            &format!("{tag} x"),
            dx.as_slice().unwrap(),
            &mut |i, v| {
                let mut x = p.x.clone();
                x.as_slice_mut().unwrap()[i] = v;
                loss(&params, &x)
            },
            p.x.as_slice().unwrap(),
            tol,
        );
        macro_rules! check_field {
            ($field:ident) => {
                let gv: Vec<f64> = g.$field.iter().copied().collect();
                let base: Vec<f64> = params.$field.iter().copied().collect();
                fd_check(
                    &format!("{tag} {}", stringify!($field)),
                    &gv,
                    &mut |i, v| {
                        let mut q = params.clone();
                        *q.$field.iter_mut().nth(i).unwrap() = v;
                        loss(&q, &p.x)
                    },
                    &base,
                    tol,
                );
            };
        }
        check_field!(theta_pre);
        check_field!(theta_post);
        check_field!(theta_res);
        check_field!(alpha);
        check_field!(b_pre);
        check_field!(b_post);
        check_field!(b_res);
    }
}

#[test]
fn backward_is_bitwise_identical_on_any_number_of_threads() {
    let mut rng = StdRng::seed_from_u64(5);
    let block = MhcBlock::<f32>::new(MhcConfig::new(4, 32), &mut rng).unwrap();
    let x = Array3::from_shape_simple_fn((1100, 4, 32), || rng.random::<f32>() - 0.5);
    let up = Array3::from_shape_simple_fn((1100, 4, 32), || rng.random::<f32>() - 0.5);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let (_, y) = block
                    .forward_train(x.view(), |u| u.mapv(f32::tanh))
                    .unwrap();
                block
                    .backward(x.view(), y.view(), up.view(), |u, dy| {
                        &dy * &u.mapv(|v| 1.0 - v.tanh().powi(2))
                    })
                    .unwrap()
            })
    };
    let one = run(1);
    for threads in [2, 4] {
        let other = run(threads);
        assert!(other.0 == one.0 && other.1 == one.1, "{threads} threads");
    }
}

#[test]
fn backward_bad_inputs_give_typed_errors() {
    let mut rng = StdRng::seed_from_u64(5);
    let block = MhcBlock::<f64>::new(MhcConfig::new(4, 8), &mut rng).unwrap();
    let x = Array3::from_shape_simple_fn((3, 4, 8), || rng.random::<f64>());
    let (out, y) = block.forward_train(x.view(), |u| u.to_owned()).unwrap();
    let up = Array3::ones(out.raw_dim());
    let id = |_: ArrayView2<f64>, dy: ArrayView2<f64>| dy.to_owned();
    assert_eq!(
        block
            .backward(x.view(), y.view(), Array3::ones((3, 4, 7)).view(), id)
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "upstream",
            expected: vec![3, 4, 8],
            got: vec![3, 4, 7]
        }
    );
    assert_eq!(
        block
            .backward(x.view(), Array2::zeros((2, 8)).view(), up.view(), id)
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "y",
            expected: vec![3, 8],
            got: vec![2, 8]
        }
    );
    assert_eq!(
        block
            .backward(x.view(), y.view(), up.view(), |_, _| Array2::zeros((3, 9)))
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "sublayer vjp output",
            expected: vec![3, 8],
            got: vec![3, 9]
        }
    );
    let mut bad_up = up.clone();
    bad_up[[1, 2, 3]] = f64::NAN;
    assert_eq!(
        block
            .backward(x.view(), y.view(), bad_up.view(), id)
            .unwrap_err(),
        Error::NonFinite {
            what: "upstream",
            index: 1
        }
    );
    let mut bad_y = y.clone();
    bad_y[[2, 0]] = f64::INFINITY;
    assert_eq!(
        block
            .backward(x.view(), bad_y.view(), up.view(), id)
            .unwrap_err(),
        Error::NonFinite {
            what: "y",
            index: 2
        }
    );
    assert_eq!(
        block
            .backward(x.view(), y.view(), up.view(), |_, dy| dy.mapv(|v| v / 0.0))
            .unwrap_err(),
        Error::NonFinite {
            what: "sublayer vjp output",
            index: 0
        }
    );
    let hc = HcBlock::<f64>::new(HcConfig::new(4, 8)).unwrap();
    assert_eq!(
        hc.backward(x.view(), y.view(), up.view(), |_, _| Array2::zeros((3, 9)))
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "sublayer vjp output",
            expected: vec![3, 8],
            got: vec![3, 9]
        }
    );
    // A tape from another block shape.
    let other = MhcBlock::<f64>::new(MhcConfig::new(4, 8), &mut rng).unwrap();
    let x2 = Array3::zeros((5, 4, 8));
    let tape = other
        .write_in_backward(x2.view(), Array2::zeros((5, 8)).view(), x2.view())
        .unwrap();
    assert_eq!(
        block
            .read_out_backward(x.view(), tape, Array2::zeros((3, 8)).view())
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "tape",
            expected: vec![3, 8],
            got: vec![5, 8]
        }
    );
}

#[test]
fn empty_batch_backward() {
    let mut rng = StdRng::seed_from_u64(5);
    let block = MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut rng).unwrap();
    let x = Array3::zeros((0, 4, 8));
    let (dx, g) = block
        .backward(x.view(), Array2::zeros((0, 8)).view(), x.view(), |_, dy| {
            dy.to_owned()
        })
        .unwrap();
    assert_eq!(dx.shape(), &[0, 4, 8]);
    assert!(g.phi.iter().all(|&v| v == 0.0));
}

/// A tape reused from a step with tokens gives zero gradients for an empty batch (it once
/// returned the previous step's).
#[test]
fn empty_batch_after_a_full_one_with_a_reused_tape() {
    let mut rng = StdRng::seed_from_u64(6);
    for hc in [false, true] {
        let mhc_block = MhcBlock::<f64>::new(MhcConfig::new(4, 8), &mut rng).unwrap();
        let hc_block = mhc::HcBlock::<f64>::new(mhc::HcConfig::new(4, 8)).unwrap();
        let mut tape = mhc::Tape::default();
        for t in [5, 0] {
            let x = Array3::from_shape_simple_fn((t, 4, 8), || rng.random::<f64>() - 0.5);
            let y = Array2::from_shape_simple_fn((t, 8), || rng.random::<f64>() - 0.5);
            let mut dx = Array3::zeros((t, 4, 8));
            let id = |_: ArrayView2<f64>, dy: ArrayView2<f64>| dy.to_owned();
            let nonzero = if hc {
                let g = hc_block
                    .backward_into(x.view(), y.view(), x.view(), id, &mut tape, dx.view_mut())
                    .unwrap();
                g.theta_res.iter().any(|&v| v != 0.0) || g.alpha.iter().any(|&v| v != 0.0)
            } else {
                let g = mhc_block
                    .backward_into(x.view(), y.view(), x.view(), id, &mut tape, dx.view_mut())
                    .unwrap();
                g.phi.iter().any(|&v| v != 0.0) || g.bias.iter().any(|&v| v != 0.0)
            };
            assert_eq!(nonzero, t > 0, "hc {hc}, T = {t}");
        }
    }
}

#[test]
fn mlp_gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(21);
    let (t, c, h) = (3, 6, 24);
    let mut mlp = mhc::Mlp::<f64>::new(c, h, &mut rng).unwrap();
    mlp.b1.mapv_inplace(|_| rng.random::<f64>() - 0.5);
    mlp.b2.mapv_inplace(|_| rng.random::<f64>() - 0.5);
    let u = Array2::from_shape_simple_fn((t, c), || rng.random::<f64>() * 2.0 - 1.0);
    let dy = Array2::from_shape_simple_fn((t, c), || rng.random::<f64>() * 2.0 - 1.0);
    let loss = |m: &mhc::Mlp<f64>, u: &Array2<f64>| (&m.forward(u.view()).unwrap() * &dy).sum();
    let (du, g) = mlp.backward(u.view(), dy.view()).unwrap();
    let tol = 1e-6;
    fd_check(
        "mlp u",
        du.as_slice().unwrap(),
        &mut |i, v| {
            let mut w = u.clone();
            w.as_slice_mut().unwrap()[i] = v;
            loss(&mlp, &w)
        },
        u.as_slice().unwrap(),
        tol,
    );
    macro_rules! check_field {
        ($field:ident) => {
            fd_check(
                concat!("mlp ", stringify!($field)),
                g.$field.as_slice().unwrap(),
                &mut |i, v| {
                    let mut m = mlp.clone();
                    m.$field.as_slice_mut().unwrap()[i] = v;
                    loss(&m, &u)
                },
                mlp.$field.as_slice().unwrap(),
                tol,
            );
        };
    }
    check_field!(w1);
    check_field!(b1);
    check_field!(w2);
    check_field!(b2);
}

/// The `*_into` methods, with one tape reused across calls of different sizes (growing and
/// shrinking) and a non-contiguous `∂x`, give bitwise the results of the allocating methods.
#[test]
fn into_variants_with_a_reused_tape_equal_the_allocating_ones() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, c) = (4usize, 24usize);
    let mhc = MhcBlock::<f64>::new(MhcConfig::new(n, c), &mut rng).unwrap();
    let hc = HcBlock::<f64>::new(HcConfig::new(n, c)).unwrap();
    let sub = |u: ArrayView2<f64>| u.mapv(f64::tanh);
    let vjp = |u: ArrayView2<f64>, dy: ArrayView2<f64>| &dy * &u.mapv(|v| 1.0 - v.tanh().powi(2));
    let mut mhc_tape = mhc::Tape::default();
    let mut hc_tape = mhc::Tape::default();
    for t in [300usize, 700, 5, 300] {
        let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() - 0.5);
        let up = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() - 0.5);
        let mut out = Array3::zeros((t, n, c));
        // ∂x through a transposed (non-contiguous) view.
        let mut dx_t = Array3::zeros((c, n, t));

        let (out0, y0) = mhc.forward_train(x.view(), sub).unwrap();
        let (dx0, g0) = mhc.backward(x.view(), y0.view(), up.view(), vjp).unwrap();
        let y = mhc
            .forward_train_into(x.view(), sub, &mut mhc_tape, out.view_mut())
            .unwrap();
        let dx_view = dx_t.view_mut().reversed_axes();
        let g = mhc
            .backward_into(x.view(), y.view(), up.view(), vjp, &mut mhc_tape, dx_view)
            .unwrap();
        assert!(out == out0 && y == y0, "mHC forward, T = {t}");
        assert!(
            dx_t.view().reversed_axes() == dx0 && g == g0,
            "mHC backward, T = {t}"
        );

        let (out0, y0) = hc.forward_train(x.view(), sub).unwrap();
        let (dx0, g0) = hc.backward(x.view(), y0.view(), up.view(), vjp).unwrap();
        let y = hc
            .forward_train_into(x.view(), sub, &mut hc_tape, out.view_mut())
            .unwrap();
        let mut dx = Array3::zeros((t, n, c));
        hc.write_in_backward_into(x.view(), y.view(), up.view(), &mut hc_tape)
            .unwrap();
        let du = vjp(hc_tape.u.view(), hc_tape.dy.view());
        // Twice from the same tape: the read-out half leaves the tape reusable.
        for _ in 0..2 {
            let g = hc
                .read_out_backward_into(x.view(), &mut hc_tape, du.view(), dx.view_mut())
                .unwrap();
            assert!(dx == dx0 && g == g0, "HC backward, T = {t}");
        }
        assert!(out == out0 && y == y0, "HC forward, T = {t}");
    }
}

#[test]
fn into_variants_check_their_outputs() {
    let mut rng = StdRng::seed_from_u64(12);
    let block = MhcBlock::<f32>::new(MhcConfig::new(2, 8), &mut rng).unwrap();
    let x = Array3::<f32>::zeros((3, 2, 8));
    let mut tape = mhc::Tape::default();
    let mut bad = Array3::<f32>::zeros((3, 2, 7));
    let e = block
        .forward_train_into(x.view(), |u| u.to_owned(), &mut tape, bad.view_mut())
        .unwrap_err();
    assert_eq!(
        e,
        Error::ShapeMismatch {
            what: "out",
            expected: vec![3, 2, 8],
            got: vec![3, 2, 7]
        }
    );
    let mut out = Array3::<f32>::zeros((3, 2, 8));
    let y = block
        .forward_train_into(x.view(), |u| u.to_owned(), &mut tape, out.view_mut())
        .unwrap();
    let e = block
        .backward_into(
            x.view(),
            y.view(),
            out.view(),
            |_, dy| dy.to_owned(),
            &mut tape,
            bad.view_mut(),
        )
        .unwrap_err();
    assert_eq!(
        e,
        Error::ShapeMismatch {
            what: "dx",
            expected: vec![3, 2, 8],
            got: vec![3, 2, 7]
        }
    );
    // A fresh tape has nothing for the read-out half.
    let e = block
        .read_out_backward_into(
            x.view(),
            &mut mhc::Tape::default(),
            y.view(),
            out.view_mut(),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { what: "tape", .. }),
        "{e:?}"
    );
}
