//! TAP (Test Anything Protocol) version 13 and 14 reports.
//!
//! A small parser of our own: the crates.io candidates were checked and do
//! not fit. `testanything` only writes TAP. `tap_parser` 0.1.1 (two releases
//! on one day in 2023, nothing since) knows TAP 14 only and turns `Bail out!`
//! into an error that drops the results read so far, which is exactly the
//! case a crashed test run needs. TAP's line grammar is small; the YAML
//! diagnostics blocks are handed to `yaml-rust2`.
//!
//! Rules:
//! - **Plan** `1..N` may come first or last; `1..0 # SKIP why` is a valid,
//!   empty report. When the count of test points differs from the plan, an
//!   extra result `<plan>` with status `error` says how many are missing (or
//!   extra). A stream with test points but no plan at all also gets a
//!   `<plan>` error (the producer most likely died before writing it).
//! - **Test points** `ok`/`not ok`, optional number, optional `- `, then the
//!   description (`\#` is a literal `#`). Name = the description, or
//!   `test N` when there is none. A `#` that starts no directive stays in
//!   the description, except node-tap's `# time=1.2ms` trailer, which is
//!   taken as the duration when there is no YAML one.
//! - **Directives** `# SKIP` and `# TODO` (case-insensitive, `skipped` etc.
//!   accepted as TAP 13 producers write them): SKIP → `skipped` whatever the
//!   ok/not ok. TODO follows the TAP spec: a failing TODO test does not fail
//!   the run, so `not ok … # TODO` → `skipped`, and `ok … # TODO` (it
//!   unexpectedly passes) → `passed`. The directive's reason is the message.
//! - **YAML diagnostics** (`  ---` … `  ...`, indented two spaces more than
//!   the test point): `message` (or node:test's `error`) becomes the message; `duration_ms` (a number
//!   of milliseconds) or `duration` (a number of milliseconds, or a string
//!   with an `ms`/`s` unit) becomes the duration. A block that is not valid
//!   YAML is ignored. Without a YAML message, `# ` comment lines right after
//!   a failing test point become its message.
//! - **`Bail out!`** (at any depth) stops reading: the results so far are
//!   kept, and a result `<bail out>` with status `error` carries the reason.
//!   No `<plan>` error is added after a bail out.
//! - **Subtests** (TAP 14, also node-tap's TAP 13): lines indented four more
//!   spaces, optionally introduced by `# Subtest: name` (accepted at either
//!   indentation). The subtest ends at the parent's test point, whose
//!   description (else the `# Subtest:` name) names it: children are
//!   `parent::child`, nested as deep as needed, and the parent's own test
//!   point is a result too. An indented line that is not TAP (a stack trace
//!   printed into the stream) is ignored.
//! - **Malformed**: input without a single plan, test point or bail out
//!   (an empty file, some other format) → [`ReportError::Malformed`]. Any
//!   other line that is not TAP is ignored, as the spec asks.

use yaml_rust2::{Yaml, YamlLoader};

use super::{cap_text, ParsedTest, ReportError};
use liminal_facts::TestStatus;

const FORMAT: &str = "tap";
/// Subtests nested deeper than this are not real output.
const MAX_DEPTH: usize = 64;

/// Parses a TAP stream.
pub fn parse(bytes: &[u8]) -> Result<Vec<ParsedTest>, ReportError> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<Line<'_>> = text
        .split('\n')
        .map(|l| {
            let l = l.strip_suffix('\r').unwrap_or(l);
            let body = l.trim_start_matches(' ');
            Line {
                indent: l.len() - body.len(),
                body: body.trim_end(),
            }
        })
        .collect();
    let mut p = Parser {
        lines,
        pos: 0,
        bailed: None,
        saw_tap: false,
    };
    let level = p.level(0, 0)?;
    if !p.saw_tap {
        return Err(ReportError::Malformed {
            format: FORMAT,
            message: "no TAP plan, test point or bail out found: not a TAP stream".into(),
        });
    }
    let mut out = level.tests;
    if let Some(reason) = p.bailed {
        out.push(ParsedTest {
            name: "<bail out>".into(),
            status: TestStatus::Error,
            duration_ms: 0,
            message: Some(if reason.is_empty() {
                "the test run bailed out".into()
            } else {
                reason
            }),
            system_out: None,
        });
    }
    Ok(out)
}

