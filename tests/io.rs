//! safetensors interop: round trips, DeepSeek-V4's layout against a PyTorch fixture, hostile
//! files.
#![cfg(feature = "safetensors")]

use std::collections::HashMap;
use std::path::PathBuf;

use mhc::io::{
    Saved, load_deepseek_v4, load_deepseek_v4_head, load_hc, load_mhc, load_mhc_stack, save,
};
use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{Error, Float, HcBlock, HcConfig, HcParams, MhcBlock, MhcConfig, SinkhornKnopp};
use ndarray::{Array1, Array2, Array3, ArrayD, IxDyn};
use proptest::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mhc-io-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn round_trip<F: Float>() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut cfg = MhcConfig::new(4, 8);
    cfg.sinkhorn = SinkhornKnopp {
        iters: 7,
        eps: 1e-6,
    };
    cfg.pre_eps = 1e-6;
    cfg.rms_eps = 1e-5;
    let a = MhcBlock::<F>::new(cfg, &mut rng).unwrap();
    let b = MhcBlock::<F>::new(MhcConfig::new(2, 3), &mut rng).unwrap();
    let mut hp = HcParams::<F>::init(3, 5, 2, 0.3);
    hp.theta_res = Array2::from_shape_fn((3, 5), |(i, j)| F::from_f64((i * 5 + j) as f64 * 0.01));
    let mut hcfg = HcConfig::new(3, 5);
    hcfg.layer = 2;
    let h = HcBlock::from_params(hcfg, hp).unwrap();
    let path = tmp(&format!("rt-{}.safetensors", F::NAME));
    save(
        &path,
        &[
            Saved::Mhc("layers.0", &a),
            Saved::Hc("hc", &h),
            Saved::Mhc("layers.1", &b),
        ],
    )
    .unwrap();
    let a2 = load_mhc::<F>(&path, "layers.0").unwrap();
    assert_eq!(a2.params(), a.params());
    assert_eq!(a2.config(), a.config());
    let h2 = load_hc::<F>(&path, "hc").unwrap();
    assert_eq!(h2.params(), h.params());
    assert_eq!(h2.config(), h.config());
    // A stack with an HC block in it is not an mHC stack.
    assert!(matches!(
        load_mhc_stack::<F>(&path),
        Err(Error::Format { .. })
    ));
    save(
        &path,
        &[Saved::Mhc("layers.0", &a), Saved::Mhc("layers.1", &b)],
    )
    .unwrap();
    let stack = load_mhc_stack::<F>(&path).unwrap();
    assert_eq!(
        stack.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["layers.0", "layers.1"]
    );
    assert_eq!(stack[1].1.params(), b.params());
}

#[test]
fn round_trip_is_bitwise_f32() {
    round_trip::<f32>();
}

#[test]
fn round_trip_is_bitwise_f64() {
    round_trip::<f64>();
}

fn expected() -> HashMap<String, ArrayD<f64>> {
    expected_in("v4_expected.safetensors")
}

fn expected_in(file: &str) -> HashMap<String, ArrayD<f64>> {
    let bytes = std::fs::read(fixture(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype(), Dtype::F64);
            let v: Vec<f64> = t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (k, ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap())
        })
        .collect()
}

fn close<F: Float, D: ndarray::Dimension>(
    what: &str,
    got: &ndarray::Array<F, D>,
    want: &ArrayD<f64>,
    tol: f64,
) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let scale = want.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want.iter())
        .fold(0.0f64, |m, (g, w)| m.max((g.as_f64() - w).abs()));
    assert!(err <= tol * scale, "{what}: {err:e} > {tol:e} × {scale:e}");
}

