//! Labels a network predicts for the unlabeled cases, kept as NIfTI on each case's grid so a user
//! can inspect them and a resumed run can read them back: MLB-Seg's initial labels, the local
//! contrastive method's pseudo-labels of each round.

use super::batch::LoadedCase;
use super::run::{self, io, predict_case, RunData, RunError};
use super::trainer::Trainer;
use crate::data::{self, nifti, Dtype, Volume};
use crate::nn::NetBackend;
use std::path::{Path, PathBuf};

fn label_path(dir: &Path, case: &LoadedCase) -> PathBuf {
    dir.join(format!("{}.nii.gz", case.name))
}

/// The label map of every case predicted by `network`, each written to `dir`/CASE.nii.gz.
pub fn predict<B: NetBackend>(
    backend: &B,
    network: &Trainer<B>,
    cases: &[LoadedCase],
    dir: &Path,
) -> run::Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut all = Vec::with_capacity(cases.len());
    for case in cases {
        let labels = predict_case(backend, network, case)?;
        let values = labels.iter().map(|&v| f32::from(v)).collect();
        nifti::write(
            &label_path(dir, case),
            &geometry(case).like(values)?,
            Dtype::U8,
        )?;
        all.push(labels);
    }
    Ok(all)
}

/// The case's grid and header for a label map (the image's display window dropped).
pub fn geometry(case: &LoadedCase) -> Volume {
    let mut header = case.image.header.clone();
    header.cal_min = 0.0;
    header.cal_max = 0.0;
    Volume {
        data: Vec::new(),
        channels: 1,
        dims: case.image.dims,
        spacing: case.image.spacing,
        header,
    }
}

/// The label maps written by [`predict`], read back.
pub fn read(cases: &[LoadedCase], dir: &Path) -> run::Result<Vec<Vec<u8>>> {
    cases
        .iter()
        .map(|case| {
            let path = label_path(dir, case);
            let volume = nifti::read(&path)?;
            if volume.dims != case.image.dims || volume.channels != 1 {
                return Err(RunError::Data(data::DataError::invalid(
                    "pseudo-labels",
                    format!(
                        "{} holds {:?} x {} channel(s); case {} is {:?}",
                        path.display(),
                        volume.dims,
                        volume.channels,
                        case.name,
                        case.image.dims
                    ),
                )));
            }
            Ok(volume.data.iter().map(|&v| v.round() as u8).collect())
        })
        .collect()
}

/// The run's cases with the unlabeled ones carrying `labels` (the reference labels an unlabeled
/// case may have are not used).
pub fn with_labels(data: &RunData, labels: Vec<Vec<u8>>) -> RunData {
    let unlabeled = data
        .unlabeled
        .iter()
        .zip(labels)
        .map(|(case, label)| LoadedCase {
            label: Some(label),
            ..case.clone()
        })
        .collect();
    RunData {
        labeled: data.labeled.clone(),
        unlabeled,
        test: data.test.clone(),
        validation: data.validation.clone(),
    }
}
