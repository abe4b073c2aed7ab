//! Content digests: of a file tree (rootfs folders, input mounts) and of a
//! run's whole input (the input digest).
//!
//! A tree digest covers, for every entry in sorted byte order of its relative
//! name: the name, the file type, the permission bits (including
//! setuid/setgid/sticky), and the content (regular files), the target
//! (symlinks) or the device number (character/block devices). It leaves out
//! mtimes, owners, inode numbers, link counts and extended attributes, so a
//! copy of the same tree at another path or made at another time has the
//! same digest. Hard links are hashed as independent files.
//!
//! Speed: the walk (lstat only) is sequential; file contents are hashed in
//! parallel with rayon, very big files also split by blake3's own rayon
//! support. Files are read, not mmapped (see [`hash_content`]). [`tree_digest_cached`] skips the content
//! pass when a stat-only walk shows nothing changed since the last time.

use crate::tree_memo::{TreeMemo, Watcher};
use liminal_plan::Plan;
use rayon::prelude::*;
use serde_json::Value;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Version tag of the tree encoding; bump it if the encoding changes.
const TREE_DOMAIN: &[u8] = b"liminal-tree-v1\0";
/// Version tag of the input digest encoding.
const INPUT_DOMAIN: &str = "liminal-input-v1";
/// Files are read whole below this size, in chunks of it above.
const CHUNK: usize = 1 << 20;
/// Files at least this big are also split across threads by blake3 itself.
const RAYON_MIN: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid digest cache entry: {message}", path.display())]
    Cache { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DigestError + '_ {
    move |source| DigestError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

impl Kind {
    fn of(ft: &std::fs::FileType) -> Kind {
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        }
    }

    fn tag(self) -> u8 {
        match self {
            Kind::File => b'f',
            Kind::Dir => b'd',
            Kind::Symlink => b'l',
            Kind::Char => b'c',
            Kind::Block => b'b',
            Kind::Fifo => b'p',
            Kind::Socket => b's',
        }
    }
}

/// One entry of a walked tree, with what the stat-only stamp needs.
struct Entry {
    rel: PathBuf,
    abs: PathBuf,
    kind: Kind,
    mode: u32,
    size: u64,
    rdev: u64,
    ino: u64,
    dev: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// Walks `root` in sorted order without following symlinks (except `root`
/// itself, like a bind mount does).
fn walk(root: &Path, watch: Option<&mut Watcher<'_>>) -> Result<Vec<Entry>, DigestError> {
    use nix::fcntl::OFlag;
    // The root is followed like a bind mount follows it.
    let md = std::fs::metadata(root).map_err(io_err(root))?;
    let mut out = vec![Entry {
        rel: PathBuf::new(),
        abs: root.to_owned(),
        kind: Kind::of(&md.file_type()),
        mode: md.mode() & 0o7777,
        size: md.size(),
        rdev: md.rdev(),
        ino: md.ino(),
        dev: md.dev(),
        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        ctime_ns: md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128,
    }];
    if md.is_dir() {
        let dir = nix::dir::Dir::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| DigestError::Io {
            path: root.to_owned(),
            source: e.into(),
        })?;
        walk_dir(dir, Path::new(""), root, &mut out, watch)?;
    } else if let Some(w) = watch {
        // A single file (an input mount can be one): its own watch.
        w.file(root);
    }
    Ok(out)
}

/// Depth-first, siblings sorted by name bytes (the order the tree encoding
/// fixes); every stat is relative to the open folder, not a path walk from
/// the root (the walk runs before every run, so its cost is on the path).
fn walk_dir(
    mut dir: nix::dir::Dir,
    rel: &Path,
    abs: &Path,
    out: &mut Vec<Entry>,
    mut watch: Option<&mut Watcher<'_>>,
) -> Result<(), DigestError> {
    use nix::fcntl::{AtFlags, OFlag};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fail = |path: &Path, e: nix::errno::Errno| DigestError::Io {
        path: path.to_owned(),
        source: e.into(),
    };
    let fd = dir.as_raw_fd();
    // Watched before it is listed: whatever changes after the listing is
    // reported.
    if let Some(w) = watch.as_deref_mut() {
        w.dir(fd);
    }
    let mut names: Vec<std::ffi::CString> = Vec::new();
    for item in dir.iter() {
        let item = item.map_err(|e| fail(abs, e))?;
        let name = item.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let os = std::ffi::OsStr::from_bytes(name.as_bytes());
        let (rel, abs) = (rel.join(os), abs.join(os));
        let st = nix::sys::stat::fstatat(Some(fd), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| fail(&abs, e))?;
        let fmt = st.st_mode & nix::libc::S_IFMT;
        let kind = match fmt {
            nix::libc::S_IFLNK => Kind::Symlink,
            nix::libc::S_IFDIR => Kind::Dir,
            nix::libc::S_IFCHR => Kind::Char,
            nix::libc::S_IFBLK => Kind::Block,
            nix::libc::S_IFIFO => Kind::Fifo,
            nix::libc::S_IFSOCK => Kind::Socket,
            _ => Kind::File,
        };
        // Another name of it, outside the tree, could write it unseen by the
        // folder's watch.
        if kind == Kind::File && st.st_nlink > 1 {
            if let Some(w) = watch.as_deref_mut() {
                w.file(&abs);
            }
        }
        out.push(Entry {
            rel: rel.clone(),
            abs: abs.clone(),
            kind,
            mode: st.st_mode & 0o7777,
            size: st.st_size as u64,
            rdev: st.st_rdev,
            ino: st.st_ino,
            dev: st.st_dev,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
            ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
        });
        if kind == Kind::Dir {
            let child = nix::fcntl::openat(
                Some(fd),
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| fail(&abs, e))?;
            // SAFETY: a fresh descriptor from openat.
            let child = unsafe { OwnedFd::from_raw_fd(child) };
            let child = nix::dir::Dir::from(child).map_err(|e| fail(&abs, e))?;
            walk_dir(child, &rel, &abs, out, watch.as_deref_mut())?;
        }
    }
    Ok(())
}