fn deepseek_v4<F: Float>(tol: f64) {
    let e = expected();
    let x: Array3<F> = e["x"]
        .view()
        .into_dimensionality()
        .unwrap()
        .mapv(F::from_f64);
    let w: Array2<F> = e["w"]
        .view()
        .into_dimensionality()
        .unwrap()
        .mapv(F::from_f64);
    for prefix in ["layers.0.hc_attn", "layers.1.hc_ffn"] {
        let block = load_deepseek_v4::<F>(fixture("v4_layer.safetensors"), prefix).unwrap();
        let cfg = block.config();
        assert_eq!(
            (cfg.streams, cfg.dim, cfg.sinkhorn, cfg.pre_eps, cfg.rms_eps),
            (
                4,
                16,
                SinkhornKnopp {
                    iters: 20,
                    eps: 1e-6
                },
                1e-6,
                1e-6
            )
        );
        let maps = block.mappings(x.view()).unwrap();
        close(
            &format!("{prefix} pre"),
            &maps.pre,
            &e[&format!("{prefix}.pre")],
            tol,
        );
        close(
            &format!("{prefix} post"),
            &maps.post,
            &e[&format!("{prefix}.post")],
            tol,
        );
        close(
            &format!("{prefix} res"),
            &maps.res,
            &e[&format!("{prefix}.res")],
            tol,
        );
        let out = block
            .forward(x.view(), |u| u.dot(&w).mapv(|v| v.tanh()))
            .unwrap();
        close(
            &format!("{prefix} out"),
            &out,
            &e[&format!("{prefix}.out")],
            tol,
        );
    }
    let head = load_deepseek_v4_head::<F>(fixture("v4_layer.safetensors"), "hc_head").unwrap();
    close(
        "head",
        &head.collapse(x.view()).unwrap(),
        &e["hc_head.out"],
        tol,
    );
}

#[test]
fn deepseek_v4_fixture_matches_pytorch_f64() {
    deepseek_v4::<f64>(1e-9);
}

#[test]
fn deepseek_v4_fixture_matches_pytorch_f32() {
    deepseek_v4::<f32>(1e-5);
}

/// Writes a safetensors file from (name, dtype, shape, bytes) and metadata.
fn write(
    path: &PathBuf,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    meta: Option<HashMap<String, String>>,
) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect()
}

