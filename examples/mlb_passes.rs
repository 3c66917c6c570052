//! What an MLB-Seg iteration costs against the passes it needs (issue 23, item 4), without a
//! training run first: the tables `metaseg train --method mlb-seg --profile N` prints after its
//! per-kernel one ([`metaseg::train::methods::mlb_seg::passes`]), on a batch of the preset's
//! shapes with one image channel.
//!
//! `cargo run --release --example mlb_passes [-- REPEATS [PRESET [KEY=VALUE ...]]]`

use metaseg::gpu::Gpu;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::mlb_seg::passes;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: u32 = args.first().map_or(Ok(3), |s| s.parse())?;
    let preset = args.get(1).map_or("default", String::as_str);
    let mut sets = vec!["method=mlb-seg".to_string()];
    sets.extend(args.iter().skip(2).cloned());
    let config = TrainConfig::load(preset, &sets)?;
    let gpu = Gpu::new()?;
    print!("{}", passes::compare(&gpu, &config, 1, repeats)?.table());
    Ok(())
}
