//! The Medical Segmentation Decathlon layout (also read by nnU-Net and MONAI):
//!
//! ```text
//! ROOT/dataset.json     modalities and label classes
//! ROOT/imagesTr/*.nii.gz training images (the labeled and unlabeled pools)
//! ROOT/labelsTr/*.nii.gz their labels, same file names
//! ROOT/imagesTs/        optional test images (labels, if any, in labelsTs/)
//! ```
//!
//! Which cases are labeled, unlabeled and test is a [`SplitSpec`]: a JSON file with the lists
//! `labeled`, `unlabeled` and `test` of case names (file names without `.nii`/`.nii.gz`), or "the first
//! N of imagesTr (sorted by name) are labeled" as the LA benchmark does.

use super::error::{DataError, Result};
use super::nifti::{self, Volume};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What dataset.json declares.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetInfo {
    pub name: String,
    /// One per image channel, in channel order (e.g. ["MRI"]).
    pub modalities: Vec<String>,
    /// Class value and name, sorted by value (e.g. [(0, "background"), (1, "left atrium")]).
    pub labels: Vec<(u32, String)>,
}

/// One case: its image and, where there is one, its label file.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub name: String,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub labeled: Vec<Case>,
    pub unlabeled: Vec<Case>,
    pub test: Vec<Case>,
}

/// How to split a data set.
#[derive(Clone, Debug)]
pub enum SplitSpec {
    /// A JSON file in the format of [`SplitFile`].
    File(PathBuf),
    /// The first `labeled` cases of imagesTr (by name) are labeled; with `test: Some(n)` the last n
    /// cases of imagesTr are the test set, otherwise imagesTs is; the rest is unlabeled.
    FirstN { labeled: usize, test: Option<usize> },
}

/// The split file: `{"labeled": [...], "unlabeled": [...], "test": [...]}`, case names.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitFile {
    pub labeled: Vec<String>,
    #[serde(default)]
    pub unlabeled: Vec<String>,
    #[serde(default)]
    pub test: Vec<String>,
}

/// An opened data set: dataset.json read and the case files listed.
#[derive(Clone, Debug)]
pub struct Msd {
    pub root: PathBuf,
    pub info: DatasetInfo,
    /// The number of classes the labels are used with (a training run's `data.classes`), if
    /// known: labels must then be below it as well as declared.
    classes: Option<usize>,
    /// Case name -> file name, in imagesTr and imagesTs.
    training: BTreeMap<String, String>,
    testing: BTreeMap<String, String>,
}

impl Msd {
    pub fn open(root: &Path) -> Result<Msd> {
        let info = read_dataset_json(&root.join("dataset.json"))?;
        let training = list_cases(&root.join("imagesTr"), true)?;
        let testing = list_cases(&root.join("imagesTs"), false)?;
        Ok(Msd {
            root: root.to_path_buf(),
            info,
            classes: None,
            training,
            testing,
        })
    }

    /// The data set used with `classes` classes (values 0 to classes - 1): a label value outside
    /// them is an error when the label is loaded, as an undeclared one is. Without this, a label
    /// of value `classes` would one-hot to nothing and train as background, silently.
    pub fn with_classes(mut self, classes: usize) -> Msd {
        self.classes = Some(classes);
        self
    }

    /// Case names in imagesTr, sorted.
    pub fn training_cases(&self) -> Vec<String> {
        self.training.keys().cloned().collect()
    }

    /// Case names in imagesTs, sorted.
    pub fn test_cases(&self) -> Vec<String> {
        self.testing.keys().cloned().collect()
    }

    pub fn split(&self, spec: &SplitSpec) -> Result<Split> {
        self.resolve(&self.split_file(spec)?)
    }

    /// The split with its unlabeled cases labeled too (each must have a label file): the fully
    /// supervised ceiling on the same cases and test set.
    pub fn split_all_labeled(&self, spec: &SplitSpec) -> Result<Split> {
        let mut file = self.split_file(spec)?;
        let unlabeled = std::mem::take(&mut file.unlabeled);
        file.labeled.extend(unlabeled);
        self.resolve(&file)
    }

    fn split_file(&self, spec: &SplitSpec) -> Result<SplitFile> {
        match spec {
            SplitSpec::File(path) => read_split_file(path),
            SplitSpec::FirstN { labeled, test } => self.first_n(*labeled, *test),
        }
    }

    fn first_n(&self, labeled: usize, test: Option<usize>) -> Result<SplitFile> {
        let names = self.training_cases();
        let held_out = test.unwrap_or(0);
        if labeled == 0 || labeled + held_out > names.len() {
            return Err(DataError::Split {
                reason: format!(
                    "{labeled} labeled and {held_out} test cases asked of the {} in {}",
                    names.len(),
                    self.root.join("imagesTr").display()
                ),
            });
        }
        let rest = names.len() - held_out;
        Ok(SplitFile {
            labeled: names[..labeled].to_vec(),
            unlabeled: names[labeled..rest].to_vec(),
            test: match test {
                Some(_) => names[rest..].to_vec(),
                None => self.test_cases(),
            },
        })
    }

