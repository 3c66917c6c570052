//! Which training cases are labeled: the first ones (`random`: the embedded set's cases are a seeded
//! random draw already), or one from each stratum of a label-free per-case quantity (`stratified`),
//! as a curator who looks at the images before choosing which to annotate would spread the labels
//! over the contrasts the pool holds.

use super::{DataError, Result, Volume};
use metaseg_autograd::random::random_bits;

/// How the labeled cases are chosen among the training cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabeledDraw {
    /// The first `labeled` training cases.
    Random,
    /// One case per stratum of [`contrast_key`].
    Stratified,
}

impl LabeledDraw {
    pub const NAMES: [&'static str; 2] = ["random", "stratified"];

    pub fn parse(name: &str) -> Result<LabeledDraw> {
        match name {
            "random" => Ok(LabeledDraw::Random),
            "stratified" => Ok(LabeledDraw::Stratified),
            _ => Err(DataError::invalid(
                "data.labeled_draw",
                format!("'{name}' is not one of {}", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// A case's contrast as its image shows it, no label needed: the median of the image z-scored
/// over the volume. The bulk of the voxels (tissue) sits far below the mean when the bright
/// structures stand out strongly, near it when the contrast is flat.
pub fn contrast_key(image: &Volume) -> f64 {
    let n = image.data.len() as f64;
    let mean = image.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = image
        .data
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let mut sorted: Vec<f64> = image.data.iter().map(|&v| v as f64).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    (median - mean) / var.sqrt().max(f64::MIN_POSITIVE)
}

/// Salt that keeps the stratified draw's random stream apart from the generator's.
const DRAW_SALT: u64 = 0x5354_5241_5449_4659;

/// The indices (ascending) of `labeled` cases, one from each of `labeled` strata of `keys`: the
/// cases ordered by key (ties by index), stratum j holding ranks [j n / k, (j + 1) n / k); within
/// its stratum, a case drawn uniformly with `seed`.
pub fn stratified(keys: &[f64], labeled: usize, seed: u64) -> Result<Vec<usize>> {
    let n = keys.len();
    if labeled == 0 || labeled > n {
        let reason = format!("{labeled} labeled of {n} training cases");
        return Err(DataError::invalid("data.labeled_draw", reason));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]).then(a.cmp(&b)));
    let mut picks: Vec<usize> = (0..labeled)
        .map(|j| {
            let stratum = &order[j * n / labeled..(j + 1) * n / labeled];
            let r = random_bits(seed ^ DRAW_SALT, j as u64) as usize;
            stratum[r % stratum.len()]
        })
        .collect();
    picks.sort_unstable();
    Ok(picks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys 0..n in a scrambled order: case i has key (7 i mod n), so its rank is 7 i mod n.
    fn scrambled(n: usize) -> Vec<f64> {
        (0..n).map(|i| ((7 * i) % n) as f64).collect()
    }

    #[test]
    fn one_pick_in_each_stratum() {
        let keys = scrambled(60);
        for seed in 1337..1342 {
            let picks = stratified(&keys, 4, seed).unwrap();
            let mut strata: Vec<usize> = picks.iter().map(|&i| keys[i] as usize / 15).collect();
            strata.sort_unstable();
            assert_eq!(strata, vec![0, 1, 2, 3], "seed {seed}: picks {picks:?}");
        }
    }

    #[test]
    fn seeded_and_reproducible() {
        let keys = scrambled(60);
        let draws: Vec<Vec<usize>> = (1337..1342)
            .map(|s| stratified(&keys, 4, s).unwrap())
            .collect();
        for (s, d) in (1337..1342).zip(&draws) {
            assert_eq!(&stratified(&keys, 4, s).unwrap(), d);
        }
        // 15^4 draws per seed: five seeds all alike would mean the seed is ignored.
        assert!(draws.iter().any(|d| d != &draws[0]), "{draws:?}");
    }

    #[test]
    fn uneven_strata_and_bad_counts() {
        // 10 cases in 3 strata: ranks 0-2, 3-5, 6-9.
        let keys = scrambled(10);
        let picks = stratified(&keys, 3, 1).unwrap();
        let mut ranks: Vec<f64> = picks.iter().map(|&i| keys[i]).collect();
        ranks.sort_by(f64::total_cmp);
        assert!(ranks[0] < 3.0 && (3.0..6.0).contains(&ranks[1]) && ranks[2] >= 6.0);
        assert_eq!(
            stratified(&keys, 10, 1).unwrap(),
            (0..10).collect::<Vec<_>>()
        );
        assert!(stratified(&keys, 11, 1).is_err());
        assert!(stratified(&keys, 0, 1).is_err());
    }

    #[test]
    fn contrast_key_is_the_z_scored_median() {
        // Values 0, 0, 0, 4: mean 1, sd sqrt(3), median (upper) 0 -> -1 / sqrt(3).
        let v = Volume::new(vec![0.0, 0.0, 0.0, 4.0], [1, 2, 2], [1.0; 3]).unwrap();
        assert!((contrast_key(&v) + 1.0 / 3f64.sqrt()).abs() < 1e-12);
        assert!(LabeledDraw::parse("stratified").is_ok() && LabeledDraw::parse("x").is_err());
    }
}