#[test]
fn hostile_files_give_typed_errors() {
    let good = std::fs::read(fixture("v4_layer.safetensors")).unwrap();
    let p = tmp("hostile.safetensors");
    let load = |p: &PathBuf| load_deepseek_v4::<f32>(p, "layers.0.hc_attn");
    // Missing file.
    assert!(matches!(
        load(&tmp("absent.safetensors")),
        Err(Error::Io { .. })
    ));
    // Truncated anywhere: header, data.
    for cut in [0, 4, 8, 20, good.len() / 2, good.len() - 1] {
        std::fs::write(&p, &good[..cut]).unwrap();
        assert!(
            matches!(load(&p), Err(Error::Format { .. })),
            "cut at {cut}"
        );
    }
    // A header length larger than the file, or absurd.
    for len in [good.len() as u64, u64::MAX, 1 << 40] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        assert!(
            matches!(load(&p), Err(Error::Format { .. })),
            "header length {len}"
        );
    }
    // Missing tensor.
    let m = 24;
    write(
        &p,
        &[(
            "layers.0.hc_attn_fn",
            Dtype::F32,
            vec![m, 32],
            f32_bytes(m * 32),
        )],
        None,
    );
    assert_eq!(
        load(&p).unwrap_err(),
        Error::MissingTensor {
            name: "layers.0.hc_attn_base".into()
        }
    );
    // Wrong dtype.
    write(
        &p,
        &[
            (
                "layers.0.hc_attn_fn",
                Dtype::I32,
                vec![m, 32],
                vec![0; m * 32 * 4],
            ),
            ("layers.0.hc_attn_base", Dtype::F32, vec![m], f32_bytes(m)),
            ("layers.0.hc_attn_scale", Dtype::F32, vec![3], f32_bytes(3)),
        ],
        None,
    );
    assert_eq!(
        load(&p).unwrap_err(),
        Error::UnsupportedDtype {
            name: "layers.0.hc_attn_fn".into(),
            dtype: "I32".into()
        }
    );
    // n·C inconsistent with n(n+2): 23 rows is no n(n+2); 24 rows (n = 4) with 30 columns.
    for (rows, cols) in [(23, 32), (24, 30), (0, 32)] {
        write(
            &p,
            &[
                (
                    "layers.0.hc_attn_fn",
                    Dtype::F32,
                    vec![rows, cols],
                    f32_bytes(rows * cols),
                ),
                (
                    "layers.0.hc_attn_base",
                    Dtype::F32,
                    vec![rows],
                    f32_bytes(rows),
                ),
                ("layers.0.hc_attn_scale", Dtype::F32, vec![3], f32_bytes(3)),
            ],
            None,
        );
        let e = load(&p).unwrap_err();
        assert!(
            matches!(&e, Error::Format { message } if message.contains("layers.0.hc_attn_fn")),
            "{e:?}"
        );
    }
    // Base of the wrong length.
    write(
        &p,
        &[
            (
                "layers.0.hc_attn_fn",
                Dtype::F32,
                vec![m, 32],
                f32_bytes(m * 32),
            ),
            (
                "layers.0.hc_attn_base",
                Dtype::F32,
                vec![m - 1],
                f32_bytes(m - 1),
            ),
            ("layers.0.hc_attn_scale", Dtype::F32, vec![3], f32_bytes(3)),
        ],
        None,
    );
    assert_eq!(
        load(&p).unwrap_err(),
        Error::TensorShape {
            name: "layers.0.hc_attn_base".into(),
            expected: vec![m],
            got: vec![m - 1]
        }
    );
    // Our layout: metadata that disagrees with the tensors, and malformed metadata.
    let mut rng = StdRng::seed_from_u64(0);
    let blk = MhcBlock::<f32>::new(MhcConfig::new(4, 8), &mut rng).unwrap();
    save(&p, &[Saved::Mhc("b", &blk)]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, TensorView<'_>)> = st.tensors();
    let rewrite = |meta: &str| {
        let m = HashMap::from([
            ("b.config".to_string(), meta.to_string()),
            ("mhc.blocks".to_string(), "b".to_string()),
        ]);
        std::fs::write(
            &p,
            safetensors::serialize(
                tensors.iter().map(|(k, v)| (k.as_str(), v.clone())),
                Some(m),
            )
            .unwrap(),
        )
        .unwrap();
    };
    rewrite("kind=mhc;streams=4;dim=9;iters=20;eps=0.0;rms_eps=1e-6;pre_eps=0.0");
    assert_eq!(
        load_mhc::<f32>(&p, "b").unwrap_err(),
        Error::TensorShape {
            name: "b.phi".into(),
            expected: vec![36, 24],
            got: vec![32, 24]
        }
    );
    rewrite("kind=mhc;streams=4;dim=8;iters=twenty;eps=0.0;rms_eps=1e-6;pre_eps=0.0");
    assert!(
        matches!(load_mhc::<f32>(&p, "b").unwrap_err(), Error::Format { message } if message.contains("iters"))
    );
    rewrite("kind=mhc;streams=4;dim=8;iters=0;eps=0.0;rms_eps=1e-6;pre_eps=0.0");
    assert_eq!(
        load_mhc::<f32>(&p, "b").unwrap_err(),
        Error::InvalidIterations { got: 0 }
    );
    rewrite("garbage");
    assert!(matches!(
        load_mhc::<f32>(&p, "b").unwrap_err(),
        Error::Format { .. }
    ));
    assert!(
        matches!(load_mhc::<f32>(&p, "other").unwrap_err(), Error::Format { message } if message.contains("other.config"))
    );
    // A NaN in the weights.
    let mut nan = f32_bytes(m * 32);
    nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    write(
        &p,
        &[
            ("layers.0.hc_attn_fn", Dtype::F32, vec![m, 32], nan),
            ("layers.0.hc_attn_base", Dtype::F32, vec![m], f32_bytes(m)),
            ("layers.0.hc_attn_scale", Dtype::F32, vec![3], f32_bytes(3)),
        ],
        None,
    );
    assert!(
        matches!(load(&p).unwrap_err(), Error::Format { message } if message.contains("non-finite"))
    );
    // f16 loads.
    let h16: Vec<u8> = (0..m * 32)
        .flat_map(|i| half::f16::from_f32(i as f32 * 1e-3).to_le_bytes())
        .collect();
    write(
        &p,
        &[
            ("layers.0.hc_attn_fn", Dtype::F16, vec![m, 32], h16),
            ("layers.0.hc_attn_base", Dtype::F32, vec![m], f32_bytes(m)),
            (
                "layers.0.hc_attn_scale",
                Dtype::F64,
                vec![3],
                (0..3)
                    .flat_map(|i| (i as f64 * 0.1).to_le_bytes())
                    .collect(),
            ),
        ],
        None,
    );
    let b = load(&p).unwrap();
    assert_eq!((b.config().streams, b.config().dim), (4, 8));
    let _ = Array1::<f32>::zeros(1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes, and the fixture with arbitrary bytes flipped, never panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)) {
        let p = tmp(&format!("fuzz-{}.safetensors", std::thread::current().name().unwrap_or("t").replace(':', "_")));
        std::fs::write(&p, &bytes).unwrap();
        let _ = load_deepseek_v4::<f32>(&p, "layers.0.hc_attn");
        let _ = load_mhc::<f64>(&p, "b");
        let mut good = std::fs::read(fixture("v4_layer.safetensors")).unwrap();
        for (i, v) in flips {
            let n = good.len();
            good[i % n] ^= v;
        }
        std::fs::write(&p, &good).unwrap();
        let _ = load_deepseek_v4::<f32>(&p, "layers.0.hc_attn");
        let _ = load_deepseek_v4_head::<f64>(&p, "hc_head");
    }
}

