//! Stability diagnostics against the float64 reference.

mod common;

use common::{a2, cases};
use mhc::gain::{Gain, amax_gain, composite_gains};
use mhc::{Error, Mappings};
use ndarray::{Array2, array};

#[test]
fn single_and_composite_gains_match_reference() {
    for (k, c) in cases("gains").iter().enumerate() {
        let mats: Vec<Array2<f64>> = c["matrices"]
            .as_array()
            .unwrap()
            .iter()
            .map(a2::<f64>)
            .collect();
        for (l, (m, want)) in mats.iter().zip(c["single"].as_array().unwrap()).enumerate() {
            let g = amax_gain(m.view()).unwrap();
            for (got, key) in [
                (g.forward, "forward"),
                (g.backward, "backward"),
                (g.min_row_sum, "min_row_sum"),
                (g.min_col_sum, "min_col_sum"),
            ] {
                let w = want[key].as_f64().unwrap();
                assert!(
                    (got - w).abs() <= 1e-12 * w.abs().max(1.0),
                    "case {k} layer {l} {key}: {got} vs {w}"
                );
            }
        }
        let comp = composite_gains(&mats).unwrap();
        let (fw, bw) = (
            c["composite_forward"].as_array().unwrap(),
            c["composite_backward"].as_array().unwrap(),
        );
        for (l, (g, (f, b))) in comp.iter().zip(fw.iter().zip(bw)).enumerate() {
            let (f, b) = (f.as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                (g.0 - f).abs() <= 1e-9 * f.abs().max(1.0),
                "case {k} layer {l} forward {} vs {f}",
                g.0
            );
            assert!(
                (g.1 - b).abs() <= 1e-9 * b.abs().max(1.0),
                "case {k} layer {l} backward {} vs {b}",
                g.1
            );
        }
        // f32 within 1e-4 relative.
        let m32: Vec<Array2<f32>> = mats.iter().map(|m| m.mapv(|v| v as f32)).collect();
        for (g, (f, _)) in composite_gains(&m32).unwrap().iter().zip(fw.iter().zip(bw)) {
            let f = f.as_f64().unwrap();
            assert!((g.0 - f).abs() <= 1e-4 * f.abs().max(1.0));
        }
    }
}

#[test]
fn gain_uses_absolute_row_sum_not_sum_of_absolutes() {
    let g = amax_gain(array![[1.0, -1.0], [0.5, 0.25f64]].view()).unwrap();
    assert_eq!(
        g,
        Gain {
            forward: 0.75,
            backward: 1.5,
            min_row_sum: 0.0,
            min_col_sum: -0.75
        }
    );
}

#[test]
fn doubly_stochastic_products_stay_at_one() {
    let sk = mhc::SinkhornKnopp {
        iters: 200,
        eps: 0.0,
    };
    let mats: Vec<Array2<f64>> = (0..50)
        .map(|l| {
            sk.project(
                Array2::from_shape_fn((4, 4), |(i, j)| ((l * 7 + i * 3 + j) as f64).sin() * 3.0)
                    .view(),
            )
            .unwrap()
        })
        .collect();
    for (f, b) in composite_gains(&mats).unwrap() {
        assert!((f - 1.0).abs() < 1e-9 && (b - 1.0).abs() < 1e-9, "{f} {b}");
    }
}

#[test]
fn bad_inputs() {
    assert_eq!(composite_gains::<f64>(&[]).unwrap(), vec![]);
    assert_eq!(
        composite_gains(&[Array2::<f64>::zeros((2, 3))]),
        Err(Error::NotSquare {
            what: "layers",
            got: vec![2, 3]
        })
    );
    assert_eq!(
        composite_gains(&[Array2::<f64>::eye(2), Array2::eye(3)]),
        Err(Error::ShapeMismatch {
            what: "layers",
            expected: vec![2, 2],
            got: vec![3, 3]
        })
    );
    let mut bad = Array2::<f64>::eye(2);
    bad[[0, 1]] = f64::NAN;
    assert_eq!(
        composite_gains(&[Array2::eye(2), bad.clone()]),
        Err(Error::NonFinite {
            what: "layers",
            index: 1
        })
    );
    assert_eq!(
        amax_gain(bad.view()),
        Err(Error::NonFinite {
            what: "matrix",
            index: 0
        })
    );
    assert_eq!(
        amax_gain(Array2::<f32>::zeros((0, 0)).view()),
        Err(Error::Empty { what: "matrix" })
    );
    assert_eq!(
        mhc::gain::mean_res(&Mappings::<f64>::zeros(0, 4)),
        Err(Error::Empty { what: "tokens" })
    );
}
