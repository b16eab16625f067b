//! The Sinkhorn-Knopp projector against the float64 reference, finite differences, properties
//! and bad inputs.

mod common;

use common::{arr, assert_close, cases};
use mhc::{Error, Float, SinkhornKnopp};
use ndarray::{Array2, Array3, ArrayD, Axis, Ix2, s};
use proptest::prelude::*;

fn to<F: Float>(a: &ArrayD<f64>) -> Array2<F> {
    a.view()
        .into_dimensionality::<Ix2>()
        .unwrap()
        .mapv(F::from_f64)
}

fn back<F: Float>(a: &Array2<F>) -> ArrayD<f64> {
    a.mapv(F::as_f64).into_dyn()
}

fn check_reference<F: Float>(tol_out: f64, tol_grad: f64, tol_extreme: f64) {
    for (k, c) in cases("sinkhorn").iter().enumerate() {
        let sk = SinkhornKnopp {
            iters: c["iters"].as_u64().unwrap() as usize,
            eps: c["eps"].as_f64().unwrap(),
        };
        let logits = to::<F>(&arr(&c["logits"]));
        let want = arr(&c["output"]);
        let got = sk.project(logits.view()).unwrap();
        assert!(
            got.iter().all(|v| v.is_finite() && *v >= F::zero()),
            "case {k}"
        );
        let extreme = c.get("extreme").is_some();
        let tol = if extreme { tol_extreme } else { tol_out };
        assert_close(
            &format!("{} case {k} output", F::NAME),
            &back(&got),
            &want,
            tol,
        );
        if !extreme {
            let up = to::<F>(&arr(&c["upstream"]));
            let g = sk.vjp(logits.view(), up.view()).unwrap();
            let want = arr(&c["grad_logits"]);
            assert_close(
                &format!("{} case {k} grad", F::NAME),
                &back(&g),
                &want,
                tol_grad,
            );
        }
    }
}

#[test]
fn reference_vectors_f64() {
    check_reference::<f64>(1e-9, 1e-8, 1e-6);
}

#[test]
fn reference_vectors_f32() {
    check_reference::<f32>(1e-4, 1e-4, 1e-4);
}

/// Central differences of `Σ upstream ⊙ SK(L)` in f64 against the VJP.
fn finite_difference_check(sk: SinkhornKnopp, logits: &Array2<f64>, upstream: &Array2<f64>) {
    let g = sk.vjp(logits.view(), upstream.view()).unwrap();
    let f = |l: &Array2<f64>| (&sk.project(l.view()).unwrap() * upstream).sum();
    let h = 1e-6;
    let mut fd = Array2::zeros(logits.raw_dim());
    for idx in ndarray::indices(logits.raw_dim()) {
        let (mut a, mut b) = (logits.clone(), logits.clone());
        a[idx] += h;
        b[idx] -= h;
        fd[idx] = (f(&a) - f(&b)) / (2.0 * h);
    }
    // Central differences carry O(h²) truncation and O(ε/h) rounding error: ~1e-10 here.
    assert_close(
        "vjp vs finite differences",
        &g.into_dyn(),
        &fd.into_dyn(),
        1e-7,
    );
}

#[test]
fn vjp_matches_finite_differences() {
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    for &(n, iters, eps, scale) in &[
        (1, 20, 0.0, 1.0),
        (2, 20, 0.0, 1.0),
        (3, 7, 0.0, 2.0),
        (4, 20, 0.0, 1.0),
        (4, 20, 1e-6, 3.0),
        (4, 1, 0.0, 1.0),
        (5, 3, 1e-3, 1.0),
        (8, 20, 0.0, 0.5),
    ] {
        let sk = SinkhornKnopp { iters, eps };
        let l = Array2::from_shape_fn((n, n), |_| rnd() * scale);
        let u = Array2::from_shape_fn((n, n), |_| rnd());
        finite_difference_check(sk, &l, &u);
    }
}

