//! JUnit XML reports.
//!
//! Built on `quick-xml`'s event reader rather than the `junit-parser` crate
//! (checked: 1.7, maintained, handles nested suites): `junit-parser` rejects
//! the whole report when one `time` attribute is not a plain float (a decimal
//! comma, Surefire's `1,234.5`), and its errors drop the XML parser's message
//! and position. Walking the events ourselves is a small amount of code and
//! keeps both under our control.
//!
//! Dialects covered by fixtures (`tests/fixtures/reports/`): pytest
//! (`testsuites` root, and the bare `testsuite` root of pytest < 5.1),
//! JUnit 5 / Maven Surefire, cargo2junit, go-junit-report (one suite per
//! package, `skipped` with a message), and nested suites (PHPUnit style).
//!
//! Rules:
//! - **Name**: `classname::name` when `classname` is present and not empty.
//!   Otherwise the names of the enclosing `testsuite` elements (outermost
//!   first, empty names left out) are joined with `::` in front of `name`:
//!   `suite::name`, `outer::inner::name`. The `testsuites` root's name never
//!   enters a test name. A `testcase` without a `name` is kept as
//!   `<unnamed testcase N>` (N counts test cases in the file from 1) rather
//!   than dropping the report.
//! - **Status**: `error` > `failure` > `skipped` > passed when a case holds
//!   several of them (pytest writes a failure and a teardown error on the
//!   same case). Surefire's `flakyFailure`/`rerunFailure` are ignored: the
//!   case's own status is the final one.
//! - **Message**: the element's `message` attribute, a newline, and its
//!   text (a stack trace); the text alone when its first line already
//!   contains the message (Surefire, pytest skips).
//! - **Output**: the case's `system-out`, then its `system-err` after a
//!   `--- system-err ---` line. Suite-level output is not attached to tests.
//! - **Duration**: the case's `time` in seconds (see `seconds_to_ms`).
//! - **Empty and malformed**: a `testsuites` or `testsuite` root with no test
//!   cases is a valid, empty report (`Ok(vec![])`: a test command that found
//!   nothing to run). Input that is not XML, XML that ends inside an element,
//!   or XML whose root is not `testsuites`/`testsuite` is
//!   [`ReportError::Malformed`] with the parser's message and byte offset.
//!   Several roots one after the other (concatenated reports) are all read.

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use super::{cap_text, seconds_to_ms, ParsedTest, ReportError};
use liminal_facts::TestStatus;

const FORMAT: &str = "junit";
/// Deeper nesting than this is not a real report; it would only risk the stack.
const MAX_DEPTH: usize = 64;

/// Parses a JUnit XML document.
pub fn parse(bytes: &[u8]) -> Result<Vec<ParsedTest>, ReportError> {
    let mut p = Parser {
        reader: Reader::from_reader(bytes),
        out: Vec::new(),
        cases_seen: 0,
    };
    p.reader.config_mut().check_end_names = true;
    p.document()?;
    Ok(p.out)
}

fn malformed(message: String) -> ReportError {
    ReportError::Malformed {
        format: FORMAT,
        message,
    }
}

struct Parser<'a> {
    reader: Reader<&'a [u8]>,
    out: Vec<ParsedTest>,
    cases_seen: usize,
}

/// What a `failure`, `error` or `skipped` element said.
struct Outcome {
    message: Option<String>,
}

