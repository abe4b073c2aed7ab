//! Captured output and `LIMINAL_SIGNALS_FD` lines into signals; secret masking.
//!
//! The runner feeds every chunk it reads from the sandbox's stdout, stderr
//! and signals pipe through a [`LineSplitter`], masks each line with a
//! [`Redactor`] built from the run's secrets, and turns lines into signal
//! facts: captured lines as `log` signals, signals-pipe lines through
//! [`parse_signal_line`].
//!
//! Masking is per line. A secret that the test prints across a line break
//! (half on one line, half on the next) is not recognised: no line holds
//! it whole. Secrets in practice are tokens without newlines; a secret that
//! itself contains a newline is masked only where it appears inside one
//! line, i.e. never. The runner should refuse or warn about such secrets.

use std::borrow::Cow;
use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use liminal_facts::SignalKind;
use serde_json::Value;

/// What every secret occurrence becomes.
pub const MASK: &[u8] = b"***";
/// Longest signals-pipe line accepted (bytes, without the newline).
pub const MAX_SIGNAL_LINE: usize = 64 * 1024;
/// Longest signal name (in characters).
pub const MAX_SIGNAL_NAME: usize = 200;

/// Replaces every occurrence of any secret by `***`.
///
/// Where secrets overlap in the text (`abcd` and `cdef` in `abcdef`), the
/// whole covered span becomes one `***`, so no part of either secret leaks
/// (a leftmost-longest replacement would print `***ef`). Two occurrences
/// side by side stay two masks; a secret inside a longer one is covered by
/// the longer one's mask (the longest match wins). Empty secrets are ignored. Short secrets
/// (under 4 bytes) are still masked: that over-masks ordinary text (a PIN
/// `123` masks every `123` in the logs), which we prefer to leaking it; the
/// runner may warn about short secrets.
#[derive(Clone)]
pub struct Redactor {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Nothing,
    Secrets(AhoCorasick),
    /// The automaton could not be built (beyond aho-corasick's size limits,
    /// megabytes of secrets): masking must not silently stop, so every
    /// non-empty line becomes `***`.
    Everything,
}

impl std::fmt::Debug for Redactor {
    // Never print the automaton: it holds the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secrets = match &self.inner {
            Inner::Nothing => 0,
            Inner::Secrets(ac) => ac.patterns_len(),
            Inner::Everything => usize::MAX,
        };
        f.debug_struct("Redactor")
            .field("secrets", &secrets)
            .finish()
    }
}

impl Redactor {
    pub fn new(secrets: &[&[u8]]) -> Self {
        let mut pats: Vec<&[u8]> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
        pats.sort_unstable();
        pats.dedup();
        if pats.is_empty() {
            return Redactor {
                inner: Inner::Nothing,
            };
        }
        // Standard match kind: overlapping search needs it; the overlapping
        // spans are merged in `redact`.
        let inner = match AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .build(&pats)
        {
            Ok(ac) => Inner::Secrets(ac),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the secret masker; masking whole lines");
                Inner::Everything
            }
        };
        Redactor { inner }
    }

    /// Whether there is no secret to mask.
    pub fn is_empty(&self) -> bool {
        matches!(self.inner, Inner::Nothing)
    }

    pub fn redact<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let ac = match &self.inner {
            Inner::Nothing => return Cow::Borrowed(bytes),
            Inner::Everything if bytes.is_empty() => return Cow::Borrowed(bytes),
            Inner::Everything => return Cow::Owned(MASK.to_vec()),
            Inner::Secrets(ac) => ac,
        };
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for m in ac.find_overlapping_iter(bytes) {
            match spans.last_mut() {
                // Overlapping (not merely adjacent): one span.
                Some(last) if m.start() < last.1 => last.1 = last.1.max(m.end()),
                _ => spans.push((m.start(), m.end())),
            }
        }
        if spans.is_empty() {
            return Cow::Borrowed(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len());
        let mut at = 0;
        for (s, e) in spans {
            out.extend_from_slice(&bytes[at..s]);
            out.extend_from_slice(MASK);
            at = e;
        }
        out.extend_from_slice(&bytes[at..]);
        Cow::Owned(out)
    }
}

