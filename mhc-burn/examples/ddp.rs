//! Data-parallel training of a small mHC model with burn's learner, over `--devices N` devices.
//!
//! ```sh
//! cargo run --release -p mhc-burn --example ddp -- --devices 2 --steps 20
//! cargo run --release -p mhc-burn --features cuda --example ddp -- --devices 8 --steps 200
//! ```
//!
//! The model: `expand → MhcStack (pre-norm MLP sublayers) → read-out → linear head`, regressing
//! a fixed random teacher network on random inputs (MSE). burn's `SupervisedTraining` runs it:
//! with the `cuda` feature, on CUDA devices `0..N` with distributed data parallel
//! (`ExecutionStrategy::ddp`, gradients all-reduced through NCCL); otherwise on `N` replicas of
//! the CPU backend with `ExecutionStrategy::MultiDevice(.., OptimMainDevice)`, which needs no
//! collectives (each step's gradients are gathered on the main device, the optimiser runs there
//! and the updated model is forked to every device).
//!
//! It prints the training loss of every batch (each device's share of a step, so `N` lines a
//! step; burn's own progress lines come between them), then checks that
//! every replica of the trained model, forked onto each device, holds bitwise the parameters of
//! the main one, and that the loss went down.
//!
//! # Several machines
//!
//! burn spans machines through its remote backend: build with burn's `remote` feature, start
//! `burn::server::start_websocket(device, port)` (feature `remote-server`) on every machine,
//! and list `Device::remote("ws://host:port")` devices instead of local ones: the learner and
//! this program do not change, the tensors of each replica live on its machine.

use std::sync::Mutex;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::train::metric::LossMetric;
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, RegressionOutput,
    SupervisedTraining, TrainOutput, TrainStep,
};
use clap::Parser;
use mhc_burn::{MhcBlockConfig, MhcStack, Schedule, expand, read_out};

#[derive(Parser, Debug)]
#[command(about = "Data-parallel training of an mHC model with burn's learner")]
struct Args {
    /// Number of devices (CUDA devices with the `cuda` feature, CPU replicas otherwise).
    #[arg(long, default_value_t = 2)]
    devices: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Sequences a step, split across the devices.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens a sequence.
    #[arg(long, default_value_t = 16)]
    seq: usize,
    /// Model width `C`.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// mHC blocks (sublayers).
    #[arg(long, default_value_t = 6)]
    blocks: usize,
    /// Schedule: `current` (paper) or `shifted` (DeepSeek-V4.1).
    #[arg(long, default_value = "shifted")]
    schedule: String,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the data and the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const STREAMS: usize = 4;

/// A pre-norm MLP sublayer `C → 4C → C`.
#[derive(Module, Debug)]
struct Mlp {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(c: usize, device: &Device) -> Self {
        Mlp {
            norm: LayerNormConfig::new(c).init(device),
            up: LinearConfig::new(c, 4 * c).init(device),
            down: LinearConfig::new(4 * c, c).init(device),
        }
    }

    fn forward(&self, u: Tensor<3>) -> Tensor<3> {
        self.down.forward(burn::tensor::activation::gelu(
            self.up.forward(self.norm.forward(u)),
        ))
    }
}

#[derive(Module, Debug)]
struct Model {
    mlps: Vec<Mlp>,
    stack: MhcStack,
    head: Linear,
}

impl Model {
    fn new(args: &Args, device: &Device) -> Self {
        let schedule = match args.schedule.as_str() {
            "current" => Schedule::Current,
            "shifted" => Schedule::Shifted,
            s => panic!("--schedule {s}: expected current or shifted"),
        };
        let blocks = (0..args.blocks)
            .map(|_| MhcBlockConfig::new(STREAMS, args.dim).init(device))
            .collect();
        Model {
            mlps: (0..args.blocks)
                .map(|_| Mlp::new(args.dim, device))
                .collect(),
            stack: MhcStack::new(blocks, schedule),
            head: LinearConfig::new(args.dim, args.dim).init(device),
        }
    }

    /// `[B, S, C] → [B, S, C]`.
    fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        let (x, pre) = self
            .stack
            .forward(expand(h, STREAMS), |l, u| self.mlps[l].forward(u));
        // The last block's H_pre reads out the final hidden state (V4.1; any schedule here).
        self.head.forward(read_out(x, pre))
    }

    fn regression(&self, batch: Batch) -> RegressionOutput {
        let [b, s, c] = batch.inputs.dims();
        let out = self.forward(batch.inputs).reshape([b * s, c]);
        let targets = batch.targets.reshape([b * s, c]);
        let loss = (out.clone() - targets.clone()).square().mean();
        RegressionOutput::new(loss.reshape([1]), out, targets)
    }
}

/// Every training step's loss, as the devices' workers report them.
static LOSSES: Mutex<Vec<f32>> = Mutex::new(Vec::new());

impl TrainStep for Model {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let out = self.regression(batch);
        let loss: f32 = out.loss.clone().into_scalar();
        let mut all = LOSSES.lock().expect("not poisoned");
        all.push(loss);
        println!("batch {:3}: loss {loss:.6}", all.len());
        drop(all);
        let grads = out.loss.backward();
        TrainOutput::new(self, grads, out)
    }
}

impl InferenceStep for Model {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.regression(batch)
    }
}

