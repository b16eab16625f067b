//! What the benches share: the `MHC_BENCH_SHAPES` parser and criterion's medians.

/// The shapes `(n, C, T)` to run: `MHC_BENCH_SHAPES=n4_c1024_t4096,n2_c512_t1024` when set, else
/// `default`.
pub fn shapes(default: &[(usize, usize, usize)]) -> Vec<(usize, usize, usize)> {
    match std::env::var("MHC_BENCH_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|p| {
                let v: Vec<usize> = p
                    .split('_')
                    .map(|f| f[1..].parse().expect("n{n}_c{C}_t{T}"))
                    .collect();
                (v[0], v[1], v[2])
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// Median (ns) of one benchmark from criterion's `estimates.json` (under `CARGO_TARGET_DIR`
/// when set).
#[allow(dead_code)] // not every bench reads criterion's files
pub fn median_ns(group: &str, function: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{function}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// The median over `rounds` interleaved rounds of `t_b / t_a` (`a` first in even rounds, `b` in
/// odd ones), so that the machine's load drifts alike for both: the ratio of two close variants
/// on a noisy machine, where separate criterion runs a minute apart differ by more than the
/// variants do. Each runs once first, untimed, so that first-touch page faults of fresh buffers
/// and lazily sized workspaces fall in no round.
#[allow(dead_code)] // not every bench pairs variants
pub fn paired_ratio(rounds: usize, a: &mut dyn FnMut(), b: &mut dyn FnMut()) -> f64 {
    a();
    b();
    let time = |f: &mut dyn FnMut()| {
        let s = std::time::Instant::now();
        f();
        s.elapsed().as_secs_f64()
    };
    let mut r: Vec<f64> = (0..rounds)
        .map(|i| {
            // Alternate which goes first, so that neither always inherits the other's caches.
            if i % 2 == 0 {
                let ta = time(a);
                time(b) / ta
            } else {
                let tb = time(b);
                tb / time(a)
            }
        })
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}
