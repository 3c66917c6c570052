//! Checkpoints written before stages were values (format 1, `tests/data/format-1`, see its README):
//! they read with the method and stage they were written at ("online-pl-teacher" as online-pl's
//! first stage, "ideal-pretrain" as IDEAL's), their networks load bit for bit, interrupted runs
//! resume from them; a format this version does not know is refused with an error naming it.

mod common;

use common::{gpu, log_lines};
use metaseg::eval::trained::SavedRun;
use metaseg::train::checkpoint::{self, HostTensor, FORMAT};
use metaseg::train::methods::{Method, Stage};
use metaseg::train::run::{self, RunOptions, RunPaths};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn data_dir(run: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/format-1")
        .join(run)
}

/// A copy of the run directory `run` under a fresh temporary directory (runs write into it).
fn copy_of(run: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let from = data_dir(run);
    let files: Vec<PathBuf> = ["", "stage1", "pretrain"]
        .iter()
        .map(|sub| from.join(sub))
        .filter(|d| d.is_dir())
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .filter(|p| p.is_file())
        .collect();
    for file in files {
        let to = dir.path().join(file.strip_prefix(&from).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, &to).unwrap();
    }
    dir
}

/// The tensors `prefix/*` of a checkpoint's file, by their names without the prefix.
fn tensors(stem: &Path, prefix: &str) -> BTreeMap<String, HostTensor> {
    let (all, sidecar) = checkpoint::load(stem).unwrap();
    assert_eq!(
        sidecar.format,
        1,
        "{} is a format-1 checkpoint",
        stem.display()
    );
    let prefix = format!("{prefix}/");
    let picked: BTreeMap<_, _> = all
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v)))
        .collect();
    assert!(!picked.is_empty(), "no {prefix} in {}", stem.display());
    picked
}

#[test]
fn format_1_checkpoints_read_with_their_stage_and_load_bit_for_bit() {
    let g = gpu();
    // (run, method, stage, the tensors of the network it is evaluated by)
    for (run, method, stage, evaluated) in [
        (
            "online-pl/stage1",
            Method::OnlinePl,
            Stage::First,
            "momentum",
        ),
        ("online-pl", Method::OnlinePl, Stage::Main, "momentum"),
        ("ideal/pretrain", Method::Ideal, Stage::First, ""),
        ("ideal", Method::Ideal, Stage::Main, ""),
        ("dtml", Method::Dtml, Stage::Main, ""),
    ] {
        let saved = SavedRun::read(&data_dir(run)).unwrap();
        assert_eq!((saved.config.method, saved.stage), (method, stage), "{run}");
        let trained = saved.network(&g, 1).unwrap();
        let key = |part: &str| match evaluated {
            "" => part.to_string(),
            p => format!("{p}/{part}"),
        };
        let stem = data_dir(run).join("checkpoint");
        for (store, part) in [(&trained.params, "params"), (&trained.stats, "stats")] {
            let file = tensors(&stem, &key(part));
            assert_eq!(store.len(), file.len(), "{run}: {part}");
            for (spec, value) in store.specs().iter().zip(store.values()) {
                let got: Vec<f32> = value.to_f64().unwrap().iter().map(|&v| v as f32).collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let want = &file[&spec.name].data;
                assert_eq!(bits(&got), bits(want), "{run}: {part}/{}", spec.name);
            }
        }
    }
}

/// The configuration of a format-1 run as the tests of this file resume it: the sidecar's, with
/// the main stage's length.
fn main_config(run: &str, iterations: u64) -> metaseg::train::config::TrainConfig {
    let mut config = SavedRun::read(&data_dir(run)).unwrap().config;
    config.iterations = iterations;
    config
}

#[test]
fn runs_interrupted_under_format_1_resume_and_write_format_2() {
    let g = gpu();
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    // (run, where its newest checkpoint is, iterations left: first stage + main stage)
    for (run, newest, left) in [
        ("online-pl-in-stage1", "stage1", 1 + 3),
        ("online-pl", "", 1),
        ("ideal", "", 1),
        ("dtml", "", 0),
    ] {
        let dir = copy_of(run);
        let config = main_config(&format!("{run}/{newest}"), 3);
        let data = run::load_data(&config).unwrap();
        let paths = RunPaths {
            dir: dir.path().to_path_buf(),
        };
        let summary = run::train(&g, &config, &data, &paths, resume).unwrap();
        assert_eq!(summary.iterations, left, "{run}");
        let (_, sidecar) = checkpoint::load(&paths.checkpoint()).unwrap();
        assert_eq!(sidecar.step, 3, "{run}");
        if left > 0 {
            assert_eq!(sidecar.format, FORMAT, "{run}: rewritten in this format");
            assert_eq!(sidecar.stage, Stage::Main, "{run}");
            let logged = log_lines(&paths.log());
            let last = logged.last().unwrap();
            assert_eq!(last["step"], 3, "{run}");
            assert!(last["loss"].as_f64().unwrap().is_finite(), "{run}: {last}");
        }
    }
}

#[test]
fn unknown_formats_and_format_1_names_are_refused_naming_the_format() {
    let dir = copy_of("online-pl");
    let json = dir.path().join("checkpoint.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let write = |sidecar: &serde_json::Value| {
        std::fs::write(&json, serde_json::to_string(sidecar).unwrap()).unwrap();
    };
    let mut newer = original.clone();
    newer["format"] = (FORMAT + 1).into();
    write(&newer);
    let Err(err) = SavedRun::read(dir.path()) else {
        panic!("a checkpoint of a newer format read");
    };
    let message = err.to_string();
    assert!(
        message.contains(&format!("format {}", FORMAT + 1)),
        "{message}"
    );

    let mut unknown = original;
    unknown["config"]["method"] = "online-pl-student".into();
    write(&unknown);
    let Err(err) = SavedRun::read(dir.path()) else {
        panic!("an unknown method read");
    };
    let message = err.to_string();
    assert!(
        message.contains("format 1") && message.contains("online-pl-student"),
        "{message}"
    );
}
