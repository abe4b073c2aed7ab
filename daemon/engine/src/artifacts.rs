//! Artifacts: globbing the workdir, BLAKE3 hashing, the content-addressed store.
//!
//! After a run the runner calls [`collect`] with the plan's artifact globs;
//! every matching regular file is stored in the [`Cas`] under its BLAKE3
//! digest and becomes an `ArtifactFact` (path relative to the workdir,
//! digest, size). Bulk bytes never travel on D-Bus: only digests do.

use std::fs::{self, File};
use std::io::{self, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Files at least this large are hashed memory-mapped on all cores
/// (`Hasher::update_rayon`), smaller ones with plain reads on one thread.
/// Measured with `examples/hash_file.rs --threshold-scan` on the 2-core
/// build machine, three scans under heavy load from parallel builds (see
/// `benches/hashing/README.md`): at 1 MiB and below the mapping and thread
/// hand-off cost more than they save (0.84–0.97x), from 2 MiB on the
/// parallel path wins (1.09–1.11x at 2 MiB, up to 1.96x at 4 MiB).
pub const MMAP_THRESHOLD: u64 = 2 << 20;

/// Temporary files older than this in `<root>/tmp` are leftovers of a crash.
const STALE_TMP: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot open the content store at {}: {source}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error("cannot write {} into the content store: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("workdir {} cannot be used: {source}", path.display())]
    Workdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact glob {glob:?} must be relative to the workdir and must not contain `..`")]
    GlobEscapes { glob: String },
    #[error("invalid artifact glob {glob:?}: {message}")]
    BadGlob { glob: String, message: String },
    #[error("cannot list {}: {source}", path.display())]
    Walk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// BLAKE3 of a file and its length.
///
/// Large files are memory-mapped and hashed on the rayon pool, as `b3sum`
/// does. As with `b3sum`, a file that another process truncates while it is
/// mapped raises SIGBUS: use it on files nobody else can write. [`Cas`]
/// and [`collect`] hash their own private copy for that reason.
pub fn hash_file(path: &Path) -> io::Result<(blake3::Hash, u64)> {
    let file = File::open(path)?;
    hash_open_file(&file)
}

fn hash_open_file(file: &File) -> io::Result<(blake3::Hash, u64)> {
    let len = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        // SAFETY: the mapping is read-only and private to this call. The
        // remaining hazard (the file shrinking underneath) is the one
        // documented above; its contents changing only changes the digest.
        let map = unsafe { memmap2::Mmap::map(file)? };
        hasher.update_rayon(&map);
    } else {
        let mut reader = file;
        // Hash the whole file wherever its cursor is (pipes cannot seek).
        if reader.stream_position().is_ok_and(|p| p != 0) {
            reader.rewind()?;
        }
        hasher.update_reader(&mut reader)?;
    }
    Ok((hasher.finalize(), hasher.count()))
}

/// A content-addressed store: `root/<first 2 hex>/<64 hex>`, BLAKE3 keys.
///
/// Objects are written to `root/tmp`, fsynced, made read-only and renamed
/// into place without replacing (`renameat2(RENAME_NOREPLACE)`): an existing
/// object is never rewritten, and two processes storing the same content at
/// once both succeed with one object on disk.
#[derive(Debug, Clone)]
pub struct Cas {
    root: PathBuf,
}

impl Cas {
    pub fn open(root: &Path) -> Result<Self, ArtifactError> {
        let store = |source| ArtifactError::Store {
            path: root.to_path_buf(),
            source,
        };
        fs::create_dir_all(root.join("tmp")).map_err(store)?;
        let cas = Cas {
            root: root.to_path_buf(),
        };
        cas.sweep_tmp();
        Ok(cas)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the object with this digest (plain lowercase hex) lives.
    pub fn path_of(&self, blake3_hex: &str) -> PathBuf {
        let shard = blake3_hex.get(..2).unwrap_or(blake3_hex);
        self.root.join(shard).join(blake3_hex)
    }

    /// Whether the object is present.
    pub fn contains(&self, blake3_hex: &str) -> bool {
        fs::symlink_metadata(self.path_of(blake3_hex)).is_ok()
    }

    /// Stores a file's content; returns (hex digest, size). Follows a
    /// symlink given as `path` (the caller chose it); see [`collect`] for
    /// untrusted trees. The file is copied into the store's `tmp` folder
    /// first and the private copy is hashed (never the source mapped).
    pub fn put_file(&self, path: &Path) -> Result<(String, u64), ArtifactError> {
        let file = File::open(path).map_err(|source| ArtifactError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.put_open_file(file, path)
    }

    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(String, u64), ArtifactError> {
        let hex = blake3::hash(bytes).to_hex().to_string();
        if self.contains(&hex) {
            return Ok((hex, bytes.len() as u64));
        }
        let write = |source| ArtifactError::Write {
            path: PathBuf::from("<bytes>"),
            source,
        };
        let mut tmp = self.temp().map_err(write)?;
        tmp.write_all(bytes).map_err(write)?;
        self.commit(tmp, &hex).map_err(write)?;
        Ok((hex, bytes.len() as u64))
    }

    fn put_open_file(&self, mut file: File, path: &Path) -> Result<(String, u64), ArtifactError> {
        let read = |source| ArtifactError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(ArtifactError::NotRegular {
                path: path.to_path_buf(),
            });
        }
        let write = |source| ArtifactError::Write {
            path: path.to_path_buf(),
            source,
        };
        // Copy first, then hash our private copy: the source lives in a tree
        // the tests wrote, and mapping a file someone else can truncate
        // would let them SIGBUS the daemon. The copy cannot change under us,
        // so the object's name always matches its bytes. (copy_file_range
        // underneath: the kernel copies, or reflinks where it can.)
        let mut tmp = self.temp().map_err(write)?;
        io::copy(&mut file, tmp.as_file_mut()).map_err(read)?;
        let (hash, len) = hash_open_file(tmp.as_file()).map_err(write)?;
        let hex = hash.to_hex().to_string();
        if !self.contains(&hex) {
            self.commit(tmp, &hex).map_err(write)?;
        }
        Ok((hex, len))
    }

    fn temp(&self) -> io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(".obj-")
            .tempfile_in(self.root.join("tmp"))
    }

    /// fsync, read-only, rename into place unless the object exists.
    fn commit(&self, tmp: tempfile::NamedTempFile, hex: &str) -> io::Result<()> {
        tmp.as_file().sync_all()?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o444))?;
        let dest = self.path_of(hex);
        let shard = dest.parent().unwrap_or(&self.root).to_path_buf();
        let new_shard = match fs::create_dir(&shard) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        match tmp.persist_noclobber(&dest) {
            Ok(_) => {}
            // Someone stored the same content first: theirs stays.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e.error),
        }
        // Make the rename (and a new shard folder) durable.
        File::open(&shard)?.sync_all()?;
        if new_shard {
            File::open(&self.root)?.sync_all()?;
        }
        Ok(())
    }

    fn sweep_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        let now = SystemTime::now();
        for e in entries.flatten() {
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if stale {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// One stored artifact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CollectedArtifact {
    /// Relative to the workdir, `/`-separated.
    pub path: String,
    /// Plain lowercase hex.
    pub blake3: String,
    pub size: u64,
}

/// Stores every regular file under `workdir_host` that one of `globs`
/// matches (relative to the workdir; `*` stays within one folder, `**`
/// crosses folders) and returns them sorted by path, each once.
///
/// The tree was written by the tests, so it is walked without following
/// symlinks: a symlink that matches a glob is stored only when its target
/// resolves to a regular file inside the workdir (its content, under the
/// link's path); one that leads out of the workdir, dangles or names a
/// folder is skipped with a warning. Folders reached only through a symlink
/// are not searched. Files whose names are not UTF-8 are skipped with a
/// warning (paths travel as strings). No match is an empty list.
pub fn collect(
    workdir_host: &Path,
    globs: &[String],
    cas: &Cas,
) -> Result<Vec<CollectedArtifact>, ArtifactError> {
    if globs.is_empty() {
        return Ok(Vec::new());
    }
    let set = build_globs(globs)?;
    let root = fs::canonicalize(workdir_host).map_err(|source| ArtifactError::Workdir {
        path: workdir_host.to_path_buf(),
        source,
    })?;
    let meta = fs::metadata(&root).map_err(|source| ArtifactError::Workdir {
        path: root.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ArtifactError::Workdir {
            path: root,
            source: io::Error::other("not a folder"),
        });
    }

    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(&root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e.path().map_or_else(|| root.clone(), Path::to_path_buf);
            ArtifactError::Walk {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("filesystem loop")),
            }
        })?;
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(&root) else {
            continue;
        };
        let Some(rel_str) = rel.to_str() else {
            tracing::warn!(path = %rel.display(), "skipping an artifact whose name is not UTF-8");
            continue;
        };
        if !set.is_match(rel) {
            continue;
        }
        let source = if ft.is_file() {
            entry.path().to_path_buf()
        } else if ft.is_symlink() {
            match resolve_inside(&root, entry.path()) {
                Some(p) => p,
                None => {
                    tracing::warn!(
                        path = rel_str,
                        "skipping an artifact symlink that leaves the workdir, dangles or is not a file"
                    );
                    continue;
                }
            }
        } else {
            // Sockets, fifos, devices: not artifacts.
            continue;
        };
        // O_NOFOLLOW: `source` has no symlink left in it; if one appeared
        // since, refuse rather than follow it.
        let file = File::options()
            .read(true)
            .custom_flags(
                nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits(),
            )
            .open(&source)
            .map_err(|source| ArtifactError::Read {
                path: entry.path().to_path_buf(),
                source,
            })?;
        let (blake3, size) = cas.put_open_file(file, entry.path())?;
        tracing::debug!(path = rel_str, %blake3, size, "stored artifact");
        out.push(CollectedArtifact {
            path: rel_str.to_string(),
            blake3,
            size,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
}

/// The symlink's final target if it is a regular file inside `root`.
fn resolve_inside(root: &Path, link: &Path) -> Option<PathBuf> {
    let target = fs::canonicalize(link).ok()?;
    if !target.starts_with(root) {
        return None;
    }
    fs::symlink_metadata(&target)
        .ok()
        .filter(|m| m.is_file())
        .map(|_| target)
}

fn build_globs(globs: &[String]) -> Result<GlobSet, ArtifactError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let trimmed = g.strip_prefix("./").unwrap_or(g);
        let p = Path::new(trimmed);
        if trimmed.is_empty()
            || p.is_absolute()
            || p.components().any(|c| matches!(c, Component::ParentDir))
        {
            return Err(ArtifactError::GlobEscapes { glob: g.clone() });
        }
        let glob = GlobBuilder::new(trimmed)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| ArtifactError::BadGlob {
                glob: g.clone(),
                message: e.kind().to_string(),
            })?;
        b.add(glob);
    }
    b.build().map_err(|e| ArtifactError::BadGlob {
        glob: globs.join(", "),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_reference_on_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        for size in [
            0usize,
            1,
            1000,
            MMAP_THRESHOLD as usize - 1,
            MMAP_THRESHOLD as usize,
            3 << 20,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join(format!("f{size}"));
            fs::write(&p, &data).unwrap();
            let (h, n) = hash_file(&p).unwrap();
            assert_eq!(n, size as u64);
            assert_eq!(h, blake3::hash(&data), "size {size}");
        }
    }

    #[test]
    fn path_of_shards() {
        let cas = Cas { root: "/r".into() };
        assert_eq!(cas.path_of("abcdef"), Path::new("/r/ab/abcdef"));
    }

    #[test]
    fn globs_are_checked() {
        for bad in ["/etc/*", "../x", "a/../../b", ""] {
            assert!(matches!(
                build_globs(&[bad.to_string()]),
                Err(ArtifactError::GlobEscapes { .. })
            ));
        }
        assert!(matches!(
            build_globs(&["a/[".to_string()]),
            Err(ArtifactError::BadGlob { .. })
        ));
        let s = build_globs(&["out/*.tar.gz".to_string(), "./logs/**/*.log".to_string()]).unwrap();
        assert!(s.is_match("out/a.tar.gz"));
        assert!(!s.is_match("out/sub/a.tar.gz"));
        assert!(s.is_match("logs/a.log"));
        assert!(s.is_match("logs/x/y/a.log"));
    }

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("work");
        fs::create_dir_all(w.join("out/sub")).unwrap();
        fs::create_dir_all(w.join("logs/a/b")).unwrap();
        fs::write(w.join("out/app.tar.gz"), b"tarball").unwrap();
        fs::write(w.join("out/b.tar.gz"), b"tarball").unwrap(); // same content
        fs::write(w.join("out/sub/deep.tar.gz"), b"deep").unwrap();
        fs::write(w.join("out/readme.txt"), b"text").unwrap();
        fs::write(w.join("logs/top.log"), b"top").unwrap();
        fs::write(w.join("logs/a/b/inner.log"), b"inner").unwrap();
        d
    }

    fn paths(v: &[CollectedArtifact]) -> Vec<&str> {
        v.iter().map(|a| a.path.as_str()).collect()
    }

    #[test]
    fn cas_put_bytes_and_file() {
        let d = tempfile::tempdir().unwrap();
        let cas = Cas::open(&d.path().join("cas")).unwrap();
        let (hex, n) = cas.put_bytes(b"hello").unwrap();
        assert_eq!(hex, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(n, 5);
        let obj = cas.path_of(&hex);
        assert_eq!(obj, d.path().join("cas").join(&hex[..2]).join(&hex));
        assert_eq!(fs::read(&obj).unwrap(), b"hello");
        assert_eq!(
            fs::metadata(&obj).unwrap().permissions().mode() & 0o777,
            0o444
        );

        // Storing it again does not rewrite the object.
        let before = fs::metadata(&obj).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let f = d.path().join("same.txt");
        fs::write(&f, b"hello").unwrap();
        assert_eq!(cas.put_file(&f).unwrap(), (hex.clone(), 5));
        assert_eq!(fs::metadata(&obj).unwrap().modified().unwrap(), before);

        // A large file goes through the mapped path.
        let big: Vec<u8> = (0..(MMAP_THRESHOLD as usize * 3))
            .map(|i| (i % 253) as u8)
            .collect();
        let bf = d.path().join("big.bin");
        fs::write(&bf, &big).unwrap();
        let (bhex, bn) = cas.put_file(&bf).unwrap();
        assert_eq!(bhex, blake3::hash(&big).to_hex().as_str());
        assert_eq!(bn, big.len() as u64);
        assert_eq!(fs::read(cas.path_of(&bhex)).unwrap(), big);

        assert!(matches!(
            cas.put_file(d.path()),
            Err(ArtifactError::NotRegular { .. })
        ));
        assert!(matches!(
            cas.put_file(&d.path().join("nope")),
            Err(ArtifactError::Read { .. })
        ));
        assert_eq!(fs::read_dir(cas.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn cas_concurrent_puts_of_the_same_content() {
        let d = tempfile::tempdir().unwrap();
        let cas = Cas::open(d.path()).unwrap();
        let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 241) as u8).collect();
        let src = d.path().join("src.bin");
        fs::write(&src, &data).unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let (cas, src, data) = (&cas, &src, &data);
                    s.spawn(move || {
                        if i % 2 == 0 {
                            cas.put_file(src)
                        } else {
                            cas.put_bytes(data)
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = blake3::hash(&data).to_hex().to_string();
        for r in results {
            assert_eq!(r.unwrap(), (want.clone(), data.len() as u64));
        }
        assert_eq!(fs::read(cas.path_of(&want)).unwrap(), data);
        let shard = cas.path_of(&want).parent().unwrap().to_path_buf();
        assert_eq!(fs::read_dir(shard).unwrap().count(), 1);
        assert_eq!(fs::read_dir(cas.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn collect_globs_nested_sorted_deduplicated() {
        let d = tree();
        let cas = Cas::open(&d.path().join("cas")).unwrap();
        let w = d.path().join("work");
        let v = collect(
            &w,
            &[
                "out/*.tar.gz".into(),
                "**/*.log".into(),
                "out/app.tar.gz".into(),
            ],
            &cas,
        )
        .unwrap();
        assert_eq!(
            paths(&v),
            [
                "logs/a/b/inner.log",
                "logs/top.log",
                "out/app.tar.gz",
                "out/b.tar.gz"
            ]
        );
        assert_eq!(v[2].blake3, v[3].blake3);
        assert_eq!(v[2].size, 7);
        for a in &v {
            assert_eq!(
                fs::read(cas.path_of(&a.blake3)).unwrap(),
                fs::read(w.join(&a.path)).unwrap()
            );
        }
        let v = collect(&w, &["out/**/*.tar.gz".into()], &cas).unwrap();
        assert_eq!(
            paths(&v),
            ["out/app.tar.gz", "out/b.tar.gz", "out/sub/deep.tar.gz"]
        );
        // No match, no globs: empty.
        assert!(collect(&w, &["*.zip".into()], &cas).unwrap().is_empty());
        assert!(collect(&w, &[], &cas).unwrap().is_empty());
        // A folder matching a glob is not an artifact.
        assert!(collect(&w, &["out/sub".into()], &cas).unwrap().is_empty());
    }

    #[test]
    fn collect_never_follows_symlinks_out_of_the_workdir() {
        let d = tree();
        let cas = Cas::open(&d.path().join("cas")).unwrap();
        let w = d.path().join("work");
        let outside = d.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret.tar.gz"), b"host secret").unwrap();
        use std::os::unix::fs::symlink;
        // Absolute and relative links to a file outside.
        symlink(outside.join("secret.tar.gz"), w.join("out/abs.tar.gz")).unwrap();
        symlink("../../outside/secret.tar.gz", w.join("out/rel.tar.gz")).unwrap();
        symlink("/etc/passwd", w.join("out/passwd.tar.gz")).unwrap();
        // A folder link leading outside: not searched.
        symlink(&outside, w.join("out/escape")).unwrap();
        // Dangling, and a link that stays inside (collected).
        symlink("nothing-here", w.join("out/dangling.tar.gz")).unwrap();
        symlink("app.tar.gz", w.join("out/inside.tar.gz")).unwrap();
        let v = collect(&w, &["out/**".into()], &cas).unwrap();
        assert_eq!(
            paths(&v),
            [
                "out/app.tar.gz",
                "out/b.tar.gz",
                "out/inside.tar.gz",
                "out/readme.txt",
                "out/sub/deep.tar.gz"
            ]
        );
        let inside = v.iter().find(|a| a.path == "out/inside.tar.gz").unwrap();
        assert_eq!(inside.blake3, blake3::hash(b"tarball").to_hex().as_str());
        // Nothing from outside entered the store.
        assert!(!cas.contains(blake3::hash(b"host secret").to_hex().as_str()));

        // The workdir itself may be reached through a symlink (the runner's
        // choice); links out of its real location still do not count.
        let wl = d.path().join("work-link");
        symlink(&w, &wl).unwrap();
        let v2 = collect(&wl, &["out/**".into()], &cas).unwrap();
        assert_eq!(v2, v);
    }

    #[test]
    fn collect_skips_special_files_and_reports_errors() {
        let d = tree();
        let cas = Cas::open(&d.path().join("cas")).unwrap();
        let w = d.path().join("work");
        nix::unistd::mkfifo(
            &w.join("out/pipe.tar.gz"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let v = collect(&w, &["out/*.tar.gz".into()], &cas).unwrap();
        assert_eq!(paths(&v), ["out/app.tar.gz", "out/b.tar.gz"]);
        assert!(matches!(
            collect(&d.path().join("missing"), &["*".into()], &cas),
            Err(ArtifactError::Workdir { .. })
        ));
        assert!(matches!(
            collect(&w, &["../work/out/*".into()], &cas),
            Err(ArtifactError::GlobEscapes { .. })
        ));
    }
}
