//! The counter-based random generator, defined once here in integer arithmetic; `kernels/random.wgsl`
//! computes the same bits, so both backends draw identical uniforms for the same (seed, counter).

/// Chris Wellons' "lowbias32" integer hash: a full-avalanche 32-bit mixer.
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// 32 random bits for (seed, counter): the seed's and the counter's halves are folded in one by one.
pub fn random_bits(seed: u64, counter: u64) -> u32 {
    let mut h = mix32(seed as u32 ^ 0x9e37_79b9);
    h = mix32(h ^ (seed >> 32) as u32);
    h = mix32(h ^ (counter >> 32) as u32);
    mix32(h ^ counter as u32)
}

/// Uniform on (0, 1): the top 23 bits, centred in their bucket; 24 significant bits, exact in f32.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    ((random_bits(seed, counter) >> 9) as f64 + 0.5) / 8_388_608.0
}

/// Standard normal for element `counter` by Box-Muller on the uniforms at 2*counter and 2*counter+1.
pub fn normal(seed: u64, counter: u64) -> f64 {
    let u1 = uniform(seed, counter.wrapping_mul(2));
    let u2 = uniform(seed, counter.wrapping_mul(2).wrapping_add(1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments_and_range() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| uniform(7, i)).collect();
        assert!(xs.iter().all(|&x| x > 0.0 && x < 1.0));
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 1/sqrt(12 n) ~ 6.5e-4 for the mean; the bounds are about 5 of them.
        assert!((mean - 0.5).abs() < 3e-3, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 2e-3, "variance {var}");
    }

    #[test]
    fn normal_moments() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| normal(11, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1.2e-2, "mean {mean}");
        assert!((var - 1.0).abs() < 2e-2, "variance {var}");
    }

    #[test]
    fn seeds_and_counters_give_different_streams() {
        assert_ne!(random_bits(1, 0), random_bits(2, 0));
        assert_ne!(random_bits(1, 0), random_bits(1, 1));
        assert_ne!(random_bits(1, 1 << 32), random_bits(1, 1));
        assert_eq!(random_bits(5, 9), random_bits(5, 9));
    }
}