    /// Finds every named case's files; labeled cases must have a label.
    fn resolve(&self, file: &SplitFile) -> Result<Split> {
        let mut seen = BTreeSet::new();
        let lists = [&file.labeled, &file.unlabeled, &file.test];
        for name in lists.iter().flat_map(|l| l.iter()) {
            if !seen.insert(name) {
                let reason = format!("case '{name}' is listed twice");
                return Err(DataError::Split { reason });
            }
        }
        if file.labeled.is_empty() {
            let reason = "no labeled case".to_string();
            return Err(DataError::Split { reason });
        }
        let labeled = (file.labeled.iter())
            .map(|n| self.case(n, &self.training, "imagesTr", "labelsTr", true))
            .collect::<Result<_>>()?;
        // An unlabeled case's label file, if any, is dropped so training cannot use it by mistake.
        let unlabeled = (file.unlabeled.iter())
            .map(|n| {
                self.case_anywhere(n, false)
                    .map(|c| Case { label: None, ..c })
            })
            .collect::<Result<_>>()?;
        let test = (file.test.iter())
            .map(|n| self.case_anywhere(n, false))
            .collect::<Result<_>>()?;
        Ok(Split {
            labeled,
            unlabeled,
            test,
        })
    }

    /// A case from imagesTs if it is there, else from imagesTr.
    fn case_anywhere(&self, name: &str, need_label: bool) -> Result<Case> {
        if self.testing.contains_key(name) {
            self.case(name, &self.testing, "imagesTs", "labelsTs", need_label)
        } else {
            self.case(name, &self.training, "imagesTr", "labelsTr", need_label)
        }
    }

    fn case(
        &self,
        name: &str,
        files: &BTreeMap<String, String>,
        images: &str,
        labels: &str,
        need_label: bool,
    ) -> Result<Case> {
        let Some(file) = files.get(name) else {
            return Err(DataError::MissingCase {
                case: name.into(),
                path: self.root.join(images).join(format!("{name}.nii.gz")),
            });
        };
        let label = self.root.join(labels).join(file);
        if need_label && !label.is_file() {
            return Err(DataError::MissingCase {
                case: name.into(),
                path: label,
            });
        }
        Ok(Case {
            name: name.into(),
            image: self.root.join(images).join(file),
            label: label.is_file().then_some(label),
        })
    }

    /// The image (one channel per modality) and, if the case has one, its label checked against the
    /// image's grid and the declared classes.
    pub fn load(&self, case: &Case) -> Result<(Volume, Option<Volume>)> {
        let image = nifti::read(&case.image)?;
        if image.channels != self.info.modalities.len() {
            return Err(DataError::DatasetJson {
                path: case.image.clone(),
                reason: format!(
                    "{} channel(s), but dataset.json declares {} modalities",
                    image.channels,
                    self.info.modalities.len()
                ),
            });
        }
        let label = match &case.label {
            Some(path) => Some(self.load_label(path, &case.image, &image)?),
            None => None,
        };
        Ok((image, label))
    }

    fn load_label(&self, path: &Path, image_path: &Path, image: &Volume) -> Result<Volume> {
        let label = nifti::read(path)?;
        let mismatch = |reason: String| DataError::GridMismatch {
            image: image_path.to_path_buf(),
            label: path.to_path_buf(),
            reason,
        };
        if label.channels != 1 {
            return Err(mismatch(format!(
                "the label has {} channels",
                label.channels
            )));
        }
        if let Some(reason) = nifti::grid_difference(image, &label) {
            return Err(mismatch(reason));
        }
        check_classes(path, &label, &self.info.labels)?;
        if let Some(classes) = self.classes {
            check_class_count(path, &label, classes)?;
        }
        Ok(label)
    }
}

/// The set as a list, `{0, 1, 2}`.
fn set_text(values: &BTreeSet<u32>) -> String {
    let items: Vec<String> = values.iter().map(u32::to_string).collect();
    format!("{{{}}}", items.join(", "))
}

/// Every label value must be one of the declared class values.
pub fn check_classes(path: &Path, label: &Volume, classes: &[(u32, String)]) -> Result<()> {
    let declared: BTreeSet<u32> = classes.iter().map(|c| c.0).collect();
    let bad = label
        .data
        .iter()
        .find(|&&v| !(v >= 0.0 && v.fract() == 0.0 && declared.contains(&(v as u32))));
    match bad {
        None => Ok(()),
        Some(&value) => Err(DataError::UndeclaredLabel {
            path: path.to_path_buf(),
            value,
            classes: set_text(&declared),
        }),
    }
}

