use super::*;

fn parse(text: &str) -> Result<Plan, PlanError> {
    Plan::parse(
        text,
        &PlanSource {
            file: Path::new("plans/unit.toml"),
            base_dir: Path::new("/srv/project/plans"),
        },
    )
}

const FULL: &str = r#"
[run]
name = "unit-tests"
image = "images/busybox"
command = ["/bin/sh", "-c", "./run-tests.sh"]
workdir = "/workspace"
timeout = "5m"
[env]
RUST_BACKTRACE = "1"
[[mount]]
source = "../src"
target = "/src"
[resources]
memory = "512M"
pids = 256
cpus = 2
[network]
mode = "none"
[[secret]]
name = "registry_token"
from = "file:/etc/liminal/token"
[results]
format = "junit"
path = "/workspace/report.xml"
[artifacts]
paths = ["out/*.tar.gz"]
"#;

#[test]
fn design_example_parses_with_every_field() {
    let p = parse(FULL).unwrap();
    assert_eq!(p.name, "unit-tests");
    assert_eq!(
        p.image,
        ImageRef::Rootfs {
            path: "/srv/project/plans/images/busybox".into()
        }
    );
    assert_eq!(p.timeout, Duration::from_secs(300));
    assert_eq!(p.env["RUST_BACKTRACE"], "1");
    assert_eq!(p.mounts[0].source, Path::new("/srv/project/plans/../src"));
    assert!(p.mounts[0].readonly, "mounts are read-only by default");
    assert_eq!(p.resources.memory_bytes, 512 << 20);
    assert_eq!(p.resources.pids, 256);
    assert_eq!(p.resources.cpus, 2);
    assert_eq!(p.network, NetworkMode::None);
    assert_eq!(p.secrets[0].env_var(), "LIMINAL_SECRET_REGISTRY_TOKEN_FD");
    assert_eq!(
        p.secrets[0].from,
        SecretSource::File("/etc/liminal/token".into())
    );
    assert_eq!(p.results.format, ResultsFormat::Junit);
    assert_eq!(p.results.path.as_deref(), Some("/workspace/report.xml"));
    assert_eq!(p.artifacts, vec!["out/*.tar.gz"]);
}

#[test]
fn minimal_plan_gets_defaults() {
    let p = parse("[run]\nname='a'\nimage='oci:img:v1'\ncommand=['/bin/true']\n").unwrap();
    assert_eq!(p.workdir, DEFAULT_WORKDIR);
    assert_eq!(p.timeout, DEFAULT_TIMEOUT);
    assert_eq!(p.results.format, ResultsFormat::ExitCode);
    assert_eq!(
        p.image,
        ImageRef::Oci {
            layout: "/srv/project/plans/img".into(),
            tag: "v1".into()
        }
    );
}

#[test]
fn unknown_key_is_an_error_at_its_line_and_column() {
    let text = "[run]\nname = 'a'\nimage = 'x'\ncommand = ['/bin/true']\n  colour = 'red'\n";
    let e = parse(text).unwrap_err();
    assert_eq!((e.line, e.column), (5, 3), "{e}");
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    assert!(e.to_string().starts_with("plans/unit.toml:5:3: "), "{e}");
}

#[test]
fn unknown_section_is_an_error() {
    let e = parse("[run]\nname='a'\nimage='x'\ncommand=['/bin/true']\n[netwerk]\nmode='none'\n")
        .unwrap_err();
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("netwerk"), "{e}");
}

#[test]
fn bad_values_point_at_the_value() {
    let cases: &[(&str, usize, usize, &str)] = &[
        ("timeout = 'soon'", 5, 11, "run.timeout"),
        ("workdir = 'relative'", 5, 11, "absolute"),
        ("workdir = '/a/../etc'", 5, 11, "'..'"),
    ];
    for (line, l, c, needle) in cases {
        let text = format!("[run]\nname='a'\nimage='x'\ncommand=['/bin/true']\n{line}\n");
        let e = parse(&text).unwrap_err();
        assert_eq!((e.line, e.column), (*l, *c), "{line}: {e}");
        assert!(e.message.contains(needle), "{line}: {e}");
    }
}

#[test]
fn typed_errors_for_sections() {
    let base = "[run]\nname='a'\nimage='x'\ncommand=['/bin/true']\n";
    let cases: &[(&str, &str)] = &[
        ("[resources]\nmemory = '12 parsecs'", "unknown size unit"),
        ("[resources]\npids = 0", "resources.pids"),
        ("[resources]\ncpus = -1", "resources.cpus"),
        ("[network]\nmode = 'host'", "unknown variant `host`"),
        ("[[secret]]\nname = 'a-b'\nfrom = 'fd'", "secret.name"),
        (
            "[[secret]]\nname = 'tok'\nfrom = 'env:TOKEN'",
            "expected \"file:PATH\"",
        ),
        ("[results]\nformat = 'junit'", "results.path is required"),
        (
            "[artifacts]\npaths = ['../../etc/passwd']",
            "relative to the workdir",
        ),
        ("[env]\nLIMINAL_SIGNALS_FD = '9'", "reserved"),
        ("[[mount]]\nsource = '.'\ntarget = '/proc'", "would hide"),
    ];
    for (extra, needle) in cases {
        let e = parse(&format!("{base}{extra}\n")).unwrap_err();
        assert!(e.message.contains(needle), "{extra}: {e}");
        assert!(
            e.line >= 5,
            "{extra}: error should point into the section: {e}"
        );
    }
}

#[test]
fn empty_command_is_rejected() {
    let e = parse("[run]\nname='a'\nimage='x'\ncommand=[]\n").unwrap_err();
    assert_eq!(e.line, 4);
}

#[test]
fn missing_run_section_is_reported() {
    let e = parse("[env]\nA='b'\n").unwrap_err();
    assert!(e.message.contains("missing field `run`"), "{e}");
}

#[test]
fn canonical_json_is_stable_and_sensitive() {
    let a = parse(FULL).unwrap();
    let b = parse(FULL).unwrap();
    assert_eq!(a.canonical_json(), b.canonical_json());
    let c = parse(&FULL.replace("RUST_BACKTRACE = \"1\"", "RUST_BACKTRACE = \"0\"")).unwrap();
    assert_ne!(a.canonical_json(), c.canonical_json());
}

#[test]
fn relative_results_path_resolves_in_workdir() {
    let p = parse(
        "[run]\nname='a'\nimage='x'\ncommand=['/bin/true']\nworkdir='/w'\n[results]\nformat='tap'\npath='out/r.tap'\n",
    )
    .unwrap();
    assert_eq!(p.results.path.as_deref(), Some("/w/out/r.tap"));
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert!(parse_size("M").is_err());
    assert!(parse_size("99999999999999T").is_err());
}
