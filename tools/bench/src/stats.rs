//! Percentiles by sorting (exact, nearest rank, as floor-bench computes them) and the units
//! they are printed in.

use serde_json::{Value, json};

/// A latency distribution, every figure in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Dist {
    pub n: usize,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

impl Dist {
    pub fn new(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| match n {
            0 => 0,
            n => samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
        };
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Dist {
            n,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or(0),
            mean: if n == 0 { 0 } else { (sum / n as u128) as u64 },
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.n,
            "p50_ms": ms(self.p50),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
            "mean_ms": ms(self.mean),
        })
    }

    pub fn human(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} max {}",
            short(self.p50),
            short(self.p90),
            short(self.p99),
            short(self.max)
        )
    }
}

/// Milliseconds with microsecond precision, for JSON.
pub fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

/// "850 µs" below a millisecond, "12.34 ms" below ten seconds, "12.3 s" above.
pub fn short(ns: u64) -> String {
    short_ms(ns as f64 / 1e6)
}

/// [`short`] for a figure already in milliseconds (floor-bench's JSON unit).
pub fn short_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0} µs", ms * 1e3)
    } else if ms < 10_000.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.1} s", ms / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let d = Dist::new((1..=100).collect());
        assert_eq!((d.p50, d.p90, d.p99, d.max, d.n), (50, 90, 99, 100, 100));
        let e = Dist::new(Vec::new());
        assert_eq!((e.p50, e.max, e.mean), (0, 0, 0));
    }
}
