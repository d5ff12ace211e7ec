use super::*;
use crate::ggml::{quantize, Backend, Scheduler, TensorSet};
use crate::rng::Rng;

/// Each kernel, alone and with each `Then`, against ggml's own ops, bit
/// for bit, for batch widths 1 to 9 (odd ones leave half a pair) on 2
/// threads.
#[test]
fn kernels_equal_ggml_bit_for_bit() {
    if !available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    for ty in [
        Type::Q8_0,
        Type::Q4_0,
        Type::Q5_0,
        Type::Q4_1,
        Type::Q4_K,
        Type::Q6_K,
    ] {
        equals_ggml(ty);
    }
}

fn equals_ggml(ty: Type) {
    let (k, n, n_slots) = (512usize, 12usize, 3usize);
    let mut rng = Rng::new(3);
    let mut values =
        |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|_| scale * rng.normal()).collect() };
    let weights = quantize(ty, &values(k * n, 1.0), k).unwrap();
    for b in 1..=9usize {
        let ctx = Context::new(5, 0).unwrap();
        ctx.new_tensor(ty, &[k as i64, n as i64]).set_name("w");
        ctx.new_tensor(Type::F32, &[k as i64, b as i64])
            .set_name("x");
        ctx.new_tensor(Type::F32, &[n as i64, n_slots as i64])
            .set_name("table");
        ctx.new_tensor(Type::I32, &[b as i64]).set_name("slots");
        ctx.new_tensor(Type::F32, &[n as i64, b as i64])
            .set_name("y");
        let backend = Backend::cpu(2).unwrap();
        let set = TensorSet::allocate(ctx, &backend).unwrap();
        let t = |name: &str| set.get(set.find(name).unwrap());
        t("w").write(&weights).unwrap();
        // Magnitudes from 1e-3 to 1e3, and one all-zero block.
        let mut x = values(k * b, 1.0);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= 10f32.powi((i / 32 % 7) as i32 - 3);
        }
        x[..32].fill(0.0);
        t("x").write(&x).unwrap();
        t("table").write(&values(n * n_slots, 1.0)).unwrap();
        let slots: Vec<i32> = (0..b as i32).map(|c| c % n_slots as i32).collect();
        t("slots").write(&slots).unwrap();
        t("y").write(&values(n * b, 1.0)).unwrap();

        let g = Context::new(64, 64).unwrap();
        let mut graph = g.new_graph(64);
        let (w, x) = (t("w"), t("x"));
        let wi = Matrix {
            tensor: w,
            batched: true,
        };
        assert!(wi.kernel_takes(b as i64) || b == 1, "{ty}: no kernel");
        let (table, slots, y) = (t("table"), t("slots"), t("y"));
        let pairs = [
            (g.mul_mat(w, x), g.product(wi, x)),
            (
                g.mul(g.mul_mat(w, x), g.get_rows(table, slots)),
                g.product_scaled(wi, x, table, slots),
            ),
            (g.add(y, g.mul_mat(w, x)), g.product_added(wi, x, y)),
        ];
        for (a, b) in pairs {
            graph.expand(a.set_output());
            graph.expand(b.set_output());
        }
        let mut sched = Scheduler::new(vec![backend], 64).unwrap();
        sched.alloc(&mut graph).unwrap().compute().unwrap();
        for (i, (expected, ours)) in pairs.iter().enumerate() {
            let (mut e, mut o) = (vec![0f32; n * b], vec![0f32; n * b]);
            expected.read(&mut e).unwrap();
            ours.read(&mut o).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o), bits(&e), "{ty}: variant {i}, {b} columns");
        }
    }
}