/// Logits that underflow the linear domain go through the log-space path; its VJP must still be
/// the derivative of what `project` returns.
#[test]
fn log_domain_vjp_matches_finite_differences() {
    // Row 0 is ~-800 below every column max: exp underflows the whole row in f64.
    let l = ndarray::array![
        [-800.0, -801.0, -799.5, -800.2],
        [0.3, -0.2, 1.0, 0.1],
        [0.5, 0.7, -0.4, 0.0],
        [-0.1, 0.2, 0.3, 0.9]
    ];
    let u = ndarray::array![
        [0.3, -0.7, 1.1, 0.2],
        [0.5, 0.1, -0.3, 0.8],
        [-0.6, 0.4, 0.9, -0.2],
        [0.7, -0.5, 0.05, 0.3]
    ];
    for eps in [0.0, 1e-300] {
        let sk = SinkhornKnopp { iters: 20, eps };
        let p: Array2<f64> = sk.project(l.view()).unwrap();
        for row in p.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-12, "{p:?}");
        }
        // The exact map: the underflowing row still carries mass after the iteration.
        assert!(p.row(0).sum() > 0.99);
        finite_difference_check(sk, &l, &u);
    }
}

#[test]
fn extreme_logits_are_finite_and_row_stochastic() {
    let mats: Vec<Array2<f64>> = vec![
        Array2::from_shape_fn(
            (4, 4),
            |(i, j)| if (i * 7 + j * 3) % 2 == 0 { 1e4 } else { -1e4 },
        ),
        Array2::from_shape_fn((4, 4), |(i, j)| if i == 1 && j == 2 { 1e4 } else { 0.0 }),
        Array2::from_shape_fn((4, 4), |(i, _)| if i == 0 { -1e4 } else { 0.0 }),
        Array2::from_shape_fn((3, 3), |(i, j)| ((i * 3 + j) as f64 - 4.0) * 2500.0),
        Array2::from_shape_fn((6, 6), |_| 5.0),
    ];
    for m in &mats {
        for sk in [
            SinkhornKnopp::default(),
            SinkhornKnopp {
                iters: 20,
                eps: 1e-6,
            },
        ] {
            for (tol, p) in [
                (1e-12f64, sk.project(m.view()).unwrap()),
                (
                    1e-5,
                    sk.project(m.mapv(|v| v as f32).view())
                        .unwrap()
                        .mapv(f64::from),
                ),
            ] {
                assert!(
                    p.iter().all(|v| v.is_finite() && *v >= 0.0),
                    "{m:?} -> {p:?}"
                );
                for row in p.rows() {
                    // eps > 0: the row sums s/(s+eps) lie within n·eps of 1.
                    assert!(
                        (row.sum() - 1.0).abs() <= tol.max(8.0 * sk.eps),
                        "{m:?} -> {p:?}"
                    );
                }
                let up = Array2::from_shape_fn(m.raw_dim(), |(i, j)| (i as f64 - j as f64) * 0.1);
                let g = sk.vjp(m.view(), up.view()).unwrap();
                assert!(g.iter().all(|v| v.is_finite()), "{m:?} -> {g:?}");
            }
        }
    }
}

#[test]
fn eps_rows_sum_to_s_over_s_plus_eps() {
    let sk = SinkhornKnopp {
        iters: 5,
        eps: 1e-2,
    };
    let l = Array2::from_shape_fn((4, 4), |(i, j)| (i as f64 * 0.7 - j as f64 * 0.3).sin());
    let p = sk.project(l.view()).unwrap();
    // Before the last row step the row sums are s_i; after it, s_i / (s_i + eps): recompute s_i
    // by undoing it from the output: sum_out = s/(s+eps) ⇒ s = eps·sum_out/(1 - sum_out).
    for row in p.rows() {
        let so = row.sum();
        let s = sk.eps * so / (1.0 - so);
        assert!((so - s / (s + sk.eps)).abs() < 1e-14);
        assert!(so < 1.0 && so > 0.97);
    }
}

