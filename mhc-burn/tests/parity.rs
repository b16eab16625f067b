//! The burn modules against the core (SPEC §9) on the shared reference vectors: forward values
//! to 1e-5 and autodiff gradients to 1e-4, relative to each tensor's largest entry, for every
//! parameter and the input; both schedules of a chain; the Sinkhorn extremes; round trips.

#[path = "../../tests/common/mod.rs"]
mod common;

use burn::prelude::*;
use common::*;
use mhc_burn::{HcBlock, MhcBlock, MhcStack, array_from_tensor, tensor_from_array};
use ndarray::{Array2, Array3, ArrayD, ArrayView2};
use serde_json::Value;

/// The backend these tests run on: Flex under autodiff, or the one `MHC_BURN_DEVICE` names
/// (`wgpu-cpu` for wgpu on a software Vulkan device, `cuda` for CUDA device 0; needs the
/// matching cargo feature).
fn device() -> Device {
    let name = std::env::var("MHC_BURN_DEVICE").unwrap_or_default();
    let d = match name.as_str() {
        "" | "flex" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu-cpu" => Device::wgpu(burn::tensor::DeviceKind::Cpu),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0),
        other => panic!("MHC_BURN_DEVICE={other}: unknown, or its feature is off"),
    };
    d.autodiff()
}

const FWD: f64 = 1e-5;
const GRAD: f64 = 1e-4;

fn f32a<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> ArrayD<f64> {
    a.mapv(f64::from).into_dyn()
}

fn of<const D: usize>(t: &Tensor<D>) -> ArrayD<f64> {
    array_from_tensor(t).mapv(f64::from)
}

/// A reference array as an f32 tensor on `dev`, of rank `D`.
fn tensor<const D: usize>(v: &Value, dev: &Device) -> Tensor<D> {
    tensor_from_array(&arr(v).mapv(|x| x as f32), dev)
}

fn grad<const D: usize>(t: &Tensor<D>, g: &burn::tensor::Gradients) -> ArrayD<f64> {
    of(&t.grad(g).expect("gradient retained"))
}

/// `[T, n, C]` as `[1, T, n, C]`.
fn batch4(t: Tensor<3>) -> Tensor<4> {
    t.unsqueeze_dim(0)
}

fn tanh_vjp(
    w: &Array2<f32>,
) -> impl Fn(ArrayView2<f32>, ArrayView2<f32>) -> (Array2<f32>, Array2<f32>) + '_ {
    move |u, dy| {
        let y = u.dot(w).mapv(f32::tanh);
        let dz = &dy * &y.mapv(|v| 1.0 - v * v);
        (dz.dot(&w.t()), u.t().dot(&dz))
    }
}

#[test]
fn mhc_block_forward_and_gradients_equal_the_core() {
    let dev = device();
    for (k, c) in cases("mhc_block").iter().enumerate() {
        let (cfg, params) = mhc_case::<f32>(c);
        let core = mhc::MhcBlock::from_params(cfg, params).unwrap();
        let block = MhcBlock::from_core(&core, &dev);
        let w = a2::<f32>(&c["sublayer_w"]);
        let x = a3::<f32>(&c["x"]);
        let up = a3::<f32>(&c["upstream"]);
        // The core, f32.
        let (out, y) = core
            .forward_train(x.view(), |u| u.dot(&w).mapv(f32::tanh))
            .unwrap();
        let vjp = tanh_vjp(&w);
        let mut dw = None;
        let (dx, g) = core
            .backward(x.view(), y.view(), up.view(), |u, dy| {
                let (du, d) = vjp(u, dy);
                dw = Some(d);
                du
            })
            .unwrap();
        // burn.
        let xt = batch4(tensor::<3>(&c["x"], &dev)).require_grad();
        let wt = tensor::<2>(&c["sublayer_w"], &dev).require_grad();
        let bo = block.forward(xt.clone(), |u| u.matmul(wt.clone().unsqueeze()).tanh());
        let what = |s: &str| format!("mhc case {k}: {s}");
        let bo3 = of(&bo).into_shape_with_order(out.shape()).unwrap();
        assert_close(&what("output vs core"), &bo3, &f32a(&out), FWD);
        assert_close(&what("output vs reference"), &bo3, &arr(&c["output"]), 1e-4);
        let maps = block.mappings(xt.clone());
        let cm = core.mappings(x.view()).unwrap();
        let sq = |a: ArrayD<f64>, s: &[usize]| a.into_shape_with_order(s.to_vec()).unwrap();
        assert_close(
            &what("pre"),
            &sq(of(&maps.pre), cm.pre.shape()),
            &f32a(&cm.pre),
            FWD,
        );
        assert_close(
            &what("post"),
            &sq(of(&maps.post), cm.post.shape()),
            &f32a(&cm.post),
            FWD,
        );
        assert_close(
            &what("res"),
            &sq(of(&maps.res), cm.res.shape()),
            &f32a(&cm.res),
            FWD,
        );
        let loss = (bo * batch4(tensor::<3>(&c["upstream"], &dev))).sum();
        let gr = loss.backward();
        let gx = sq(grad(&xt, &gr), dx.shape());
        assert_close(&what("grad x"), &gx, &f32a(&dx), GRAD);
        assert_close(
            &what("grad phi"),
            &grad(&block.phi.val(), &gr),
            &f32a(&g.phi),
            GRAD,
        );
        let ga = ndarray::Array1::from(g.alpha.to_vec());
        assert_close(
            &what("grad alpha"),
            &grad(&block.alpha.val(), &gr),
            &f32a(&ga),
            GRAD,
        );
        assert_close(
            &what("grad bias"),
            &grad(&block.bias.val(), &gr),
            &f32a(&g.bias),
            GRAD,
        );
        assert_close(&what("grad W"), &grad(&wt, &gr), &f32a(&dw.unwrap()), GRAD);
    }
}