#[derive(Clone, Copy)]
struct Line<'a> {
    indent: usize,
    body: &'a str,
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
    bailed: Option<String>,
    saw_tap: bool,
}

struct Level {
    tests: Vec<ParsedTest>,
}

struct Plan {
    count: u64,
}

struct Point<'a> {
    ok: bool,
    /// From a `# time=…` trailer (node-tap), in milliseconds.
    time_ms: Option<u64>,
    number: Option<u64>,
    description: String,
    directive: Option<(Directive, &'a str)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Directive {
    Skip,
    Todo,
}

enum Kind<'a> {
    Version,
    Plan(Plan),
    Point(Point<'a>),
    BailOut(&'a str),
    Subtest(&'a str),
    Comment(&'a str),
    Other,
}

fn classify(body: &str) -> Kind<'_> {
    if body.starts_with("TAP version ") {
        return Kind::Version;
    }
    if let Some(rest) = body.strip_prefix("Bail out!") {
        return Kind::BailOut(rest.trim());
    }
    if let Some(rest) = body.strip_prefix('#') {
        let rest = rest.trim_start();
        if let Some(name) = rest.strip_prefix("Subtest") {
            let name = name.strip_prefix(':').unwrap_or(name).trim();
            return Kind::Subtest(name);
        }
        return Kind::Comment(rest);
    }
    if let Some(p) = parse_plan(body) {
        return Kind::Plan(p);
    }
    if let Some(p) = parse_point(body) {
        return Kind::Point(p);
    }
    Kind::Other
}

fn parse_plan(body: &str) -> Option<Plan> {
    let rest = body.strip_prefix("1..")?;
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if digits_end == 0 {
        return None;
    }
    let count = rest[..digits_end].parse().ok()?;
    let tail = rest[digits_end..].trim_start();
    if !(tail.is_empty() || tail.starts_with('#')) {
        return None;
    }
    Some(Plan { count })
}

fn parse_point(body: &str) -> Option<Point<'_>> {
    let (ok, rest) = if let Some(r) = body.strip_prefix("not ok") {
        (false, r)
    } else if let Some(r) = body.strip_prefix("ok") {
        (true, r)
    } else {
        return None;
    };
    // `ok` must be a word of its own: "okay" is not a test point.
    if !(rest.is_empty() || rest.starts_with([' ', '\t', '#'])) {
        return None;
    }
    let rest = rest.trim_start();
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let number = if digits_end > 0 {
        rest[..digits_end].parse().ok()
    } else {
        None
    };
    let rest = rest[digits_end..].trim_start();
    let rest = rest
        .strip_prefix("- ")
        .or_else(|| rest.strip_prefix('-'))
        .unwrap_or(rest);
    // The directive starts at the first unescaped '#'.
    let mut hash = None;
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'#' => {
                hash = Some(i);
                break;
            }
            _ => i += 1,
        }
    }
    let (desc, directive) = match hash {
        Some(h) => {
            let after = rest[h + 1..].trim_start();
            let lower = after.to_ascii_lowercase();
            let kind = if lower.starts_with("skip") {
                Some(Directive::Skip)
            } else if lower.starts_with("todo") {
                Some(Directive::Todo)
            } else {
                None
            };
            match kind {
                Some(k) => {
                    let word_end = after
                        .find(|c: char| c.is_whitespace())
                        .unwrap_or(after.len());
                    (&rest[..h], Some((k, after[word_end..].trim())))
                }
                // node-tap's `# time=1.2ms` trailer is a timing, not part of
                // the name.
                None if lower.starts_with("time=") => (&rest[..h], None),
                // Any other '#' is part of the description.
                None => (rest, None),
            }
        }
        None => (rest, None),
    };
    let time_ms = hash
        .map(|h| rest[h + 1..].trim_start())
        .and_then(|a| a.strip_prefix("time="))
        .and_then(|t| yaml_duration_ms(&Yaml::String(t.trim().to_string()), true));
    Some(Point {
        ok,
        time_ms,
        number,
        description: desc.trim().replace("\\#", "#").replace("\\\\", "\\"),
        directive,
    })
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.pos).copied()
    }

    /// Reads one document level (the top, or a subtest at `indent`) until a
    /// line less indented than it, the end, or a bail out.
    fn level(&mut self, indent: usize, depth: usize) -> Result<Level, ReportError> {
        if depth > MAX_DEPTH {
            return Err(ReportError::Malformed {
                format: FORMAT,
                message: format!("subtests nested deeper than {MAX_DEPTH} levels"),
            });
        }
        let mut tests: Vec<ParsedTest> = Vec::new();
        let mut plans = 0usize;
        let mut plan: Option<Plan> = None;
        let mut points = 0u64;
        // Children of a subtest waiting for the parent's test point.
        let mut pending: Option<(Option<String>, Vec<ParsedTest>)> = None;
        let mut subtest_name: Option<String> = None;
        // Index in `tests` of the last failing test point at this level,
        // which `# ` comment lines right after it describe.
        let mut last_failed: Option<usize> = None;

        while let Some(line) = self.peek() {
            if line.body.is_empty() {
                self.pos += 1;
                continue;
            }
            if line.indent < indent {
                break;
            }
            if line.indent > indent {
                // A subtest starts with a TAP line indented four more spaces.
                let child = line.indent >= indent + 4
                    && !matches!(classify(line.body), Kind::Other | Kind::Comment(_));
                if !child || pending.is_some() {
                    if child {
                        // Second subtest block without a parent point in
                        // between: fold it into the pending one.
                        let lvl = self.level(line.indent, depth + 1)?;
                        if let Some((_, kids)) = pending.as_mut() {
                            kids.extend(lvl.tests);
                        }
                        if self.bailed.is_some() {
                            break;
                        }
                    } else {
                        self.pos += 1;
                    }
                    continue;
                }
                let hint = match classify(line.body) {
                    Kind::Subtest(name) if !name.is_empty() => Some(name.to_string()),
                    _ => subtest_name.take(),
                };
                let lvl = self.level(line.indent, depth + 1)?;
                pending = Some((hint, lvl.tests));
                last_failed = None;
                if self.bailed.is_some() {
                    break;
                }
                continue;
            }
            self.pos += 1;
            match classify(line.body) {
                Kind::Version | Kind::Other => {}
                Kind::BailOut(reason) => {
                    self.saw_tap = true;
                    self.bailed = Some(reason.to_string());
                    break;
                }
                Kind::Subtest(name) => {
                    subtest_name = (!name.is_empty()).then(|| name.to_string());
                    last_failed = None;
                }
                Kind::Comment(c) => {
                    if let Some(i) = last_failed {
                        let t = &mut tests[i];
                        let m = t.message.get_or_insert_with(String::new);
                        if !m.is_empty() {
                            m.push('\n');
                        }
                        m.push_str(c);
                    }
                }
                Kind::Plan(p) => {
                    self.saw_tap = true;
                    plans += 1;
                    if plan.is_none() {
                        plan = Some(p);
                    }
                    last_failed = None;
                }
                Kind::Point(p) => {
                    self.saw_tap = true;
                    points += 1;
                    let yaml = self.yaml_block(indent + 2);
                    let mut t = point_result(&p, yaml.as_ref());
                    if let Some((hint, kids)) = pending.take() {
                        let parent = if p.description.is_empty() {
                            hint.unwrap_or_else(|| t.name.clone())
                        } else {
                            p.description.clone()
                        };
                        if p.description.is_empty() {
                            t.name = parent.clone();
                        }
                        tests.extend(kids.into_iter().map(|mut k| {
                            k.name = format!("{parent}::{}", k.name);
                            k
                        }));
                    }
                    subtest_name = None;
                    let failed = t.status == TestStatus::Failed && t.message.is_none();
                    tests.push(t);
                    last_failed = failed.then(|| tests.len() - 1);
                }
            }
        }

        // A subtest whose parent point never came (truncated or bailed out).
        if let Some((hint, kids)) = pending.take() {
            let parent = hint.unwrap_or_else(|| "<subtest>".into());
            tests.extend(kids.into_iter().map(|mut k| {
                k.name = format!("{parent}::{}", k.name);
                k
            }));
        }
        if self.bailed.is_none() {
            let problem = match (&plan, plans) {
                (_, n) if n > 1 => Some(format!("{n} plans at one level; the first was used")),
                _ => None,
            };
            let count_problem = match &plan {
                Some(p) if p.count > points => Some(format!(
                    "planned {} tests but {} ran: {} missing",
                    p.count,
                    points,
                    p.count - points
                )),
                Some(p) if p.count < points => Some(format!(
                    "planned {} tests but {} ran: {} more than planned",
                    p.count,
                    points,
                    points - p.count
                )),
                Some(_) => None,
                None if points > 0 || !tests.is_empty() => Some(format!(
                    "no plan: {points} tests ran but the stream has no `1..N` line (the producer may have died)"
                )),
                None => None,
            };
            for message in problem.into_iter().chain(count_problem) {
                tests.push(ParsedTest {
                    name: "<plan>".into(),
                    status: TestStatus::Error,
                    duration_ms: 0,
                    message: Some(message),
                    system_out: None,
                });
            }
        }
        Ok(Level { tests })
    }

    /// A YAML diagnostics block right after a test point, if there is one.
    fn yaml_block(&mut self, indent: usize) -> Option<Yaml> {
        let first = self.peek()?;
        if first.indent != indent || first.body != "---" {
            return None;
        }
        self.pos += 1;
        let mut doc = String::new();
        while let Some(line) = self.peek() {
            self.pos += 1;
            if line.indent == indent && line.body == "..." {
                break;
            }
            if !line.body.is_empty() && line.indent < indent {
                // Unterminated block: give the line back and stop.
                self.pos -= 1;
                break;
            }
            let extra = line.indent.saturating_sub(indent);
            doc.push_str(&" ".repeat(extra));
            doc.push_str(line.body);
            doc.push('\n');
        }
        match YamlLoader::load_from_str(&doc) {
            Ok(mut docs) if !docs.is_empty() => Some(docs.swap_remove(0)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a TAP YAML block that is not valid YAML");
                None
            }
        }
    }
}

