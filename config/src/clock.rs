//! The wall clock as every binary reads it: unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix milliseconds now: a host credential's serial.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// [`unix_now`] as the servers keep report times: 32 bits, saturating (in 2106).
pub fn unix_now_u32() -> u32 {
    u32::try_from(unix_now()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_forms_tell_the_same_second() {
        let (a, b) = (super::unix_now(), super::unix_now_u32());
        assert!(a > 1_700_000_000, "{a}");
        assert!(u64::from(b) == a || u64::from(b) == a + 1, "{a} {b}");
    }
}
