//! Timestamps: microseconds since the Unix epoch, UTC, written as RFC 3339.
//!
//! Microseconds because that is PostgreSQL's `timestamptz` resolution: a
//! value survives a round trip through the database unchanged.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

#[derive(Debug, thiserror::Error)]
#[error("invalid timestamp {text:?}: {reason}")]
pub struct TimestampError {
    text: String,
    reason: String,
}

impl Timestamp {
    pub const fn from_unix_micros(us: i64) -> Self {
        Timestamp(us)
    }

    pub const fn unix_micros(self) -> i64 {
        self.0
    }

    /// Microseconds since 2000-01-01 UTC: PostgreSQL's internal `TimestampTz`.
    pub const fn pg_micros(self) -> i64 {
        self.0 - 946_684_800_000_000
    }

    pub fn now() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(now.as_micros() as i64)
    }

    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        let dt = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| TimestampError {
            text: text.to_owned(),
            reason: e.to_string(),
        })?;
        let us = dt.unix_timestamp_nanos() / 1_000;
        i64::try_from(us)
            .map(Timestamp)
            .map_err(|_| TimestampError {
                text: text.to_owned(),
                reason: "out of range".into(),
            })
    }

    pub fn to_rfc3339(self) -> String {
        let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let secs = dt.unix_timestamp();
        let base = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let micros = self.0.rem_euclid(1_000_000);
        let whole = base
            .format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]"
            ))
            .unwrap_or_default();
        format!("{whole}.{micros:06}Z")
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_at_microsecond_resolution() {
        let t = Timestamp::from_unix_micros(1_763_800_000_000_001);
        let s = t.to_rfc3339();
        assert_eq!(s, "2025-11-22T08:26:40.000001Z");
        assert_eq!(Timestamp::parse(&s).unwrap(), t);
    }

    #[test]
    fn offsets_are_normalised_to_utc() {
        let t = Timestamp::parse("2025-11-22T10:26:40.5+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-11-22T08:26:40.500000Z");
    }

    #[test]
    fn pg_epoch_offset() {
        assert_eq!(
            Timestamp::parse("2000-01-01T00:00:00Z")
                .unwrap()
                .pg_micros(),
            0
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Timestamp::parse("yesterday").is_err());
    }
}
