//! How the CLI prints: tables for people, JSON for scripts (`--json`).
//!
//! JSON keys are a contract (DESIGN.md): they may be added, never renamed.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::Table;
use std::io::Write;

use serde_json::Value;

/// Prints either the table or the JSON value, as the user asked.
pub fn emit(json: bool, value: &Value, table: impl FnOnce() -> String) {
    let text = if json {
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    } else {
        table()
    };
    // A closed pipe (`pgquorum status | head`) is the reader's choice, not an error.
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// One record of a stream: a JSON line for scripts, a text line for people.
pub fn emit_line(json: bool, value: &Value, line: impl FnOnce() -> String) {
    let text = if json { value.to_string() } else { line() };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(headers.to_vec());
    for row in rows {
        t.add_row(row);
    }
    t.to_string()
}

/// Milliseconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`, without a date crate.
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(super::timestamp(1_795_824_000_000), "2026-11-28 00:00:00");
        assert_eq!(
            super::timestamp(951_782_400_000 + 3_723_000),
            "2000-02-29 01:02:03"
        );
    }
}
