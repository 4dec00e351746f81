//! PostgreSQL WAL positions (`pg_lsn`), as text `X/Y` on the wire and u64 for math.

use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses `X/Y` (hex halves). Empty text, as sent for "unknown", parses to None.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return None;
        }
        Some(Lsn((hi << 32) | lo))
    }

    /// Bytes from `earlier` to `self`, zero if `earlier` is ahead.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let l = Lsn::parse("0/3000148").unwrap();
        assert_eq!(l.0, 0x3000148);
        assert_eq!(l.to_string(), "0/3000148");
        assert_eq!(Lsn::parse("1A/FF").unwrap().to_string(), "1A/FF");
        assert_eq!(
            Lsn::parse("1/0")
                .unwrap()
                .bytes_since(Lsn::parse("0/FFFFFFFF").unwrap()),
            1
        );
        for bad in ["", "0", "x/1", "1/", "100000000/0"] {
            assert_eq!(Lsn::parse(bad), None, "{bad:?}");
        }
    }
}
