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
    LogNormal(LogNormal),
    Empirical(Vec<f64>),
}

/// A lognormal distribution given by its median and 99th percentile; `sigma`, the
/// standard deviation of its logarithm, is worked out once, not at every sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogNormal {
    median: f64,
    p99: f64,
    sigma: f64,
}

impl LogNormal {
    /// Needs `0 < median <= p99`, both finite.
    pub fn new(median: f64, p99: f64) -> Result<LogNormal, String> {
        if !(median.is_finite() && p99.is_finite() && median > 0.0 && p99 >= median) {
            return Err(format!("lognormal: need 0 < `median` <= `p99`, got median {median}, p99 {p99}"));
        }
        Ok(LogNormal { median, p99, sigma: (p99 / median).ln() / Z_99 })
    }

    pub fn median(&self) -> f64 {
        self.median
    }

    pub fn p99(&self) -> f64 {
        self.p99
    }

    /// The same shape with every value `k` times as large (`k > 0`).
    pub fn scaled(&self, k: f64) -> LogNormal {
        debug_assert!(k > 0.0, "a lognormal scales by a positive factor");
        LogNormal { median: self.median * k, p99: self.p99 * k, sigma: self.sigma }
    }

    fn sample(&self, rng: &mut impl Rng) -> f64 {
        self.median * (self.sigma * standard_normal(rng)).exp()
    }

    fn mean(&self) -> f64 {
        self.median * (self.sigma * self.sigma / 2.0).exp()
    }
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
            RawDist::LogNormal { median, p99 } => Dist::LogNormal(LogNormal::new(median, p99)?),
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
            Dist::LogNormal(d) => RawDist::LogNormal { median: d.median, p99: d.p99 },
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
            Dist::LogNormal(d) => d.sample(rng),
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
            Dist::LogNormal(d) => d.mean(),
            Dist::Empirical(values) => values.iter().sum::<f64>() / values.len() as f64,
        }
    }
}

/// `x.round() as u64` (halves away from zero, negatives and NaN to 0, saturating
/// above `u64::MAX`) without a call: `f64::round` is a library routine on the
/// baseline x86-64 target, and the simulator rounds several samples per request.
/// Exact: for `x` below 2^53 the fraction `x - trunc(x)` is computed without
/// error, and above it there is no fraction.
#[inline]
pub fn round_to_u64(x: f64) -> u64 {
    // Below 2^63, the usual case, truncating is a signed conversion: one
    // instruction on x86-64, where the unsigned one takes a dozen.
    const TWO_TO_THE_63: f64 = 9_223_372_036_854_775_808.0;
    if (0.0..TWO_TO_THE_63).contains(&x) {
        let whole = x as i64;
        return whole as u64 + u64::from(x - whole as f64 >= 0.5);
    }
    round_outside_i64(x)
}

/// [`round_to_u64`] for negatives, NaN and values from 2^63 up.
fn round_outside_i64(x: f64) -> u64 {
    let whole = x as u64;
    match x - whole as f64 >= 0.5 {
        // Above 2^64 the cast saturated and the "fraction" is huge: stay at the top.
        true => whole.saturating_add(1),
        false => whole,
    }
}

/// A standard normal by the ziggurat method (Marsaglia and Tsang, in Doornik's
/// ZIGNOR form with 128 layers): about 99% of samples cost one 64-bit draw, a
/// multiplication and a comparison, where Box–Muller needs a logarithm, a square
/// root and a cosine for each. Written out, with its tables computed here, so a
/// seed gives the same numbers whatever version of a distributions crate is used.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let zig = ziggurat();
    loop {
        // One word gives both the layer (low 7 bits) and a uniform in [-1, 1)
        // (high 53 bits): they share no bits, so they are independent.
        let word = rng.next_u64();
        let layer = (word & 0x7f) as usize;
        let u = 2.0 * ((word >> 11) as f64 / (1u64 << 53) as f64) - 1.0;
        let (edge, ratio) = zig.layers[layer];
        if u.abs() < ratio {
            return u * edge;
        }
        if layer == 0 {
            return normal_tail(rng, u < 0.0);
        }
        // The wedge between this layer's rectangle and the curve.
        let (x, next_edge) = (u * edge, zig.edge(layer + 1));
        let f0 = (-0.5 * (edge * edge - x * x)).exp();
        let f1 = (-0.5 * (next_edge * next_edge - x * x)).exp();
        if f1 + rng.random::<f64>() * (f0 - f1) < 1.0 {
            return x;
        }
    }
}

