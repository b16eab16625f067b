//! Chains of blocks (SPEC §8): both schedules against autograd (the reference vectors), finite
//! differences through the cross-block edge, bitwise equalities, determinism, bad input.

mod common;

use common::*;
use mhc::rand::{RngExt, SeedableRng, rngs::StdRng};
use mhc::{
    ChainLink, Error, Float, MhcBlock, MhcConfig, MhcParams, MhcStack, PrevBlock, Schedule,
    StackTape, StackWorkspace, Tape, initial_pre,
};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};
use std::cell::RefCell;

/// `F_l(u) = tanh(u·W_l)`'s VJP, recording `∂W_l`.
fn tanh_vjps<'a, F: Float>(
    ws: &'a [Array2<F>],
    dws: &'a RefCell<Vec<Option<Array2<F>>>>,
) -> impl FnMut(usize, ArrayView2<F>, ArrayView2<F>) -> Array2<F> + 'a {
    move |l, u, dy| {
        let y = tanh_layer(u, &ws[l]);
        let dz = &dy * &y.mapv(|v| F::one() - v * v);
        dws.borrow_mut()[l] = Some(u.t().dot(&dz));
        dz.dot(&ws[l].t())
    }
}

fn stack_reference<F: Float>(tol: f64, gtol: f64) {
    for (k, c) in cases("mhc_stack").iter().enumerate() {
        let (stack, ws) = stack_case::<F>(c);
        let x = a3::<F>(&c["x"]);
        let what = |s: &str| format!("case {k} ({}) {s}", c["schedule"]);
        let (out, pre, tape) = stack
            .forward_train(x.view(), |l, u| tanh_layer(u, &ws[l]))
            .unwrap();
        assert_close(&what("output"), &dyn_f64(&out), &arr(&c["output"]), tol);
        assert_close(&what("pre_last"), &dyn_f64(&pre), &arr(&c["pre_last"]), tol);
        let (fo, fp) = stack
            .forward(x.view(), |l, u| tanh_layer(u, &ws[l]))
            .unwrap();
        assert_eq!((&fo, &fp), (&out, &pre), "forward == forward_train");
        let (up, up_pre) = (a3::<F>(&c["upstream"]), a2::<F>(&c["upstream_pre"]));
        let dws = RefCell::new(vec![None; ws.len()]);
        let (dx, grads) = stack
            .backward(&tape, up.view(), Some(up_pre.view()), tanh_vjps(&ws, &dws))
            .unwrap();
        assert_close(&what("grad_x"), &dyn_f64(&dx), &arr(&c["grad_x"]), gtol);
        for (l, (g, layer)) in grads
            .iter()
            .zip(c["layers"].as_array().unwrap())
            .enumerate()
        {
            let w = |s: &str| what(&format!("block {l} {s}"));
            assert_close(
                &w("grad_phi"),
                &dyn_f64(&g.phi),
                &arr(&layer["grad_phi"]),
                gtol,
            );
            let ga = ndarray::Array1::from(g.alpha.to_vec());
            assert_close(
                &w("grad_alpha"),
                &dyn_f64(&ga),
                &arr(&layer["grad_alpha"]),
                gtol,
            );
            assert_close(
                &w("grad_bias"),
                &dyn_f64(&g.bias),
                &arr(&layer["grad_bias"]),
                gtol,
            );
            let dw = dws.borrow()[l].clone().unwrap();
            assert_close(
                &w("grad_w"),
                &dyn_f64(&dw),
                &arr(&layer["grad_sublayer_w"]),
                gtol,
            );
        }
    }
}

#[test]
fn stacks_match_autograd_f64() {
    stack_reference::<f64>(1e-9, 1e-8);
}

#[test]
fn stacks_match_autograd_f32() {
    stack_reference::<f32>(1e-4, 1e-4);
}