/// One sequence: inputs and the teacher's outputs, `[S, C]` each, flattened.
#[derive(Clone, Debug)]
struct Item {
    inputs: Vec<f32>,
    targets: Vec<f32>,
}

#[derive(Clone, Debug)]
struct Batch {
    inputs: Tensor<3>,
    targets: Tensor<3>,
}

#[derive(Clone)]
struct Stack {
    seq: usize,
    dim: usize,
}

impl Batcher<Item, Batch> for Stack {
    fn batch(&self, items: Vec<Item>, device: &Device) -> Batch {
        let b = items.len();
        let cat = |f: fn(&Item) -> &Vec<f32>| {
            let v: Vec<f32> = items.iter().flat_map(|i| f(i).iter().copied()).collect();
            Tensor::<3>::from_data(TensorData::new(v, [b, self.seq, self.dim]), device)
        };
        Batch {
            inputs: cat(|i| &i.inputs),
            targets: cat(|i| &i.targets),
        }
    }
}

/// `n` sequences regressed onto a fixed random tanh teacher.
fn dataset(args: &Args, n: usize, teacher: &[Tensor<2>], device: &Device) -> InMemDataset<Item> {
    let (s, c) = (args.seq, args.dim);
    let x = Tensor::<2>::random([n * s, c], Distribution::Normal(0.0, 1.0), device);
    let y = teacher
        .iter()
        .fold(x.clone(), |h, w| h.matmul(w.clone()).tanh());
    let xs: Vec<f32> = x.into_data().try_to_vec().expect("f32");
    let ys: Vec<f32> = y.into_data().try_to_vec().expect("f32");
    let items = (0..n)
        .map(|k| Item {
            inputs: xs[k * s * c..(k + 1) * s * c].to_vec(),
            targets: ys[k * s * c..(k + 1) * s * c].to_vec(),
        })
        .collect();
    InMemDataset::new(items)
}

fn devices(n: usize) -> Vec<Device> {
    #[cfg(feature = "cuda")]
    {
        (0..n).map(|i| Device::cuda(i).autodiff()).collect()
    }
    #[cfg(not(feature = "cuda"))]
    {
        (0..n).map(|_| Device::flex().autodiff()).collect()
    }
}

fn strategy(devices: Vec<Device>) -> ExecutionStrategy {
    #[cfg(feature = "cuda")]
    {
        use burn::tensor::distributed::{DistributedConfig, ReduceOperation};
        ExecutionStrategy::ddp(
            devices,
            DistributedConfig {
                all_reduce_op: ReduceOperation::Mean,
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice)
    }
}

fn main() {
    let args = Args::parse();
    assert!(args.devices >= 1, "--devices N with N >= 1");
    let devices = devices(args.devices);
    let main_device = devices[0].clone();
    main_device.seed(args.seed);
    let teacher: Vec<Tensor<2>> = (0..3)
        .map(|_| {
            Tensor::random(
                [args.dim, args.dim],
                Distribution::Normal(0.0, (1.5 / args.dim as f64).sqrt()),
                &main_device,
            )
        })
        .collect();
    let batcher = Stack {
        seq: args.seq,
        dim: args.dim,
    };
    let train = dataset(&args, args.steps * args.batch, &teacher, &main_device);
    let valid = dataset(&args, args.batch, &teacher, &main_device);
    let loader_train = DataLoaderBuilder::new(batcher.clone())
        .batch_size(args.batch / args.devices.max(1))
        .shuffle(args.seed)
        .build(train);
    let loader_valid = DataLoaderBuilder::new(batcher)
        .batch_size(args.batch)
        .build(valid);
    let model = Model::new(&args, &main_device);
    let dir = std::env::temp_dir().join(format!("mhc-burn-ddp-{}", std::process::id()));
    println!(
        "{} device(s) ({}), {} steps of {} sequences, {} mHC blocks ({}), C = {}",
        args.devices,
        if cfg!(feature = "cuda") {
            "CUDA, ddp"
        } else {
            "CPU, MultiDevice"
        },
        args.steps,
        args.batch,
        args.blocks,
        args.schedule,
        args.dim
    );
    let result = SupervisedTraining::new(&dir, loader_train, loader_valid)
        .with_training_strategy(strategy(devices.clone()).into())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .num_epochs(1)
        .launch(Learner::new(model, AdamConfig::new().init(), args.lr));
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(e) = result.error {
        panic!("training failed: {e:?}");
    }
    let trained = result.model;
    let reference = trained.stack.to_core().expect("finite parameters");
    for (i, d) in devices.iter().enumerate() {
        let replica = trained.clone().fork(d);
        let core = replica.stack.to_core().expect("finite parameters");
        for (a, b) in core.blocks().iter().zip(reference.blocks()) {
            assert_eq!(a.params(), b.params(), "replica on device {i} differs");
        }
    }
    let losses = LOSSES.lock().expect("not poisoned").clone();
    let k = args.devices.min(losses.len()).max(1);
    let first: f32 = losses[..k].iter().sum::<f32>() / k as f32;
    let last: f32 = losses[losses.len() - k..].iter().sum::<f32>() / k as f32;
    println!(
        "every replica holds the same parameters ({} devices); loss {first:.5} -> {last:.5}",
        args.devices
    );
    assert!(last < first, "the loss did not go down");
}
