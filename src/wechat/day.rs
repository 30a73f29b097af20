//! WeChat's day: its daily quotas (45009) and token budgets count calls per calendar day in
//! Beijing time, and start over at midnight UTC+8.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far ahead of UTC WeChat's day is: it ends at midnight in Beijing.
pub const DAY_OFFSET: Duration = Duration::from_secs(8 * 3600);

/// When the WeChat day that `now` falls in ends: days of `day` aligned to midnight UTC+8
/// (for a day of 86,400 s, midnight in Beijing).
pub fn day_end(now: SystemTime, day: Duration) -> SystemTime {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default() + DAY_OFFSET;
    let day = day.as_nanos().max(1);
    let end = (since_epoch.as_nanos() / day + 1) * day;
    let end = Duration::from_nanos(u64::try_from(end).unwrap_or(u64::MAX));
    UNIX_EPOCH + end.saturating_sub(DAY_OFFSET)
}

/// `at` in Beijing time, as `2025-01-02T00:00:00+08:00`.
pub fn beijing_time(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + DAY_OFFSET.as_secs();
    let (days, seconds) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+08:00",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn wechats_day_ends_at_midnight_in_beijing() {
        // 2025-01-01T15:59:59Z is 23:59:59 in Beijing: the day ends a second later.
        assert_eq!(day_end(at(1_735_747_199), DAY), at(1_735_747_200));
        assert_eq!(day_end(at(1_735_747_200), DAY), at(1_735_747_200 + 86_400));
        assert_eq!(beijing_time(at(1_735_747_200)), "2025-01-02T00:00:00+08:00");
        assert_eq!(
            beijing_time(at(951_782_400 - 8 * 3600)),
            "2000-02-29T00:00:00+08:00"
        );
        // Short days for tests: aligned the same way.
        let six = Duration::from_secs(6);
        assert_eq!(day_end(at(100), six), at(102));
    }
}
