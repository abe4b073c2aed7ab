//! Test reports (JUnit XML, TAP) into test results.
//!
//! The runner reads the report the plan names after the command exits and
//! turns each [`ParsedTest`] into a `TestResultFact`. Parsing is strict about
//! what makes a file *not a report* (not XML, truncated XML, no TAP at all:
//! [`ReportError::Malformed`]) and lenient about what real tools write (a
//! missing `time`, a comma as decimal separator, unknown elements, text
//! around the TAP stream). See [`junit`] and [`tap`] for the rules of each
//! format, including how test names are formed.

pub mod junit;
pub mod tap;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use liminal_facts::TestStatus;
use liminal_plan::ResultsFormat;

/// Messages and captured output longer than this are cut (with a marker):
/// they travel in facts over D-Bus, and a multi-megabyte stack trace in one
/// fact helps nobody. The whole report stays available as an artifact.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// One test case as the report describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTest {
    pub name: String,
    pub status: TestStatus,
    pub duration_ms: u64,
    /// Failure, error or skip message (and details), if the report had one.
    pub message: Option<String>,
    /// Output the report captured for this test (JUnit `system-out`, then
    /// `system-err` after a marker line).
    pub system_out: Option<String>,
}

impl ParsedTest {
    /// Masks secrets in everything the report said (name, message, output):
    /// the report was written by the tests, which can see the secrets.
    pub fn redacted(self, redactor: &crate::signals::Redactor) -> ParsedTest {
        let mask = |s: String| match redactor.redact(s.as_bytes()) {
            std::borrow::Cow::Borrowed(_) => s,
            std::borrow::Cow::Owned(b) => String::from_utf8_lossy(&b).into_owned(),
        };
        ParsedTest {
            name: mask(self.name),
            message: self.message.map(mask),
            system_out: self.system_out.map(mask),
            ..self
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("test report {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("test report {} is {size} bytes, over the limit of {max} bytes", path.display())]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("malformed {format} report: {message}")]
    Malformed {
        format: &'static str,
        message: String,
    },
    /// The report exists but could not be read (permissions, not a regular
    /// file, a symlink, an I/O error).
    #[error("cannot read test report {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Parses a report held in memory. `ExitCode` has no report: `Ok(vec![])`.
pub fn parse_report(format: ResultsFormat, bytes: &[u8]) -> Result<Vec<ParsedTest>, ReportError> {
    match format {
        ResultsFormat::Junit => junit::parse(bytes),
        ResultsFormat::Tap => tap::parse(bytes),
        ResultsFormat::ExitCode => Ok(Vec::new()),
    }
}

/// Reads and parses a report file of at most `max_bytes`.
///
/// The file is opened with `O_NOFOLLOW` and must be a regular file: the
/// report lives in a folder the tests wrote, and a test must not make the
/// daemon read (and echo in error messages) some other host file through a
/// symlink. Resolving the folders above it safely is the caller's job.
pub fn read_report(
    format: ResultsFormat,
    path: &Path,
    max_bytes: u64,
) -> Result<Vec<ParsedTest>, ReportError> {
    if format == ResultsFormat::ExitCode {
        return Ok(Vec::new());
    }
    let unreadable = |source| ReportError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::options()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReportError::Missing(path.to_path_buf()))
        }
        Err(e) => return Err(unreadable(e)),
    };
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    if meta.len() > max_bytes {
        return Err(ReportError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
            max: max_bytes,
        });
    }
    // Read at most max+1 bytes: the file may still grow after fstat.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReportError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            max: max_bytes,
        });
    }
    let tests = parse_report(format, &bytes)?;
    tracing::debug!(path = %path.display(), tests = tests.len(), "parsed test report");
    Ok(tests)
}

/// Cuts `s` to at most [`MAX_TEXT_BYTES`] on a char boundary, with a marker.
pub(crate) fn cap_text(mut s: String) -> String {
    if s.len() > MAX_TEXT_BYTES {
        let mut cut = MAX_TEXT_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        let dropped = s.len() - cut;
        s.truncate(cut);
        s.push_str(&format!("\n[… {dropped} bytes cut]"));
    }
    s
}

/// Seconds (as report tools write them) to whole milliseconds.
///
/// Accepts `1.5`, `1,5` (decimal comma), `1,234.5` (thousands separator, as
/// some Surefire versions write), surrounding spaces and an `s` suffix.
/// Missing, negative, non-finite or unparsable values give 0: a bad duration
/// must not discard a test's result.
pub(crate) fn seconds_to_ms(raw: Option<&str>) -> u64 {
    let Some(raw) = raw else { return 0 };
    let t = raw.trim().trim_end_matches('s').trim();
    if t.is_empty() {
        return 0;
    }
    let normalized = if t.contains('.') {
        t.replace(',', "")
    } else {
        t.replacen(',', ".", 1)
    };
    match normalized.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => (v * 1000.0).round() as u64,
        _ => {
            tracing::warn!(value = raw, "ignoring unparsable test duration");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_variants() {
        assert_eq!(seconds_to_ms(None), 0);
        assert_eq!(seconds_to_ms(Some("")), 0);
        assert_eq!(seconds_to_ms(Some("0.0015")), 2);
        assert_eq!(seconds_to_ms(Some("1.5")), 1500);
        assert_eq!(seconds_to_ms(Some("1,5")), 1500);
        assert_eq!(seconds_to_ms(Some("1,234.5")), 1_234_500);
        assert_eq!(seconds_to_ms(Some(" 3 ")), 3000);
        assert_eq!(seconds_to_ms(Some("2s")), 2000);
        assert_eq!(seconds_to_ms(Some("-1")), 0);
        assert_eq!(seconds_to_ms(Some("NaN")), 0);
        assert_eq!(seconds_to_ms(Some("soon")), 0);
    }

    #[test]
    fn cap_text_cuts_on_char_boundary() {
        let s = "é".repeat(MAX_TEXT_BYTES); // 2 bytes each
        let capped = cap_text(s);
        assert!(capped.len() < MAX_TEXT_BYTES + 64);
        assert!(capped.ends_with("bytes cut]"));
        assert_eq!(cap_text("short".into()), "short");
    }

    #[test]
    fn redacted_masks_every_text_field() {
        let r = crate::signals::Redactor::new(&[b"s3cret"]);
        let t = ParsedTest {
            name: "login with s3cret".into(),
            status: TestStatus::Failed,
            duration_ms: 3,
            message: Some("expected s3cret".into()),
            system_out: Some("token=s3cret\n".into()),
        }
        .redacted(&r);
        assert_eq!(t.name, "login with ***");
        assert_eq!(t.message.as_deref(), Some("expected ***"));
        assert_eq!(t.system_out.as_deref(), Some("token=***\n"));
        assert_eq!(t.duration_ms, 3);
    }

    #[test]
    fn exit_code_has_no_report() {
        assert!(parse_report(ResultsFormat::ExitCode, b"anything")
            .unwrap()
            .is_empty());
        let r = read_report(ResultsFormat::ExitCode, Path::new("/nonexistent"), 10).unwrap();
        assert!(r.is_empty());
    }
}
