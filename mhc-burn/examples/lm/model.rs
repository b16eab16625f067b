//! The character-level transformer of `examples/lm` (also compiled into `tests/lm_smoke.rs`):
//! token embedding → `n` streams → `L` layers of two sublayers (causal attention, MLP), each
//! with its own pre-norm and wrapped by the connection under test → collapse → norm → head.

use burn::module::{ModuleVisitor, Param};
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Gradients;
use mhc_burn::{
    Collapse, HcBlock, HcBlockConfig, Mappings, MhcBlockConfig, MhcStack, Schedule, collapse,
    expand, read_out,
};

/// The connection around every sublayer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `x + F(x)`, one stream.
    Residual,
    /// Hyper-Connections, `n` streams, collapsed by their mean.
    Hc,
    /// mHC under the paper's (V4's) schedule, collapsed by the mean of the streams.
    Mhc,
    /// mHC under DeepSeek-V4.1's single pass, read out by the last block's `H_pre`.
    MhcShifted,
}

impl Variant {
    /// Every variant, in report order.
    pub const ALL: [Variant; 4] = [
        Variant::Residual,
        Variant::Hc,
        Variant::Mhc,
        Variant::MhcShifted,
    ];

    /// The name used by `--variants` and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Residual => "residual",
            Variant::Hc => "hc",
            Variant::Mhc => "mhc",
            Variant::MhcShifted => "mhc-shifted",
        }
    }

    /// The variant called `name`.
    pub fn parse(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// Sizes of a model.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub vocab: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub context: usize,
    pub streams: usize,
}

/// Causal multi-head self-attention with its own pre-norm.
#[derive(Module, Debug)]
pub struct Attention {
    norm: LayerNorm,
    mha: MultiHeadAttention,
}

impl Attention {
    fn forward(&self, u: Tensor<3>) -> Tensor<3> {
        let h = self.norm.forward(u);
        let [b, s, _] = h.dims();
        let mask = generate_autoregressive_mask(b, s, &h.device());
        self.mha
            .forward(MhaInput::self_attn(h).mask_attn(mask))
            .context
    }
}

/// The MLP `C → 4C → C` (GELU) with its own pre-norm.
#[derive(Module, Debug)]
pub struct Mlp {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, u: Tensor<3>) -> Tensor<3> {
        let h = burn::tensor::activation::gelu(self.up.forward(self.norm.forward(u)));
        self.down.forward(h)
    }
}

/// The language model.
#[derive(Module, Debug)]
pub struct Lm {
    embed: Embedding,
    pos: Embedding,
    attn: Vec<Attention>,
    mlp: Vec<Mlp>,
    /// HC blocks, one a sublayer (the `hc` variant).
    hc: Vec<HcBlock>,
    /// The mHC chain, one block a sublayer (the `mhc` variants).
    mhc: Option<MhcStack>,
    norm: LayerNorm,
    head: Linear,
    #[module(skip)]
    variant: Variant,
    streams: usize,
}

impl Lm {
    /// A model of `shape` with `variant`'s connections on `device` (seed the device first).
    pub fn new(shape: Shape, variant: Variant, device: &Device) -> Self {
        let (c, n, depth) = (shape.dim, shape.streams, 2 * shape.layers);
        let attn = (0..shape.layers)
            .map(|_| Attention {
                norm: LayerNormConfig::new(c).init(device),
                mha: MultiHeadAttentionConfig::new(c, shape.heads)
                    .with_dropout(0.0)
                    .init(device),
            })
            .collect();
        let mlp = (0..shape.layers)
            .map(|_| Mlp {
                norm: LayerNormConfig::new(c).init(device),
                up: LinearConfig::new(c, 4 * c).init(device),
                down: LinearConfig::new(4 * c, c).init(device),
            })
            .collect();
        let hc = match variant {
            Variant::Hc => (0..depth)
                .map(|k| HcBlockConfig::new(n, c).with_layer(k).init(device))
                .collect(),
            _ => vec![],
        };
        let mhc = match variant {
            Variant::Mhc | Variant::MhcShifted => {
                let schedule = if variant == Variant::Mhc {
                    Schedule::Current
                } else {
                    Schedule::Shifted
                };
                let blocks = (0..depth)
                    .map(|_| MhcBlockConfig::new(n, c).init(device))
                    .collect();
                Some(MhcStack::new(blocks, schedule))
            }
            _ => None,
        };
        Lm {
            embed: EmbeddingConfig::new(shape.vocab, c).init(device),
            pos: EmbeddingConfig::new(shape.context, c).init(device),
            attn,
            mlp,
            hc,
            mhc,
            norm: LayerNormConfig::new(c).init(device),
            head: LinearConfig::new(c, shape.vocab).init(device),
            variant,
            streams: n,
        }
    }

    /// Sublayer `l`: attention for even `l`, the MLP for odd.
    fn sublayer(&self, l: usize, u: Tensor<3>) -> Tensor<3> {
        if l.is_multiple_of(2) {
            self.attn[l / 2].forward(u)
        } else {
            self.mlp[l / 2].forward(u)
        }
    }

    /// Logits `[B, S, vocab]` of tokens `[B, S]`, and each connection's mappings when `trace`.
    pub fn forward_traced(
        &self,
        tokens: Tensor<2, Int>,
        trace: bool,
    ) -> (Tensor<3>, Vec<Mappings>) {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let h = self.embed.forward(tokens) + self.pos.forward(positions);
        let depth = 2 * self.attn.len();
        let mut maps = Vec::new();
        let h = match self.variant {
            Variant::Residual => (0..depth).fold(h, |h, l| h.clone() + self.sublayer(l, h)),
            Variant::Hc => {
                let mut x = expand(h, self.streams);
                for (l, block) in self.hc.iter().enumerate() {
                    if trace {
                        maps.push(block.mappings(x.clone()));
                    }
                    x = block.forward(x, |u| self.sublayer(l, u));
                }
                collapse(x, Collapse::Mean)
            }
            Variant::Mhc | Variant::MhcShifted => {
                let stack = self.mhc.as_ref().expect("the mhc variants have a stack");
                let (x, pre, m) =
                    stack.forward_traced(expand(h, self.streams), |l, u| self.sublayer(l, u));
                if trace {
                    maps = m;
                }
                if self.variant == Variant::MhcShifted {
                    read_out(x, pre)
                } else {
                    collapse(x, Collapse::Mean)
                }
            }
        };
        (self.head.forward(self.norm.forward(h)), maps)
    }

    /// Mean cross-entropy of predicting `targets` `[B, S]` from `inputs` `[B, S]` (nats).
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        let (logits, _) = self.forward_traced(inputs, false);
        let [b, s, v] = logits.dims();
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([b * s, v]), targets.reshape([b * s]))
    }
}

/// The global gradient norm `sqrt(Σ ‖∂p‖²)` over a module's parameters.
pub fn grad_norm<M: Module>(module: &M, grads: &Gradients) -> f32 {
    struct Sum<'a> {
        grads: &'a Gradients,
        total: f64,
    }
    impl ModuleVisitor for Sum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.total += f64::from(g.square().sum().into_scalar::<f32>());
            }
        }
    }
    let mut s = Sum { grads, total: 0.0 };
    module.visit(&mut s);
    s.total.sqrt() as f32
}