#[test]
fn hc_block_forward_and_gradients_equal_the_core() {
    let dev = device();
    for (k, c) in cases("hc_block").iter().enumerate() {
        let (cfg, params) = hc_case::<f32>(c);
        let core = mhc::HcBlock::from_params(cfg, params).unwrap();
        let block = HcBlock::from_core(&core, &dev);
        let w = a2::<f32>(&c["sublayer_w"]);
        let x = a3::<f32>(&c["x"]);
        let (t, n, cc) = x.dim();
        let up = Array3::from_shape_fn((t, n, cc), |(a, b, d)| ((a * 7 + b * 3 + d) as f32).sin());
        let (out, y) = core
            .forward_train(x.view(), |u| u.dot(&w).mapv(f32::tanh))
            .unwrap();
        let vjp = tanh_vjp(&w);
        let (dx, g) = core
            .backward(x.view(), y.view(), up.view(), |u, dy| vjp(u, dy).0)
            .unwrap();
        let xt = batch4(tensor::<3>(&c["x"], &dev)).require_grad();
        let wt = tensor::<2>(&c["sublayer_w"], &dev);
        let bo = block.forward(xt.clone(), |u| u.matmul(wt.clone().unsqueeze()).tanh());
        let what = |s: &str| format!("hc case {k}: {s}");
        let sq = |a: ArrayD<f64>, s: &[usize]| a.into_shape_with_order(s.to_vec()).unwrap();
        assert_close(
            &what("output vs core"),
            &sq(of(&bo), out.shape()),
            &f32a(&out),
            FWD,
        );
        assert_close(
            &what("output vs reference"),
            &sq(of(&bo), out.shape()),
            &arr(&c["output"]),
            1e-4,
        );
        let upt: Tensor<4> = batch4(tensor_from_array(&up, &dev));
        let gr = (bo * upt).sum().backward();
        assert_close(
            &what("grad x"),
            &sq(grad(&xt, &gr), dx.shape()),
            &f32a(&dx),
            GRAD,
        );
        let pairs: [(&str, ArrayD<f64>, ArrayD<f64>); 6] = [
            (
                "theta_pre",
                grad(&block.theta_pre.val(), &gr),
                f32a(&g.theta_pre),
            ),
            (
                "theta_post",
                grad(&block.theta_post.val(), &gr),
                f32a(&g.theta_post),
            ),
            (
                "theta_res",
                grad(&block.theta_res.val(), &gr),
                f32a(&g.theta_res),
            ),
            ("b_pre", grad(&block.b_pre.val(), &gr), f32a(&g.b_pre)),
            ("b_post", grad(&block.b_post.val(), &gr), f32a(&g.b_post)),
            ("b_res", grad(&block.b_res.val(), &gr), f32a(&g.b_res)),
        ];
        for (name, got, want) in pairs {
            assert_close(&what(name), &got, &want, GRAD);
        }
        let ga = ndarray::Array1::from(g.alpha.to_vec());
        assert_close(
            &what("alpha"),
            &grad(&block.alpha.val(), &gr),
            &f32a(&ga),
            GRAD,
        );
    }
}

