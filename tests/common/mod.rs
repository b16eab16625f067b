//! Shared helpers for the integration tests: reference vectors and tolerant comparisons.
#![allow(dead_code)]

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

/// The cases of `tests/data/{name}.json` (produced by `mhc_reference.py`, seed 0).
pub fn cases(name: &str) -> Vec<Value> {
    let path = format!("{}/tests/data/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// A nested JSON list (or a number) as an f64 array of any rank.
pub fn arr(v: &Value) -> ArrayD<f64> {
    fn shape(v: &Value, s: &mut Vec<usize>) {
        if let Value::Array(a) = v {
            s.push(a.len());
            if let Some(f) = a.first() {
                shape(f, s);
            }
        }
    }
    fn flat(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.push(x.as_f64().unwrap()),
        }
    }
    let mut s = vec![];
    shape(v, &mut s);
    let mut data = vec![];
    flat(v, &mut data);
    ArrayD::from_shape_vec(IxDyn(&s), data).unwrap()
}

/// Largest absolute entry (at least `f64::MIN_POSITIVE`, so tolerances never collapse to 0).
pub fn max_abs(a: &ArrayD<f64>) -> f64 {
    a.iter().fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs()))
}

/// Asserts `|got - want| <= tol * max|want|` elementwise (SPEC §7: relative to the tensor's
/// largest entry).
#[track_caller]
pub fn assert_close(what: &str, got: &ArrayD<f64>, want: &ArrayD<f64>, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = max_abs(want);
    let err = got
        .iter()
        .zip(want.iter())
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max error {err:e} > {tol:e} × {scale:e}\n got {got:?}\nwant {want:?}"
    );
}
