//! The 2D track: every method trains on depth-1 patches of 2D cases through the 2D V-Net (kernels
//! of depth 1), its extra parts (DTML's signed-distance head and second network, the projection
//! head, IDEAL's second decoder) included, and predicts the 2D test cases.

mod common;

use common::gpu;
use metaseg::train::checkpoint;
use metaseg::train::config::TrainConfig;
use metaseg::train::run::{self, RunOptions, RunPaths};

/// 2D cases of 16 x 16, whole-image patches, a 2-level V-Net of width 2; 2 labeled, 3 unlabeled,
/// 1 test case; 2 iterations of each stage.
fn tiny_2d(method: &str) -> TrainConfig {
    let sets: Vec<String> = [
        &format!("method={method}"),
        "iterations=2",
        "data.cases=6",
        "data.size=[1, 16, 16]",
        "data.labeled=2",
        "data.test=1",
        "network.base_width=2",
        "network.levels=2",
        "batch.patch=[1, 16, 16]",
        "batch.labeled=2",
        "batch.unlabeled=2",
        "log.validate_every=2",
        "log.checkpoint_every=2",
        "mlb_seg.stage0_iterations=2",
        "online_pl.stage1_iterations=2",
        "local_contrastive.stage1_iterations=2",
        "local_contrastive.rounds=1",
        "ideal.pretrain_iterations=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    TrainConfig::load("default", &sets).unwrap()
}

/// The tensors a method's network holds besides the plain V-Net's, as checkpoint names contain
/// them.
fn extra_tensor(method: &str) -> Option<&'static str> {
    match method {
        "dtml" => Some("sdf_head"),
        "local-contrastive" => Some("projection"),
        "ideal" => Some("b.head"),
        _ => None,
    }
}

#[test]
fn every_method_trains_in_2d_with_depth_1_kernels() {
    let g = gpu();
    for method in [
        "supervised",
        "full",
        "mean-teacher",
        "mlb-seg",
        "online-pl",
        "dtml",
        "local-contrastive",
        "ideal",
    ] {
        let config = tiny_2d(method);
        let data = run::load_data(&config).unwrap();
        assert_eq!(data.test[0].image.dims, [1, 16, 16]);
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths {
            dir: dir.path().to_path_buf(),
        };
        run::train(&g, &config, &data, &paths, RunOptions::default())
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let log = std::fs::read_to_string(paths.log()).unwrap();
        let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
        let dice = last["validation_dice"].as_f64();
        assert!(
            dice.is_some_and(|d| (0.0..=1.0).contains(&d)),
            "{method}: {last}"
        );
        assert!(
            last["loss"].as_f64().unwrap().is_finite(),
            "{method}: {last}"
        );

        let (tensors, _) = checkpoint::load(&paths.checkpoint()).unwrap();
        let mut convolutions = 0;
        for (name, t) in &tensors {
            if name.ends_with("conv.weight") && t.shape.len() == 5 {
                assert_eq!(t.shape[2], 1, "{method}: {name} {:?}", t.shape);
                convolutions += 1;
            }
        }
        assert!(
            convolutions > 0,
            "{method}: no convolution in the checkpoint"
        );
        if let Some(part) = extra_tensor(method) {
            assert!(
                tensors.keys().any(|n| n.contains(part)),
                "{method}: no {part} in {:?}",
                tensors.keys().collect::<Vec<_>>()
            );
        }
    }
}
