//! Lease timing both sides agree on: the agent stops its primary this much *before*
//! its lease ends, and a coordinator counts the lease as over only this much *after*.

use std::time::Duration;

/// What covers the difference in clock rates between an agent's host and a
/// coordinator's over one lease, and the time a fence takes: 2 % of the lease, at
/// least 10 ms (NTP slews a clock by at most 0.05 %; the rest is timer and scheduling
/// slack, and a SIGKILL of the postmaster's process group).
pub fn margin(lease: Duration) -> Duration {
    (lease / 50).max(Duration::from_millis(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_percent_but_never_under_ten_ms() {
        assert_eq!(margin(Duration::from_millis(1000)), Duration::from_millis(20));
        assert_eq!(margin(Duration::from_millis(8000)), Duration::from_millis(160));
        assert_eq!(margin(Duration::from_millis(100)), Duration::from_millis(10));
    }
}