fn random_stack(
    nb: usize,
    n: usize,
    c: usize,
    schedule: Schedule,
    rng: &mut StdRng,
) -> (MhcStack<f64>, Vec<Array2<f64>>) {
    let mut cfg = MhcConfig::new(n, c);
    cfg.phi_std = 0.3;
    let blocks = (0..nb)
        .map(|_| {
            let mut b = MhcBlock::<f64>::new(cfg, rng).unwrap();
            let mut p = b.params().clone();
            p.alpha = [0.3, 0.4, 0.5];
            p.bias.mapv_inplace(|_| rng.random::<f64>() - 0.5);
            b.set_params(p).unwrap();
            b
        })
        .collect();
    let ws = (0..nb)
        .map(|_| {
            Array2::from_shape_simple_fn((c, c), || {
                (rng.random::<f64>() * 2.0 - 1.0) / (c as f64).sqrt()
            })
        })
        .collect();
    (MhcStack::new(blocks, schedule).unwrap(), ws)
}

/// Central differences through 4 chained blocks, for every parameter of every block and the
/// input: the loss `⟨U, x_L⟩ + ⟨V, pre_{L−1}⟩`.
fn fd_stack(schedule: Schedule) {
    let mut rng = StdRng::seed_from_u64(11);
    let (t, n, c, nb) = (3, 4, 5, 4);
    let (stack, ws) = random_stack(nb, n, c, schedule, &mut rng);
    let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() * 2.0 - 1.0);
    let up = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() * 2.0 - 1.0);
    let up_pre = Array2::from_shape_simple_fn((t, n), || rng.random::<f64>() * 2.0 - 1.0);
    let loss = |s: &MhcStack<f64>, x: &Array3<f64>| {
        let (o, p) = s.forward(x.view(), |l, u| tanh_layer(u, &ws[l])).unwrap();
        (&o * &up).sum() + (&p * &up_pre).sum()
    };
    let (_, _, tape) = stack
        .forward_train(x.view(), |l, u| tanh_layer(u, &ws[l]))
        .unwrap();
    let dws = RefCell::new(vec![None; nb]);
    let (dx, grads) = stack
        .backward(&tape, up.view(), Some(up_pre.view()), tanh_vjps(&ws, &dws))
        .unwrap();
    let h = 1e-5;
    let check = |what: String, g: f64, fd: f64, scale: f64| {
        assert!(
            (g - fd).abs() <= 1e-6 * scale.max(1e-3),
            "{what}: backward {g:e} vs fd {fd:e}"
        );
    };
    let scale = dx.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp.as_slice_mut().unwrap()[i] += h;
        xm.as_slice_mut().unwrap()[i] -= h;
        let fd = (loss(&stack, &xp) - loss(&stack, &xm)) / (2.0 * h);
        check(format!("dx[{i}]"), dx.as_slice().unwrap()[i], fd, scale);
    }
    for (l, g) in grads.iter().enumerate() {
        let perturb = |f: &dyn Fn(&mut MhcParams<f64>, f64)| {
            let mut s = stack.clone();
            let mut p = s.blocks()[l].params().clone();
            f(&mut p, h);
            s.blocks_mut()[l].set_params(p).unwrap();
            let lp = loss(&s, &x);
            let mut p = stack.blocks()[l].params().clone();
            f(&mut p, -h);
            s.blocks_mut()[l].set_params(p).unwrap();
            (lp - loss(&s, &x)) / (2.0 * h)
        };
        let sc = g.phi.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for i in 0..g.phi.len() {
            let fd = perturb(&|p, d| p.phi.as_slice_mut().unwrap()[i] += d);
            check(
                format!("block {l} phi[{i}]"),
                g.phi.as_slice().unwrap()[i],
                fd,
                sc,
            );
        }
        let sc = g.alpha.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for i in 0..3 {
            let fd = perturb(&|p, d| p.alpha[i] += d);
            check(format!("block {l} alpha[{i}]"), g.alpha[i], fd, sc);
        }
        let sc = g.bias.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for i in 0..g.bias.len() {
            let fd = perturb(&|p, d| p.bias[i] += d);
            check(format!("block {l} bias[{i}]"), g.bias[i], fd, sc);
        }
    }
}