/// Chains of 1–4 blocks under both schedules (V4.1's constants among them): `x_L`, `pre_{L−1}`
/// and every gradient of the loss `⟨U, x_L⟩ + ⟨V, pre_{L−1}⟩`, against the core's stack.
#[test]
fn stacks_forward_and_gradients_equal_the_core() {
    let dev = device();
    for (k, c) in cases("mhc_stack").iter().enumerate() {
        let (core, ws) = stack_case::<f32>(c);
        let layers = c["layers"].as_array().unwrap();
        let schedule = core.schedule();
        let x = a3::<f32>(&c["x"]);
        let (up, up_pre) = (a3::<f32>(&c["upstream"]), a2::<f32>(&c["upstream_pre"]));
        let (out, pre, tape) = core
            .forward_train(x.view(), |l, u| u.dot(&ws[l]).mapv(f32::tanh))
            .unwrap();
        let (dx, grads) = core
            .backward(&tape, up.view(), Some(up_pre.view()), |l, u, dy| {
                tanh_vjp(&ws[l])(u, dy).0
            })
            .unwrap();
        let stack = MhcStack::from_core(&core, &dev);
        let xt = batch4(tensor::<3>(&c["x"], &dev)).require_grad();
        let wts: Vec<Tensor<2>> = layers
            .iter()
            .map(|l| tensor::<2>(&l["sublayer_w"], &dev))
            .collect();
        let (bo, bp) = stack.forward(xt.clone(), |l, u| {
            u.matmul(wts[l].clone().unsqueeze()).tanh()
        });
        let what = |s: &str| {
            format!(
                "stack case {k} ({schedule:?}, {} blocks): {s}",
                layers.len()
            )
        };
        let sq = |a: ArrayD<f64>, s: &[usize]| a.into_shape_with_order(s.to_vec()).unwrap();
        assert_close(&what("x_L"), &sq(of(&bo), out.shape()), &f32a(&out), FWD);
        assert_close(
            &what("pre_L-1"),
            &sq(of(&bp), pre.shape()),
            &f32a(&pre),
            FWD,
        );
        assert_close(
            &what("x_L vs reference"),
            &sq(of(&bo), out.shape()),
            &arr(&c["output"]),
            1e-4,
        );
        let loss = (bo * batch4(tensor::<3>(&c["upstream"], &dev))).sum()
            + (bp * tensor::<2>(&c["upstream_pre"], &dev).unsqueeze::<3>()).sum();
        let gr = loss.backward();
        assert_close(
            &what("grad x"),
            &sq(grad(&xt, &gr), dx.shape()),
            &f32a(&dx),
            GRAD,
        );
        for (l, (b, g)) in stack.blocks.iter().zip(&grads).enumerate() {
            let w = |s: &str| what(&format!("block {l} {s}"));
            assert_close(&w("phi"), &grad(&b.phi.val(), &gr), &f32a(&g.phi), GRAD);
            let ga = ndarray::Array1::from(g.alpha.to_vec());
            assert_close(&w("alpha"), &grad(&b.alpha.val(), &gr), &f32a(&ga), GRAD);
            assert_close(&w("bias"), &grad(&b.bias.val(), &gr), &f32a(&g.bias), GRAD);
        }
    }
}

/// The reference Sinkhorn cases, extreme logits (±1e3, ±1e4) among them: finite, rows summing
/// to 1 (or `s/(s+eps)`), equal to the core's projection.
#[test]
fn sinkhorn_matches_the_core_and_stays_finite_on_extreme_logits() {
    let dev = Device::flex();
    for (k, c) in cases("sinkhorn").iter().enumerate() {
        let n = c["n"].as_u64().unwrap() as usize;
        let sk = mhc::SinkhornKnopp {
            iters: c["iters"].as_u64().unwrap() as usize,
            eps: c["eps"].as_f64().unwrap(),
        };
        let logits = a2::<f32>(&c["logits"]);
        let want = sk.project(logits.view()).unwrap();
        let lt: Tensor<3> = tensor_from_array::<2, _>(&logits, &dev).reshape([1, n, n]);
        let got = of(&mhc_burn::sinkhorn(lt, sk.iters, sk.eps))
            .into_shape_with_order(vec![n, n])
            .unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "case {k}: non-finite");
        assert_close(&format!("sinkhorn case {k}"), &got, &f32a(&want), FWD);
    }
    // Logits the linear domain cannot take: a spread of ±1e4 in f32.
    let wild = Tensor::<3>::from_floats(
        [[[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [3.0, -2e3, 1e4]]],
        &dev,
    );
    let m = of(&mhc_burn::sinkhorn(wild, 20, 0.0));
    assert!(m.iter().all(|v| v.is_finite() && *v >= 0.0));
    let rows = m.sum_axis(ndarray::Axis(2));
    assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5), "{rows:?}");
}

