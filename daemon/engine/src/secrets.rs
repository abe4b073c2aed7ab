//! Secrets into sealed, read-only memfds.
//!
//! Each plan secret is read once (from a file, a systemd credential, or a
//! descriptor the D-Bus caller passed), bounded by
//! [`liminal_plan::MAX_SECRET_BYTES`], and copied into a memfd that is sealed
//! against writing, growing, shrinking and further sealing, rewound and
//! close-on-exec. The sandbox helper hands that descriptor to the container.
//! Errors name the secret and what went wrong, never its bytes.

use liminal_plan::{Secret, SecretSource, MAX_SECRET_BYTES};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// How long a passed pipe may take to deliver its secret and reach EOF.
pub const PIPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One secret, ready for the sandbox.
pub struct SealedSecret {
    pub name: String,
    /// `LIMINAL_SECRET_<NAME>_FD`.
    pub env_var: String,
    /// Sealed memfd (write/grow/shrink/seal), offset 0, close-on-exec.
    pub fd: OwnedFd,
    /// The bytes, for masking them in captured output; wiped on drop.
    pub value: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("name", &self.name)
            .field("env_var", &self.env_var)
            .field("fd", &self.fd)
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .finish()
    }
}

/// Why a secret could not be loaded. Names the secret; never contains its
/// bytes.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?}: cannot open {}: {source}", path.display())]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("secret {name:?}: {what} is a {found}; expected {expected}")]
    WrongType {
        name: String,
        what: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("secret {name:?}: larger than the limit of {limit} bytes")]
    TooLarge { name: String, limit: u64 },
    #[error("secret {name:?}: cannot read: {source}")]
    Read {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("secret {name:?}: the passed pipe did not reach end of file within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
    #[error("secret {name:?} is declared `from = \"fd\"` but no descriptor was passed for it")]
    NotPassed { name: String },
    #[error("a descriptor was passed for secret {name:?}, but the plan declares no `fd` secret of that name")]
    Undeclared { name: String },
    #[error("secret {name:?}: no credentials directory (CREDENTIALS_DIRECTORY is not set)")]
    NoCredentialsDir { name: String },
    #[error("secret {name:?}: invalid credential name {credential:?}")]
    BadCredentialName { name: String, credential: String },
    #[error("secret {name:?}: cannot make a sealed memfd: {source}")]
    Memfd {
        name: String,
        #[source]
        source: io::Error,
    },
}

impl SecretError {
    /// The secret (or passed descriptor) the error is about.
    pub fn secret_name(&self) -> &str {
        match self {
            SecretError::Open { name, .. }
            | SecretError::WrongType { name, .. }
            | SecretError::TooLarge { name, .. }
            | SecretError::Read { name, .. }
            | SecretError::Timeout { name, .. }
            | SecretError::NotPassed { name }
            | SecretError::Undeclared { name }
            | SecretError::NoCredentialsDir { name }
            | SecretError::BadCredentialName { name, .. }
            | SecretError::Memfd { name, .. } => name,
        }
    }
}

fn kind_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_fifo() {
        "pipe"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// A zeroed buffer of the maximum size plus one, allocated once so reading
/// never reallocates (a reallocation would leave an unwiped copy behind).
fn bounded_buffer() -> Zeroizing<Vec<u8>> {
    Zeroizing::new(vec![0u8; MAX_SECRET_BYTES as usize + 1])
}

/// Reads a regular file (or memfd) from offset 0, at most the limit.
fn read_regular(name: &str, file: &File) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let mut buf = bounded_buffer();
    let mut len = 0usize;
    loop {
        if len == buf.len() {
            return Err(SecretError::TooLarge {
                name: name.to_owned(),
                limit: MAX_SECRET_BYTES,
            });
        }
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SecretError::Read {
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Reads a pipe to end of file, bounded in size and in time.
fn read_pipe(name: &str, mut file: File) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let deadline = Instant::now() + PIPE_TIMEOUT;
    let mut buf = bounded_buffer();
    let mut len = 0usize;
    loop {
        if len == buf.len() {
            return Err(SecretError::TooLarge {
                name: name.to_owned(),
                limit: MAX_SECRET_BYTES,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = || SecretError::Timeout {
            name: name.to_owned(),
            timeout: PIPE_TIMEOUT,
        };
        if left.is_zero() {
            return Err(timeout());
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Err(timeout()),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(SecretError::Read {
                    name: name.to_owned(),
                    source: e.into(),
                })
            }
        }
        // Readable or hung up: read does not block now.
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(SecretError::Read {
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Opens a host file without blocking on a FIFO and insists it is regular.
fn read_host_file(name: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags::O_NONBLOCK | libc_flags::O_NOCTTY)
        .open(path)
        .map_err(|source| SecretError::Open {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        })?;
    let md = file.metadata().map_err(|source| SecretError::Read {
        name: name.to_owned(),
        source,
    })?;
    if !md.file_type().is_file() {
        return Err(SecretError::WrongType {
            name: name.to_owned(),
            what: path.display().to_string(),
            found: kind_name(&md.file_type()),
            expected: "a regular file",
        });
    }
    read_regular(name, &file)
}

/// `O_*` flags without a libc dependency of our own.
mod libc_flags {
    pub const O_NONBLOCK: i32 = nix::fcntl::OFlag::O_NONBLOCK.bits();
    pub const O_NOCTTY: i32 = nix::fcntl::OFlag::O_NOCTTY.bits();
}

/// Reads a descriptor the caller passed: regular file, memfd or pipe only.
fn read_passed(name: &str, fd: OwnedFd) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let file = File::from(fd);
    let md = file.metadata().map_err(|source| SecretError::Read {
        name: name.to_owned(),
        source,
    })?;
    let ft = md.file_type();
    if ft.is_file() {
        // memfds are regular files too.
        read_regular(name, &file)
    } else if ft.is_fifo() {
        read_pipe(name, file)
    } else {
        Err(SecretError::WrongType {
            name: name.to_owned(),
            what: "the passed descriptor".to_owned(),
            found: kind_name(&ft),
            expected: "a regular file, memfd or pipe",
        })
    }
}

/// Copies bytes into a new memfd, seals it and rewinds it.
fn seal(name: &str, bytes: &[u8]) -> Result<OwnedFd, SecretError> {
    let err = |source: io::Error| SecretError::Memfd {
        name: name.to_owned(),
        source,
    };
    // The memfd name shows in /proc/PID/fd; only the secret's name goes there.
    // memfd names are limited to 249 bytes.
    let short: String = name.chars().filter(|c| *c != '\0').take(64).collect();
    let label =
        CString::new(format!("liminal-secret:{short}")).map_err(|e| err(io::Error::other(e)))?;
    let fd = memfd_create(
        &label,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| err(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(err)?;
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|e| err(e.into()))?;
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    Ok(OwnedFd::from(file))
}

fn credential_path(
    name: &str,
    credential: &str,
    credentials_dir: Option<&Path>,
) -> Result<PathBuf, SecretError> {
    // A credential name is one path component (systemd's own rule).
    if credential.is_empty()
        || credential == "."
        || credential == ".."
        || credential.contains('/')
        || credential.contains('\0')
    {
        return Err(SecretError::BadCredentialName {
            name: name.to_owned(),
            credential: credential.to_owned(),
        });
    }
    let dir = match credentials_dir {
        Some(d) => d.to_owned(),
        None => std::env::var_os("CREDENTIALS_DIRECTORY")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| SecretError::NoCredentialsDir {
                name: name.to_owned(),
            })?,
    };
    Ok(dir.join(credential))
}

/// Reads each plan secret (file:, credential: from `$CREDENTIALS_DIRECTORY`
/// or the given dir, fd: from `passed`), checks passed fds (regular file,
/// memfd or pipe; at most [`MAX_SECRET_BYTES`]), copies each into a sealed
/// (write/grow/shrink/seal) memfd, rewound, close-on-exec.
///
/// A passed descriptor the plan does not declare as an `fd` secret is an
/// error, and so is an `fd` secret without a passed descriptor.
pub fn load(
    secrets: &[Secret],
    mut passed: BTreeMap<String, OwnedFd>,
    credentials_dir: Option<&Path>,
) -> Result<Vec<SealedSecret>, SecretError> {
    if let Some(extra) = passed.keys().find(|k| {
        !secrets
            .iter()
            .any(|s| &s.name == *k && matches!(s.from, SecretSource::Fd))
    }) {
        return Err(SecretError::Undeclared {
            name: extra.clone(),
        });
    }
    let mut out = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let name = secret.name.as_str();
        let _span = tracing::debug_span!("secret", name).entered();
        let value = match &secret.from {
            SecretSource::File(path) => read_host_file(name, path)?,
            SecretSource::Credential(cred) => {
                read_host_file(name, &credential_path(name, cred, credentials_dir)?)?
            }
            SecretSource::Fd => {
                let fd = passed.remove(name).ok_or_else(|| SecretError::NotPassed {
                    name: name.to_owned(),
                })?;
                read_passed(name, fd)?
            }
        };
        let fd = seal(name, &value)?;
        tracing::debug!(bytes = value.len(), "secret sealed");
        out.push(SealedSecret {
            name: secret.name.clone(),
            env_var: secret.env_var(),
            fd,
            value,
        });
    }
    Ok(out)
}