#[test]
fn shifted_stack_gradients_match_finite_differences() {
    fd_stack(Schedule::Shifted);
}

#[test]
fn current_stack_gradients_match_finite_differences() {
    fd_stack(Schedule::Current);
}

/// A current-schedule stack computes what its blocks compute one after the other, to the bit,
/// forward and backward; spanning several 256-token tasks and a partial one.
#[test]
fn current_stack_equals_its_blocks_bitwise() {
    let mut rng = StdRng::seed_from_u64(3);
    let (t, n, c, nb) = (600, 4, 24, 3);
    let (stack, ws) = random_stack(nb, n, c, Schedule::Current, &mut rng);
    let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() * 2.0 - 1.0);
    let (out, pre, tape) = stack
        .forward_train(x.view(), |l, u| tanh_layer(u, &ws[l]))
        .unwrap();
    let mut h = x.clone();
    let mut ys = vec![];
    let mut xs = vec![];
    for (l, b) in stack.blocks().iter().enumerate() {
        let (o, y) = b
            .forward_train(h.view(), |u| tanh_layer(u, &ws[l]))
            .unwrap();
        xs.push(h);
        ys.push(y);
        h = o;
    }
    assert_eq!(out, h);
    assert_eq!(
        pre,
        stack.blocks()[nb - 1]
            .mappings(xs[nb - 1].view())
            .unwrap()
            .pre
    );
    assert!(tape.inputs().eq(xs.iter().map(|x| x.view())));
    assert_eq!(tape.outputs(), &ys[..]);
    let up = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() - 0.5);
    let vjp = |l: usize, u: ArrayView2<f64>, dy: ArrayView2<f64>| {
        let y = tanh_layer(u, &ws[l]);
        (&dy * &y.mapv(|v| 1.0 - v * v)).dot(&ws[l].t())
    };
    let (dx, grads) = stack.backward(&tape, up.view(), None, vjp).unwrap();
    let mut g = up.clone();
    let mut want = vec![];
    for l in (0..nb).rev() {
        let (d, p) = stack.blocks()[l]
            .backward(xs[l].view(), ys[l].view(), g.view(), |u, dy| vjp(l, u, dy))
            .unwrap();
        want.push(p);
        g = d;
    }
    want.reverse();
    assert_eq!(dx, g);
    assert_eq!(grads, want);
}

/// The chain's backward pass without the backward seam: each block's write-in half, the
/// sublayer's VJP and the read-out half one after the other, through the public linked
/// primitives, with the stack's error tagging.
fn unfused_backward(
    stack: &MhcStack<f64>,
    tape: &StackTape<f64>,
    up: ArrayView3<f64>,
    up_pre: Option<ArrayView2<f64>>,
    mut vjp: impl FnMut(usize, ArrayView2<f64>, ArrayView2<f64>) -> Array2<f64>,
) -> Result<(Array3<f64>, Vec<MhcParams<f64>>), Error> {
    let inb = |index| {
        move |e| Error::InBlock {
            index,
            source: Box::new(e),
        }
    };
    let xs: Vec<_> = tape.inputs().collect();
    let (nb, (t, n, _)) = (xs.len(), xs[0].dim());
    let shifted = stack.schedule() == Schedule::Shifted;
    let pres: Vec<_> = (0..nb)
        .map(|l| stack.blocks()[l].mappings(xs[l]).unwrap().pre)
        .collect();
    let e0 = initial_pre::<f64>(t, n);
    let ro = |l: usize| {
        shifted.then(|| {
            if l == 0 {
                e0.view()
            } else {
                pres[l - 1].view()
            }
        })
    };
    let (mut g, mut dpre) = (up.to_owned(), None::<Array2<f64>>);
    let mut grads = vec![];
    for l in (0..nb).rev() {
        let b = &stack.blocks()[l];
        let mut tp = Tape::default();
        b.write_in_backward_linked_into(xs[l], tape.outputs()[l].view(), g.view(), ro(l), &mut tp)
            .map_err(inb(l))?;
        let du = vjp(l, tp.u.view(), tp.dy.view());
        let mut dprev = Array2::zeros((t, n));
        let link = ChainLink {
            prev_pre: ro(l),
            dpre: if l == nb - 1 {
                up_pre
            } else {
                dpre.as_ref().map(|d| d.view())
            },
            dprev_pre: (shifted && l > 0).then(|| dprev.view_mut()),
        };
        let mut dx = Array3::zeros(xs[l].raw_dim());
        grads.push(
            b.read_out_backward_linked_into(xs[l], &mut tp, du.view(), link, dx.view_mut())
                .map_err(inb(l))?,
        );
        (g, dpre) = (dx, shifted.then_some(dprev));
    }
    grads.reverse();
    Ok((g, grads))
}

