use crate::ggml::{Backend, Context, Scheduler, Tensor, TensorSet, Type};
use crate::rng::Rng;

/// A batch of LoRA-style products through `mul_mat_id` (each token `x`
/// times `A` of its own adapter, `[r, k]` of 5 adapters): every
/// token's result equals the same token computed alone, bit for bit,
/// and the plain product with its adapter's matrix to f32 rounding.
#[test]
fn per_token_products_are_batch_invariant() {
    let (k, r, adapters, tokens) = (96i64, 8i64, 5i64, 13i64);
    let mut rng = Rng::new(9);
    let ctx = Context::new(3, 0).unwrap();
    ctx.new_tensor(Type::F32, &[k, r, adapters])
        .set_name("stack");
    ctx.new_tensor(Type::F32, &[k, 1, tokens]).set_name("x");
    ctx.new_tensor(Type::I32, &[1, tokens]).set_name("ids");
    let backend = Backend::cpu(3).unwrap();
    let set = TensorSet::allocate(ctx, &backend).unwrap();
    let t = |name: &str| set.get(set.find(name).unwrap());
    let stack: Vec<f32> = (0..k * r * adapters).map(|_| rng.normal()).collect();
    let x: Vec<f32> = (0..k * tokens).map(|_| rng.normal()).collect();
    let ids: Vec<i32> = (0..tokens).map(|i| ((i * 3) % adapters) as i32).collect();
    t("stack").write(&stack).unwrap();
    t("x").write(&x).unwrap();
    t("ids").write(&ids).unwrap();
    let mut sched = Scheduler::new(vec![backend], 16).unwrap();
    fn run<'a>(
        sched: &mut Scheduler,
        stack: Tensor<'a>,
        x: Tensor<'a>,
        ids: Tensor<'a>,
    ) -> Vec<f32> {
        let g = Context::new(16, 16).unwrap();
        let mut graph = g.new_graph(16);
        let out = g.mul_mat_id(stack, x, ids).set_output();
        graph.expand(out);
        sched.alloc(&mut graph).unwrap().compute().unwrap();
        out.read_f32_vec().unwrap()
    }
    let batch = run(&mut sched, t("stack"), t("x"), t("ids"));
    assert_eq!(batch.len(), (r * tokens) as usize);
    for token in 0..tokens as usize {
        let g = Context::new(4, 0).unwrap();
        g.new_tensor(Type::F32, &[k, 1, 1]).set_name("x1");
        g.new_tensor(Type::I32, &[1, 1]).set_name("id1");
        let one = TensorSet::allocate(g, &Backend::cpu(1).unwrap()).unwrap();
        let x1 = one.get(one.find("x1").unwrap());
        let id1 = one.get(one.find("id1").unwrap());
        x1.write(&x[token * k as usize..(token + 1) * k as usize])
            .unwrap();
        id1.write(&[ids[token]]).unwrap();
        let alone = run(&mut sched, t("stack"), x1, id1);
        let row = &batch[token * r as usize..(token + 1) * r as usize];
        assert_eq!(row, alone.as_slice(), "token {token}");
        let a = &stack[ids[token] as usize * (k * r) as usize..];
        for (i, v) in row.iter().enumerate() {
            let dense: f32 = (0..k as usize)
                .map(|l| a[i * k as usize + l] * x[token * k as usize + l])
                .sum();
            assert!(
                (v - dense).abs() < 1e-4,
                "token {token} row {i}: {v} vs {dense}"
            );
        }
    }
}
