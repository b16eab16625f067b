//! The first minute with mhc: a 4-stream mHC stack around small MLP sublayers.
//!
//! Run: `cargo run --release --example quickstart`
//!
//! It widens a batch of token embeddings into 4 streams, runs a few mHC blocks (each with its own
//! MLP sublayer), collapses the streams back, and prints the mappings of one token: `H_pre`,
//! `H_post` and the doubly-stochastic `H_res` with its row and column sums.

use mhc::rand::{SeedableRng, rngs::StdRng};
use mhc::{Collapse, MhcBlock, MhcConfig, Mlp, collapse, expand};
use ndarray::{Array2, s};
use rand_distr::{Distribution, StandardNormal};

fn main() -> Result<(), mhc::Error> {
    let (tokens, streams, dim, layers) = (64, 4, 64, 4);
    let mut rng = StdRng::seed_from_u64(0);

    // Token embeddings h: [T, C], and L blocks, each an mHC block around an MLP C → 4C → C.
    let h = Array2::from_shape_simple_fn((tokens, dim), || {
        let z: f64 = StandardNormal.sample(&mut rng);
        z as f32
    });
    let mut config = MhcConfig::new(streams, dim);
    // Larger than the paper's initialisation (alpha = 0.01, small φ) so that the mappings differ
    // visibly between tokens and streams, as they do after training.
    config.alpha_init = 0.5;
    config.phi_std = 0.1;
    let mut stack = Vec::new();
    for _ in 0..layers {
        let block = MhcBlock::<f32>::new(config, &mut rng)?;
        let mlp = Mlp::<f32>::new(dim, 4 * dim, &mut rng)?;
        stack.push((block, mlp));
    }

    // expand → L blocks → collapse.
    let mut x = expand(h.view(), streams)?; // [T, n, C]
    let mut x_last = x.clone(); // the input of the last block, to inspect its mappings
    for (block, mlp) in &stack {
        x_last = x;
        x = block.forward(x_last.view(), |u| mlp.forward(u).expect("u is [T, C]"))?;
    }
    let out = collapse(x.view(), Collapse::Mean)?; // [T, C]
    println!(
        "{layers} mHC blocks, n = {streams} streams, C = {dim}, T = {tokens} tokens: output {:?}, RMS {:.3} (input RMS {:.3})",
        out.shape(),
        rms(&out),
        rms(&h)
    );

    // The mappings of token 0 at the last block.
    let (last, _) = stack.last().expect("layers > 0");
    let maps = last.mappings(x_last.view())?;
    let t = 0;
    println!("\ntoken {t}, block {layers}:");
    println!("  H_pre  = {:.4}", maps.pre.row(t));
    println!("  H_post = {:.4}", maps.post.row(t));
    let res = maps.res.slice(s![t, .., ..]);
    println!("  H_res (rows: output streams, columns: input streams)   row sum");
    for row in res.rows() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.4}")).collect();
        println!("    [{}]   {:.6}", cells.join("  "), row.sum());
    }
    let cols: Vec<String> = res
        .columns()
        .into_iter()
        .map(|c| format!("{:.4}", c.sum()))
        .collect();
    println!("  column sums: [{}]", cols.join("  "));
    println!(
        "\nRows sum to 1 exactly (rows are normalised last); columns to 1 within the 20-iteration truncation."
    );
    Ok(())
}

fn rms(a: &Array2<f32>) -> f32 {
    (a.mapv(|v| v * v).mean().unwrap_or(0.0)).sqrt()
}