/// The stack's backward pass, which fuses each block's read-out half with the previous block's
/// write-in half (the backward seam), equals the unfused chain to the bit under both schedules,
/// over several tasks and a partial sub-chunk, and gives the same errors: a NaN from a sublayer
/// VJP (block 0, block 1), and a VJP of block 1 so large that block 0's `∂y` overflows (an error
/// of block 0's VJP, after the seam).
#[test]
fn stack_backward_equals_the_unfused_chain_bitwise() {
    for schedule in [Schedule::Current, Schedule::Shifted] {
        let mut rng = StdRng::seed_from_u64(8);
        let (t, n, c, nb) = (600, 4, 24, 3);
        let (stack, ws) = random_stack(nb, n, c, schedule, &mut rng);
        let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() * 2.0 - 1.0);
        let (_, _, tape) = stack
            .forward_train(x.view(), |l, u| tanh_layer(u, &ws[l]))
            .unwrap();
        let up = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() - 0.5);
        let up_pre = Array2::from_shape_simple_fn((t, n), || rng.random::<f64>() - 0.5);
        let vjp = |l: usize, u: ArrayView2<f64>, dy: ArrayView2<f64>| {
            let y = tanh_layer(u, &ws[l]);
            (&dy * &y.mapv(|v| 1.0 - v * v)).dot(&ws[l].t())
        };
        let got = stack.backward(&tape, up.view(), Some(up_pre.view()), vjp);
        let want = unfused_backward(&stack, &tape, up.view(), Some(up_pre.view()), vjp);
        assert_eq!(got, want, "{schedule:?}");
        for (bad, v) in [(0, f64::NAN), (1, f64::NAN), (1, f64::MAX)] {
            let vjp = |l: usize, u: ArrayView2<f64>, dy: ArrayView2<f64>| {
                let mut d = vjp(l, u, dy);
                if l == bad {
                    d[[t - 3, 5]] = v;
                }
                d
            };
            let got = stack.backward(&tape, up.view(), None, vjp);
            let want = unfused_backward(&stack, &tape, up.view(), None, vjp);
            assert!(want.is_err(), "{schedule:?} {bad} {v}");
            assert_eq!(got, want, "{schedule:?} {bad} {v}");
        }
    }
}

