//! Value formatting shared by the subcommands: layer sizes and revision dates, exactly as
//! pcocc prints them, so that scripts written against pcocc keep parsing our output.
//!
//! Dates go through libc's `localtime_r` (the process's `TZ`, like Python's
//! `datetime.fromtimestamp`) rather than a date crate: it is the one call we need.

/// Units above bytes, each 1024 times the previous one. pcocc stops at GB and prints an
/// empty cell from 1 TiB on; we go on so that every size has a value.
const SIZE_UNITS: [&str; 6] = ["KB", "MB", "GB", "TB", "PB", "EB"];

/// One unit step (pcocc divides by 1024, not 1000).
const UNIT_STEP: u64 = 1024;

/// Formats a byte count as pcocc's `show` does: `N Bytes` below 1 KiB, otherwise the count
/// divided down (rounding towards zero) to the largest unit that keeps it at least 1,
/// followed by `.0` — pcocc floors before formatting with one decimal, so the decimal is
/// always zero (`1900544` is `1.0 MB`).
pub fn format_size(bytes: u64) -> String {
    if bytes < UNIT_STEP {
        return format!("{bytes} Bytes");
    }
    let mut scaled = bytes / UNIT_STEP;
    let mut unit = 0;
    while scaled >= UNIT_STEP && unit + 1 < SIZE_UNITS.len() {
        scaled /= UNIT_STEP;
        unit += 1;
    }
    format!("{scaled}.0 {}", SIZE_UNITS[unit])
}

/// Microseconds per second: Python's `datetime.fromtimestamp` rounds a float timestamp to
/// whole microseconds (half to even) before it splits off the seconds, so a timestamp of
/// `x.9999999` shows as second `x + 1`. We do the same to print the same second.
const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// Formats a pcocc timestamp (float seconds since the epoch) as `%Y-%m-%d %H:%M:%S` in
/// local time. A timestamp that the C library cannot convert (absurdly far from now) is
/// printed as the number itself rather than failing the whole listing.
pub fn format_timestamp(timestamp: f64) -> String {
    match local_time(timestamp) {
        Some(tm) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            i64::from(tm.tm_year) + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        ),
        None => format!("{timestamp}"),
    }
}

/// Whole local-time fields of `timestamp`, or `None` when it is not a finite time that
/// `time_t` and `localtime_r` can represent.
fn local_time(timestamp: f64) -> Option<libc::tm> {
    let micros = (timestamp * MICROS_PER_SECOND).round_ties_even();
    // i64 microseconds cover ±292,000 years; anything outside is not a real timestamp.
    if !micros.is_finite() || micros.abs() >= i64::MAX as f64 {
        return None;
    }
    let seconds = (micros as i64).div_euclid(MICROS_PER_SECOND as i64);
    let time = libc::time_t::try_from(seconds).ok()?;
    crate::sys::local_time(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_below_one_kib_are_printed_in_bytes() {
        assert_eq!(format_size(0), "0 Bytes");
        assert_eq!(format_size(1), "1 Bytes");
        assert_eq!(format_size(1023), "1023 Bytes");
    }

    #[test]
    fn sizes_are_floored_to_the_largest_unit_like_pcocc() {
        assert_eq!(format_size(1024), "1.0 KB");
        assert_eq!(format_size(196_616), "192.0 KB");
        assert_eq!(format_size(393_216), "384.0 KB");
        assert_eq!(format_size(1_048_575), "1023.0 KB");
        assert_eq!(format_size(1_048_576), "1.0 MB");
        assert_eq!(format_size(1_900_544), "1.0 MB");
        assert_eq!(format_size(1_073_741_823), "1023.0 MB");
        assert_eq!(format_size(1 << 30), "1.0 GB");
    }

    #[test]
    fn sizes_from_one_tib_get_a_unit_where_pcocc_printed_nothing() {
        assert_eq!(format_size(1 << 40), "1.0 TB");
        assert_eq!(format_size(3 << 50), "3.0 PB");
        assert_eq!(format_size(u64::MAX), "15.0 EB");
    }

    // The tests run in one process; TZ is read by the C library once, so these tests
    // only check zone-independent properties plus UTC when the environment asks for it.
    fn utc() -> bool {
        std::env::var("TZ").is_ok_and(|tz| tz == "UTC" || tz == "UTC0")
    }

    #[test]
    fn timestamps_print_as_local_date_and_time() {
        let text = format_timestamp(1_795_749_382.404_805_2);
        assert_eq!(text.len(), "2026-11-27 03:16:22".len());
        if utc() {
            assert_eq!(text, "2026-11-27 03:16:22");
            assert_eq!(format_timestamp(1_500_000_000.5), "2017-07-14 02:40:00");
        }
    }

    #[test]
    fn timestamps_round_to_the_microsecond_before_dropping_the_fraction() {
        // Python's fromtimestamp shows 1795749382.9999999 as second ...383.
        let rounded = format_timestamp(1_795_749_382.999_999_9);
        assert_eq!(rounded, format_timestamp(1_795_749_383.0));
        assert_ne!(format_timestamp(1_795_749_382.999_999), rounded);
    }

    #[test]
    fn impossible_timestamps_print_as_numbers_instead_of_failing() {
        assert!(format_timestamp(1e300).starts_with("1000"));
        assert_eq!(format_timestamp(f64::NAN), "NaN");
    }
}