/// One line written to `LIMINAL_SIGNALS_FD`.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalLine {
    pub kind: SignalKind,
    pub name: String,
    /// `null` when the line has no `value`.
    pub value: Value,
    pub attrs: BTreeMap<String, Value>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalLineError {
    #[error("signal line is empty")]
    Empty,
    #[error("signal line is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("signal line is not JSON: {0}")]
    NotJson(String),
    #[error("signal line is not a JSON object")]
    NotObject,
    #[error("signal line has no `{0}`")]
    Missing(&'static str),
    #[error("signal line has an unknown key `{0}` (allowed: kind, name, value, attrs)")]
    UnknownKey(String),
    #[error("signal `kind` must be \"event\", \"metric\" or \"log\", not {0}")]
    BadKind(String),
    #[error("signal `name` {0}")]
    BadName(&'static str),
    #[error("signal `attrs` must be a JSON object")]
    AttrsNotObject,
}

/// Parses one signals-pipe line (without its newline; a trailing `\r` or
/// spaces are fine). `kind` and `name` are required; `value` defaults to
/// `null` and `attrs` to `{}`; any other key is an error, so a typo
/// (`"atrs"`) does not silently lose data.
pub fn parse_signal_line(line: &[u8]) -> Result<SignalLine, SignalLineError> {
    if line.len() > MAX_SIGNAL_LINE {
        return Err(SignalLineError::TooLong {
            len: line.len(),
            max: MAX_SIGNAL_LINE,
        });
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(SignalLineError::Empty);
    }
    let v: Value =
        serde_json::from_slice(line).map_err(|e| SignalLineError::NotJson(e.to_string()))?;
    let Value::Object(map) = v else {
        return Err(SignalLineError::NotObject);
    };
    let mut kind = None;
    let mut name = None;
    let mut value = Value::Null;
    let mut attrs = BTreeMap::new();
    for (k, v) in map {
        match k.as_str() {
            "kind" => {
                kind = Some(match v.as_str() {
                    Some("event") => SignalKind::Event,
                    Some("metric") => SignalKind::Metric,
                    Some("log") => SignalKind::Log,
                    _ => return Err(SignalLineError::BadKind(short_json(&v))),
                })
            }
            "name" => {
                let Value::String(s) = v else {
                    return Err(SignalLineError::BadName("must be a string"));
                };
                let chars = s.chars().count();
                if chars == 0 {
                    return Err(SignalLineError::BadName("must not be empty"));
                }
                if chars > MAX_SIGNAL_NAME {
                    return Err(SignalLineError::BadName("is longer than 200 characters"));
                }
                if s.chars().any(char::is_control) {
                    return Err(SignalLineError::BadName(
                        "must not contain control characters",
                    ));
                }
                name = Some(s);
            }
            "value" => value = v,
            "attrs" => {
                let Value::Object(m) = v else {
                    return Err(SignalLineError::AttrsNotObject);
                };
                attrs = m.into_iter().collect();
            }
            _ => return Err(SignalLineError::UnknownKey(truncate_chars(&k, 64))),
        }
    }
    Ok(SignalLine {
        kind: kind.ok_or(SignalLineError::Missing("kind"))?,
        name: name.ok_or(SignalLineError::Missing("name"))?,
        value,
        attrs,
    })
}

fn truncate_chars(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn short_json(v: &Value) -> String {
    truncate_chars(&v.to_string(), 64)
}

/// A line cut from a byte stream, without its `\n` (or `\r\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub bytes: Vec<u8>,
    /// The line was longer than the limit: `bytes` holds its first
    /// `max_line` bytes and the rest (up to the newline) was dropped.
    pub truncated: bool,
}

/// Splits a byte stream into lines; a line longer than `max_line` is cut and
/// marked truncated.
///
/// An over-long line is emitted as soon as it passes the limit (so memory
/// stays bounded and a newline-less flood still shows up), then the rest of
/// it is discarded up to the next newline. A `\r` before `\n` is removed
/// and does not count towards the limit; a `\r` elsewhere is kept.
#[derive(Debug)]
pub struct LineSplitter {
    max_line: usize,
    buf: Vec<u8>,
    discarding: bool,
}

impl LineSplitter {
    /// `max_line` is in bytes; 0 is treated as 1.
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            max_line: max_line.max(1),
            buf: Vec::new(),
            discarding: false,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (segment, newline) = match memchr::memchr(b'\n', bytes) {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = &bytes[segment.len() + usize::from(newline)..];
            if !self.discarding {
                self.extend(segment, &mut out);
            }
            if newline {
                if self.discarding {
                    self.discarding = false;
                } else {
                    out.push(self.take_line());
                }
            }
        }
        out
    }

    /// The unterminated last line, if the stream did not end with a newline.
    pub fn finish(&mut self) -> Option<Line> {
        if self.discarding {
            self.discarding = false;
            return None;
        }
        if self.buf.is_empty() {
            return None;
        }
        Some(self.take_line())
    }

    /// Appends part of a line (no `\n` in it); emits it cut if too long.
    fn extend(&mut self, segment: &[u8], out: &mut Vec<Line>) {
        // Room for max_line bytes plus a possible '\r' of a "\r\n".
        let room = (self.max_line + 1).saturating_sub(self.buf.len());
        let take = room.min(segment.len());
        self.buf.extend_from_slice(&segment[..take]);
        let overflow = take < segment.len()
            || (self.buf.len() == self.max_line + 1 && self.buf.last() != Some(&b'\r'));
        if overflow {
            self.buf.truncate(self.max_line);
            out.push(Line {
                bytes: std::mem::take(&mut self.buf),
                truncated: true,
            });
            self.discarding = true;
        }
    }

    fn take_line(&mut self) -> Line {
        let mut bytes = std::mem::take(&mut self.buf);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        Line {
            bytes,
            truncated: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(secrets: &[&str], text: &str) -> String {
        let s: Vec<&[u8]> = secrets.iter().map(|s| s.as_bytes()).collect();
        String::from_utf8(Redactor::new(&s).redact(text.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn redacts_every_occurrence() {
        assert_eq!(
            r(&["hunter2"], "pw=hunter2 again hunter2"),
            "pw=*** again ***"
        );
        assert_eq!(r(&["tok"], "toktok"), "******");
        assert_eq!(r(&[], "nothing"), "nothing");
        assert_eq!(r(&[""], "nothing"), "nothing");
    }

    #[test]
    fn redact_borrows_when_clean() {
        let red = Redactor::new(&[b"secret"]);
        assert!(matches!(red.redact(b"clean line"), Cow::Borrowed(_)));
        assert!(matches!(red.redact(b"a secret"), Cow::Owned(_)));
        assert!(Redactor::new(&[]).is_empty());
    }

    #[test]
    fn overlapping_and_nested_secrets_leak_nothing() {
        // Overlap: the union is masked.
        assert_eq!(r(&["abcd", "cdef"], "xabcdefx"), "x***x");
        // One inside another: the longer wins, no fragment left.
        assert_eq!(r(&["pass", "password123"], "password1234"), "***4");
        assert_eq!(r(&["word", "password"], "my password"), "my ***");
        // Short secrets are masked too (over-masking accepted).
        assert_eq!(r(&["42"], "answer 42, 1420"), "answer ***, 1***0");
    }

    #[test]
    fn secret_across_a_line_break_is_not_caught() {
        // Documented limitation of per-line masking.
        let red = Redactor::new(&[b"topsecret"]);
        let mut sp = LineSplitter::new(100);
        let lines = sp.push(b"top\nsecret\n");
        let masked: Vec<Vec<u8>> = lines
            .iter()
            .map(|l| red.redact(&l.bytes).into_owned())
            .collect();
        assert_eq!(masked, vec![b"top".to_vec(), b"secret".to_vec()]);
    }

    #[test]
    fn redactor_debug_hides_secrets() {
        let red = Redactor::new(&[b"hunter2"]);
        assert!(!format!("{red:?}").contains("hunter2"));
    }

    #[test]
    fn signal_lines() {
        let s = parse_signal_line(
            br#"{"kind":"metric","name":"latency_ms","value":12.5,"attrs":{"route":"/a","ok":true,"n":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(s.kind, SignalKind::Metric);
        assert_eq!(s.name, "latency_ms");
        assert_eq!(s.value, json!(12.5));
        assert_eq!(s.attrs["n"], json!([1, 2]));
        let s = parse_signal_line(b"{\"kind\":\"event\",\"name\":\"db up\"}\r").unwrap();
        assert_eq!(s.value, Value::Null);
        assert!(s.attrs.is_empty());
    }

    #[test]
    fn signal_line_errors() {
        use SignalLineError::*;
        let e = |l: &str| parse_signal_line(l.as_bytes()).unwrap_err();
        assert_eq!(e(""), Empty);
        assert_eq!(e("  "), Empty);
        assert!(matches!(e("{nope"), NotJson(_)));
        assert_eq!(e("[1]"), NotObject);
        assert_eq!(e(r#"{"name":"x"}"#), Missing("kind"));
        assert_eq!(e(r#"{"kind":"log"}"#), Missing("name"));
        assert_eq!(
            e(r#"{"kind":"trace","name":"x"}"#),
            BadKind("\"trace\"".into())
        );
        assert_eq!(e(r#"{"kind":1,"name":"x"}"#), BadKind("1".into()));
        assert_eq!(
            e(r#"{"kind":"log","name":""}"#),
            BadName("must not be empty")
        );
        assert_eq!(e(r#"{"kind":"log","name":5}"#), BadName("must be a string"));
        assert_eq!(
            e(r#"{"kind":"log","name":"a\nb"}"#),
            BadName("must not contain control characters")
        );
        let long = format!(r#"{{"kind":"log","name":"{}"}}"#, "é".repeat(201));
        assert_eq!(e(&long), BadName("is longer than 200 characters"));
        let ok = format!(r#"{{"kind":"log","name":"{}"}}"#, "é".repeat(200));
        assert!(parse_signal_line(ok.as_bytes()).is_ok());
        assert_eq!(
            e(r#"{"kind":"log","name":"x","attrs":[1]}"#),
            AttrsNotObject
        );
        assert_eq!(
            e(r#"{"kind":"log","name":"x","atrs":{}}"#),
            UnknownKey("atrs".into())
        );
        let huge = vec![b' '; MAX_SIGNAL_LINE + 1];
        assert!(matches!(parse_signal_line(&huge), Err(TooLong { .. })));
    }

    fn lines(v: Vec<Line>) -> Vec<(String, bool)> {
        v.into_iter()
            .map(|l| (String::from_utf8(l.bytes).unwrap(), l.truncated))
            .collect()
    }

    #[test]
    fn splitter_basic_and_crlf() {
        let mut sp = LineSplitter::new(10);
        assert_eq!(
            lines(sp.push(b"a\nbb\r\n\nc\rd\n")),
            vec![
                ("a".into(), false),
                ("bb".into(), false),
                ("".into(), false),
                ("c\rd".into(), false)
            ]
        );
        assert_eq!(sp.finish(), None);
    }

    #[test]
    fn splitter_chunks_and_tail() {
        let mut sp = LineSplitter::new(10);
        assert!(sp.push(b"hel").is_empty());
        assert_eq!(lines(sp.push(b"lo\r")), vec![]);
        assert_eq!(lines(sp.push(b"\nwor")), vec![("hello".into(), false)]);
        assert_eq!(
            sp.finish(),
            Some(Line {
                bytes: b"wor".to_vec(),
                truncated: false
            })
        );
        assert_eq!(sp.finish(), None);
    }

    #[test]
    fn splitter_truncates_and_discards_rest() {
        let mut sp = LineSplitter::new(4);
        assert_eq!(
            lines(sp.push(b"abcdefgh\nxy\n")),
            vec![("abcd".into(), true), ("xy".into(), false)]
        );
        // Exactly max_line, with and without \r\n, split across pushes.
        assert_eq!(lines(sp.push(b"abcd\n")), vec![("abcd".into(), false)]);
        assert_eq!(lines(sp.push(b"abcd\r")), vec![]);
        assert_eq!(lines(sp.push(b"\n")), vec![("abcd".into(), false)]);
        assert_eq!(lines(sp.push(b"abcd\r")), vec![]);
        assert_eq!(
            lines(sp.push(b"e\nz\n")),
            vec![("abcd".into(), true), ("z".into(), false)]
        );
        // A flood without newline is emitted once, then dropped to the newline.
        assert_eq!(lines(sp.push(b"0123456789")), vec![("0123".into(), true)]);
        assert!(sp.push(b"more and more").is_empty());
        assert_eq!(lines(sp.push(b"tail\nok\n")), vec![("ok".into(), false)]);
        // A truncated unterminated line is not returned twice by finish.
        assert_eq!(lines(sp.push(b"123456")), vec![("1234".into(), true)]);
        assert_eq!(sp.finish(), None);
    }

    #[test]
    fn splitter_zero_limit_is_one() {
        let mut sp = LineSplitter::new(0);
        assert_eq!(lines(sp.push(b"ab\n")), vec![("a".into(), true)]);
    }
}