/// The public backward seam equals the two halves one after the other, and names its own bad
/// inputs.
#[test]
fn backward_seam_primitive() {
    let mut rng = StdRng::seed_from_u64(9);
    let (t, n, c) = (300, 4, 16);
    let (stack, ws) = random_stack(2, n, c, Schedule::Shifted, &mut rng);
    let [b0, b1] = stack.blocks() else {
        unreachable!()
    };
    let x0 = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() * 2.0 - 1.0);
    let e0 = initial_pre::<f64>(t, n);
    let (_, _, tape) = stack
        .forward_train(x0.view(), |l, u| tanh_layer(u, &ws[l]))
        .unwrap();
    let x1 = tape.inputs().nth(1).unwrap();
    let (y0, y1) = (tape.outputs()[0].view(), tape.outputs()[1].view());
    let pre0 = b0.mappings(x0.view()).unwrap().pre;
    let up = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() - 0.5);
    let mut t1 = Tape::default();
    b1.write_in_backward_linked_into(x1, y1, up.view(), Some(pre0.view()), &mut t1)
        .unwrap();
    let du = t1.dy.mapv(|v| v * 0.5);
    fn link<'a>(pre0: &'a Array2<f64>, d: &'a mut Array2<f64>) -> ChainLink<'a, f64> {
        ChainLink {
            prev_pre: Some(pre0.view()),
            dpre: None,
            dprev_pre: Some(d.view_mut()),
        }
    }
    let (mut d_a, mut d_b) = (Array2::zeros((t, n)), Array2::zeros((t, n)));
    let (mut t0, mut t0_) = (Tape::default(), Tape::default());
    let side = PrevBlock {
        block: b0,
        x: x0.view(),
        y: y0,
        prev_pre: Some(e0.view()),
    };
    let g = b1
        .read_out_backward_seam_into(x1, &mut t1, du.view(), link(&pre0, &mut d_a), side, &mut t0)
        .unwrap();
    let mut dx1 = Array3::zeros((t, n, c));
    let g_ = b1
        .read_out_backward_linked_into(
            x1,
            &mut t1,
            du.view(),
            link(&pre0, &mut d_b),
            dx1.view_mut(),
        )
        .unwrap();
    b0.write_in_backward_linked_into(x0.view(), y0, dx1.view(), Some(e0.view()), &mut t0_)
        .unwrap();
    assert_eq!((&g, &d_a, &t0.u, &t0.dy), (&g_, &d_b, &t0_.u, &t0_.dy));
    // A non-finite y_0 (a tape edited by hand): block 0's write-in half fails inside the seam,
    // with the error of the two calls one after the other.
    let mut y_bad = y0.to_owned();
    y_bad[[100, 3]] = f64::NAN;
    let e = b1
        .read_out_backward_seam_into(
            x1,
            &mut t1,
            du.view(),
            link(&pre0, &mut d_a),
            PrevBlock {
                y: y_bad.view(),
                ..side
            },
            &mut t0,
        )
        .unwrap_err();
    let e_ = b0
        .write_in_backward_linked_into(
            x0.view(),
            y_bad.view(),
            dx1.view(),
            Some(e0.view()),
            &mut t0_,
        )
        .unwrap_err();
    assert_eq!(e, e_);
    assert!(matches!(e, Error::NonFinite { index: 100, .. }), "{e:?}");
    // Block 0 of another width, or another number of tokens: block 0's errors, after block 1's
    // half ran.
    let other = MhcBlock::<f64>::new(MhcConfig::new(n, c + 1), &mut rng).unwrap();
    let x_other = Array3::zeros((t - 1, n, c));
    for (side, what, expected, got) in [
        (
            PrevBlock {
                block: &other,
                ..side
            },
            "previous block",
            vec![n, c],
            vec![n, c + 1],
        ),
        (
            PrevBlock {
                x: x_other.view(),
                ..side
            },
            "x",
            vec![t, n, c],
            vec![t - 1, n, c],
        ),
    ] {
        let e = b1
            .read_out_backward_seam_into(
                x1,
                &mut t1,
                du.view(),
                link(&pre0, &mut d_a),
                side,
                &mut t0,
            )
            .unwrap_err();
        assert_eq!(
            e,
            Error::ShapeMismatch {
                what,
                expected,
                got
            }
        );
    }
}