#[test]
fn batch_is_bitwise_identical_to_single_any_threads() {
    let b = 1000;
    for &n in &[1usize, 2, 3, 4, 8] {
        let logits = Array3::from_shape_fn((b, n, n), |(k, i, j)| {
            (((k * 31 + i * 7 + j * 3) % 17) as f64 - 8.0) * 0.37
                + if k % 97 == 0 { -900.0 * i as f64 } else { 0.0 }
        });
        let up = logits.mapv(|v| (v * 1.3).cos());
        for sk in [
            SinkhornKnopp::default(),
            SinkhornKnopp {
                iters: 7,
                eps: 1e-6,
            },
        ] {
            let batch = sk.project_batch(logits.view()).unwrap();
            let gb = sk.vjp_batch(logits.view(), up.view()).unwrap();
            for k in 0..b {
                let single = sk.project(logits.index_axis(Axis(0), k)).unwrap();
                assert_eq!(single, batch.index_axis(Axis(0), k), "n={n} k={k}");
                let gs = sk
                    .vjp(logits.index_axis(Axis(0), k), up.index_axis(Axis(0), k))
                    .unwrap();
                assert_eq!(gs, gb.index_axis(Axis(0), k), "n={n} k={k}");
            }
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (p, g) = pool.install(|| {
                    (
                        sk.project_batch(logits.view()).unwrap(),
                        sk.vjp_batch(logits.view(), up.view()).unwrap(),
                    )
                });
                assert_eq!(p, batch);
                assert_eq!(g, gb);
            }
        }
    }
}

#[test]
fn non_contiguous_views_are_accepted() {
    let l = Array3::from_shape_fn((6, 4, 4), |(k, i, j)| (k + i * j) as f64 * 0.1);
    let sk = SinkhornKnopp::default();
    let strided = l.slice(s![..;2, .., ..]);
    let t = strided.permuted_axes([0, 2, 1]);
    let got = sk.project_batch(t).unwrap();
    for k in 0..3 {
        let want = sk.project(l.index_axis(Axis(0), 2 * k).t()).unwrap();
        assert_eq!(got.index_axis(Axis(0), k), want);
    }
    let mut out = Array3::zeros((4, 4, 3));
    sk.project_batch_into(t, out.view_mut().permuted_axes([2, 0, 1]))
        .unwrap();
    assert_eq!(out.permuted_axes([2, 0, 1]), got);
}

#[test]
fn empty_batch_is_empty() {
    let sk = SinkhornKnopp::default();
    let p = sk
        .project_batch(Array3::<f32>::zeros((0, 4, 4)).view())
        .unwrap();
    assert_eq!(p.shape(), &[0, 4, 4]);
    let g = sk
        .vjp_batch(
            Array3::<f32>::zeros((0, 4, 4)).view(),
            Array3::zeros((0, 4, 4)).view(),
        )
        .unwrap();
    assert_eq!(g.shape(), &[0, 4, 4]);
}

#[test]
fn bad_inputs_give_typed_errors() {
    let sk = SinkhornKnopp::default();
    assert_eq!(
        sk.project(Array2::<f64>::zeros((3, 4)).view()),
        Err(Error::NotSquare {
            what: "logits",
            got: vec![3, 4]
        })
    );
    assert_eq!(
        sk.project(Array2::<f64>::zeros((0, 0)).view()),
        Err(Error::Empty { what: "logits" })
    );
    assert_eq!(
        sk.project_batch(Array3::<f64>::zeros((2, 0, 0)).view()),
        Err(Error::Empty { what: "logits" })
    );
    assert_eq!(
        SinkhornKnopp { iters: 0, eps: 0.0 }.project(Array2::<f64>::zeros((2, 2)).view()),
        Err(Error::InvalidIterations { got: 0 })
    );
    assert_eq!(
        SinkhornKnopp::new(0, 0.0),
        Err(Error::InvalidIterations { got: 0 })
    );
    for eps in [-1e-6, f64::NAN, f64::INFINITY] {
        let e = SinkhornKnopp { iters: 20, eps }
            .project(Array2::<f32>::zeros((2, 2)).view())
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidEpsilon { what: "eps", expected: "finite and >= 0", got } if got.to_bits() == eps.to_bits()),
            "{e:?}"
        );
    }
    let mut bad = Array3::<f32>::zeros((5, 3, 3));
    bad[[3, 1, 2]] = f32::NAN;
    bad[[4, 0, 0]] = f32::INFINITY;
    assert_eq!(
        sk.project_batch(bad.view()),
        Err(Error::NonFinite {
            what: "logits",
            index: 3
        })
    );
    let mut one = Array2::<f64>::zeros((2, 2));
    one[[1, 1]] = f64::NEG_INFINITY;
    assert_eq!(
        sk.project(one.view()),
        Err(Error::NonFinite {
            what: "logits",
            index: 0
        })
    );
    assert_eq!(
        sk.vjp(
            Array2::<f64>::zeros((2, 2)).view(),
            Array2::zeros((2, 3)).view()
        ),
        Err(Error::ShapeMismatch {
            what: "upstream",
            expected: vec![2, 2],
            got: vec![2, 3]
        })
    );
    assert_eq!(
        sk.vjp_batch(
            Array3::<f64>::zeros((4, 2, 2)).view(),
            Array3::zeros((3, 2, 2)).view()
        ),
        Err(Error::ShapeMismatch {
            what: "upstream",
            expected: vec![4, 2, 2],
            got: vec![3, 2, 2]
        })
    );
    let mut up = Array3::<f64>::zeros((4, 2, 2));
    up[[2, 0, 1]] = f64::NAN;
    assert_eq!(
        sk.vjp_batch(Array3::<f64>::zeros((4, 2, 2)).view(), up.view()),
        Err(Error::NonFinite {
            what: "upstream",
            index: 2
        })
    );
    assert_eq!(
        sk.project_into(
            Array2::<f64>::zeros((2, 2)).view(),
            Array2::zeros((3, 3)).view_mut()
        ),
        Err(Error::ShapeMismatch {
            what: "out",
            expected: vec![2, 2],
            got: vec![3, 3]
        })
    );
    // Messages a user can act on.
    assert_eq!(
        Error::NonFinite {
            what: "logits",
            index: 3
        }
        .to_string(),
        "`logits` holds a non-finite value (NaN or infinity) at entry 3"
    );
}

