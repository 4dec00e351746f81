//! `pgquorum bench …`: measurements on real processes, never timed assertions.
//!
//! Every benchmark prints a table for people and, as its last line, one JSON object
//! for scripts; times are milliseconds as `{"p50": …, "p99": …, "max": …}`.

pub mod chaos;
pub mod failover;
pub mod outage;
pub mod raft;
pub mod router;

use std::path::PathBuf;

use serde_json::{json, Value};

/// Where a benchmark keeps its cluster: `dir`, or a temporary directory that is removed
/// when the returned guard is dropped.
pub fn work_dir(
    dir: &Option<PathBuf>,
    prefix: &str,
) -> std::io::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => Ok((d.clone(), None)),
        None => {
            let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
    }
}

/// p50 / p99 / max of samples in milliseconds (nearest-rank percentiles).
pub fn summary(samples: &[f64]) -> Value {
    if samples.is_empty() {
        return json!({"p50": null, "p99": null, "max": null});
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"p50": round(rank(0.50)), "p99": round(rank(0.99)), "max": round(s[s.len() - 1])})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(summary(&samples), json!({"p50": 50.0, "p99": 99.0, "max": 100.0}));
        assert_eq!(summary(&[3.0]), json!({"p50": 3.0, "p99": 3.0, "max": 3.0}));
        assert_eq!(summary(&[])["p50"], Value::Null);
    }
}
