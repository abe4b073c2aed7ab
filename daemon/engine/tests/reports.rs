//! Report parsing against fixtures shaped like the real tools' output.

use std::path::PathBuf;

use liminal_engine::results::{parse_report, read_report, ParsedTest, ReportError};
use liminal_facts::TestStatus::{self, Error, Failed, Passed, Skipped};
use liminal_plan::ResultsFormat::{self, Junit, Tap};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reports")
        .join(name)
}

fn load(format: ResultsFormat, name: &str) -> Vec<ParsedTest> {
    match read_report(format, &fixture(name), 1 << 20) {
        Ok(v) => v,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn summary(v: &[ParsedTest]) -> Vec<(&str, TestStatus, u64)> {
    v.iter()
        .map(|t| (t.name.as_str(), t.status, t.duration_ms))
        .collect()
}

fn by_name<'a>(v: &'a [ParsedTest], name: &str) -> &'a ParsedTest {
    v.iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no test {name} in {:#?}", summary(v)))
}

fn malformed(format: ResultsFormat, name: &str) -> String {
    match read_report(format, &fixture(name), 1 << 20) {
        Err(ReportError::Malformed { message, .. }) => message,
        other => panic!("{name}: expected Malformed, got {other:?}"),
    }
}

// ---------------------------------------------------------------- JUnit

#[test]
fn junit_pytest() {
    let v = load(Junit, "pytest.xml");
    assert_eq!(
        summary(&v),
        vec![
            ("tests.test_math::test_add", Passed, 1),
            ("tests.test_math::test_divide[zero]", Failed, 2),
            ("tests.test_math::test_sqrt", Skipped, 0),
            ("tests.test_math::test_known_bug", Skipped, 1),
            ("tests.test_db::test_connect", Error, 3),
            ("tests.test_unicode::test_héllo_wörld", Passed, 405),
        ]
    );
    let div = &v[1];
    let msg = div.message.as_deref().unwrap();
    assert!(
        msg.starts_with("ZeroDivisionError: division by zero\na = 1, b = 0"),
        "{msg}"
    );
    assert!(
        msg.contains(">       return a / b"),
        "entities decoded: {msg}"
    );
    assert!(div
        .system_out
        .as_deref()
        .unwrap()
        .contains("dividing 1 by 0"));
    assert_eq!(
        v[2].message.as_deref(),
        Some("/src/tests/test_math.py:20: needs numpy")
    );
    assert_eq!(v[3].message.as_deref(), Some("bug #12"));
    assert!(v[4]
        .message
        .as_deref()
        .unwrap()
        .starts_with("failed on setup with \"ConnectionRefusedError"));
    assert_eq!(
        v[5].system_out.as_deref(),
        Some("printed ünïcode ✓\n\n--- system-err ---\nwarning: slow\n")
    );
}

#[test]
fn junit_pytest_legacy_bare_testsuite() {
    let v = load(Junit, "pytest-legacy.xml");
    assert_eq!(
        summary(&v),
        vec![
            ("test_sample::test_answer", Failed, 1),
            ("test_sample::test_ok", Passed, 0),
            ("test_sample.TestGroup::test_method", Passed, 0),
        ]
    );
    // A multi-line message attribute (normalised to spaces by XML) that
    // the text does not contain verbatim: both are kept.
    let m = v[0].message.as_deref().unwrap();
    assert!(m.starts_with("assert (3 + 1) == 5"), "{m}");
    assert!(m.contains("E       assert 4 == 5"), "{m}");
}

#[test]
fn junit_surefire() {
    let v = load(Junit, "surefire.xml");
    assert_eq!(
        summary(&v),
        vec![
            ("com.example.CalculatorTest::addsTwoNumbers", Passed, 12),
            ("com.example.CalculatorTest::dividesByZero", Failed, 4),
            (
                "com.example.CalculatorTest::parsesInput(String)[2]",
                Error,
                1
            ),
            // Thousands separator in `time`; a flaky first attempt does
            // not change the final (passed) status.
            ("com.example.CalculatorTest::slowSuite", Passed, 1_236_050),
            ("com.example.CalculatorTest::disabledOnLinux", Skipped, 0),
        ]
    );
    let m = v[1].message.as_deref().unwrap();
    assert!(m.starts_with("org.opentest4j.AssertionFailedError: expected: <0> but was: <1>"));
    assert!(m.contains("CalculatorTest.java:27"));
    assert_eq!(v[1].system_out.as_deref(), Some("computing 1/0\n"));
    assert_eq!(
        v[3].system_out, None,
        "flakyFailure output is not the case's"
    );
    assert_eq!(
        v[4].message.as_deref(),
        Some("Disabled on operating system: LINUX")
    );
}

#[test]
fn junit_cargo2junit() {
    let v = load(Junit, "cargo2junit.xml");
    assert_eq!(
        summary(&v),
        vec![
            ("liminal_plan::tests::parses_minimal_plan", Passed, 1),
            ("liminal_plan::tests::rejects_unknown_key", Failed, 1),
            ("liminal_plan::tests::slow_io", Skipped, 0),
            (
                "doc-tests liminal_plan::daemon/plan/src/lib.rs - Plan::parse (line 40)",
                Passed,
                412
            ),
        ]
    );
    let m = v[1].message.as_deref().unwrap();
    assert!(m.starts_with("failed\nthread 'tests::rejects_unknown_key' panicked"));
    assert!(v[1]
        .system_out
        .as_deref()
        .unwrap()
        .starts_with("---- tests::"));
    assert_eq!(v[2].message, None);
}

#[test]
fn junit_go_junit_report() {
    let v = load(Junit, "go-junit-report.xml");
    assert_eq!(
        summary(&v),
        vec![
            ("example.com/shop/cart::TestAddItem", Passed, 0),
            ("example.com/shop/cart::TestTotal/with_discount", Passed, 10),
            ("example.com/shop/cart::TestCheckout", Failed, 2),
            ("example.com/shop/pay::TestRefund", Passed, 1),
            ("example.com/shop/pay::TestLiveGateway", Skipped, 0),
        ]
    );
    assert_eq!(
        v[2].message.as_deref(),
        Some("Failed\n    cart_test.go:48: checkout: got status 500, want 200\n    cart_test.go:49: body: {\"error\":\"payment gateway unavailable\"}")
    );
    assert_eq!(
        v[4].message.as_deref(),
        Some("Skipped\n    pay_test.go:31: set PAY_LIVE=1 to run against the sandbox gateway")
    );
}

#[test]
fn junit_nested_suites() {
    let v = load(Junit, "nested.xml");
    assert_eq!(
        summary(&v),
        vec![
            ("Tests.Unit.SlugTest::testLowercases", Passed, 4),
            (
                "Tests.Unit.SlugTest::testTransliterates with data set \"german\"",
                Passed,
                6
            ),
            (
                "Tests.Unit.SlugTest::testTransliterates with data set \"greek\"",
                Failed,
                5
            ),
            // No classname: the enclosing suites' names, outermost first,
            // the empty-named one left out.
            ("Unit::smoke::boots", Passed, 7),
        ]
    );
    assert!(v[2].message.as_deref().unwrap().contains("'καλημερα'"));
}

#[test]
fn junit_empty_report_is_valid() {
    assert!(load(Junit, "empty.xml").is_empty());
}

#[test]
fn junit_truncated_is_malformed() {
    let m = malformed(Junit, "truncated.xml");
    assert!(m.contains("truncated") || m.contains("end of file"), "{m}");
    assert!(m.contains("byte"), "{m}");
}

#[test]
fn junit_not_xml_is_malformed() {
    let m = malformed(Junit, "not-xml.txt");
    assert!(
        m.contains("not an XML document") || m.contains("not XML"),
        "{m}"
    );
    // A TAP file handed to the JUnit parser is also refused.
    malformed(Junit, "prove-tap13.tap");
}

#[test]
fn junit_other_xml_is_malformed() {
    let m = malformed(Junit, "cobertura.xml");
    assert!(m.contains("<coverage>"), "{m}");
}

#[test]
fn junit_broken_xml_names_the_parser_error() {
    let e = parse_report(Junit, b"<testsuite><testcase name=\"a\"></testsuite>").unwrap_err();
    let ReportError::Malformed { format, message } = e else {
        panic!("{e:?}")
    };
    assert_eq!(format, "junit");
    assert!(message.contains("testcase"), "{message}");
}

// ---------------------------------------------------------------- TAP

#[test]
fn tap13_prove() {
    let v = load(Tap, "prove-tap13.tap");
    assert_eq!(
        summary(&v),
        vec![
            ("use Config::Tiny;", Passed, 0),
            ("reads the default file", Passed, 0),
            ("parses a quoted value", Failed, 0),
            ("handles # in keys", Passed, 0),
            ("test 5", Skipped, 0),
            ("round-trips comments", Skipped, 0),
            ("writes atomically", Passed, 0),
        ]
    );
    let m = v[2].message.as_deref().unwrap();
    assert!(m.starts_with("Failed test 'parses a quoted value'"), "{m}");
    assert!(m.contains("expected: 'a\"b'"), "{m}");
    assert_eq!(
        v[4].message.as_deref(),
        Some("no network access in the sandbox")
    );
    assert_eq!(
        v[5].message.as_deref(),
        Some("comments are dropped on write")
    );
}

#[test]
fn tap_node_test_runner_subtests() {
    let v = load(Tap, "node-test.tap");
    assert_eq!(
        summary(&v),
        vec![
            ("cart::adds an item", Passed, 1),
            ("cart::computes the total", Failed, 2),
            ("cart::applies coupons", Skipped, 0),
            ("cart", Failed, 4),
            ("health endpoint answers", Passed, 13),
        ]
    );
    let m = v[1].message.as_deref().unwrap();
    assert!(
        m.starts_with("Expected values to be strictly equal:"),
        "{m}"
    );
    assert!(m.contains("41 !== 42"), "{m}");
    assert_eq!(
        v[2].message.as_deref(),
        Some("coupons service not mocked yet")
    );
    assert_eq!(v[3].message.as_deref(), Some("1 subtest failed"));
}

#[test]
fn tap14_nested_subtests() {
    let v = load(Tap, "tap14-subtests.tap");
    assert_eq!(
        summary(&v),
        vec![
            ("parser::tokens::numbers", Passed, 0),
            ("parser::tokens::strings", Passed, 0),
            ("parser::tokens", Passed, 0),
            ("parser::precedence", Failed, 4),
            ("parser", Failed, 0),
            ("lexer", Passed, 1),
        ]
    );
    assert_eq!(v[3].message.as_deref(), Some("1 + 2 * 3 gave 9, want 7"));
}

#[test]
fn tap_bail_out_keeps_results_so_far() {
    let v = load(Tap, "bail-out.tap");
    assert_eq!(
        summary(&v),
        vec![
            ("migrations apply", Passed, 0),
            ("seed data loads", Passed, 0),
            ("connects to replica", Failed, 0),
            ("<bail out>", Error, 0),
        ]
    );
    assert_eq!(
        v[2].message.as_deref(),
        Some("could not connect to 10.0.0.7:5432")
    );
    assert_eq!(
        v[3].message.as_deref(),
        Some("replica unreachable, aborting the suite")
    );
}

#[test]
fn tap_todo_and_skip() {
    let v = load(Tap, "todo-skip.tap");
    assert_eq!(
        summary(&v),
        vec![
            ("fast path", Passed, 0),
            // A failing TODO does not fail the run.
            ("handles leap seconds", Skipped, 0),
            ("works on big-endian", Skipped, 0),
            // A passing TODO is a pass.
            ("unexpectedly fixed", Passed, 0),
        ]
    );
}

#[test]
fn tap_plan_mismatch_names_missing_tests() {
    let v = load(Tap, "plan-mismatch.tap");
    assert_eq!(v.len(), 4);
    let plan = by_name(&v, "<plan>");
    assert_eq!(plan.status, Error);
    assert_eq!(
        plan.message.as_deref(),
        Some("planned 6 tests but 3 ran: 3 missing")
    );
}

#[test]
fn tap_missing_plan_is_reported() {
    let v = load(Tap, "no-plan.tap");
    assert_eq!(v.len(), 3);
    assert!(by_name(&v, "<plan>")
        .message
        .as_deref()
        .unwrap()
        .starts_with("no plan"));
}

#[test]
fn tap_skip_all_is_empty() {
    assert!(load(Tap, "skip-all.tap").is_empty());
}

#[test]
fn tap_noise_around_the_stream_is_ignored() {
    let v = load(Tap, "with-noise.tap");
    assert_eq!(
        summary(&v),
        vec![("alpha", Passed, 0), ("beta", Failed, 250)]
    );
    assert_eq!(v[1].message.as_deref(), Some("expected 1\ngot 2"));
}

#[test]
fn tap_garbage_is_malformed() {
    malformed(Tap, "garbage.tap");
    malformed(Tap, "not-xml.txt");
    malformed(Tap, "pytest.xml");
}

// ---------------------------------------------------------------- files

#[test]
fn missing_too_large_and_symlinked_reports() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("report.xml");
    assert!(matches!(
        read_report(Junit, &p, 100),
        Err(ReportError::Missing(_))
    ));
    std::fs::write(&p, b"<testsuites/>").unwrap();
    assert!(matches!(
        read_report(Junit, &p, 5),
        Err(ReportError::TooLarge {
            size: 13,
            max: 5,
            ..
        })
    ));
    assert!(read_report(Junit, &p, 13).unwrap().is_empty());
    // A test must not make the daemon read another file through a symlink.
    let link = dir.path().join("link.xml");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    assert!(matches!(
        read_report(Junit, &link, 100),
        Err(ReportError::Unreadable { .. })
    ));
    assert!(matches!(
        read_report(Junit, dir.path(), 100),
        Err(ReportError::Unreadable { .. })
    ));
}

// ---------------------------------------------------------------- robustness

/// Every prefix of every fixture (a report cut off at any byte, as a crashed
/// writer leaves it) parses without panicking; JUnit prefixes that stop
/// before the root is closed are always Malformed.
#[test]
fn every_truncation_is_handled() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reports");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let root_closed = bytes
            .windows(b"</testsuites>".len())
            .position(|w| w == b"</testsuites>")
            .or_else(|| {
                bytes
                    .windows(b"</testsuite>".len())
                    .rposition(|w| w == b"</testsuite>")
            });
        for cut in 0..bytes.len() {
            let prefix = &bytes[..cut];
            let _ = parse_report(Tap, prefix);
            let junit = parse_report(Junit, prefix);
            if name.ends_with(".xml") && name != "empty.xml" {
                if let Some(end) = root_closed {
                    if cut <= end {
                        assert!(
                            matches!(junit, Err(ReportError::Malformed { .. })),
                            "{name} cut at {cut}: {junit:?}"
                        );
                    }
                }
            }
        }
    }
}