/// Both domains of `sinkhorn` against the core, values and gradients (through autodiff): batches
/// whose logits span just under and just over `LINEAR_SPREAD` (linear and log domain), one
/// extreme matrix that sends a whole batch of ordinary ones to the log domain, and `eps > 0`
/// (always the linear domain).
#[test]
fn sinkhorn_domains_match_the_core_with_gradients() {
    let dev = device();
    let (b, n) = (37, 4);
    let spread = mhc_burn::LINEAR_SPREAD;
    for (name, scale, eps, extreme) in [
        ("linear", 0.95 * spread, 0.0, false),
        ("log", 1.05 * spread, 0.0, false),
        ("log (one extreme matrix)", 2.0, 0.0, true),
        ("linear with eps", 3.0 * spread, 1e-6, false),
    ] {
        let mut k = 0u32;
        let mut unit = || {
            k += 1;
            (f64::from(k) * 0.618_033_988_7).fract() as f32 // in [0, 1), equidistributed
        };
        let mut logits = Array3::from_shape_simple_fn((b, n, n), || unit() * scale as f32);
        if extreme {
            logits[[b - 1, 0, 0]] = 1e3;
        }
        let up = Array3::from_shape_simple_fn((b, n, n), || unit() - 0.5);
        let sk = mhc::SinkhornKnopp { iters: 20, eps };
        let want = sk.project_batch(logits.view()).unwrap();
        let want_g = sk.vjp_batch(logits.view(), up.view()).unwrap();
        let lt = tensor_from_array::<3, _>(&logits, &dev).require_grad();
        let m = mhc_burn::sinkhorn(lt.clone(), 20, eps);
        let loss = (m.clone() * tensor_from_array::<3, _>(&up, &dev)).sum();
        let g = loss.backward();
        assert_close(&format!("sinkhorn {name}"), &of(&m), &f32a(&want), FWD);
        assert_close(
            &format!("sinkhorn {name} vjp"),
            &grad(&lt, &g),
            &f32a(&want_g),
            GRAD,
        );
    }
}

#[test]
fn conversions_round_trip_exactly() {
    let dev = Device::flex();
    let (cfg, params) = mhc_case::<f32>(&cases("mhc_block")[0]);
    let core = mhc::MhcBlock::from_params(cfg, params).unwrap();
    let back = MhcBlock::from_core(&core, &dev).to_core().unwrap();
    assert_eq!(back.params(), core.params());
    assert_eq!(back.config(), core.config());
    let (cfg, params) = hc_case::<f32>(&cases("hc_block")[0]);
    let core = mhc::HcBlock::from_params(cfg, params).unwrap();
    let back = HcBlock::from_core(&core, &dev).to_core().unwrap();
    assert_eq!(back.params(), core.params());
}

/// burn's own records: save a stack with `Module::save_file`, load it into a fresh one.
#[test]
fn burn_records_round_trip() {
    let dev = Device::flex();
    let cfg = mhc_burn::MhcBlockConfig::new(4, 8);
    let blocks: Vec<_> = (0..3).map(|_| cfg.init(&dev)).collect();
    let stack = MhcStack::new(blocks, mhc::Schedule::Shifted);
    let want = stack.to_core().unwrap();
    let path = std::env::temp_dir().join(format!("mhc-burn-record-{}", std::process::id()));
    stack.save_file(&path).unwrap();
    let fresh = MhcStack::new(
        (0..3).map(|_| cfg.init(&dev)).collect(),
        mhc::Schedule::Shifted,
    );
    assert_ne!(
        fresh.to_core().unwrap().blocks()[0].params(),
        want.blocks()[0].params()
    );
    let loaded = fresh.load_file(&path);
    let _ = std::fs::remove_file(&path);
    for (a, b) in loaded.to_core().unwrap().blocks().iter().zip(want.blocks()) {
        assert_eq!(a.params(), b.params());
    }
}

