//! `train --profile`'s split of an MLB-Seg iteration into its parts, against the passes each needs
//! timed alone (issue 23, item 4), on a tiny configuration: the parts add up to the iteration,
//! the passes that are exactly a part launch exactly its kernels, and marking and profiling leave
//! the iteration's launches as they are. No timing is asserted.
//!
//! One test in this binary: the profiler times every dispatch on the device, so nothing else may
//! run on it meanwhile.

mod common;

use common::gpu;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::mlb_seg::passes::{self, Kind, Pass};
use metaseg::train::methods::mlb_seg::step::parts;
use metaseg::train::profile::Timed;
use metaseg::train::trainer::Trainer;

/// 8^3 patches, a 2-level V-Net of width 4; a meta batch of 2 and 3 unlabeled patches, so that
/// K U = 15 and K L = 10 views.
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "method=mlb-seg",
        "data.size=[16, 16, 16]",
        "network.base_width=4",
        "network.levels=2",
        "batch.patch=[8, 8, 8]",
        "batch.labeled=2",
        "batch.unlabeled=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

fn names(timed: &Timed) -> Vec<&str> {
    timed.parts.iter().map(|(n, _)| *n).collect()
}

/// The parts' launches add up to the iteration's, each a whole number (the same every call).
fn assert_parts_add_up(timed: &Timed) {
    let sum: f64 = timed.parts.iter().map(|(_, c)| c.launches).sum();
    assert_eq!(sum, timed.cost.launches, "{:?}", names(timed));
    for (name, cost) in &timed.parts {
        assert_eq!(cost.launches.fract(), 0.0, "{name}: {}", cost.launches);
    }
}

#[test]
fn an_iteration_splits_into_parts_that_add_up_and_match_their_passes() {
    let gpu = gpu();
    let config = tiny(&[]);
    let c = passes::compare(&gpu, &config, 1, 2).unwrap();
    let it = &c.iteration;
    assert_eq!(
        names(it),
        [
            parts::BATCH,
            parts::VIEWS_U,
            parts::TEACHER_U,
            parts::STUDENT_U,
            parts::TERMS_U,
            parts::VIEWS_M,
            parts::LOOK_AHEAD,
            parts::META_LOSS,
            parts::FORWARD_MODE,
            parts::WEIGHTS,
            parts::UPDATE,
            parts::EMA,
            parts::LOGGED,
            parts::TEACHER_M,
            parts::STUDENT_M,
            parts::BACKWARD_M,
        ]
    );
    assert_parts_add_up(it);

    // Each distinct pass timed once: over the 15 unlabeled views, the 10 views of the meta batch
    // and the meta batch itself (the meta loss).
    let pass = |kind, images| Pass { kind, images };
    let timed: Vec<Pass> = c.passes.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        timed,
        [
            pass(Kind::F, 15),
            pass(Kind::Fr, 15),
            pass(Kind::Fb, 15),
            pass(Kind::Fb, 2),
            pass(Kind::J, 15),
            pass(Kind::F, 10),
            pass(Kind::Fr, 10),
            pass(Kind::Fb, 10),
        ]
    );
    // Where a part is one pass and nothing else, it launches exactly that pass's kernels: the
    // student over the views, the meta loss's forward and backward at theta', and the costs in
    // forward mode (then scaled by -lr: one launch more).
    let launches = |part: &str| it.part(part).launches;
    let needed = |part: &str| c.part_passes(part).1.launches;
    assert_eq!(launches(parts::STUDENT_U), needed(parts::STUDENT_U));
    assert_eq!(launches(parts::META_LOSS), needed(parts::META_LOSS));
    assert_eq!(
        launches(parts::FORWARD_MODE),
        needed(parts::FORWARD_MODE) + 1.0
    );
    assert_eq!(c.part_passes(parts::LOOK_AHEAD).0, "Fb(15) - Fr(15)");
    // Every other part launches its passes and the method's terms besides (the teacher's input
    // noise and running statistics, L_cons, L_mt, clipping, SGD).
    for (name, cost) in &it.parts {
        assert!(cost.launches >= needed(name), "{name}");
    }
    let sum = c.sum_of_passes();
    assert!(sum.launches > 0.0 && sum.launches < it.cost.launches);
    let table = c.table();
    for (name, _) in &it.parts {
        assert!(table.contains(name), "{name} missing from\n{table}");
    }
    assert!(
        table.contains("the iteration / the sum of its passes"),
        "{table}"
    );

    // Marked and profiled or not, an iteration launches the same kernels (at its third step, as
    // the timed calls run after a warm-up step).
    let data = passes::synthetic_batch(&gpu, &config, 1).unwrap();
    let mut trainer = Trainer::new(&gpu, &config, 1).unwrap();
    for t in 2..4 {
        let before = gpu.context().dispatch_count();
        trainer.step(&data, t).unwrap();
        if t == 3 {
            let plain = gpu.context().dispatch_count() - before;
            assert_eq!(plain as f64, it.cost.launches);
        }
    }

    // The reverse path's meta-gradient is one part, and no pass of the sum.
    let reverse = tiny(&["mlb_seg.meta_path=reverse"]);
    let c = passes::compare(&gpu, &reverse, 1, 1).unwrap();
    let names = names(&c.iteration);
    assert!(names.contains(&parts::META_REVERSE), "{names:?}");
    for fast_only in [parts::LOOK_AHEAD, parts::META_LOSS, parts::FORWARD_MODE] {
        assert!(!names.contains(&fast_only), "{names:?}");
    }
    assert_eq!(c.part_passes(parts::META_REVERSE).1.launches, 0.0);
    assert_parts_add_up(&c.iteration);
}