/// BLAKE3 of one regular file's content and its length.
///
/// Read, not mmapped: this runs inside the daemon on user-supplied trees, and
/// a file truncated while mapped would kill the whole daemon with SIGBUS.
/// Big files are read in chunks that blake3 splits across threads.
fn hash_content(path: &Path, size_hint: u64) -> Result<(blake3::Hash, u64), DigestError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    if size_hint < CHUNK as u64 {
        let mut buf = Vec::with_capacity(size_hint as usize + 1);
        f.read_to_end(&mut buf).map_err(io_err(path))?;
        hasher.update(&buf);
    } else {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = read_full(&mut f, &mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            if size_hint >= RAYON_MIN {
                hasher.update_rayon(&buf[..n]);
            } else {
                hasher.update(&buf[..n]);
            }
        }
    }
    Ok((hasher.finalize(), hasher.count()))
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = 0;
    while len < buf.len() {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

/// Content digest of a file or folder tree: relative names, file type, mode
/// bits, symlink targets, contents. Not mtimes, not owners. `"blake3:<hex>"`.
pub fn tree_digest(path: &Path) -> Result<String, DigestError> {
    let entries = walk(path, None)?;
    digest_entries(&entries)
}

fn digest_entries(entries: &[Entry]) -> Result<String, DigestError> {
    // Content hashes in parallel; everything else is cheap and sequential.
    let contents: Vec<Option<(blake3::Hash, u64)>> = entries
        .par_iter()
        .map(|e| match e.kind {
            Kind::File => hash_content(&e.abs, e.size).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let mut h = blake3::Hasher::new();
    h.update(TREE_DOMAIN);
    for (e, content) in entries.iter().zip(contents) {
        put_bytes(&mut h, e.rel.as_os_str().as_bytes());
        h.update(&[e.kind.tag()]);
        h.update(&e.mode.to_le_bytes());
        match e.kind {
            Kind::File => {
                if let Some((hash, size)) = content {
                    h.update(&size.to_le_bytes());
                    h.update(hash.as_bytes());
                }
            }
            Kind::Symlink => {
                let target = std::fs::read_link(&e.abs).map_err(io_err(&e.abs))?;
                put_bytes(&mut h, target.as_os_str().as_bytes());
            }
            Kind::Char | Kind::Block => {
                h.update(&e.rdev.to_le_bytes());
            }
            Kind::Dir | Kind::Fifo | Kind::Socket => {}
        }
    }
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

/// Stat-only fingerprint of a walked tree: changes whenever any entry is
/// added, removed, renamed, rewritten, chmodded or replaced (ctime moves on
/// every such change and cannot be set from user space).
fn stamp(entries: &[Entry]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"liminal-stamp-v1\0");
    for e in entries {
        put_bytes(&mut h, e.rel.as_os_str().as_bytes());
        h.update(&[e.kind.tag()]);
        for n in [e.mode as u64, e.size, e.rdev, e.ino, e.dev] {
            h.update(&n.to_le_bytes());
        }
        h.update(&e.mtime_ns.to_le_bytes());
        h.update(&e.ctime_ns.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheRecord {
    path: PathBuf,
    stamp: String,
    digest: String,
}

/// [`tree_digest`] with a cache under `cache_dir/tree-digests/`, and in
/// front of it the process's [`TreeMemo`].
///
/// The cache is keyed by the canonical path and validated by a stat-only walk
/// (names, types, modes, sizes, inode numbers, mtimes and ctimes of every
/// entry), so only a changed tree has its contents read again. Staleness risk:
/// a content change that keeps size, mtime and ctime of the file identical —
/// which needs the system clock to be set back, or a filesystem without
/// ctime. The walk still costs one lstat per entry (a few ms per thousand
/// files), so in a long-lived process the memo skips it while inotify reports
/// no change in the tree, for at most [`crate::tree_memo::TTL`] (see there
/// for what inotify misses). An unreadable or corrupt cache entry is
/// recomputed, not an error.
pub fn tree_digest_cached(path: &Path, cache_dir: &Path) -> Result<String, DigestError> {
    let canonical = std::fs::canonicalize(path).map_err(io_err(path))?;
    tree_digest_cached_canonical(&canonical, cache_dir)
}

/// [`tree_digest_cached`] of a path the caller already made canonical.
pub(crate) fn tree_digest_cached_canonical(
    canonical: &Path,
    cache_dir: &Path,
) -> Result<String, DigestError> {
    let memo = TreeMemo::global();
    if let Some(digest) = memo.and_then(|m| m.get(canonical)) {
        tracing::trace!(path = %canonical.display(), "tree digest memo hit");
        return Ok(digest);
    }
    let mut watcher = memo.map(|m| m.watcher(canonical));
    let entries = walk(canonical, watcher.as_mut())?;
    let digest = cached_digest(canonical, &entries, cache_dir)?;
    if let (Some(m), Some(w)) = (memo, watcher) {
        m.finish(w, (entries[0].dev, entries[0].ino), &digest);
    }
    Ok(digest)
}

/// The digest of a walked tree from the on-disk cache if its stamp matches,
/// else from its contents (and then cached).
fn cached_digest(
    canonical: &Path,
    entries: &[Entry],
    cache_dir: &Path,
) -> Result<String, DigestError> {
    let stamp = stamp(entries);
    let key = blake3::hash(canonical.as_os_str().as_bytes()).to_hex();
    let dir = cache_dir.join("tree-digests");
    let file = dir.join(format!("{key}.json"));
    if let Ok(bytes) = std::fs::read(&file) {
        match serde_json::from_slice::<CacheRecord>(&bytes) {
            Ok(rec) if rec.path == canonical && rec.stamp == stamp => {
                tracing::debug!(path = %canonical.display(), "tree digest cache hit");
                return Ok(rec.digest);
            }
            Ok(_) => tracing::debug!(path = %canonical.display(), "tree digest cache stale"),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "ignoring corrupt digest cache entry")
            }
        }
    }
    let digest = digest_entries(entries)?;
    let rec = CacheRecord {
        path: canonical.to_owned(),
        stamp,
        digest: digest.clone(),
    };
    // Best effort: a cache that cannot be written only costs time.
    if let Err(e) = write_atomic(&dir, &file, &rec) {
        tracing::warn!(file = %file.display(), error = %e, "cannot write digest cache entry");
    }
    Ok(digest)
}

fn write_atomic(dir: &Path, file: &Path, rec: &CacheRecord) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(&mut tmp, rec).map_err(io::Error::other)?;
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}

/// JSON with every object's keys sorted, whatever serde_json's map type is
/// (its `preserve_order` feature may be switched on by another crate).
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The plan as JSON without host-only paths: the image (its digest stands
/// for it), mount sources (their tree digests stand for them) and the paths
/// of file secrets (secret values never enter the digest).
fn plan_without_host_paths(plan: &Plan) -> Value {
    let mut v: Value = serde_json::from_str(&plan.canonical_json()).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.remove("image");
        if let Some(Value::Array(mounts)) = map.get_mut("mounts") {
            for m in mounts {
                if let Value::Object(m) = m {
                    m.remove("source");
                }
            }
        }
        if let Some(Value::Array(secrets)) = map.get_mut("secrets") {
            for s in secrets {
                if let Some(Value::Object(from)) = s.get_mut("from") {
                    if from.get("type").and_then(Value::as_str) == Some("file") {
                        from.remove("value");
                    }
                }
            }
        }
    }
    v
}

/// BLAKE3 over canonical JSON of {plan (minus host-only paths), image_digest,
/// mounts [(target, tree_digest)], sandbox}. Host paths of mounts and images
/// do not enter it: the same inputs at another path are the same inputs.
/// `"blake3:<hex>"`.
pub fn input_digest(
    plan: &Plan,
    image_digest: &str,
    mount_digests: &[(String, String)],
    sandbox_config: &serde_json::Value,
) -> String {
    let doc = serde_json::json!({
        "domain": INPUT_DOMAIN,
        "plan": plan_without_host_paths(plan),
        "image_digest": image_digest,
        "mounts": mount_digests
            .iter()
            .map(|(t, d)| serde_json::json!([t, d]))
            .collect::<Vec<_>>(),
        "sandbox": sandbox_config,
    });
    let mut text = String::new();
    canonical(&doc, &mut text);
    format!("blake3:{}", blake3::hash(text.as_bytes()).to_hex())
}
