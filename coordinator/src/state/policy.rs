//! Per-cluster failover policy: what it holds, its defaults, and the rules a value must
//! meet before it is committed.
//!
//! Operators change a policy by naming fields (`failure_timeout_ms=1500`), the way
//! `patronictl edit-config -s` works, so one parser here serves the CLI, gRPC clients
//! and config files alike, and every refusal names the field it refuses. A change is
//! applied to a copy and the whole resulting policy is validated, so fields that must
//! move together (heartbeat < failure timeout ≤ lease) can be moved in one request.
//!
//! The defaults aim at DESIGN.md's goal of a failover well under two seconds: a primary
//! silent for one second is declared failed, and its lease (counted from when its agent
//! *sent* the last heartbeat) has run out by then too.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use pgquorum_client::WORKLOADS;

/// Workload classes that take routed reads, so they carry a lag threshold. `backup`
/// replicas exist for base backups and PITR and are never routed.
pub const ROUTED_WORKLOADS: &[&str] = &["realtime", "reporting", "analytics", "dr", "general"];

/// Largest timing value accepted, to catch unit mistakes (seconds typed as ms·1000).
const MAX_TIMING_MS: u64 = 10 * 60 * 1000;
/// Smallest heartbeat interval: below it agents would spend more time reporting than
/// observing, and the leader's in-memory report table would churn for nothing.
const MIN_HEARTBEAT_MS: u64 = 10;
/// Postgres itself caps synchronous_standby_names at far more, but a larger number here
/// is a typo, not a topology.
const MAX_SYNC_STANDBYS: u32 = 16;

/// How strictly the primary waits for synchronous standbys, and what that allows a
/// failover to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// The primary always waits for `sync_standbys` standbys; only a member of the
    /// committed sync set may be promoted automatically. No acknowledged write is lost.
    Strict,
    /// Synchronous while enough standbys are healthy, asynchronous otherwise.
    Prefer,
    /// Asynchronous replication; failover bounded by `max_lag_on_failover_bytes`.
    Off,
}

impl SyncMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            SyncMode::Strict => "strict",
            SyncMode::Prefer => "prefer",
            SyncMode::Off => "off",
        }
    }

    pub fn parse(s: &str) -> Option<SyncMode> {
        match s {
            "strict" => Some(SyncMode::Strict),
            "prefer" => Some(SyncMode::Prefer),
            "off" => Some(SyncMode::Off),
            _ => None,
        }
    }
}

/// The failover policy of one database cluster. Every field is replicated through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// How often each agent reports.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a primary counts as failed (if no standby reaches it either).
    pub failure_timeout_ms: u64,
    /// Length of the primary's lease; its agent fences Postgres when it runs out.
    pub lease_ms: u64,
    pub sync_mode: SyncMode,
    /// How many standbys the primary waits for (`ANY k (...)`).
    pub sync_standbys: u32,
    /// In `off`/`prefer` mode, the most WAL a candidate may miss and still be promoted.
    pub max_lag_on_failover_bytes: u64,
    /// Workload class -> max replay lag (ms) at which its replicas still take reads.
    pub lag_threshold_ms: BTreeMap<String, u64>,
    pub alert_lag_warning_ms: u64,
    pub alert_lag_critical_ms: u64,
    pub alert_lag_emergency_ms: u64,
    /// Regions whose members may be promoted without an operator; empty means the
    /// failed primary's own region only.
    pub auto_failover_regions: Vec<String>,
    /// Paused: no automatic failover while set.
    pub maintenance: bool,
}

impl Default for Policy {
    fn default() -> Self {
        let lag_threshold_ms = [
            ("realtime", 50),
            ("reporting", 100),
            ("analytics", 300),
            ("dr", 1000),
            ("general", 500),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Policy {
            // As fine as the finest lag threshold (realtime, 50 ms), which validation
            // requires: lag cannot be enforced more finely than it is observed.
            heartbeat_interval_ms: 50,
            failure_timeout_ms: 1000,
            lease_ms: 1000,
            sync_mode: SyncMode::Strict,
            sync_standbys: 1,
            max_lag_on_failover_bytes: 1024 * 1024,
            lag_threshold_ms,
            alert_lag_warning_ms: 1_000,
            alert_lag_critical_ms: 5_000,
            alert_lag_emergency_ms: 30_000,
            auto_failover_regions: Vec::new(),
            maintenance: false,
        }
    }
}

/// A refused policy value: which field, and why, in words an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for PolicyError {}

fn err(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The names `set` accepts, for help texts and error messages.
pub fn setting_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "heartbeat_interval_ms",
        "failure_timeout_ms",
        "lease_ms",
        "sync_mode",
        "sync_standbys",
        "max_lag_on_failover_bytes",
        "alert_lag_warning_ms",
        "alert_lag_critical_ms",
        "alert_lag_emergency_ms",
        "auto_failover_regions",
        "maintenance",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.extend(ROUTED_WORKLOADS.iter().map(|w| format!("lag_threshold_ms.{w}")));
    names
}

fn parse_u64(field: &str, value: &str) -> Result<u64, PolicyError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| err(field, format!("expected a whole number ≥ 0, got {value:?}")))
}