fn point_result(p: &Point<'_>, yaml: Option<&Yaml>) -> ParsedTest {
    let name = if p.description.is_empty() {
        match p.number {
            Some(n) => format!("test {n}"),
            None => "test".into(),
        }
    } else {
        p.description.clone()
    };
    let (status, reason) = match p.directive {
        Some((Directive::Skip, r)) => (TestStatus::Skipped, Some(r)),
        Some((Directive::Todo, r)) if !p.ok => (TestStatus::Skipped, Some(r)),
        Some((Directive::Todo, r)) => (TestStatus::Passed, Some(r)),
        None if p.ok => (TestStatus::Passed, None),
        None => (TestStatus::Failed, None),
    };
    let mut message = reason.filter(|r| !r.is_empty()).map(str::to_string);
    let mut duration_ms = 0;
    if let Some(y) = yaml {
        // `message` is the TAP convention; node:test writes `error`.
        if let Some(m) = yaml_text(&y["message"]).or_else(|| yaml_text(&y["error"])) {
            message = Some(match message {
                Some(r) => format!("{r}\n{m}"),
                None => m,
            });
        }
        duration_ms = yaml_duration_ms(&y["duration_ms"], false)
            .or_else(|| yaml_duration_ms(&y["duration"], true))
            .or(p.time_ms)
            .unwrap_or(0);
    } else if let Some(t) = p.time_ms {
        duration_ms = t;
    }
    ParsedTest {
        name,
        status,
        duration_ms,
        message: message.map(cap_text),
        system_out: None,
    }
}