/// The shifted stack in f32 over several tasks: the same bits on 1 and 4 threads.
/// The `*_into` forms with reused buffers equal the allocating ones to the bit, under both
/// schedules, also when the number of tokens changes between calls (the buffers resize).
#[test]
fn into_forms_equal_the_allocating_ones_bitwise() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, c, nb) = (4, 8, 3);
    for schedule in [Schedule::Current, Schedule::Shifted] {
        let (stack, ws) = random_stack(nb, n, c, schedule, &mut rng);
        let f = |l: usize, u: ArrayView2<f64>| tanh_layer(u, &ws[l]);
        let vjp = |l: usize, u: ArrayView2<f64>, dy: ArrayView2<f64>| {
            let y = tanh_layer(u, &ws[l]);
            (&dy * &y.mapv(|v| 1.0 - v * v)).dot(&ws[l].t())
        };
        let (mut tape, mut sw, mut fw) = (
            StackTape::default(),
            StackWorkspace::default(),
            StackWorkspace::default(),
        );
        for t in [7, 300, 7, 0, 5] {
            let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() * 2.0 - 1.0);
            let up = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>() - 0.5);
            let up_pre = Array2::from_shape_simple_fn((t, n), || rng.random::<f64>() - 0.5);
            let (out, pre) = stack.forward(x.view(), f).unwrap();
            let (mut o2, mut p2) = (Array3::zeros((t, n, c)), Array2::zeros((t, n)));
            stack
                .forward_into(x.view(), f, &mut fw, o2.view_mut(), p2.view_mut())
                .unwrap();
            assert_eq!(
                (&o2, &p2),
                (&out, &pre),
                "{schedule:?} forward_into, T = {t}"
            );
            let (out_t, pre_t, owned) = stack.forward_train(x.view(), f).unwrap();
            stack
                .forward_train_into(x.view(), f, &mut tape, o2.view_mut(), p2.view_mut())
                .unwrap();
            assert_eq!(
                (&o2, &p2),
                (&out_t, &pre_t),
                "{schedule:?} forward_train_into"
            );
            assert_eq!((&out_t, &pre_t), (&out, &pre));
            assert_eq!(tape.len(), nb);
            assert!(tape.inputs().eq(owned.inputs()));
            assert_eq!(tape.outputs(), owned.outputs());
            let (dx, grads) = stack
                .backward(&owned, up.view(), Some(up_pre.view()), vjp)
                .unwrap();
            let mut dx2 = Array3::from_elem((t, n, c), f64::NAN); // every entry is written
            let grads2 = stack
                .backward_into(
                    &tape,
                    up.view(),
                    Some(up_pre.view()),
                    vjp,
                    &mut sw,
                    dx2.view_mut(),
                )
                .unwrap();
            assert_eq!(dx2, dx, "{schedule:?} backward_into, T = {t}");
            assert_eq!(grads2, grads, "{schedule:?} grads, T = {t}");
        }
    }
}

#[test]
fn stacks_are_bitwise_identical_on_any_number_of_threads() {
    let mut rng = StdRng::seed_from_u64(5);
    let (t, n, c) = (1000, 4, 32);
    let blocks: Vec<_> = (0..3)
        .map(|_| MhcBlock::<f32>::new(MhcConfig::new(n, c), &mut rng).unwrap())
        .collect();
    let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f32>() - 0.5);
    for schedule in [Schedule::Current, Schedule::Shifted] {
        let stack = MhcStack::new(blocks.clone(), schedule).unwrap();
        let run = || {
            let (o, p, tape) = stack
                .forward_train(x.view(), |_, u| u.mapv(f32::tanh))
                .unwrap();
            let (dx, g) = stack
                .backward(&tape, o.view(), Some(p.view()), |_, u, dy| {
                    &dy * &u.mapv(|v| 1.0 - v.tanh().powi(2))
                })
                .unwrap();
            (o, p, dx, g)
        };
        let pool = |k| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(k)
                .build()
                .unwrap()
        };
        let one = pool(1).install(run);
        let four = pool(4).install(run);
        assert!(
            one == four,
            "{schedule:?}: results differ between 1 and 4 threads"
        );
    }
}