/// Every label value must be below `classes` (values already checked to be declared classes).
pub fn check_class_count(path: &Path, label: &Volume, classes: usize) -> Result<()> {
    match label
        .data
        .iter()
        .find(|&&v| v.is_nan() || v >= classes as f32)
    {
        None => Ok(()),
        Some(&value) => Err(DataError::LabelBeyondClasses {
            path: path.to_path_buf(),
            value,
            classes,
        }),
    }
}

/// Case name -> file name of the .nii/.nii.gz files in `dir`. Names starting with a dot are skipped:
/// the MSD's own Task02_Heart archive carries macOS `._la_003.nii.gz` resource forks.
fn list_cases(dir: &Path, required: bool) -> Result<BTreeMap<String, String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(BTreeMap::new())
        }
        Err(e) => return Err(DataError::io(dir, e)),
    };
    let mut cases = BTreeMap::new();
    for entry in entries {
        let file = entry.map_err(|e| DataError::io(dir, e))?.file_name();
        let Some(file) = file.to_str() else { continue };
        if let Some(name) = case_name(file) {
            cases.insert(name.to_string(), file.to_string());
        }
    }
    Ok(cases)
}

/// The case name of a NIfTI file name, or None for other files.
pub fn case_name(file: &str) -> Option<&str> {
    if file.starts_with('.') {
        return None;
    }
    let name = file
        .strip_suffix(".nii.gz")
        .or_else(|| file.strip_suffix(".nii"))?;
    (!name.is_empty()).then_some(name)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::DatasetJson {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

fn read_split_file(path: &Path) -> Result<SplitFile> {
    serde_json::from_value(read_json(path)?).map_err(|e| DataError::DatasetJson {
        path: path.to_path_buf(),
        reason: format!(
            "not a split file {{\"labeled\": [..], \"unlabeled\": [..], \"test\": [..]}}: {e}"
        ),
    })
}

/// Reads dataset.json in the MSD form (`"modality": {"0": "MRI"}`, `"labels": {"0": "background"}`)
/// or nnU-Net v2's (`"channel_names"`, `"labels": {"background": 0}`).
pub fn read_dataset_json(path: &Path) -> Result<DatasetInfo> {
    let json = read_json(path)?;
    let bad = |reason: String| DataError::DatasetJson {
        path: path.to_path_buf(),
        reason,
    };
    let modality = json
        .get("modality")
        .or_else(|| json.get("channel_names"))
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"modality\" object".into()))?;
    let mut modalities = Vec::new();
    for i in 0..modality.len() {
        let name = modality.get(&i.to_string()).and_then(Value::as_str);
        let name = name.ok_or_else(|| bad(format!("\"modality\" has no channel \"{i}\"")))?;
        modalities.push(name.to_string());
    }
    let labels = json
        .get("labels")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"labels\" object".into()))?;
    let mut classes = Vec::new();
    for (key, value) in labels {
        let class = match (key.parse::<u32>(), value) {
            (Ok(v), Value::String(name)) => (v, name.clone()),
            (_, Value::Number(n)) if n.as_u64().is_some_and(|v| v <= u32::MAX as u64) => {
                (n.as_u64().unwrap() as u32, key.clone())
            }
            _ => {
                return Err(bad(format!(
                    "label \"{key}\": {value} is not a class value"
                )))
            }
        };
        classes.push(class);
    }
    classes.sort();
    let name = json.get("name").and_then(Value::as_str).unwrap_or("");
    Ok(DatasetInfo {
        name: name.to_string(),
        modalities,
        labels: classes,
    })
}

/// dataset.json in the MSD form for the training files and test files given (file names).
pub fn dataset_json(info: &DatasetInfo, training: &[String], test: &[String]) -> Value {
    let modality: serde_json::Map<String, Value> = (info.modalities.iter().enumerate())
        .map(|(i, m)| (i.to_string(), json!(m)))
        .collect();
    let labels: serde_json::Map<String, Value> = (info.labels.iter())
        .map(|(v, name)| (v.to_string(), json!(name)))
        .collect();
    json!({
        "name": info.name,
        "tensorImageSize": if info.modalities.len() > 1 { "4D" } else { "3D" },
        "modality": modality,
        "labels": labels,
        "numTraining": training.len(),
        "numTest": test.len(),
        "training": training.iter().map(|f| json!({
            "image": format!("./imagesTr/{f}"),
            "label": format!("./labelsTr/{f}"),
        })).collect::<Vec<_>>(),
        "test": test.iter().map(|f| format!("./imagesTs/{f}")).collect::<Vec<_>>(),
    })
}

/// Writes `value` as pretty JSON (atomically: no half-written file under `path`).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise") + "\n";
    let fill = |file: &mut std::io::BufWriter<std::fs::File>| {
        std::io::Write::write_all(file, text.as_bytes())
    };
    crate::atomic::write_with(path, fill, |e| DataError::io(path, e))
}