/// DeepSeek-V4.1's chain (`make_v41_fixture.py`, numpy float64 in V4's comb coordinates): the
/// loaded stack's output, last `H_pre` and final read-out; f32, bf16 and f16 halves.
fn deepseek_v41<F: Float>(tol: f64) {
    let e = expected_in("v41_expected.safetensors");
    let x: Array3<F> = e["x"]
        .view()
        .into_dimensionality()
        .unwrap()
        .mapv(F::from_f64);
    let ws: Vec<Array2<F>> = (0..4)
        .map(|l| {
            e[&format!("w.{l}")]
                .view()
                .into_dimensionality()
                .unwrap()
                .mapv(F::from_f64)
        })
        .collect();
    let stack =
        mhc::io::load_deepseek_v41::<F>(fixture("v41_layers.safetensors"), "layers").unwrap();
    assert_eq!(stack.schedule(), mhc::Schedule::Shifted);
    assert_eq!(stack.blocks().len(), 4);
    for b in stack.blocks() {
        let c = b.config();
        assert_eq!(
            (c.rms_eps, c.pre_eps, c.sinkhorn.eps, c.sinkhorn.iters),
            (1e-20, 1e-6, 1e-6, 20)
        );
    }
    let (out, pre) = stack
        .forward(x.view(), |l, u| u.dot(&ws[l]).mapv(|v| v.tanh()))
        .unwrap();
    close("out", &out, &e["out"], tol);
    close("pre_last", &pre, &e["pre_last"], tol);
    let h = mhc::mixing::read_out(out.view(), pre.view()).unwrap();
    close("h", &h, &e["h"], tol);
}

#[test]
fn deepseek_v41_fixture_matches_numpy_f64() {
    deepseek_v41::<f64>(1e-9);
}

#[test]
fn deepseek_v41_fixture_matches_numpy_f32() {
    deepseek_v41::<f32>(1e-5);
}

