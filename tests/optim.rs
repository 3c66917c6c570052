//! Optimisers, schedules, clipping, ramp-up and teacher decay against their formulas written out
//! per element in f64, and an optimiser step on the GPU against Cpu64.

mod common;

use common::{gpu, seeded};
use metaseg::nn::{Declarations, Init, ParamStore};
use metaseg::optim::{
    clip_grad_norm, sigmoid_rampup, teacher_decay, Adam, Optimizer, Rampup, Rule, Schedule, Sgd,
};
use metaseg_autograd::{Backend, Cpu64, Shape, Tolerance, Var};

/// Two tensors of odd sizes, Kaiming-initialised.
fn store<B: Backend>(b: &B) -> ParamStore<B> {
    let mut d = Declarations::default();
    d.declare(
        "a".into(),
        Shape::from([3, 5]),
        Init::KaimingNormal { fan_in: 5 },
    );
    d.declare(
        "b".into(),
        Shape::from([7]),
        Init::KaimingNormal { fan_in: 7 },
    );
    ParamStore::init(b, &d, 4).unwrap()
}

fn grads<B: Backend>(b: &B, p: &ParamStore<B>, seed: u64) -> Vec<Var<B>> {
    p.values()
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let n = v.shape().numel();
            Var::from_f64(b, &seeded(n, seed + k as u64, -1.0, 1.0), v.shape(), false).unwrap()
        })
        .collect()
}

fn flat(p: &ParamStore<Cpu64>) -> Vec<f64> {
    p.flat().unwrap().data.to_vec()
}

fn flat_grads(g: &[Var<Cpu64>]) -> Vec<f64> {
    g.iter().flat_map(|g| g.to_f64().unwrap()).collect()
}

#[test]
fn sgd_with_momentum_follows_pytorch_over_two_steps() {
    let sgd = Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
    };
    let mut opt = Optimizer::new(Rule::Sgd(sgd));
    let p0 = store(&Cpu64);
    let (g1, g2) = (grads(&Cpu64, &p0, 10), grads(&Cpu64, &p0, 20));
    let p1 = opt.step(&p0, &g1, 0.1).unwrap();
    let p2 = opt.step(&p1, &g2, 0.05).unwrap();
    let (mut theta, mut buf) = (flat(&p0), Vec::new());
    for (g, lr) in [(flat_grads(&g1), 0.1), (flat_grads(&g2), 0.05)] {
        let d: Vec<f64> = g.iter().zip(&theta).map(|(g, t)| g + 0.01 * t).collect();
        buf = if buf.is_empty() {
            d
        } else {
            buf.iter().zip(&d).map(|(b, d)| 0.9 * b + d).collect()
        };
        theta = theta.iter().zip(&buf).map(|(t, b)| t - lr * b).collect();
    }
    Tolerance::F64.assert("sgd", &flat(&p2), &theta);
}

#[test]
fn adam_follows_pytorch_over_two_steps() {
    let adam = Adam {
        weight_decay: 1e-2,
        ..Adam::default()
    };
    let mut opt = Optimizer::new(Rule::Adam(adam));
    let p0 = store(&Cpu64);
    let (g1, g2) = (grads(&Cpu64, &p0, 10), grads(&Cpu64, &p0, 20));
    let p1 = opt.step(&p0, &g1, 1e-3).unwrap();
    let p2 = opt.step(&p1, &g2, 1e-3).unwrap();
    let mut theta = flat(&p0);
    let (mut m, mut v) = (vec![0.0; theta.len()], vec![0.0; theta.len()]);
    for (t, g) in [flat_grads(&g1), flat_grads(&g2)].iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..theta.len() {
            let d = g[i] + 1e-2 * theta[i];
            m[i] = 0.9 * m[i] + 0.1 * d;
            v[i] = 0.999 * v[i] + 0.001 * d * d;
            let m_hat = m[i] / (1.0 - 0.9f64.powi(t));
            let v_hat = v[i] / (1.0 - 0.999f64.powi(t));
            theta[i] -= 1e-3 * m_hat / (v_hat.sqrt() + 1e-8);
        }
    }
    Tolerance::F64.assert("adam", &flat(&p2), &theta);
    assert_eq!(opt.steps, 2);
}

#[test]
fn an_optimizer_step_on_the_gpu_matches_cpu64() {
    let g = gpu();
    let adam = Rule::Adam(Adam::default());
    let cpu = store(&Cpu64);
    let on_gpu = cpu.transfer(&g).unwrap();
    let cpu_next = Optimizer::new(adam)
        .step(&cpu, &grads(&Cpu64, &cpu, 3), 1e-3)
        .unwrap();
    let gpu_next = Optimizer::new(adam)
        .step(&on_gpu, &grads(&g, &on_gpu, 3), 1e-3)
        .unwrap();
    let gpu_values = g.to_f64(&gpu_next.flat().unwrap()).unwrap();
    Tolerance::F32.assert("adam on the GPU", &gpu_values, &flat(&cpu_next));
}

#[test]
fn clipping_scales_to_the_limit_only_above_it() {
    let p = store(&Cpu64);
    let g = grads(&Cpu64, &p, 5);
    let norm = flat_grads(&g).iter().map(|x| x * x).sum::<f64>().sqrt();
    let clipped = flat_grads(&clip_grad_norm(&g, 0.2).unwrap());
    let expected: Vec<f64> = flat_grads(&g)
        .iter()
        .map(|x| x * 0.2 / (norm + 1e-6))
        .collect();
    Tolerance::F64.assert("clipped", &clipped, &expected);
    let untouched = flat_grads(&clip_grad_norm(&g, 2.0 * norm).unwrap());
    Tolerance::F64.assert("below the limit", &untouched, &flat_grads(&g));
}

#[test]
fn schedules_rampup_and_teacher_decay_follow_their_formulas() {
    let step = Schedule::Step {
        every: 2500,
        gamma: 0.1,
    };
    Tolerance::F64.assert(
        "step",
        &[step.lr(0.01, 2499), step.lr(0.01, 5000)],
        &[0.01, 1e-4],
    );
    let poly = Schedule::Poly {
        total: 100,
        power: 0.9,
    };
    Tolerance::F64.assert("poly", &[poly.lr(1.0, 50)], &[0.5f64.powf(0.9)]);
    let lambda = Schedule::Lambda { epoch: 10 };
    Tolerance::F64.assert("lambda", &[lambda.lr(1.0, 25)], &[20.0 / 22.0]);
    Tolerance::F64.assert(
        "rampup",
        &[
            sigmoid_rampup(0.0, 40.0),
            sigmoid_rampup(20.0, 40.0),
            sigmoid_rampup(50.0, 40.0),
        ],
        &[(-5.0f64).exp(), (-1.25f64).exp(), 1.0],
    );
    // A weight of 0.1 ramped over 40 units of 150 iterations: iteration 3000 is unit 20, half way.
    let ramp = Rampup {
        weight: 0.1,
        length: 40.0,
        unit: 150,
    };
    Tolerance::F64.assert(
        "ramped weight",
        &[ramp.at(0), ramp.at(3000), ramp.at(3149), ramp.at(6000)],
        &[
            0.1 * (-5.0f64).exp(),
            0.1 * (-1.25f64).exp(),
            0.1 * (-1.25f64).exp(),
            0.1,
        ],
    );
    Tolerance::F64.assert(
        "teacher decay",
        &[
            teacher_decay(0, 0.99),
            teacher_decay(9, 0.99),
            teacher_decay(1000, 0.99),
        ],
        &[0.0, 0.9, 0.99],
    );
}
