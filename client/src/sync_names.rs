//! `synchronous_standby_names` as pgquorum writes and reads it.
//!
//! pgquorum always writes the quorum form `ANY k ("a", "b")`: the primary acknowledges a
//! commit once any k of the named standbys have flushed it. In strict mode, when fewer
//! than k standbys can be named, the list is padded with names no standby carries, so
//! commits wait rather than being acknowledged by too few (DESIGN.md, Invariant 2).

/// Application name that no standby uses; pads the list in strict mode.
pub const NO_STANDBY: &str = "pgquorum_no_sync_standby";

/// Formats the setting; empty `names` and `k == 0` mean asynchronous (`''`).
pub fn format(k: u32, names: &[String], strict: bool) -> String {
    let mut names: Vec<String> = names.to_vec();
    if strict {
        let mut pad = 1;
        while (names.len() as u32) < k.max(1) {
            names.push(format!("{NO_STANDBY}_{pad}"));
            pad += 1;
        }
    }
    if names.is_empty() || k == 0 {
        return String::new();
    }
    let k = k.min(names.len() as u32);
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!("ANY {k} ({})", quoted.join(", "))
}

/// The standby names a setting waits for (placeholders left out), in order.
pub fn parse(setting: &str) -> Vec<String> {
    let s = setting.trim();
    let inner = match (s.find('('), s.rfind(')')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    inner
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty() && !n.starts_with(NO_STANDBY))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn formats_and_parses_back() {
        assert_eq!(format(1, &v(&["node2"]), true), r#"ANY 1 ("node2")"#);
        assert_eq!(format(1, &v(&["a", "b"]), false), r#"ANY 1 ("a", "b")"#);
        assert_eq!(format(1, &[], false), "");
        assert_eq!(format(1, &[], true), format!("ANY 1 (\"{NO_STANDBY}_1\")"));
        assert_eq!(
            format(2, &v(&["a"]), true),
            format!("ANY 2 (\"a\", \"{NO_STANDBY}_1\")")
        );
        for names in [v(&[]), v(&["a"]), v(&["a", "b"])] {
            assert_eq!(parse(&format(2, &names, true)), names);
        }
        assert_eq!(parse("a, b"), v(&["a", "b"]));
        assert_eq!(parse("FIRST 1 (x)"), v(&["x"]));
        assert_eq!(parse(""), v(&[]));
    }
}