#[test]
fn deepseek_v41_bad_files_give_typed_errors() {
    let src = std::fs::read(fixture("v41_layers.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&src).unwrap();
    let keep = |drop: &dyn Fn(&str) -> bool, rename: &dyn Fn(&str) -> String| -> PathBuf {
        let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .filter(|(k, _)| !drop(k))
            .map(|(k, t)| (rename(&k), t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        let p = tmp(&format!(
            "v41-{}.safetensors",
            tensors.len() * 131 + tensors[0].0.len()
        ));
        let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, d, s, b)| (k.as_str(), *d, s.clone(), b.clone()))
            .collect();
        write(&p, &refs, None);
        p
    };
    let load = |p: &PathBuf| mhc::io::load_deepseek_v41::<f32>(p, "layers");
    let same = |k: &str| k.to_string();
    // A half layer: layer 1 without its ffn.
    let p = keep(&|k| k.starts_with("layers.1.hc_ffn"), &same);
    assert_eq!(
        load(&p).unwrap_err(),
        Error::MissingTensor {
            name: "layers.1.hc_ffn_fn".into()
        }
    );
    // No layer 0 at all.
    let p = keep(&|k| k.starts_with("layers.0."), &same);
    assert_eq!(
        load(&p).unwrap_err(),
        Error::MissingTensor {
            name: "layers.0.hc_attn_fn".into()
        }
    );
    // A gap: layer 1 stored as layer 2.
    let p = keep(&|_| false, &|k| k.replace("layers.1.", "layers.2."));
    match load(&p).unwrap_err() {
        Error::Format { message } => assert!(message.contains("layers.2.hc_"), "{message}"),
        e => panic!("{e:?}"),
    }
    // A missing base names the tensor.
    let p = keep(&|k| k == "layers.0.hc_ffn_base", &same);
    assert_eq!(
        load(&p).unwrap_err(),
        Error::MissingTensor {
            name: "layers.0.hc_ffn_base".into()
        }
    );
    // A wrong shape: a scale of 2 entries.
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            if k == "layers.1.hc_attn_scale" {
                (k, t.dtype(), vec![2], t.data()[..4].to_vec())
            } else {
                (k, t.dtype(), t.shape().to_vec(), t.data().to_vec())
            }
        })
        .collect();
    let p = tmp("v41-shape.safetensors");
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.as_str(), *d, s.clone(), b.clone()))
        .collect();
    write(&p, &refs, None);
    assert_eq!(
        load(&p).unwrap_err(),
        Error::TensorShape {
            name: "layers.1.hc_attn_scale".into(),
            expected: vec![3],
            got: vec![2]
        }
    );
}

#[test]
fn stacks_round_trip_with_their_schedule() {
    let mut rng = StdRng::seed_from_u64(9);
    for schedule in [mhc::Schedule::Current, mhc::Schedule::Shifted] {
        let blocks = (0..3)
            .map(|_| MhcBlock::<f64>::new(MhcConfig::new(2, 5), &mut rng).unwrap())
            .collect();
        let stack = mhc::MhcStack::new(blocks, schedule).unwrap();
        let p = tmp(&format!("stack-{schedule:?}.safetensors"));
        mhc::io::save_stack(&p, &stack).unwrap();
        let back = mhc::io::load_stack::<f64>(&p).unwrap();
        assert_eq!(back.schedule(), schedule);
        for (a, b) in back.blocks().iter().zip(stack.blocks()) {
            assert_eq!((a.params(), a.config()), (b.params(), b.config()));
        }
    }
    // A file of blocks without a schedule is not a stack.
    let b = MhcBlock::<f32>::new(MhcConfig::new(2, 5), &mut rng).unwrap();
    let p = tmp("no-schedule.safetensors");
    save(&p, &[Saved::Mhc("l0", &b)]).unwrap();
    assert!(matches!(
        mhc::io::load_stack::<f32>(&p),
        Err(Error::Format { .. })
    ));
}