impl<'a> Parser<'a> {
    fn next(&mut self) -> Result<Event<'a>, ReportError> {
        self.reader
            .read_event()
            .map_err(|e| malformed(format!("{e} (at byte {})", self.reader.error_position())))
    }

    fn eof_inside(&self, what: &str) -> ReportError {
        malformed(format!(
            "unexpected end of file inside <{what}> (at byte {}): the report is truncated",
            self.reader.buffer_position()
        ))
    }

    fn document(&mut self) -> Result<(), ReportError> {
        let mut roots = 0usize;
        loop {
            let (start, empty) = match self.next()? {
                Event::Start(e) => (e, false),
                Event::Empty(e) => (e, true),
                Event::Eof if roots == 0 => {
                    return Err(malformed(
                        "no root element: the file is empty or not XML".into(),
                    ))
                }
                Event::Eof => return Ok(()),
                Event::Text(t) if roots == 0 && !t.xml10_content().trim().is_empty() => {
                    return Err(malformed(format!(
                        "text before the root element (at byte {}): not an XML document",
                        self.reader.buffer_position()
                    )))
                }
                Event::CData(_) | Event::GeneralRef(_) if roots == 0 => {
                    return Err(malformed(format!(
                        "content before the root element (at byte {}): not an XML document",
                        self.reader.buffer_position()
                    )))
                }
                // Declaration, comments, doctype, processing instructions,
                // whitespace, anything after a root.
                _ => continue,
            };
            match start.name().as_ref() {
                "testsuites" | "testsuite" => {
                    roots += 1;
                    let mut path = Vec::new();
                    self.suite(&start, empty, &mut path, 0)?;
                }
                other if roots == 0 => {
                    return Err(malformed(format!(
                        "root element is <{}>, expected <testsuites> or <testsuite>",
                        other
                    )))
                }
                // Trailing elements after a report: not ours, skip them.
                _ => {
                    if !empty {
                        self.skip(&start)?;
                    }
                }
            }
        }
    }

    /// A `testsuites` or `testsuite` element and everything inside it.
    fn suite(
        &mut self,
        start: &BytesStart<'_>,
        empty: bool,
        path: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), ReportError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "test suites nested deeper than {MAX_DEPTH} levels"
            )));
        }
        let is_suite = start.name().as_ref() == "testsuite";
        let pushed = if is_suite {
            let name = self.attr(start, "name")?.unwrap_or_default();
            let name = name.trim().to_string();
            if name.is_empty() {
                false
            } else {
                path.push(name);
                true
            }
        } else {
            false
        };
        if !empty {
            let tag = if is_suite { "testsuite" } else { "testsuites" };
            loop {
                match self.next()? {
                    Event::Start(e) => match e.name().as_ref() {
                        "testsuite" => self.suite(&e, false, path, depth + 1)?,
                        "testcase" => self.case(&e, false, path)?,
                        _ => self.skip(&e)?,
                    },
                    Event::Empty(e) => match e.name().as_ref() {
                        "testsuite" => self.suite(&e, true, path, depth + 1)?,
                        "testcase" => self.case(&e, true, path)?,
                        _ => {}
                    },
                    Event::End(_) => break,
                    Event::Eof => return Err(self.eof_inside(tag)),
                    _ => {}
                }
            }
        }
        if pushed {
            path.pop();
        }
        Ok(())
    }

    fn case(
        &mut self,
        start: &BytesStart<'_>,
        empty: bool,
        path: &[String],
    ) -> Result<(), ReportError> {
        self.cases_seen += 1;
        let name = self.attr(start, "name")?.unwrap_or_default();
        let classname = self.attr(start, "classname")?.unwrap_or_default();
        let time = self.attr(start, "time")?;
        let name = if name.trim().is_empty() {
            tracing::warn!(case = self.cases_seen, "JUnit testcase without a name");
            format!("<unnamed testcase {}>", self.cases_seen)
        } else {
            name
        };
        let full_name = if !classname.trim().is_empty() {
            format!("{}::{}", classname.trim(), name)
        } else if !path.is_empty() {
            format!("{}::{}", path.join("::"), name)
        } else {
            name
        };

        let mut error: Option<Outcome> = None;
        let mut failure: Option<Outcome> = None;
        let mut skipped: Option<Outcome> = None;
        let mut out: Option<String> = None;
        let mut err: Option<String> = None;
        if !empty {
            loop {
                let (e, child_empty) = match self.next()? {
                    Event::Start(e) => (e, false),
                    Event::Empty(e) => (e, true),
                    Event::End(_) => break,
                    Event::Eof => return Err(self.eof_inside("testcase")),
                    _ => continue,
                };
                let slot = match e.name().as_ref() {
                    "failure" => Some(&mut failure),
                    "error" => Some(&mut error),
                    "skipped" => Some(&mut skipped),
                    _ => None,
                };
                if let Some(slot) = slot {
                    let message = self.attr(&e, "message")?;
                    let text = if child_empty {
                        String::new()
                    } else {
                        self.text(&e)?
                    };
                    // Keep the first of each kind; later ones are rare repeats.
                    if slot.is_none() {
                        *slot = Some(Outcome {
                            message: combine_message(message, &text),
                        });
                    }
                    continue;
                }
                match e.name().as_ref() {
                    "system-out" if !child_empty => {
                        let t = self.text(&e)?;
                        append(&mut out, t);
                    }
                    "system-err" if !child_empty => {
                        let t = self.text(&e)?;
                        append(&mut err, t);
                    }
                    _ if !child_empty => self.skip(&e)?,
                    _ => {}
                }
            }
        }

        let (status, outcome) = if let Some(o) = error {
            (TestStatus::Error, Some(o))
        } else if let Some(o) = failure {
            (TestStatus::Failed, Some(o))
        } else if let Some(o) = skipped {
            (TestStatus::Skipped, Some(o))
        } else {
            (TestStatus::Passed, None)
        };
        let system_out = match (out, err) {
            (None, None) => None,
            (Some(o), None) => Some(o),
            (None, Some(e)) => Some(format!("--- system-err ---\n{e}")),
            (Some(o), Some(e)) => Some(format!("{o}\n--- system-err ---\n{e}")),
        };
        self.out.push(ParsedTest {
            name: full_name,
            status,
            duration_ms: seconds_to_ms(time.as_deref()),
            message: outcome.and_then(|o| o.message).map(cap_text),
            system_out: system_out.map(cap_text),
        });
        Ok(())
    }

    /// The text content of an element (text, CDATA and entity references;
    /// nested elements are skipped).
    fn text(&mut self, start: &BytesStart<'_>) -> Result<String, ReportError> {
        let tag = start.name().as_ref().to_string();
        let mut s = String::new();
        loop {
            match self.next()? {
                Event::Text(t) => s.push_str(&t.xml10_content()),
                Event::CData(t) => s.push_str(&t.xml10_content()),
                Event::GeneralRef(r) => {
                    let resolved = r.resolve_char_ref().map_err(|e| {
                        malformed(format!("{e} (at byte {})", self.reader.buffer_position()))
                    })?;
                    match resolved {
                        Some(c) => s.push(c),
                        None => match quick_xml::escape::resolve_predefined_entity(&r) {
                            Some(v) => s.push_str(v),
                            // An undeclared entity: keep it as written.
                            None => {
                                s.push('&');
                                s.push_str(&r);
                                s.push(';');
                            }
                        },
                    }
                }
                Event::Start(e) => self.skip(&e)?,
                Event::End(_) => break,
                Event::Eof => return Err(self.eof_inside(&tag)),
                _ => {}
            }
        }
        Ok(s)
    }

    /// Skips an element we do not read, with everything inside it.
    fn skip(&mut self, start: &BytesStart<'_>) -> Result<(), ReportError> {
        let tag = start.name().as_ref().to_string();
        let mut depth = 0usize;
        loop {
            match self.next()? {
                Event::Start(_) => depth += 1,
                Event::End(_) if depth == 0 => return Ok(()),
                Event::End(_) => depth -= 1,
                Event::Eof => return Err(self.eof_inside(&tag)),
                _ => {}
            }
        }
    }

    fn attr(&self, e: &BytesStart<'_>, key: &str) -> Result<Option<String>, ReportError> {
        for a in e.attributes() {
            let a = a.map_err(|err| {
                malformed(format!(
                    "bad attribute in <{}>: {err} (near byte {})",
                    e.name().as_ref(),
                    self.reader.buffer_position()
                ))
            })?;
            if a.key.as_ref() == key {
                let v = a.normalized_value(XmlVersion::Implicit1_0).map_err(|err| {
                    malformed(format!(
                        "bad attribute value in <{}>: {err} (near byte {})",
                        e.name().as_ref(),
                        self.reader.buffer_position()
                    ))
                })?;
                return Ok(Some(v.into_owned()));
            }
        }
        Ok(None)
    }
}