#[test]
fn stack_bad_inputs_give_typed_errors() {
    let mut rng = StdRng::seed_from_u64(1);
    let (t, n, c) = (4, 2, 3);
    let b = |c| MhcBlock::<f64>::new(MhcConfig::new(n, c), &mut StdRng::seed_from_u64(0)).unwrap();
    assert_eq!(
        MhcStack::<f64>::new(vec![], Schedule::Shifted).unwrap_err(),
        Error::Empty { what: "blocks" }
    );
    assert_eq!(
        MhcStack::new(vec![b(c), b(c), b(c + 1)], Schedule::Shifted).unwrap_err(),
        Error::BlockMismatch {
            index: 2,
            expected: [n, c],
            got: [n, c + 1]
        }
    );
    let stack = MhcStack::new(vec![b(c), b(c), b(c)], Schedule::Shifted).unwrap();
    let x = Array3::from_shape_simple_fn((t, n, c), || rng.random::<f64>());
    let inb = |index, e| Error::InBlock {
        index,
        source: Box::new(e),
    };
    // x of the wrong shape.
    assert_eq!(
        stack
            .forward(Array3::zeros((t, n, c + 1)).view(), |_, u| u.to_owned())
            .unwrap_err(),
        inb(
            0,
            Error::ShapeMismatch {
                what: "x",
                expected: vec![t, n, c],
                got: vec![t, n, c + 1]
            }
        )
    );
    // A sublayer of the wrong shape, and one that returns NaN, in block 1.
    let e = stack
        .forward(x.view(), |l, u| {
            if l == 1 {
                Array2::zeros((t, c + 2))
            } else {
                u.to_owned()
            }
        })
        .unwrap_err();
    assert_eq!(
        e,
        inb(
            1,
            Error::ShapeMismatch {
                what: "sublayer output",
                expected: vec![t, c],
                got: vec![t, c + 2]
            }
        )
    );
    let e = stack
        .forward(x.view(), |l, u| {
            let mut y = u.to_owned();
            if l == 1 {
                y[[2, 1]] = f64::NAN;
            }
            y
        })
        .unwrap_err();
    assert_eq!(
        e,
        inb(
            1,
            Error::NonFinite {
                what: "sublayer output",
                index: 2
            }
        )
    );
    // The last block's sublayer returning infinity (checked by the last write-in).
    let e = stack
        .forward(x.view(), |l, u| {
            let mut y = u.to_owned();
            if l == 2 {
                y[[3, 0]] = f64::INFINITY;
            }
            y
        })
        .unwrap_err();
    assert_eq!(
        e,
        inb(
            2,
            Error::NonFinite {
                what: "sublayer output",
                index: 3
            }
        )
    );
    // Backward: wrong upstream shapes, a wrong VJP shape, a NaN VJP.
    let (out, _, tape) = stack.forward_train(x.view(), |_, u| u.to_owned()).unwrap();
    let id = |_: usize, _: ArrayView2<f64>, dy: ArrayView2<f64>| dy.to_owned();
    assert_eq!(
        stack
            .backward(&tape, Array3::zeros((t, n, c + 1)).view(), None, id)
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "upstream",
            expected: vec![t, n, c],
            got: vec![t, n, c + 1]
        }
    );
    assert_eq!(
        stack
            .backward(
                &tape,
                out.view(),
                Some(Array2::zeros((t, n + 1)).view()),
                id
            )
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "upstream_pre",
            expected: vec![t, n],
            got: vec![t, n + 1]
        }
    );
    let e = stack
        .backward(&tape, out.view(), None, |l, _, dy| {
            if l == 1 {
                Array2::zeros((t + 1, c))
            } else {
                dy.to_owned()
            }
        })
        .unwrap_err();
    assert_eq!(
        e,
        inb(
            1,
            Error::ShapeMismatch {
                what: "sublayer vjp output",
                expected: vec![t, c],
                got: vec![t + 1, c]
            }
        )
    );
    let e = stack
        .backward(&tape, out.view(), None, |l, _, dy| {
            let mut d = dy.to_owned();
            if l == 0 {
                d[[1, 2]] = f64::NAN;
            }
            d
        })
        .unwrap_err();
    assert_eq!(
        e,
        inb(
            0,
            Error::NonFinite {
                what: "sublayer vjp output",
                index: 1
            }
        )
    );
    // A tape of another chain.
    let short = MhcStack::new(vec![b(c)], Schedule::Shifted).unwrap();
    assert!(matches!(
        short.backward(&tape, out.view(), None, id).unwrap_err(),
        Error::ShapeMismatch { what: "tape", .. }
    ));
    // Display names the block.
    assert!(e.to_string().starts_with("block 0: "), "{e}");
    // Caller buffers of the wrong shape.
    let mut ws = StackWorkspace::default();
    let (mut o, mut p) = (Array3::zeros((t, n, c)), Array2::zeros((t, n)));
    assert_eq!(
        stack
            .forward_into(
                x.view(),
                id_f,
                &mut ws,
                Array3::zeros((t + 1, n, c)).view_mut(),
                p.view_mut()
            )
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "out",
            expected: vec![t, n, c],
            got: vec![t + 1, n, c]
        }
    );
    assert_eq!(
        stack
            .forward_into(
                x.view(),
                id_f,
                &mut ws,
                o.view_mut(),
                Array2::zeros((t, n + 1)).view_mut()
            )
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "pre",
            expected: vec![t, n],
            got: vec![t, n + 1]
        }
    );
    let mut tp = StackTape::default();
    stack
        .forward_train_into(x.view(), id_f, &mut tp, o.view_mut(), p.view_mut())
        .unwrap();
    assert_eq!(
        stack
            .backward_into(
                &tp,
                o.view(),
                None,
                id,
                &mut ws,
                Array3::zeros((t, n, c + 1)).view_mut()
            )
            .unwrap_err(),
        Error::ShapeMismatch {
            what: "dx",
            expected: vec![t, n, c],
            got: vec![t, n, c + 1]
        }
    );
    // A failed forward leaves an empty tape, which no backward takes.
    let nan = |_: usize, u: ArrayView2<f64>| u.mapv(|_| f64::NAN);
    assert!(
        stack
            .forward_train_into(x.view(), nan, &mut tp, o.view_mut(), p.view_mut())
            .is_err()
    );
    assert!(tp.is_empty());
    assert!(matches!(
        stack
            .backward_into(
                &tp,
                o.view(),
                None,
                id,
                &mut ws,
                Array3::zeros((t, n, c)).view_mut()
            )
            .unwrap_err(),
        Error::ShapeMismatch { what: "tape", .. }
    ));
}

fn id_f(_: usize, u: ArrayView2<f64>) -> Array2<f64> {
    u.to_owned()
}

#[test]
fn empty_batch_stack() {
    let b = MhcBlock::<f32>::from_params(MhcConfig::new(4, 8), MhcParams::zeros(4, 8)).unwrap();
    let stack = MhcStack::new(vec![b.clone(), b], Schedule::Shifted).unwrap();
    let x = Array3::<f32>::zeros((0, 4, 8));
    let (out, pre, tape) = stack.forward_train(x.view(), |_, u| u.to_owned()).unwrap();
    assert_eq!((out.shape(), pre.shape()), (&[0, 4, 8][..], &[0, 4][..]));
    let (dx, g) = stack
        .backward(&tape, out.view(), None, |_, _, dy| dy.to_owned())
        .unwrap();
    assert_eq!(dx.shape(), &[0, 4, 8]);
    assert!(g.iter().all(|p| p.phi.iter().all(|&v| v == 0.0)));
}