#[test]
fn bad_configuration_is_an_error_at_init() {
    let dev = Device::flex();
    let e = mhc_burn::MhcBlockConfig::new(0, 8)
        .try_init(&dev)
        .unwrap_err();
    assert_eq!(
        e,
        mhc::Error::InvalidDimension {
            what: "streams",
            got: 0
        }
    );
    let e = mhc_burn::MhcBlockConfig::new(4, 8)
        .with_sinkhorn_iters(0)
        .try_init(&dev)
        .unwrap_err();
    assert_eq!(e, mhc::Error::InvalidIterations { got: 0 });
    let e = mhc_burn::HcBlockConfig::new(4, 0)
        .try_init(&dev)
        .unwrap_err();
    assert_eq!(
        e,
        mhc::Error::InvalidDimension {
            what: "dim",
            got: 0
        }
    );
    let a = mhc_burn::MhcBlockConfig::new(4, 8).init(&dev);
    let b = mhc_burn::MhcBlockConfig::new(4, 16).init(&dev);
    assert_eq!(
        MhcStack::try_new(vec![a, b], mhc::Schedule::Current).unwrap_err(),
        mhc::Error::BlockMismatch {
            index: 1,
            expected: [4, 8],
            got: [4, 16]
        }
    );
    let r = std::panic::catch_unwind(|| {
        mhc_burn::MhcBlockConfig::new(4, 8)
            .with_rms_eps(-1.0)
            .init(&Device::flex())
    });
    assert!(r.is_err());
}

/// The zero-bias block on replicated streams is a pre-norm residual connection (SPEC §3).
#[test]
fn zero_bias_block_on_replicated_streams_is_a_residual() {
    let dev = Device::flex();
    let core =
        mhc::MhcBlock::<f32>::from_params(mhc::MhcConfig::new(4, 8), mhc::MhcParams::zeros(4, 8))
            .unwrap();
    let block = MhcBlock::from_core(&core, &dev);
    let h = Tensor::<3>::random(
        [2, 3, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let out = block.forward(mhc_burn::expand(h.clone(), 4), |u| u * 0.5);
    // H_pre = ½ on 4 equal streams: u = 2h, y = h; H_res = J/4: Σ_j x_j/4 = h; out = 2h.
    let want = mhc_burn::expand(h * 2.0, 4);
    let d = of(&(out - want).abs())
        .iter()
        .fold(0.0f64, |m, v| m.max(*v));
    assert!(d < 1e-5, "{d}");
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The core's DeepSeek-V4.1 loader feeds a burn stack, and DeepSeek-V4's head a burn
/// `LearnedCollapse`: both equal the core on the committed fixtures.
#[test]
fn deepseek_weights_feed_burn_modules() {
    let dev = device();
    let stack =
        mhc::io::load_deepseek_v41::<f32>(fixture("v41_layers.safetensors"), "layers").unwrap();
    let burn_stack = MhcStack::from_core(&stack, &dev);
    let (t, n, c) = (6, 4, 16);
    let x = Array3::from_shape_fn((t, n, c), |(a, b, k)| {
        ((a * 5 + b * 3 + k) as f32 * 0.37).sin()
    });
    let (out, pre) = stack.forward(x.view(), |_, u| u.mapv(f32::tanh)).unwrap();
    let xt = batch4(tensor_from_array(&x, &dev));
    let (bo, bp) = burn_stack.forward(xt.clone(), |_, u| u.tanh());
    let sq = |a: ArrayD<f64>, s: &[usize]| a.into_shape_with_order(s.to_vec()).unwrap();
    assert_close("v41 x_L", &sq(of(&bo), out.shape()), &f32a(&out), FWD);
    assert_close("v41 pre", &sq(of(&bp), pre.shape()), &f32a(&pre), FWD);
    let head =
        mhc::io::load_deepseek_v4_head::<f32>(fixture("v4_layer.safetensors"), "hc_head").unwrap();
    let want = head.collapse(x.view()).unwrap();
    let got = mhc_burn::LearnedCollapse::from_core(&head, &dev).forward(xt);
    assert_close("v4 head", &sq(of(&got), want.shape()), &f32a(&want), FWD);
}

/// Half-precision activations keep f32 mappings (SPEC §9), and the output keeps the activations'
/// dtype.
#[test]
fn half_precision_activations_keep_f32_mappings() {
    use burn::tensor::{DType, FloatDType};
    let dev = Device::flex();
    let block = mhc_burn::MhcBlockConfig::new(4, 8).init(&dev);
    let x = Tensor::<4>::random(
        [1, 3, 4, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    )
    .cast(FloatDType::BF16);
    let maps = block.mappings(x.clone());
    assert_eq!(maps.res.dtype(), DType::F32);
    let out = block.forward(x, |u| u);
    assert_eq!(out.dtype(), DType::BF16);
}
