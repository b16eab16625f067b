//! Time-bounded fuzz harnesses (the toolchain here is stable, so cargo-fuzz's libFuzzer builds
//! are out of reach): random bit patterns into the projector, random shapes and values into
//! `from_params` + `forward` + `backward`, random and mutated bytes into the safetensors
//! loaders. Each harness asserts that nothing panics and that every `Ok` result is finite.
//!
//! Run: `MHC_FUZZ_SECS=60 cargo test --release --test fuzz -- --ignored --nocapture`
//! (without `--ignored`, each harness runs a short smoke pass of 200 inputs).

use mhc::{Error, MhcBlock, MhcConfig, MhcParams, SinkhornKnopp};
use ndarray::{Array1, Array2, Array3};
use std::time::{Duration, Instant};

/// xorshift64*: fast, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// An f32 from arbitrary bits half of the time (NaN, ±∞, subnormals, huge), else a
    /// moderate value.
    fn f32(&mut self) -> f32 {
        match self.below(4) {
            0 => f32::from_bits(self.next() as u32),
            1 => {
                ((self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    * 10f32.powi(self.below(60) as i32 - 30)
            }
            _ => (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0,
        }
    }
    fn f64(&mut self) -> f64 {
        if self.below(8) == 0 {
            f64::from_bits(self.next())
        } else {
            self.f32() as f64
        }
    }
}

/// Runs `case` on fresh seeds until the budget (`MHC_FUZZ_SECS`, default: 200 cases) is spent;
/// returns the number of cases.
fn drive(name: &str, ignored: bool, mut case: impl FnMut(&mut Rng)) -> usize {
    let secs: u64 = std::env::var("MHC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let budget = if ignored {
        Duration::from_secs(secs)
    } else {
        Duration::ZERO
    };
    let start = Instant::now();
    let mut k = 0usize;
    loop {
        let mut rng = Rng(0x9E3779B97F4A7C15 ^ (k as u64).wrapping_mul(0xD1B54A32D192ED03) | 1);
        case(&mut rng);
        k += 1;
        if (ignored && start.elapsed() >= budget) || (!ignored && k >= 200) {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {k} cases in {:.1} s without a finding",
        start.elapsed().as_secs_f64()
    );
    k
}

fn projector(rng: &mut Rng) {
    let n = 1 + rng.below(8);
    let b = rng.below(20);
    let sk = SinkhornKnopp {
        iters: [0, 1, 2, 20, 37][rng.below(5)],
        eps: [0.0, 1e-6, 1e-300, -1.0, f64::NAN, 0.5][rng.below(6)],
    };
    let l = Array3::from_shape_simple_fn((b, n, n), || rng.f32());
    let u = Array3::from_shape_simple_fn((b, n, n), || rng.f32());
    match sk.project_batch(l.view()) {
        Ok(p) => {
            assert!(
                p.iter().all(|v| v.is_finite() && *v >= 0.0),
                "{sk:?} {l:?} -> {p:?}"
            );
            if sk.eps == 0.0 {
                for (r, row) in p.rows().into_iter().enumerate() {
                    let (b, i) = (r / n, r % n);
                    let li = l.slice(ndarray::s![b, .., ..]);
                    assert!(
                        (row.sum() - 1.0).abs() < 1e-5,
                        "{sk:?} matrix {li:?} row {i}: {row:?} sums to {}",
                        row.sum()
                    );
                }
            }
        }
        Err(e) => assert!(
            matches!(
                e,
                Error::NonFinite { .. }
                    | Error::InvalidIterations { .. }
                    | Error::InvalidEpsilon { .. }
            ),
            "{e:?}"
        ),
    }
    if let Ok(g) = sk.vjp_batch(l.view(), u.view()) {
        // The VJP of a finite map at finite inputs is finite unless the product overflows.
        let _ = g;
    }
    let big = if rng.below(2) == 0 { 1.0 } else { 1e300 };
    let l64 = Array3::from_shape_simple_fn((b, n, n), || rng.f64() * big);
    if let Ok(p) = sk.project_batch(l64.view()) {
        assert!(p.iter().all(|v| v.is_finite() && *v >= 0.0));
    }
}

fn block(rng: &mut Rng) {
    let n = 1 + rng.below(5);
    let c = 1 + rng.below(12);
    let t = rng.below(40);
    let m = n * n + 2 * n;
    let mut cfg = MhcConfig::new(n, c);
    cfg.rms_eps = [1e-6, 0.0, 1e-30, f64::INFINITY][rng.below(4)];
    cfg.sinkhorn.iters = [20, 0, 3][rng.below(3)];
    let bad_shape = rng.below(10) == 0;
    // Parameters: moderate but for one case in eight, where they are arbitrary bit patterns.
    let wild = rng.below(8) == 0;
    let mut p = |s: f32| {
        if wild {
            rng.f32()
        } else {
            s * ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        }
    };
    let params = MhcParams {
        phi: Array2::from_shape_simple_fn((n * c + usize::from(bad_shape), m), || p(0.5)),
        alpha: [p(4.0), p(4.0), p(40.0)],
        bias: Array1::from_shape_simple_fn(m, || p(20.0)),
    };

    let Ok(block) = MhcBlock::from_params(cfg, params) else {
        return;
    };
    let x = Array3::from_shape_simple_fn((t, n, c), || rng.f32());
    let scale = rng.f32();
    let sub = |u: ndarray::ArrayView2<f32>| u.mapv(|v| (v * scale).tanh());
    if let Ok(out) = block.forward(x.view(), sub) {
        assert!(out.iter().all(|v| v.is_finite()));
        let maps = block.mappings(x.view()).unwrap();
        for r in maps.res.rows() {
            assert!((r.sum() - 1.0).abs() < 1e-4, "{r:?}");
        }
    }
    if let Ok((out, y)) = block.forward_train(x.view(), sub) {
        let up = Array3::from_shape_simple_fn(out.raw_dim(), || rng.f32());
        if let Ok((dx, g)) = block.backward(x.view(), y.view(), up.view(), |_, dy| dy.to_owned()) {
            assert_eq!(dx.shape(), x.shape());
            assert_eq!(g.phi.shape(), block.params().phi.shape());
        }
    }
}

#[cfg(feature = "safetensors")]
fn loader(rng: &mut Rng) {
    let path = std::env::temp_dir().join(format!("mhc-fuzz-{}.safetensors", std::process::id()));
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/v4_layer.safetensors"
    ))
    .unwrap();
    let bytes: Vec<u8> = match rng.below(3) {
        0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
        1 => {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(6) {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            b
        }
        _ => good[..rng.below(good.len())].to_vec(),
    };
    std::fs::write(&path, &bytes).unwrap();
    if let Ok(b) = mhc::io::load_deepseek_v4::<f32>(&path, "layers.0.hc_attn") {
        assert!(b.params().phi.iter().all(|v| v.is_finite()));
    }
    let _ = mhc::io::load_deepseek_v4_head::<f64>(&path, "hc_head");
    let _ = mhc::io::load_mhc_stack::<f32>(&path);
}

#[test]
fn smoke() {
    drive("projector", false, projector);
    drive("block", false, block);
    #[cfg(feature = "safetensors")]
    drive("loader", false, loader);
}

#[test]
#[ignore = "time-bounded fuzzing: MHC_FUZZ_SECS per harness"]
fn fuzz_projector() {
    drive("projector", true, projector);
}

#[test]
#[ignore = "time-bounded fuzzing: MHC_FUZZ_SECS per harness"]
fn fuzz_block() {
    drive("block", true, block);
}

#[cfg(feature = "safetensors")]
#[test]
#[ignore = "time-bounded fuzzing: MHC_FUZZ_SECS per harness"]
fn fuzz_loader() {
    drive("loader", true, loader);
}