fn yaml_text(y: &Yaml) -> Option<String> {
    let s = match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        _ => return None,
    };
    let s = s.trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

/// A number is milliseconds; with `units`, a string may carry `ms`, `s` or `us`.
fn yaml_duration_ms(y: &Yaml, units: bool) -> Option<u64> {
    let ms = match y {
        Yaml::Integer(i) => *i as f64,
        Yaml::Real(s) => s.parse::<f64>().ok()?,
        Yaml::String(s) if units => {
            let s = s.trim();
            let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
                (n, 1.0)
            } else if let Some(n) = s.strip_suffix("us") {
                (n, 0.001)
            } else if let Some(n) = s.strip_suffix('s') {
                (n, 1000.0)
            } else {
                (s, 1.0)
            };
            num.trim().parse::<f64>().ok()? * scale
        }
        _ => return None,
    };
    (ms.is_finite() && ms >= 0.0).then(|| ms.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[ParsedTest]) -> Vec<(&str, TestStatus)> {
        v.iter().map(|t| (t.name.as_str(), t.status)).collect()
    }

    #[test]
    fn points_and_directives() {
        let v = parse(
            b"TAP version 13\n1..6\nok 1 - adds\nnot ok 2 divides\nok 3 # SKIP no network\nnot ok 4 - later # TODO not done\nok 5 - lucky # todo\nok\n",
        )
        .unwrap();
        assert_eq!(
            names(&v),
            vec![
                ("adds", TestStatus::Passed),
                ("divides", TestStatus::Failed),
                ("test 3", TestStatus::Skipped),
                ("later", TestStatus::Skipped),
                ("lucky", TestStatus::Passed),
                ("test", TestStatus::Passed),
            ]
        );
        assert_eq!(v[2].message.as_deref(), Some("no network"));
        assert_eq!(v[3].message.as_deref(), Some("not done"));
    }

    #[test]
    fn escaped_hash_and_non_directive_hash() {
        let v = parse(b"1..2\nok 1 - issue \\#42\nok 2 - counts # of items\n").unwrap();
        assert_eq!(v[0].name, "issue #42");
        assert_eq!(v[1].name, "counts # of items");
        assert_eq!(v[1].status, TestStatus::Passed);
    }

    #[test]
    fn plan_mismatch_and_missing_plan() {
        let v = parse(b"1..4\nok 1\nok 2\n").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].name, "<plan>");
        assert_eq!(v[2].status, TestStatus::Error);
        assert!(v[2].message.as_deref().unwrap().contains("2 missing"));
        let v = parse(b"ok 1\nok 2\n").unwrap();
        assert_eq!(v[2].name, "<plan>");
        let v = parse(b"ok 1\nok 2\n1..2\n").unwrap();
        assert_eq!(v.len(), 2);
        let v = parse(b"1..1\nok 1\nok 2\n").unwrap();
        assert!(v[2]
            .message
            .as_deref()
            .unwrap()
            .contains("1 more than planned"));
    }

    #[test]
    fn skip_all_plan_is_empty() {
        assert!(parse(b"TAP version 14\n1..0 # SKIP no database\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            &b""[..],
            b"\n\n",
            b"hello\nworld\n",
            b"<testsuite/>",
            b"okay then\n",
        ] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ReportError::Malformed { format: "tap", .. })
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn durations() {
        let v = parse(
            b"1..3\nok 1 - a\n  ---\n  duration_ms: 12.6\n  ...\nok 2 - b\n  ---\n  duration: 1.5s\n  ...\nok 3 - c\n  ---\n  duration: 40\n  ...\n",
        )
        .unwrap();
        assert_eq!(
            v.iter().map(|t| t.duration_ms).collect::<Vec<_>>(),
            [13, 1500, 40]
        );
    }

    #[test]
    fn bail_out_inside_a_subtest() {
        let v = parse(
            b"TAP version 14\n1..2\n# Subtest: db\n    1..3\n    ok 1 - connects\n    Bail out! disk full\n",
        )
        .unwrap();
        assert_eq!(
            names(&v),
            vec![
                ("db::connects", TestStatus::Passed),
                ("<bail out>", TestStatus::Error)
            ]
        );
        assert_eq!(v[1].message.as_deref(), Some("disk full"));
        let v = parse(b"Bail out!\n").unwrap();
        assert_eq!(v[0].message.as_deref(), Some("the test run bailed out"));
    }

    #[test]
    fn crlf_and_unterminated_yaml() {
        let v = parse(b"1..2\r\nnot ok 1 - a\r\n  ---\r\n  message: boom\r\nok 2 - b\r\n").unwrap();
        assert_eq!(
            names(&v),
            vec![("a", TestStatus::Failed), ("b", TestStatus::Passed)]
        );
        assert_eq!(v[0].message.as_deref(), Some("boom"));
    }

    #[test]
    fn invalid_yaml_is_ignored() {
        let v = parse(b"1..1\nnot ok 1 - a\n  ---\n  message: [unclosed\n  ...\n").unwrap();
        assert_eq!(names(&v), vec![("a", TestStatus::Failed)]);
        assert_eq!(v[0].message, None);
    }

    #[test]
    fn subtest_plan_mismatch_is_prefixed() {
        let v = parse(b"1..1\n    1..2\n    ok 1 - x\nok 1 - parent\n").unwrap();
        assert_eq!(
            names(&v),
            vec![
                ("parent::x", TestStatus::Passed),
                ("parent::<plan>", TestStatus::Error),
                ("parent", TestStatus::Passed),
            ]
        );
    }

    #[test]
    fn deep_subtests_are_bounded() {
        let mut doc = String::new();
        for d in 0..100 {
            doc.push_str(&" ".repeat(d * 4));
            doc.push_str("1..1\n");
        }
        assert!(matches!(
            parse(doc.as_bytes()),
            Err(ReportError::Malformed { .. })
        ));
    }
}
