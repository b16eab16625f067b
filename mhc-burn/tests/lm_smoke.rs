//! Smoke test of `examples/lm`'s model: a tiny transformer of every variant learns a periodic
//! character sequence for a few steps and its loss goes down.

#[path = "../examples/lm/model.rs"]
#[allow(dead_code)]
mod model;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use model::{Lm, Shape, Variant, grad_norm};

fn windows(b: usize, s: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    // "abcdeabcde…" shifted by the sequence index: next-character prediction is learnable.
    let id = |k: usize| (k % 5) as i64;
    let x: Vec<i64> = (0..b * s).map(|k| id(k / s + k % s)).collect();
    let y: Vec<i64> = (0..b * s).map(|k| id(k / s + k % s + 1)).collect();
    (
        Tensor::from_data(TensorData::new(x, [b, s]), device),
        Tensor::from_data(TensorData::new(y, [b, s]), device),
    )
}

#[test]
fn every_variant_trains() {
    for variant in Variant::ALL {
        let device = Device::flex().autodiff();
        device.seed(0);
        let shape = Shape {
            vocab: 5,
            dim: 16,
            layers: 2,
            heads: 2,
            context: 8,
            streams: 4,
        };
        let mut model = Lm::new(shape, variant, &device);
        let mut optim = AdamWConfig::new().init();
        let (x, y) = windows(4, 8, &device);
        let mut losses = vec![];
        for _ in 0..15 {
            let loss = model.loss(x.clone(), y.clone());
            losses.push(loss.clone().into_scalar::<f32>());
            let grads = loss.backward();
            assert!(grad_norm(&model, &grads).is_finite());
            let grads = GradientsParams::from_grads(grads, &model);
            model = optim.step(1e-2, model, grads);
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(
            last < 0.7 * first,
            "{}: loss {first} -> {last}",
            variant.name()
        );
    }
}