fn append(slot: &mut Option<String>, text: String) {
    match slot {
        Some(s) => {
            s.push('\n');
            s.push_str(&text);
        }
        None => *slot = Some(text),
    }
}

fn first_line(t: &str) -> &str {
    t.lines().find(|l| !l.trim().is_empty()).unwrap_or("")
}

fn combine_message(message: Option<String>, text: &str) -> Option<String> {
    let message = message
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty());
    let text = text.trim_matches(|c| c == '\n' || c == '\r');
    let text = if text.trim().is_empty() { "" } else { text };
    match (message, text) {
        (None, "") => None,
        (Some(m), "") => Some(m),
        (None, t) => Some(t.to_string()),
        // The trace usually restates the message on its first line.
        (Some(m), t) if first_line(t).contains(&m) => Some(t.to_string()),
        (Some(m), t) => Some(format!("{m}\n{t}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(xml: &str) -> ParsedTest {
        let mut v = parse(xml.as_bytes()).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    #[test]
    fn name_rules() {
        assert_eq!(
            one(r#"<testsuite name="s"><testcase classname="a.b" name="t"/></testsuite>"#).name,
            "a.b::t"
        );
        assert_eq!(
            one(r#"<testsuite name="s"><testcase classname="" name="t"/></testsuite>"#).name,
            "s::t"
        );
        assert_eq!(
            one(r#"<testsuites name="root"><testsuite name="o"><testsuite name="i"><testcase name="t"/></testsuite></testsuite></testsuites>"#).name,
            "o::i::t"
        );
        assert_eq!(
            one(r#"<testsuites><testsuite><testcase name="t"/></testsuite></testsuites>"#).name,
            "t"
        );
        assert_eq!(
            one(r#"<testsuite name="s"><testcase classname="c"/></testsuite>"#).name,
            "c::<unnamed testcase 1>"
        );
    }

    #[test]
    fn status_precedence_and_entities() {
        let t = one(
            r#"<testsuite><testcase name="t" time="0,25"><failure message="a &lt; b">x &amp; y &#x41;</failure><error message="teardown"/></testcase></testsuite>"#,
        );
        assert_eq!(t.status, TestStatus::Error);
        assert_eq!(t.message.as_deref(), Some("teardown"));
        assert_eq!(t.duration_ms, 250);
        let t = one(
            r#"<testsuite><testcase name="t"><failure message="a &lt; b">x &amp; y &#x41;</failure></testcase></testsuite>"#,
        );
        assert_eq!(t.status, TestStatus::Failed);
        assert_eq!(t.message.as_deref(), Some("a < b\nx & y A"));
    }

    #[test]
    fn bom_and_doctype_are_fine() {
        let t = one("\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- generated -->\n<testsuites><testsuite name=\"s\"><testcase name=\"t\"/></testsuite></testsuites>\n");
        assert_eq!(t.name, "s::t");
        // Two reports concatenated: both read.
        let v = parse(b"<testsuite name=\"a\"><testcase name=\"x\"/></testsuite>\n<testsuite name=\"b\"><testcase name=\"y\"/></testsuite>").unwrap();
        assert_eq!(
            v.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a::x", "b::y"]
        );
    }

    #[test]
    fn empty_reports_are_valid() {
        assert!(parse(b"<testsuites/>").unwrap().is_empty());
        assert!(
            parse(b"<?xml version=\"1.0\"?>\n<testsuites></testsuites>\n")
                .unwrap()
                .is_empty()
        );
        assert!(parse(b"<testsuite name=\"x\" tests=\"0\"/>")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_inputs() {
        for bad in [
            &b""[..],
            b"   \n",
            b"hello world",
            b"{\"json\": true}",
            b"<html><body/></html>",
            b"<testsuite><testcase name=\"a\">",
            b"<testsuite><testcase name=\"a\"></testsuite>",
            b"<testsuite name=\"a><testcase/></testsuite>",
        ] {
            match parse(bad) {
                Err(ReportError::Malformed { format, message }) => {
                    assert_eq!(format, "junit");
                    assert!(!message.is_empty());
                }
                other => panic!("{:?} gave {other:?}", bad),
            }
        }
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let xml = format!(
            "{}{}",
            "<testsuite name=\"x\">".repeat(10_000),
            "</testsuite>".repeat(10_000)
        );
        assert!(matches!(
            parse(xml.as_bytes()),
            Err(ReportError::Malformed { .. })
        ));
    }
}
