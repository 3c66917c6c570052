//! Checkpoints: a round trip keeps every tensor bit for bit and the sidecar whole; a save leaves no
//! temporary files; tensors and sidecar from different saves, and missing files, are errors.

use metaseg::train::checkpoint::{load, paths, save, HostTensor, Sidecar, FORMAT};
use metaseg::train::methods::Stage;
use std::collections::BTreeMap;

fn sample(step: u64) -> (BTreeMap<String, HostTensor>, Sidecar) {
    let tensors = BTreeMap::from([
        (
            "params/encoder.0.0.conv.weight".to_string(),
            HostTensor {
                shape: vec![2, 1, 3],
                // Values that do not survive a round trip through text or f16.
                data: vec![0.1, -1.0e-30, 3.4e38, f32::MIN_POSITIVE, -0.0, 1.0 / 3.0],
            },
        ),
        (
            "optimizer/0".to_string(),
            HostTensor {
                shape: vec![4],
                data: vec![1.0, 2.0, 3.0, 4.5],
            },
        ),
    ]);
    let sidecar = Sidecar {
        format: FORMAT,
        step,
        seed: 7,
        config: serde_json::json!({"method": "online-pl", "lr": 0.01}),
        stage: Stage::First,
        counters: BTreeMap::from([("optimizer_steps".to_string(), step)]),
    };
    (tensors, sidecar)
}

#[test]
fn a_round_trip_is_exact_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("last");
    let (tensors, sidecar) = sample(120);
    save(&stem, &tensors, &sidecar).unwrap();
    let (read, read_sidecar) = load(&stem).unwrap();
    assert_eq!(read_sidecar, sidecar);
    assert_eq!(read.len(), tensors.len());
    for (name, t) in &tensors {
        let r = &read[name];
        assert_eq!(r.shape, t.shape, "{name}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&r.data), bits(&t.data), "{name}");
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["last.json", "last.safetensors"]);
}

#[test]
fn tensors_and_sidecar_from_different_saves_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("ckpt");
    let (tensors, sidecar) = sample(100);
    save(&stem, &tensors, &sidecar).unwrap();
    // A crash after the tensors of step 200 were renamed but before its sidecar was.
    let (_, json) = paths(&stem);
    let old_json = std::fs::read(&json).unwrap();
    save(&stem, &tensors, &sample(200).1).unwrap();
    std::fs::write(&json, old_json).unwrap();
    let err = load(&stem).unwrap_err().to_string();
    assert!(
        err.contains("step 200") && err.contains("step 100"),
        "{err}"
    );
    let err = load(&dir.path().join("missing")).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}
