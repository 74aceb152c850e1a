//! Percentiles and rates of what was measured.
use std::time::Duration;

/// Latency percentiles in µs, and operations per second one after another.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub rate: f64,
    pub samples: usize,
}

pub fn summary(samples: &[Duration]) -> Summary {
    let micros: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let Percentiles { p50, p99, samples } = percentiles(&micros);
    let total_s: f64 = micros.iter().sum::<f64>() / 1e6;
    Summary {
        p50,
        p99,
        rate: samples as f64 / total_s,
        samples,
    }
}

/// The median and the 99th percentile (nearest rank below) of some values, in their unit.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub samples: usize,
}

pub fn percentiles(values: &[f64]) -> Percentiles {
    let sorted = sorted(values);
    Percentiles {
        p50: nearest_rank_below(&sorted, 0.5),
        p99: nearest_rank_below(&sorted, 0.99),
        samples: sorted.len(),
    }
}

/// The median and the 90th percentile (nearest rank below) of a few values, in their unit:
/// for slow operations measured tens of times, where a p99 would be the maximum.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub p50: f64,
    pub p90: f64,
    pub samples: usize,
}

pub fn spread(values: &[f64]) -> Spread {
    let sorted = sorted(values);
    Spread {
        p50: nearest_rank_below(&sorted, 0.5),
        p90: nearest_rank_below(&sorted, 0.9),
        samples: sorted.len(),
    }
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

fn nearest_rank_below(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank_below() {
        let hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        for (values, p50, p99) in [
            (vec![7.0], 7.0, 7.0),
            (vec![3.0, 1.0, 2.0], 2.0, 2.0),
            (hundred, 50.0, 99.0),
        ] {
            let p = percentiles(&values);
            assert_eq!((p.p50, p.p99, p.samples), (p50, p99, values.len()));
        }
    }

    #[test]
    fn spread_takes_the_nearest_rank_below() {
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        for (values, p50, p90) in [
            (vec![7.0], 7.0, 7.0),
            (vec![3.0, 1.0, 2.0], 2.0, 2.0),
            (ten, 5.0, 9.0),
        ] {
            let s = spread(&values);
            assert_eq!((s.p50, s.p90, s.samples), (p50, p90, values.len()));
        }
    }

    #[test]
    fn summary_is_in_microseconds_and_per_second() {
        let samples = [250, 250, 250, 250].map(Duration::from_millis);
        let s = summary(&samples);
        assert_eq!((s.p50, s.p99, s.samples), (250_000.0, 250_000.0, 4));
        assert!((s.rate - 4.0).abs() < 1e-9, "{}", s.rate);
    }
}