fn logits_strategy() -> impl Strategy<Value = Array2<f64>> {
    (
        1usize..=6,
        prop_oneof![Just(0.1f64), Just(1.0), Just(5.0), Just(50.0)],
    )
        .prop_flat_map(|(n, scale)| {
            proptest::collection::vec(-1.0f64..1.0, n * n)
                .prop_map(move |v| Array2::from_shape_vec((n, n), v).unwrap() * scale)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rows_sum_to_one_and_entries_nonnegative(l in logits_strategy()) {
        let sk = SinkhornKnopp::default();
        let p = sk.project(l.view()).unwrap();
        prop_assert!(p.iter().all(|&v| v >= 0.0 && v.is_finite()));
        for row in p.rows() {
            prop_assert!((row.sum() - 1.0).abs() < 1e-12);
        }
        let p32 = sk.project(l.mapv(|v| v as f32).view()).unwrap();
        for row in p32.rows() {
            prop_assert!((row.sum() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn invariant_to_constant_shift(l in logits_strategy(), c in -30.0f64..30.0) {
        let sk = SinkhornKnopp::default();
        let p = sk.project(l.view()).unwrap();
        let q = sk.project((&l + c).view()).unwrap();
        // Shifting changes rounding of the exp arguments only: |Δ| ~ |c|·ε amplified by the
        // iteration; 1e-9 absolute is far above that and far below any real difference.
        for (a, b) in p.iter().zip(q.iter()) {
            prop_assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }

    #[test]
    fn equivariant_under_permutations(l in logits_strategy(), seed in any::<u64>()) {
        let n = l.nrows();
        let perm = |s: u64| {
            let mut p: Vec<usize> = (0..n).collect();
            let mut s = s;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                p.swap(i, (s >> 33) as usize % (i + 1));
            }
            p
        };
        let (pr, pc) = (perm(seed), perm(seed ^ 0x9e3779b97f4a7c15));
        let permute = |m: &Array2<f64>| Array2::from_shape_fn((n, n), |(i, j)| m[[pr[i], pc[j]]]);
        let sk = SinkhornKnopp::default();
        let a = permute(&sk.project(l.view()).unwrap());
        let b = sk.project(permute(&l).view()).unwrap();
        for (x, y) in a.iter().zip(b.iter()) {
            prop_assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn batch_equals_single(ls in proptest::collection::vec(-3.0f64..3.0, 16 * 19)) {
        let l = Array3::from_shape_vec((19, 4, 4), ls).unwrap();
        let sk = SinkhornKnopp { iters: 20, eps: 1e-6 };
        let b = sk.project_batch(l.view()).unwrap();
        for k in 0..19 {
            prop_assert_eq!(sk.project(l.index_axis(Axis(0), k)).unwrap(), b.index_axis(Axis(0), k));
        }
    }
}

#[test]
fn vjp_batch_into_equals_vjp_batch_and_checks_grad() {
    let l = Array3::from_shape_fn((37, 4, 4), |(k, i, j)| {
        ((k * 5 + i * 3 + j) % 7) as f32 - 3.0
    });
    let up = l.mapv(|v| (0.7 * v).sin());
    let sk = SinkhornKnopp::default();
    let want = sk.vjp_batch(l.view(), up.view()).unwrap();
    let mut got = Array3::zeros((37, 4, 4));
    sk.vjp_batch_into(l.view(), up.view(), got.view_mut())
        .unwrap();
    assert_eq!(got, want);
    // Into a non-contiguous view.
    let mut t = Array3::zeros((4, 4, 37));
    sk.vjp_batch_into(l.view(), up.view(), t.view_mut().reversed_axes())
        .unwrap();
    assert_eq!(t.view().reversed_axes(), want);
    let mut bad = Array3::zeros((37, 4, 3));
    assert_eq!(
        sk.vjp_batch_into(l.view(), up.view(), bad.view_mut()),
        Err(Error::ShapeMismatch {
            what: "grad",
            expected: vec![37, 4, 4],
            got: vec![37, 4, 3]
        })
    );
}

/// The `f32` batch path moves full groups with SIMD transposes and a single matrix with scalar
/// moves: the results must still be bitwise those of one matrix at a time.
#[test]
fn f32_batch_is_bitwise_identical_to_single() {
    let b = 200;
    for &n in &[2usize, 4, 8] {
        let logits = Array3::<f32>::from_shape_fn((b, n, n), |(k, i, j)| {
            (((k * 31 + i * 7 + j * 3) % 17) as f32 - 8.0) * 0.37
        });
        let up = logits.mapv(|v| (v * 1.3).cos());
        let sk = SinkhornKnopp::default();
        let batch = sk.project_batch(logits.view()).unwrap();
        let gb = sk.vjp_batch(logits.view(), up.view()).unwrap();
        for k in 0..b {
            let l = logits.index_axis(Axis(0), k);
            assert_eq!(
                sk.project(l).unwrap(),
                batch.index_axis(Axis(0), k),
                "n={n} k={k}"
            );
            let g = sk.vjp(l, up.index_axis(Axis(0), k)).unwrap();
            assert_eq!(g, gb.index_axis(Axis(0), k), "n={n} k={k}");
        }
    }
}

/// Finiteness is checked inside the kernel (a flagged matrix is looked at afterwards): the
/// error still names the first non-finite matrix of the whole batch, across parallel tasks,
/// including an `-inf` logit in a column whose maximum is finite (which the softmax alone
/// would turn into a harmless zero).
#[test]
fn non_finite_logits_are_found_inside_the_kernel() {
    let (b, n) = (8000, 4);
    let sk = SinkhornKnopp::default();
    for bad in [f32::NEG_INFINITY, f32::INFINITY, f32::NAN] {
        let mut l = Array3::<f32>::from_shape_fn((b, n, n), |(k, i, j)| {
            ((k + 3 * i + 5 * j) % 7) as f32 * 0.3
        });
        l[[7000, 0, 3]] = bad;
        l[[5001, 2, 1]] = bad;
        let mut out = Array3::zeros((b, n, n));
        assert_eq!(
            sk.project_batch_into(l.view(), out.view_mut()),
            Err(Error::NonFinite {
                what: "logits",
                index: 5001
            }),
            "{bad}"
        );
        assert_eq!(
            sk.project_batch(l.slice(ndarray::s![7000..7001, .., ..])),
            Err(Error::NonFinite {
                what: "logits",
                index: 0
            })
        );
        // A finite batch around it is unaffected.
        l[[7000, 0, 3]] = 0.0;
        l[[5001, 2, 1]] = 0.0;
        assert!(sk.project_batch(l.view()).is_ok());
    }
}
