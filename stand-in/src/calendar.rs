//! The stand-in's calendar: which calendar month a day of the daily limits falls in, for the
//! monthly budget of `clear_quota`. Days are counted from 1970-01-01 on the day's own clock
//! (see `limits.rs`), so with a short day a month is 28 to 31 short days.

/// The month (`year * 12 + month - 1`) of the date `day` days after 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub(crate) fn month_of_day(day: u128) -> i64 {
    let days = i64::try_from(day).unwrap_or(i64::MAX / 2) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    year * 12 + month - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_calendar_months() {
        // 1970-01-01 is day 0; 1970-02-01 day 31; 2000-03-01 (leap year) day 11017.
        assert_eq!(month_of_day(0), 1970 * 12);
        assert_eq!(month_of_day(30), 1970 * 12);
        assert_eq!(month_of_day(31), 1970 * 12 + 1);
        assert_eq!(month_of_day(11_016), 2000 * 12 + 1, "2000-02-29");
        assert_eq!(month_of_day(11_017), 2000 * 12 + 2, "2000-03-01");
        // 2024-12-31 is day 20088, 2025-01-01 day 20089.
        assert_eq!(month_of_day(20_088), 2024 * 12 + 11);
        assert_eq!(month_of_day(20_089), 2025 * 12);
    }
}