const ZIG_LAYERS: usize = 128;
/// Where the tail begins, and each layer's area, for 128 layers (Doornik 2005).
const ZIG_R: f64 = 3.442_619_855_899;
const ZIG_V: f64 = 9.912_563_035_262_17e-3;

struct Ziggurat {
    /// Per layer i, `(x[i], x[i + 1] / x[i])`: its right edge and the share of it
    /// inside the curve, side by side so the fast path reads one cache line.
    /// `x[0]` is the base layer's width `V / f(R)`, `x[1] = R` and `x[128] = 0`.
    layers: [(f64, f64); ZIG_LAYERS],
}

impl Ziggurat {
    /// `x[i]`, the right edge of layer i (zero above the top layer).
    fn edge(&self, i: usize) -> f64 {
        self.layers.get(i).map_or(0.0, |layer| layer.0)
    }
}

fn ziggurat() -> &'static Ziggurat {
    static TABLES: std::sync::OnceLock<Ziggurat> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let mut x = [0.0; ZIG_LAYERS + 1];
        let mut f = (-0.5 * ZIG_R * ZIG_R).exp();
        x[0] = ZIG_V / f;
        x[1] = ZIG_R;
        for i in 2..ZIG_LAYERS {
            x[i] = (-2.0 * (ZIG_V / x[i - 1] + f).ln()).sqrt();
            f = (-0.5 * x[i] * x[i]).exp();
        }
        Ziggurat { layers: std::array::from_fn(|i| (x[i], x[i + 1] / x[i])) }
    })
}

/// A sample from the normal's tail beyond `ZIG_R` (Marsaglia 1964), negated for
/// the left tail.
fn normal_tail(rng: &mut impl Rng, negative: bool) -> f64 {
    loop {
        // 1 - U is in (0, 1], so both logarithms are finite.
        let x = (1.0 - rng.random::<f64>()).ln() / ZIG_R;
        let y = (1.0 - rng.random::<f64>()).ln();
        if -2.0 * y >= x * x {
            return if negative { x - ZIG_R } else { ZIG_R - x };
        }
    }
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

    /// The ziggurat's samples against the standard normal's distribution function
    /// at points across the body, the wedges and both tails (beyond `ZIG_R` too):
    /// each share within 5 standard errors of its exact value.
    #[test]
    fn the_ziggurat_draws_a_standard_normal() {
        let n = 1_000_000;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let xs: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        let check = |x: f64, phi: f64| {
            let share = xs.iter().filter(|&&v| v <= x).count() as f64 / n as f64;
            let se = (phi * (1.0 - phi) / n as f64).sqrt();
            assert!((share - phi).abs() <= 5.0 * se, "P(Z <= {x}) = {share}, expected {phi}");
        };
        check(-3.6, 0.000_159_109);
        check(-3.0, 0.001_349_898);
        check(-2.0, 0.022_750_132);
        check(-1.0, 0.158_655_254);
        check(-0.3, 0.382_088_578);
        check(0.0, 0.5);
        check(0.5, 0.691_462_461);
        check(1.0, 0.841_344_746);
        check(2.5, 0.993_790_335);
        check(3.0, 0.998_650_102);
        check(3.6, 0.999_840_891);
        let mean = xs.iter().sum::<f64>() / n as f64;
        let variance = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.005 && (variance - 1.0).abs() < 0.01, "mean {mean}, variance {variance}");
    }

    proptest::proptest! {
        #[test]
        fn rounding_to_u64_is_round_then_cast(bits: u64, small in -1e3f64..1e16) {
            for x in [f64::from_bits(bits), small, small.trunc() + 0.5, small.trunc() - 0.5] {
                proptest::prop_assert_eq!(round_to_u64(x), x.round() as u64, "x = {:e}", x);
            }
        }
    }

    #[test]
    fn rounding_to_u64_handles_the_edges() {
        for x in [
            0.0,
            -0.0,
            0.49999999999999994,
            0.5,
            1.5,
            2.5,
            -0.5,
            -0.7,
            4503599627370495.5,
            9007199254740993.0,
            9223372036854774784.0,
            9223372036854775808.0,
            9223372036854777856.0,
            1.8446744073709552e19,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
        ] {
            assert_eq!(round_to_u64(x), x.round() as u64, "x = {x:e}");
        }
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
