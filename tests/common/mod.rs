//! Shared helpers for the integration tests: reference vectors and tolerant comparisons.
#![allow(dead_code)]

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

/// The cases of `tests/data/{name}.json` (produced by `mhc_reference.py`, seed 0).
pub fn cases(name: &str) -> Vec<Value> {
    // The core's tests and mhc-burn's (one folder down) share `tests/data`.
    let root = env!("CARGO_MANIFEST_DIR");
    let path = [
        format!("{root}/tests/data/{name}.json"),
        format!("{root}/../tests/data/{name}.json"),
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .unwrap_or_else(|| format!("{root}/tests/data/{name}.json"));
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
    if std::env::var_os("MHC_REPORT_ERRORS").is_some() {
        println!("{what}: max error {:.2e} of the largest entry", err / scale);
    }
    assert!(
        err <= tol * scale,
        "{what}: max error {err:e} > {tol:e} × {scale:e}\n got {got:?}\nwant {want:?}"
    );
}

use mhc::{Float, HcConfig, HcParams, MhcConfig, MhcParams, SinkhornKnopp};
use ndarray::{Array1, Array2, Array3, ArrayView2, Ix1, Ix2, Ix3};

pub fn a1<F: Float>(v: &Value) -> Array1<F> {
    arr(v)
        .into_dimensionality::<Ix1>()
        .unwrap()
        .mapv(F::from_f64)
}
pub fn a2<F: Float>(v: &Value) -> Array2<F> {
    arr(v)
        .into_dimensionality::<Ix2>()
        .unwrap()
        .mapv(F::from_f64)
}
pub fn a3<F: Float>(v: &Value) -> Array3<F> {
    arr(v)
        .into_dimensionality::<Ix3>()
        .unwrap()
        .mapv(F::from_f64)
}
pub fn alpha<F: Float>(v: &Value) -> [F; 3] {
    let a = a1::<F>(v);
    [a[0], a[1], a[2]]
}
pub fn dyn_f64<F: Float, D: ndarray::Dimension>(a: &ndarray::Array<F, D>) -> ArrayD<f64> {
    a.mapv(F::as_f64).into_dyn()
}

/// The mHC configuration of a reference case (`mhc_block.json`, `mhc_stack.json`).
pub fn mhc_config(c: &Value) -> MhcConfig {
    let n = c["n"].as_u64().unwrap() as usize;
    let dim = c["c"].as_u64().unwrap() as usize;
    let mut cfg = MhcConfig::new(n, dim);
    cfg.rms_eps = c["rms_eps"].as_f64().unwrap();
    cfg.pre_eps = c["pre_eps"].as_f64().unwrap();
    cfg.sinkhorn = SinkhornKnopp {
        iters: c["iters"].as_u64().unwrap() as usize,
        eps: c["eps"].as_f64().unwrap(),
    };
    cfg
}

/// A stack case of `mhc_stack.json`: the stack and its sublayer weights `W_l`.
pub fn stack_case<F: Float>(c: &Value) -> (mhc::MhcStack<F>, Vec<Array2<F>>) {
    let cfg = mhc_config(c);
    let layers = c["layers"].as_array().unwrap();
    let blocks = layers
        .iter()
        .map(|l| {
            let p = MhcParams {
                phi: a2(&l["phi"]),
                alpha: alpha(&l["alpha"]),
                bias: a1(&l["bias"]),
            };
            mhc::MhcBlock::from_params(cfg, p).unwrap()
        })
        .collect();
    let schedule = match c["schedule"].as_str().unwrap() {
        "current" => mhc::Schedule::Current,
        "shifted" => mhc::Schedule::Shifted,
        s => panic!("schedule {s}"),
    };
    let ws = layers.iter().map(|l| a2(&l["sublayer_w"])).collect();
    (mhc::MhcStack::new(blocks, schedule).unwrap(), ws)
}

/// An mHC block case of `mhc_block.json`: its config and params.
pub fn mhc_case<F: Float>(c: &Value) -> (MhcConfig, MhcParams<F>) {
    let cfg = mhc_config(c);
    let params = MhcParams {
        phi: a2(&c["phi"]),
        alpha: alpha(&c["alpha"]),
        bias: a1(&c["bias"]),
    };
    (cfg, params)
}

/// An HC block case of `hc_block.json`.
pub fn hc_case<F: Float>(c: &Value) -> (HcConfig, HcParams<F>) {
    let n = c["n"].as_u64().unwrap() as usize;
    let dim = c["c"].as_u64().unwrap() as usize;
    let mut cfg = HcConfig::new(n, dim);
    cfg.rms_eps = c["rms_eps"].as_f64().unwrap();
    let params = HcParams {
        theta_pre: a1(&c["theta_pre"]),
        theta_post: a1(&c["theta_post"]),
        theta_res: a2(&c["theta_res"]),
        alpha: alpha(&c["alpha"]),
        b_pre: a1(&c["b_pre"]),
        b_post: a1(&c["b_post"]),
        b_res: a2(&c["b_res"]),
    };
    (cfg, params)
}

/// The reference sublayer `F(u) = tanh(u · W)`.
pub fn tanh_layer<F: Float>(u: ArrayView2<F>, w: &Array2<F>) -> Array2<F> {
    u.dot(w).mapv(|v| v.tanh())
}
