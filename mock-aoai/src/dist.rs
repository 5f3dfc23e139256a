//! Distributions for token counts and latencies, sampled from a seeded RNG.
//!
//! In TOML: `{ fixed = 200 }`, `{ uniform = { min = 50, max = 400 } }`,
//! `{ normal = { mean = 300, std = 50 } }`, `{ lognormal = { median = 200, p99 = 2000 } }`,
//! `{ empirical = [120, 180, 950] }`. Samples below zero are read as zero.

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// The 99th percentile of the standard normal distribution.
const Z_99: f64 = 2.326_347_874_040_841;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, try_from = "RawDist", into = "RawDist")]
pub enum Dist {
    Fixed(f64),
    Uniform { min: f64, max: f64 },
    Normal { mean: f64, std: f64 },
    LogNormal { median: f64, p99: f64 },
    Empirical(Vec<f64>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum RawDist {
    Fixed(f64),
    Uniform {
        min: f64,
        max: f64,
    },
    Normal {
        mean: f64,
        std: f64,
    },
    #[serde(rename = "lognormal")]
    LogNormal {
        median: f64,
        p99: f64,
    },
    Empirical(Vec<f64>),
}

impl TryFrom<RawDist> for Dist {
    type Error = String;
    fn try_from(raw: RawDist) -> Result<Dist, String> {
        let finite = |name: &str, v: f64| match v.is_finite() && v >= 0.0 {
            true => Ok(()),
            false => Err(format!("`{name}` must be a number, 0 or more, got {v}")),
        };
        match &raw {
            RawDist::Fixed(v) => finite("fixed", *v)?,
            RawDist::Uniform { min, max } => {
                finite("min", *min)?;
                finite("max", *max)?;
                if min > max {
                    return Err(format!("uniform: `min` ({min}) is above `max` ({max})"));
                }
            }
            RawDist::Normal { mean, std } => {
                finite("mean", *mean)?;
                finite("std", *std)?;
            }
            RawDist::LogNormal { median, p99 } => {
                finite("median", *median)?;
                finite("p99", *p99)?;
                if *median <= 0.0 || p99 < median {
                    return Err(format!("lognormal: need 0 < `median` <= `p99`, got median {median}, p99 {p99}"));
                }
            }
            RawDist::Empirical(values) => {
                if values.is_empty() {
                    return Err("empirical: give at least one value".into());
                }
                values.iter().try_for_each(|v| finite("empirical", *v))?;
            }
        }
        Ok(match raw {
            RawDist::Fixed(v) => Dist::Fixed(v),
            RawDist::Uniform { min, max } => Dist::Uniform { min, max },
            RawDist::Normal { mean, std } => Dist::Normal { mean, std },
            RawDist::LogNormal { median, p99 } => Dist::LogNormal { median, p99 },
            RawDist::Empirical(v) => Dist::Empirical(v),
        })
    }
}

impl From<Dist> for RawDist {
    fn from(d: Dist) -> RawDist {
        match d {
            Dist::Fixed(v) => RawDist::Fixed(v),
            Dist::Uniform { min, max } => RawDist::Uniform { min, max },
            Dist::Normal { mean, std } => RawDist::Normal { mean, std },
            Dist::LogNormal { median, p99 } => RawDist::LogNormal { median, p99 },
            Dist::Empirical(v) => RawDist::Empirical(v),
        }
    }
}

impl Dist {
    /// One sample, never negative.
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        let value = match self {
            Dist::Fixed(v) => *v,
            Dist::Uniform { min, max } => min + (max - min) * rng.random::<f64>(),
            Dist::Normal { mean, std } => mean + std * standard_normal(rng),
            Dist::LogNormal { median, p99 } => {
                let sigma = (p99 / median).ln() / Z_99;
                median * (sigma * standard_normal(rng)).exp()
            }
            Dist::Empirical(values) => values[rng.random_range(0..values.len())],
        };
        value.max(0.0)
    }

    /// The mean, for reports and sizing hints.
    pub fn mean(&self) -> f64 {
        match self {
            Dist::Fixed(v) => *v,
            Dist::Uniform { min, max } => (min + max) / 2.0,
            Dist::Normal { mean, .. } => *mean,
            Dist::LogNormal { median, p99 } => {
                let sigma = (p99 / median).ln() / Z_99;
                median * (sigma * sigma / 2.0).exp()
            }
            Dist::Empirical(values) => values.iter().sum::<f64>() / values.len() as f64,
        }
    }
}

/// Box–Muller: two uniforms give one standard normal; written out so a seed
/// gives the same numbers whatever version of a distributions crate is used.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1], so the logarithm is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn dist(text: &str) -> Result<Dist, String> {
        #[derive(Deserialize)]
        struct D {
            d: Dist,
        }
        toml::from_str::<D>(&format!("d = {text}")).map(|d| d.d).map_err(|e| e.to_string())
    }

    #[test]
    fn samples_follow_their_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 20_000;
        let check = |text: &str, median: f64, tolerance: f64, rng: &mut ChaCha8Rng| {
            let d = dist(text).unwrap();
            let mut xs: Vec<f64> = (0..n).map(|_| d.sample(rng)).collect();
            xs.sort_by(f64::total_cmp);
            let got = xs[n / 2];
            assert!((got - median).abs() <= tolerance, "{text}: median {got}, expected {median}");
            xs
        };
        check("{ fixed = 7 }", 7.0, 0.0, &mut rng);
        check("{ uniform = { min = 10, max = 20 } }", 15.0, 0.2, &mut rng);
        check("{ normal = { mean = 100, std = 10 } }", 100.0, 0.5, &mut rng);
        let xs = check("{ lognormal = { median = 200, p99 = 2000 } }", 200.0, 8.0, &mut rng);
        let p99 = xs[n * 99 / 100];
        assert!((p99 - 2000.0).abs() < 200.0, "lognormal p99 {p99}");
        check("{ empirical = [1, 2, 3] }", 2.0, 0.0, &mut rng);
    }

    #[test]
    fn bad_distributions_are_refused() {
        assert!(dist("{ uniform = { min = 5, max = 1 } }").unwrap_err().contains("above `max`"));
        assert!(dist("{ lognormal = { median = 200, p99 = 100 } }").unwrap_err().contains("median"));
        assert!(dist("{ empirical = [] }").unwrap_err().contains("at least one"));
        assert!(dist("{ fixed = -1 }").unwrap_err().contains("0 or more"));
        assert!(dist("{ gamma = 1 }").unwrap_err().contains("unknown variant"));
    }
}