fn parse_bool(field: &str, value: &str) -> Result<bool, PolicyError> {
    match value.trim() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(err(field, format!("expected true or false, got {value:?}"))),
    }
}

impl Policy {
    /// Sets one field from its textual value. Does not check cross-field rules; call
    /// [`Policy::validate`] on the result (or use [`Policy::with_settings`]).
    pub fn set(&mut self, field: &str, value: &str) -> Result<(), PolicyError> {
        match field {
            "heartbeat_interval_ms" => self.heartbeat_interval_ms = parse_u64(field, value)?,
            "failure_timeout_ms" => self.failure_timeout_ms = parse_u64(field, value)?,
            "lease_ms" => self.lease_ms = parse_u64(field, value)?,
            "sync_mode" => {
                self.sync_mode = SyncMode::parse(value.trim())
                    .ok_or_else(|| err(field, format!("expected strict, prefer or off, got {value:?}")))?
            }
            "sync_standbys" => {
                let n = parse_u64(field, value)?;
                self.sync_standbys = u32::try_from(n)
                    .map_err(|_| err(field, format!("at most {MAX_SYNC_STANDBYS}, got {n}")))?;
            }
            "max_lag_on_failover_bytes" => self.max_lag_on_failover_bytes = parse_u64(field, value)?,
            "alert_lag_warning_ms" => self.alert_lag_warning_ms = parse_u64(field, value)?,
            "alert_lag_critical_ms" => self.alert_lag_critical_ms = parse_u64(field, value)?,
            "alert_lag_emergency_ms" => self.alert_lag_emergency_ms = parse_u64(field, value)?,
            "auto_failover_regions" => {
                self.auto_failover_regions = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "maintenance" => self.maintenance = parse_bool(field, value)?,
            _ => {
                if let Some(workload) = field.strip_prefix("lag_threshold_ms.") {
                    if workload == "backup" {
                        return Err(err(
                            field,
                            "backup replicas are never routed, so they have no lag threshold",
                        ));
                    }
                    if !ROUTED_WORKLOADS.contains(&workload) {
                        return Err(err(
                            field,
                            format!(
                                "unknown workload class {workload:?}; known: {}",
                                ROUTED_WORKLOADS.join(", ")
                            ),
                        ));
                    }
                    let ms = parse_u64(field, value)?;
                    self.lag_threshold_ms.insert(workload.to_string(), ms);
                } else {
                    return Err(err(
                        field,
                        format!("no such policy field; known: {}", setting_names().join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Returns a copy with every setting applied, validated as a whole.
    pub fn with_settings<'a>(
        &self,
        settings: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Policy, PolicyError> {
        let mut next = self.clone();
        for (field, value) in settings {
            next.set(field, value)?;
        }
        next.validate()?;
        Ok(next)
    }

    /// Checks the rules that keep failover safe and the numbers sensible.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let timing = [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("failure_timeout_ms", self.failure_timeout_ms),
            ("lease_ms", self.lease_ms),
        ];
        for (field, v) in timing {
            if v > MAX_TIMING_MS {
                return Err(err(
                    field,
                    format!("at most {MAX_TIMING_MS} ms (10 minutes), got {v}"),
                ));
            }
        }
        if self.heartbeat_interval_ms < MIN_HEARTBEAT_MS {
            return Err(err(
                "heartbeat_interval_ms",
                format!(
                    "at least {MIN_HEARTBEAT_MS} ms, got {}",
                    self.heartbeat_interval_ms
                ),
            ));
        }
        // A failure timeout no longer than one heartbeat would declare a primary dead
        // between two perfectly punctual reports.
        if self.failure_timeout_ms <= self.heartbeat_interval_ms {
            return Err(err(
                "failure_timeout_ms",
                format!(
                    "must be greater than heartbeat_interval_ms ({}), got {}",
                    self.heartbeat_interval_ms, self.failure_timeout_ms
                ),
            ));
        }
        // The lease must outlast the detection window: a primary that is declared failed
        // must already have fenced itself, or the promotion waits for its lease anyway.
        if self.lease_ms < self.failure_timeout_ms {
            return Err(err(
                "lease_ms",
                format!(
                    "must be at least failure_timeout_ms ({}), got {}",
                    self.failure_timeout_ms, self.lease_ms
                ),
            ));
        }
        if self.sync_mode != SyncMode::Off && self.sync_standbys == 0 {
            return Err(err(
                "sync_standbys",
                format!(
                    "must be at least 1 in {} sync mode (use sync_mode=off for none)",
                    self.sync_mode.as_str()
                ),
            ));
        }
        if self.sync_standbys > MAX_SYNC_STANDBYS {
            return Err(err(
                "sync_standbys",
                format!("at most {MAX_SYNC_STANDBYS}, got {}", self.sync_standbys),
            ));
        }
        for (workload, &limit) in &self.lag_threshold_ms {
            if !ROUTED_WORKLOADS.contains(&workload.as_str()) {
                return Err(err(
                    &format!("lag_threshold_ms.{workload}"),
                    "unknown workload class",
                ));
            }
            // Lag is observed once a heartbeat: a replica may be a whole interval past
            // its limit before anyone can see it, so a limit below the interval would
            // be a promise the routing cannot keep.
            if limit < self.heartbeat_interval_ms {
                return Err(err(
                    &format!("lag_threshold_ms.{workload}"),
                    format!(
                        "{limit} ms is below heartbeat_interval_ms ({} ms), the interval at which \
                         lag is observed; raise it or lower heartbeat_interval_ms",
                        self.heartbeat_interval_ms
                    ),
                ));
            }
        }
        if self.alert_lag_warning_ms == 0 {
            return Err(err("alert_lag_warning_ms", "must be greater than 0"));
        }
        if self.alert_lag_critical_ms <= self.alert_lag_warning_ms {
            return Err(err(
                "alert_lag_critical_ms",
                format!(
                    "must be greater than alert_lag_warning_ms ({}), got {}",
                    self.alert_lag_warning_ms, self.alert_lag_critical_ms
                ),
            ));
        }
        if self.alert_lag_emergency_ms <= self.alert_lag_critical_ms {
            return Err(err(
                "alert_lag_emergency_ms",
                format!(
                    "must be greater than alert_lag_critical_ms ({}), got {}",
                    self.alert_lag_critical_ms, self.alert_lag_emergency_ms
                ),
            ));
        }
        for region in &self.auto_failover_regions {
            if !is_valid_name(region) {
                return Err(err(
                    "auto_failover_regions",
                    format!("{region:?} is not a region name (letters, digits, '-', '_', '.')"),
                ));
            }
        }
        Ok(())
    }

    /// Field name -> value as text, in the form `set` accepts; for display and diffs.
    pub fn to_settings(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(
            "heartbeat_interval_ms".into(),
            self.heartbeat_interval_ms.to_string(),
        );
        m.insert("failure_timeout_ms".into(), self.failure_timeout_ms.to_string());
        m.insert("lease_ms".into(), self.lease_ms.to_string());
        m.insert("sync_mode".into(), self.sync_mode.as_str().into());
        m.insert("sync_standbys".into(), self.sync_standbys.to_string());
        m.insert(
            "max_lag_on_failover_bytes".into(),
            self.max_lag_on_failover_bytes.to_string(),
        );
        m.insert(
            "alert_lag_warning_ms".into(),
            self.alert_lag_warning_ms.to_string(),
        );
        m.insert(
            "alert_lag_critical_ms".into(),
            self.alert_lag_critical_ms.to_string(),
        );
        m.insert(
            "alert_lag_emergency_ms".into(),
            self.alert_lag_emergency_ms.to_string(),
        );
        m.insert(
            "auto_failover_regions".into(),
            self.auto_failover_regions.join(","),
        );
        m.insert("maintenance".into(), self.maintenance.to_string());
        for (w, v) in &self.lag_threshold_ms {
            m.insert(format!("lag_threshold_ms.{w}"), v.to_string());
        }
        m
    }
}

/// Names of clusters, members and regions: short, and safe in file names, metrics labels
/// and Postgres `application_name`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Policy::default().validate().unwrap();
    }

    #[test]
    fn every_advertised_setting_round_trips() {
        let p = Policy::default();
        for (field, value) in p.to_settings() {
            let q = p.with_settings([(field.as_str(), value.as_str())]).unwrap();
            assert_eq!(p, q, "setting {field} to its own value changed the policy");
        }
        let names: Vec<String> = p.to_settings().into_keys().collect();
        let mut advertised = setting_names();
        advertised.sort();
        assert_eq!(names, advertised);
    }

    #[test]
    fn refusals_name_the_field() {
        let p = Policy::default();
        let cases = [
            (vec![("failure_timeout_ms", "50")], "failure_timeout_ms"),
            (vec![("heartbeat_interval_ms", "5")], "heartbeat_interval_ms"),
            (vec![("lease_ms", "900")], "lease_ms"),
            (vec![("sync_mode", "sometimes")], "sync_mode"),
            (vec![("sync_standbys", "0")], "sync_standbys"),
            (vec![("sync_standbys", "-1")], "sync_standbys"),
            (
                vec![("lag_threshold_ms.reporting", "-5")],
                "lag_threshold_ms.reporting",
            ),
            (vec![("lag_threshold_ms.batch", "5")], "lag_threshold_ms.batch"),
            (vec![("lag_threshold_ms.backup", "5")], "lag_threshold_ms.backup"),
            (vec![("alert_lag_critical_ms", "500")], "alert_lag_critical_ms"),
            (vec![("maintenance", "maybe")], "maintenance"),
            (
                vec![("auto_failover_regions", "us west")],
                "auto_failover_regions",
            ),
            (vec![("failover_timeout", "1")], "failover_timeout"),
        ];
        for (settings, field) in cases {
            let e = p.with_settings(settings.clone()).unwrap_err();
            assert_eq!(e.field, field, "{settings:?} -> {e}");
            assert!(e.to_string().contains(field));
        }
    }

    #[test]
    fn fields_that_move_together_can_move_in_one_change() {
        let p = Policy::default();
        // Raising only the failure timeout above the lease is refused...
        assert!(p.with_settings([("failure_timeout_ms", "3000")]).is_err());
        // ...but raising both at once is fine, in either order.
        let q = p
            .with_settings([("failure_timeout_ms", "3000"), ("lease_ms", "4000")])
            .unwrap();
        assert_eq!((q.failure_timeout_ms, q.lease_ms), (3000, 4000));
        let q = p
            .with_settings([("lease_ms", "4000"), ("failure_timeout_ms", "3000")])
            .unwrap();
        assert_eq!((q.failure_timeout_ms, q.lease_ms), (3000, 4000));
    }

    #[test]
    fn a_lag_threshold_finer_than_the_heartbeat_is_refused_either_way() {
        let p = Policy::default();
        let e = p
            .with_settings([("lag_threshold_ms.realtime", "20")])
            .unwrap_err();
        assert_eq!(e.field, "lag_threshold_ms.realtime");
        assert!(e.message.contains("below heartbeat_interval_ms (50 ms)"), "{e}");
        // Slowing the heartbeat past an existing threshold names that threshold.
        let e = p.with_settings([("heartbeat_interval_ms", "100")]).unwrap_err();
        assert_eq!(e.field, "lag_threshold_ms.realtime", "{e}");
        // Both in one change is fine.
        let q = p
            .with_settings([
                ("heartbeat_interval_ms", "100"),
                ("lag_threshold_ms.realtime", "100"),
            ])
            .unwrap();
        assert_eq!(
            (q.heartbeat_interval_ms, q.lag_threshold_ms["realtime"]),
            (100, 100)
        );
    }

    #[test]
    fn sync_off_allows_zero_standbys() {
        let p = Policy::default()
            .with_settings([("sync_mode", "off"), ("sync_standbys", "0")])
            .unwrap();
        assert_eq!(p.sync_mode, SyncMode::Off);
    }

    proptest::proptest! {
        /// Whatever the input, `with_settings` either refuses or returns a valid policy;
        /// it never panics and never returns something `validate` rejects.
        #[test]
        fn settings_never_yield_an_invalid_policy(
            field in proptest::sample::select(setting_names()),
            value in "[-a-z0-9,._ ]{0,12}",
        ) {
            if let Ok(p) = Policy::default().with_settings([(field.as_str(), value.as_str())]) {
                proptest::prop_assert!(p.validate().is_ok());
            }
        }
    }
}
