//! The plan file (DESIGN.md's TOML contract), parsed and validated.
//!
//! Every error names the file, line and column of the offending key or value:
//! unknown keys are errors, not silently ignored. The validated [`Plan`] has
//! relative host paths resolved against the plan's folder, durations and sizes
//! parsed, and defaults filled in; it serializes canonically (sorted maps,
//! fixed field order) for the input digest.

mod size;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub use size::parse_size;

/// A validation error, positioned in the plan file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct PlanError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

/// Where a plan's text came from, for error messages and relative paths.
#[derive(Debug, Clone)]
pub struct PlanSource<'a> {
    /// Shown in errors; may be a pseudo-name like `<dbus>`.
    pub file: &'a Path,
    /// Folder that relative host paths resolve against.
    pub base_dir: &'a Path,
}

pub const DEFAULT_WORKDIR: &str = "/workspace";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_MEMORY: u64 = 1 << 30;
pub const DEFAULT_PIDS: u32 = 1024;
pub const DEFAULT_CPUS: u32 = 1;
/// Secrets are small by nature; bigger inputs belong in a mount.
pub const MAX_SECRET_BYTES: u64 = 1 << 20;

/// A validated plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub name: String,
    pub image: ImageRef,
    pub command: Vec<String>,
    pub workdir: String,
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub resources: Resources,
    pub network: NetworkMode,
    pub secrets: Vec<Secret>,
    pub results: Results,
    pub artifacts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageRef {
    /// A root filesystem folder on the host.
    Rootfs { path: PathBuf },
    /// An OCI image layout folder and a tag in its index.
    Oci { layout: PathBuf, tag: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub memory_bytes: u64,
    pub pids: u32,
    pub cpus: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No interfaces at all, not even loopback traffic to the host.
    None,
    /// A private loopback interface inside the sandbox.
    Loopback,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Secret {
    /// As written; the sandbox variable is `LIMINAL_SECRET_<NAME>_FD`.
    pub name: String,
    pub from: SecretSource,
}

impl Secret {
    pub fn env_var(&self) -> String {
        format!("LIMINAL_SECRET_{}_FD", self.name.to_ascii_uppercase())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum SecretSource {
    File(PathBuf),
    /// A systemd credential, read from `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
    /// A descriptor the D-Bus caller passes with StartRun.
    Fd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultsFormat {
    Junit,
    Tap,
    ExitCode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Results {
    pub format: ResultsFormat,
    /// Absolute path inside the sandbox; `None` only for `exit-code`.
    pub path: Option<String>,
}

// ---------------------------------------------------------------------------
// The file as written: every section rejects unknown keys.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    run: RunSection,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    mount: Vec<MountSection>,
    #[serde(default)]
    resources: Option<ResourcesSection>,
    #[serde(default)]
    network: Option<NetworkSection>,
    #[serde(default)]
    secret: Vec<SecretSection>,
    #[serde(default)]
    results: Option<ResultsSection>,
    #[serde(default)]
    artifacts: Option<ArtifactsSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSection {
    name: Spanned<String>,
    image: Spanned<String>,
    command: Spanned<Vec<String>>,
    workdir: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MountSection {
    source: Spanned<String>,
    target: Spanned<String>,
    #[serde(default)]
    readonly: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesSection {
    memory: Option<Spanned<String>>,
    pids: Option<Spanned<i64>>,
    cpus: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    mode: Option<NetworkMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSection {
    name: Spanned<String>,
    from: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultsSection {
    format: Option<ResultsFormat>,
    path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArtifactsSection {
    #[serde(default)]
    paths: Vec<Spanned<String>>,
}

// ---------------------------------------------------------------------------

impl Plan {
    /// Read and validate a plan file; relative paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError {
            file: path.to_owned(),
            line: 1,
            column: 1,
            message: format!("cannot read plan: {e}"),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_owned());
        Plan::parse(
            &text,
            &PlanSource {
                file: path,
                base_dir: &base,
            },
        )
    }

    /// Validate plan text.
    pub fn parse(text: &str, source: &PlanSource<'_>) -> Result<Plan, PlanError> {
        let cx = Cx { text, source };
        let file: PlanFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            cx.err_at(offset, e.message().trim_end().to_owned())
        })?;
        cx.validate(file)
    }

    /// Canonical JSON for digests: sorted maps, fixed field order.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("plans always serialize")
    }
}

struct Cx<'a> {
    text: &'a str,
    source: &'a PlanSource<'a>,
}

impl Cx<'_> {
    fn err_at(&self, offset: usize, message: impl Into<String>) -> PlanError {
        let (line, column) = line_col(self.text, offset);
        PlanError {
            file: self.source.file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    fn err<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> PlanError {
        self.err_at(spanned.span().start, message)
    }

    fn host_path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.source.base_dir.join(p)
        }
    }

    fn validate(&self, f: PlanFile) -> Result<Plan, PlanError> {
        let run = f.run;
        let name = run.name.get_ref();
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(self.err(
                &run.name,
                "run.name must be 1 to 128 characters of letters, digits, '-', '_' or '.'",
            ));
        }

        let image = self.image(&run.image)?;

        if run.command.get_ref().is_empty() {
            return Err(self.err(&run.command, "run.command must name a program"));
        }
        if run.command.get_ref().iter().any(|a| a.contains('\0')) {
            return Err(self.err(&run.command, "run.command arguments must not contain NUL"));
        }

        let workdir = match &run.workdir {
            Some(w) => self.sandbox_path(w, "run.workdir")?,
            None => DEFAULT_WORKDIR.to_owned(),
        };
        if workdir == "/" || workdir == "/tmp" {
            let w = run.workdir.as_ref().expect("defaults are neither");
            return Err(self.err(w, "run.workdir must be a folder of its own, not / or /tmp"));
        }

        let timeout = match &run.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => {
                let d = humantime::parse_duration(t.get_ref()).map_err(|e| {
                    self.err(
                        t,
                        format!("run.timeout: {e} (write it like \"90s\" or \"5m\")"),
                    )
                })?;
                if d.is_zero() {
                    return Err(self.err(t, "run.timeout must be longer than zero"));
                }
                d
            }
        };

        let mut env = BTreeMap::new();
        for (k, v) in &f.env {
            let key = k.get_ref();
            let valid = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(self.err(k, format!("env: {key:?} is not a valid variable name")));
            }
            if key.starts_with("LIMINAL_") {
                return Err(self.err(k, format!("env: {key} is reserved for the sandbox")));
            }
            if v.get_ref().contains('\0') {
                return Err(self.err(v, format!("env: {key} must not contain NUL")));
            }
            env.insert(key.clone(), v.get_ref().clone());
        }

        let mut mounts = Vec::new();
        for m in &f.mount {
            let target = self.sandbox_path(&m.target, "mount.target")?;
            if matches!(target.as_str(), "/" | "/proc" | "/sys" | "/dev") || target == workdir {
                return Err(self.err(
                    &m.target,
                    format!("mount.target {target} would hide a path the sandbox needs"),
                ));
            }
            if mounts.iter().any(|x: &Mount| x.target == target) {
                return Err(self.err(&m.target, format!("mount.target {target} is mounted twice")));
            }
            mounts.push(Mount {
                source: self.host_path(m.source.get_ref()),
                target,
                readonly: m.readonly.unwrap_or(true),
            });
        }

        let resources = self.resources(f.resources.as_ref())?;
        let network = f.network.and_then(|n| n.mode).unwrap_or(NetworkMode::None);

        let mut secrets: Vec<Secret> = Vec::new();
        for s in &f.secret {
            let name = s.name.get_ref();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(self.err(
                    &s.name,
                    "secret.name must be letters, digits and '_' (it becomes part of a variable name)",
                ));
            }
            if secrets.iter().any(|x| x.name.eq_ignore_ascii_case(name)) {
                return Err(self.err(&s.name, format!("secret {name} is declared twice")));
            }
            let from = s.from.get_ref();
            let source = if let Some(p) = from.strip_prefix("file:") {
                if p.is_empty() {
                    return Err(self.err(&s.from, "secret.from = \"file:\" needs a path"));
                }
                SecretSource::File(self.host_path(p))
            } else if let Some(c) = from.strip_prefix("credential:") {
                if c.is_empty() || c.contains('/') {
                    return Err(self.err(
                        &s.from,
                        "secret.from = \"credential:NAME\" needs a plain name",
                    ));
                }
                SecretSource::Credential(c.to_owned())
            } else if from == "fd" {
                SecretSource::Fd
            } else {
                return Err(self.err(
                    &s.from,
                    format!("secret.from {from:?}: expected \"file:PATH\", \"credential:NAME\" or \"fd\""),
                ));
            };
            secrets.push(Secret {
                name: name.clone(),
                from: source,
            });
        }

        let results = match &f.results {
            None => Results {
                format: ResultsFormat::ExitCode,
                path: None,
            },
            Some(r) => {
                let format = r.format.unwrap_or(ResultsFormat::ExitCode);
                let path = match (&r.path, format) {
                    (None, ResultsFormat::ExitCode) => None,
                    (None, _) => {
                        return Err(self.err_at(
                            self.text.find("[results]").unwrap_or(0),
                            "results.path is required for junit and tap reports",
                        ))
                    }
                    (Some(p), _) => {
                        let raw = p.get_ref();
                        let abs = if raw.starts_with('/') {
                            raw.clone()
                        } else {
                            format!("{workdir}/{raw}")
                        };
                        Some(self.normalize(p, &abs, "results.path")?)
                    }
                };
                Results { format, path }
            }
        };

        let mut artifacts = Vec::new();
        if let Some(a) = &f.artifacts {
            for g in &a.paths {
                let raw = g.get_ref();
                if raw.is_empty() || raw.starts_with('/') || raw.split('/').any(|c| c == "..") {
                    return Err(self.err(
                        g,
                        format!("artifacts.paths {raw:?} must be a glob relative to the workdir, without '..'"),
                    ));
                }
                artifacts.push(raw.clone());
            }
        }

        Ok(Plan {
            name: name.clone(),
            image,
            command: run.command.into_inner(),
            workdir,
            timeout,
            env,
            mounts,
            resources,
            network,
            secrets,
            results,
            artifacts,
        })
    }

    fn image(&self, s: &Spanned<String>) -> Result<ImageRef, PlanError> {
        let raw = s.get_ref();
        if let Some(rest) = raw.strip_prefix("oci:") {
            let Some((dir, tag)) = rest.rsplit_once(':') else {
                return Err(self.err(s, "run.image \"oci:DIR:TAG\" needs a tag after the folder"));
            };
            if dir.is_empty() || tag.is_empty() {
                return Err(self.err(s, "run.image \"oci:DIR:TAG\" needs both a folder and a tag"));
            }
            return Ok(ImageRef::Oci {
                layout: self.host_path(dir),
                tag: tag.to_owned(),
            });
        }
        if raw.is_empty() {
            return Err(self.err(s, "run.image must name a rootfs folder or \"oci:DIR:TAG\""));
        }
        Ok(ImageRef::Rootfs {
            path: self.host_path(raw),
        })
    }

    fn sandbox_path(&self, s: &Spanned<String>, what: &str) -> Result<String, PlanError> {
        if !s.get_ref().starts_with('/') {
            return Err(self.err(
                s,
                format!("{what} must be an absolute path inside the sandbox"),
            ));
        }
        self.normalize(s, s.get_ref(), what)
    }

    /// Collapse `.` and empty components; refuse `..` so a path cannot escape.
    fn normalize(&self, s: &Spanned<String>, path: &str, what: &str) -> Result<String, PlanError> {
        let mut parts = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(self.err(s, format!("{what} must not contain '..'"))),
                c => parts.push(c),
            }
        }
        Ok(format!("/{}", parts.join("/")))
    }

    fn resources(&self, r: Option<&ResourcesSection>) -> Result<Resources, PlanError> {
        let mut out = Resources {
            memory_bytes: DEFAULT_MEMORY,
            pids: DEFAULT_PIDS,
            cpus: DEFAULT_CPUS,
        };
        let Some(r) = r else { return Ok(out) };
        if let Some(m) = &r.memory {
            out.memory_bytes = parse_size(m.get_ref())
                .map_err(|e| self.err(m, format!("resources.memory: {e}")))?;
            if out.memory_bytes < 4 << 20 {
                return Err(self.err(m, "resources.memory must be at least 4M"));
            }
        }
        if let Some(p) = &r.pids {
            out.pids = u32::try_from(*p.get_ref())
                .ok()
                .filter(|p| (1..=1_000_000).contains(p))
                .ok_or_else(|| self.err(p, "resources.pids must be between 1 and 1000000"))?;
        }
        if let Some(c) = &r.cpus {
            out.cpus = u32::try_from(*c.get_ref())
                .ok()
                .filter(|c| (1..=1024).contains(c))
                .ok_or_else(|| self.err(c, "resources.cpus must be between 1 and 1024"))?;
        }
        Ok(out)
    }
}

/// 1-based line and character column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

mod duration_ms {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests;
