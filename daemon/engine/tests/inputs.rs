//! Tests of the run inputs: tree and input digests, OCI image resolution,
//! secrets. Everything real: files, OCI layouts written byte by byte, memfds,
//! pipes, sockets.

use liminal_engine::digest::{input_digest, tree_digest, tree_digest_cached};
use liminal_engine::image::{resolve, ImageError};
use liminal_engine::secrets::{load, SecretError};
use liminal_plan::{ImageRef, Plan, PlanSource, Secret, SecretSource, MAX_SECRET_BYTES};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------
// Tree digests

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc/empty")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("etc/conf"), b"a=1\n").unwrap();
    fs::write(root.join("big"), vec![7u8; 3 * 1024 * 1024]).unwrap();
    symlink("../bin/tool", root.join("etc/link")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
}

/// A temporary folder with [`sample_tree`] at `root` and a digest cache
/// folder beside it.
fn sample_tree_with_cache() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    sample_tree(&root);
    let cache = tmp.path().join("cache");
    (tmp, root, cache)
}

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn touch_all(root: &Path, stamp: &str) {
    let st = Command::new("find")
        .arg(root)
        .args(["-exec", "touch", "-h", "-d", stamp, "{}", "+"])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn tree_digest_is_stable_across_paths_and_mtimes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    sample_tree(&a);
    let d1 = tree_digest(&a).unwrap();
    assert!(d1.starts_with("blake3:") && d1.len() == 7 + 64, "{d1}");
    assert_eq!(d1, tree_digest(&a).unwrap(), "deterministic");

    let b = tmp.path().join("elsewhere/b");
    fs::create_dir_all(b.parent().unwrap()).unwrap();
    cp_a(&a, &b);
    touch_all(&b, "2001-02-03 04:05:06");
    assert_ne!(
        fs::metadata(a.join("etc/conf")).unwrap().mtime(),
        fs::metadata(b.join("etc/conf")).unwrap().mtime()
    );
    assert_eq!(
        d1,
        tree_digest(&b).unwrap(),
        "same tree at another path and time"
    );
}

#[test]
fn tree_digest_changes_with_content_mode_and_symlink_target() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    sample_tree(&base);
    let d0 = tree_digest(&base).unwrap();

    let variant = |name: &str, change: &dyn Fn(&Path)| {
        let p = tmp.path().join(name);
        cp_a(&base, &p);
        change(&p);
        let d = tree_digest(&p).unwrap();
        assert_ne!(d, d0, "{name} must change the digest");
        d
    };
    let content = variant("content", &|p| {
        fs::write(p.join("etc/conf"), b"a=2\n").unwrap()
    });
    let big = variant("big", &|p| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(p.join("big"))
            .unwrap();
        f.seek(SeekFrom::Start(2 * 1024 * 1024)).unwrap();
        f.write_all(b"x").unwrap();
    });
    let mode = variant("mode", &|p| {
        fs::set_permissions(p.join("etc/conf"), fs::Permissions::from_mode(0o600)).unwrap()
    });
    let link = variant("link", &|p| {
        fs::remove_file(p.join("etc/link")).unwrap();
        symlink("../bin/other", p.join("etc/link")).unwrap();
    });
    let renamed = variant("renamed", &|p| {
        fs::rename(p.join("etc/conf"), p.join("etc/conf2")).unwrap()
    });
    let added = variant("added", &|p| fs::create_dir(p.join("etc/new")).unwrap());
    let all = [d0, content, big, mode, link, renamed, added];
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "every change gives its own digest");
}

#[test]
fn tree_digest_of_a_single_file_and_of_a_missing_path() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("f");
    fs::write(&f, b"hello").unwrap();
    let d = tree_digest(&f).unwrap();
    fs::write(&f, b"hellO").unwrap();
    assert_ne!(d, tree_digest(&f).unwrap());
    // A symlinked root is followed, like a bind mount follows it.
    let dir = tmp.path().join("dir");
    sample_tree(&dir);
    symlink(&dir, tmp.path().join("via-link")).unwrap();
    assert_eq!(
        tree_digest(&dir).unwrap(),
        tree_digest(&tmp.path().join("via-link")).unwrap()
    );
    let err = tree_digest(&tmp.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn cached_tree_digest_notices_changes() {
    let (_tmp, root, cache) = sample_tree_with_cache();
    let d1 = tree_digest_cached(&root, &cache).unwrap();
    assert_eq!(d1, tree_digest(&root).unwrap());
    assert_eq!(fs::read_dir(cache.join("tree-digests")).unwrap().count(), 1);
    assert_eq!(d1, tree_digest_cached(&root, &cache).unwrap(), "hit");
    // Same size, mtime put back: ctime still moves.
    let conf = root.join("etc/conf");
    let mtime = fs::metadata(&conf).unwrap().mtime();
    fs::write(&conf, b"a=9\n").unwrap();
    let st = Command::new("touch")
        .args(["-d", &format!("@{mtime}")])
        .arg(&conf)
        .status()
        .unwrap();
    assert!(st.success());
    let d2 = tree_digest_cached(&root, &cache).unwrap();
    assert_ne!(d1, d2);
    assert_eq!(d2, tree_digest(&root).unwrap());
}

/// The in-process memo in front of the cache (inotify) must never answer
/// with a digest older than the tree: after each kind of change, right away,
/// the cached digest is the one a full walk computes.
#[test]
fn memoized_tree_digest_follows_every_kind_of_change() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("images");
    let root = base.join("root");
    let cache = tmp.path().join("cache");
    sample_tree(&root);
    // A second name of etc/conf outside the tree.
    fs::hard_link(root.join("etc/conf"), tmp.path().join("conf-elsewhere")).unwrap();
    let mut last = tree_digest_cached(&root, &cache).unwrap();
    assert_eq!(last, tree_digest(&root).unwrap());
    assert_eq!(
        last,
        tree_digest_cached(&root, &cache).unwrap(),
        "unchanged"
    );
    type Change<'a> = Box<dyn Fn() + 'a>;
    let steps: Vec<(&str, Change)> = vec![
        (
            "rewrite, same size",
            Box::new(|| fs::write(root.join("bin/tool"), b"#!/bin/sh\necho ho\n").unwrap()),
        ),
        (
            "chmod",
            Box::new(|| {
                fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o700))
                    .unwrap()
            }),
        ),
        (
            "new file in a subfolder",
            Box::new(|| fs::write(root.join("etc/empty/new"), b"x").unwrap()),
        ),
        (
            "new folder, then a file in it",
            Box::new(|| {
                fs::create_dir(root.join("opt")).unwrap();
                fs::write(root.join("opt/f"), b"y").unwrap();
            }),
        ),
        (
            "file in the new folder rewritten",
            Box::new(|| fs::write(root.join("opt/f"), b"z").unwrap()),
        ),
        (
            "rename",
            Box::new(|| fs::rename(root.join("etc/empty/new"), root.join("etc/new")).unwrap()),
        ),
        (
            "remove",
            Box::new(|| fs::remove_file(root.join("etc/new")).unwrap()),
        ),
        (
            "written through a name outside the tree",
            Box::new(|| fs::write(tmp.path().join("conf-elsewhere"), b"a=2\n").unwrap()),
        ),
        (
            "symlink retargeted",
            Box::new(|| {
                fs::remove_file(root.join("etc/link")).unwrap();
                symlink("../etc/conf", root.join("etc/link")).unwrap();
            }),
        ),
        (
            "truncated",
            Box::new(|| {
                fs::File::options()
                    .write(true)
                    .open(root.join("big"))
                    .unwrap()
                    .set_len(10)
                    .unwrap()
            }),
        ),
        (
            "a parent renamed and another tree put at the same path",
            Box::new(|| {
                fs::rename(&base, tmp.path().join("images.old")).unwrap();
                sample_tree(&root);
            }),
        ),
    ];
    for (what, change) in steps {
        change();
        let d = tree_digest_cached(&root, &cache).unwrap();
        assert_eq!(d, tree_digest(&root).unwrap(), "after: {what}");
        assert_ne!(d, last, "after: {what}");
        last = d;
    }
}

/// A tree that is a single file (an input mount can be one) is watched too.
#[test]
fn memoized_digest_of_a_single_file_follows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("input.txt");
    let cache = tmp.path().join("cache");
    fs::write(&file, b"one\n").unwrap();
    let d1 = tree_digest_cached(&file, &cache).unwrap();
    assert_eq!(d1, tree_digest_cached(&file, &cache).unwrap());
    fs::write(&file, b"two\n").unwrap();
    let d2 = tree_digest_cached(&file, &cache).unwrap();
    assert_ne!(d1, d2);
    assert_eq!(d2, tree_digest(&file).unwrap());
}

/// What inotify cannot see (a write through a shared mapping) the walk
/// catches once the memo's time to live is over.
#[test]
fn memoized_tree_digest_catches_unreported_writes_after_its_ttl() {
    let (_tmp, root, cache) = sample_tree_with_cache();
    let before = tree_digest_cached(&root, &cache).unwrap();
    // Past the clock tick of the last write, so the mapping's write moves
    // the file's mtime.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = fs::File::options()
        .read(true)
        .write(true)
        .open(root.join("etc/conf"))
        .unwrap();
    // SAFETY: the file is private to this test and not resized while mapped.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    map[2] = b'5';
    map.flush().unwrap();
    drop(map);
    let after = tree_digest(&root).unwrap();
    assert_ne!(before, after);
    std::thread::sleep(liminal_engine::tree_memo::TTL + std::time::Duration::from_millis(50));
    assert_eq!(tree_digest_cached(&root, &cache).unwrap(), after);
}

fn plan(text: &str, base: &Path) -> Plan {
    Plan::parse(
        text,
        &PlanSource {
            file: Path::new("plan.toml"),
            base_dir: base,
        },
    )
    .unwrap()
}

#[test]
fn input_digest_ignores_host_paths_but_not_inputs() {
    let text = r#"
[run]
name = "t"
image = "images/busybox"
command = ["/bin/true"]
[[mount]]
source = "../src"
target = "/src"
[[secret]]
name = "tok"
from = "file:token"
"#;
    let a = plan(text, Path::new("/home/alice/proj"));
    let b = plan(text, Path::new("/srv/ci/build-17/proj"));
    assert_ne!(a, b);
    let mounts = vec![("/src".to_owned(), "blake3:aa".to_owned())];
    let sandbox = serde_json::json!({"seccomp": "default", "uid": 0});
    let da = input_digest(&a, "blake3:11", &mounts, &sandbox);
    assert!(da.starts_with("blake3:"));
    assert_eq!(da, input_digest(&b, "blake3:11", &mounts, &sandbox));
    // Key order of the sandbox value does not matter.
    let sandbox2: serde_json::Value =
        serde_json::from_str(r#"{"uid":0,"seccomp":"default"}"#).unwrap();
    assert_eq!(da, input_digest(&a, "blake3:11", &mounts, &sandbox2));

    assert_ne!(da, input_digest(&a, "blake3:12", &mounts, &sandbox));
    let other_mounts = vec![("/src".to_owned(), "blake3:ab".to_owned())];
    assert_ne!(da, input_digest(&a, "blake3:11", &other_mounts, &sandbox));
    assert_ne!(
        da,
        input_digest(&a, "blake3:11", &mounts, &serde_json::json!({"uid": 1}))
    );
    let c = plan(
        &text.replace("/bin/true", "/bin/false"),
        Path::new("/home/alice/proj"),
    );
    assert_ne!(da, input_digest(&c, "blake3:11", &mounts, &sandbox));
    let d = plan(
        &text.replace("\"/src\"", "\"/src2\""),
        Path::new("/home/alice/proj"),
    );
    assert_ne!(da, input_digest(&d, "blake3:11", &mounts, &sandbox));
}

// ---------------------------------------------------------------------------
// OCI layouts, written byte by byte

enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    /// A name written raw into the header, bypassing the tar crate's checks.
    RawFile(&'a [u8], &'a [u8]),
}

fn tar_layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::RawFile(name, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn put_blob(layout: &Path, bytes: &[u8]) -> serde_json::Value {
    let d = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&d[7..]), bytes).unwrap();
    serde_json::json!({"digest": d, "size": bytes.len()})
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes an OCI layout with one manifest per tag; layers are gzipped except
/// when `media` says otherwise. Returns the manifest digest and its layer
/// digests.
fn write_layout(
    layout: &Path,
    tag: &str,
    layers: &[Vec<u8>],
    media: &str,
) -> (String, Vec<String>) {
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_digests = Vec::new();
    for l in layers {
        diff_ids.push(sha256(l));
        let blob = match media {
            "application/vnd.oci.image.layer.v1.tar" => l.clone(),
            "application/vnd.oci.image.layer.v1.tar+zstd" => zstd::encode_all(&l[..], 3).unwrap(),
            _ => gzip(l),
        };
        let mut d = put_blob(layout, &blob);
        layer_digests.push(d["digest"].as_str().unwrap().to_owned());
        d["mediaType"] = media.into();
        descs.push(d);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let mut cd = put_blob(layout, config.to_string().as_bytes());
    cd["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cd, "layers": descs
    });
    let mut md = put_blob(layout, manifest.to_string().as_bytes());
    md["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    md["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"].as_array_mut().unwrap().push(md.clone());
    fs::write(&index_path, index.to_string()).unwrap();
    (md["digest"].as_str().unwrap().to_owned(), layer_digests)
}

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn oci(layout: &Path, tag: &str) -> ImageRef {
    ImageRef::Oci {
        layout: layout.to_owned(),
        tag: tag.to_owned(),
    }
}

fn two_layers() -> Vec<Vec<u8>> {
    let l1 = tar_layer(&[
        E::Dir("./", 0o755),
        E::Dir("bin/", 0o755),
        E::File("bin/tool", b"tool v1", 0o755),
        E::Dir("etc/", 0o755),
        E::File("etc/a", b"a", 0o644),
        E::File("etc/b", b"b", 0o600),
        E::Symlink("etc/link", "/bin/tool"),
        E::Hardlink("bin/tool2", "bin/tool"),
        E::Dir("opt/", 0o755),
        E::Dir("opt/x/", 0o700),
        E::File("opt/x/y", b"y", 0o644),
        E::File("opt/keep-lower", b"k", 0o644),
        E::Dir("ro/", 0o555),
        E::File("ro/f", b"f", 0o444),
        E::File("setuid", b"s", 0o4755),
    ]);
    let l2 = tar_layer(&[
        E::File("etc/.wh.a", b"", 0o644),
        E::Dir("opt/", 0o755),
        E::File("opt/.wh..wh..opq", b"", 0o644),
        E::File("opt/new", b"new", 0o644),
        E::File("bin/tool", b"tool v2", 0o755),
        E::File("etc/.wh.does-not-exist", b"", 0o644),
    ]);
    vec![l1, l2]
}

#[test]
fn oci_layers_unpack_with_whiteouts_and_hit_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let cache = tmp.path().join("cache");
    let (manifest_digest, _) = write_layout(&layout, "v1", &two_layers(), GZ);

    let img = resolve(&oci(&layout, "v1"), &cache).unwrap();
    assert_eq!(img.digest, manifest_digest);
    assert_eq!(
        img.rootfs,
        cache.join(format!("oci/sha256-{}/rootfs", &manifest_digest[7..]))
    );
    let r = &img.rootfs;
    assert!(!r.join("etc/a").exists(), "whiteout removed etc/a");
    assert_eq!(fs::read(r.join("etc/b")).unwrap(), b"b");
    assert_eq!(
        fs::metadata(r.join("etc/b")).unwrap().mode() & 0o7777,
        0o600
    );
    assert!(!r.join("opt/x").exists(), "opaque folder hid opt/x");
    assert!(
        !r.join("opt/keep-lower").exists(),
        "opaque folder hid opt/keep-lower"
    );
    assert_eq!(fs::read(r.join("opt/new")).unwrap(), b"new");
    assert_eq!(
        fs::read(r.join("bin/tool")).unwrap(),
        b"tool v2",
        "upper layer wins"
    );
    assert_eq!(
        fs::read(r.join("bin/tool2")).unwrap(),
        b"tool v1",
        "hard link kept"
    );
    assert_eq!(
        fs::read_link(r.join("etc/link")).unwrap(),
        Path::new("/bin/tool")
    );
    assert_eq!(fs::metadata(r.join("ro")).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(
        fs::metadata(r.join("setuid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(fs::metadata(r.join("etc/b")).unwrap().mtime(), 1_000_000);
    assert!(!r.join("etc/.wh.a").exists() && !r.join("opt/.wh..wh..opq").exists());

    // Second resolve: same entry, nothing unpacked again.
    let ino = fs::metadata(r.join("opt/new")).unwrap().ino();
    let again = resolve(&oci(&layout, "v1"), &cache).unwrap();
    assert_eq!(again, img);
    assert_eq!(fs::metadata(r.join("opt/new")).unwrap().ino(), ino);
    // No temporary folders left behind.
    let names: Vec<_> = fs::read_dir(cache.join("oci"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(".lock-"))
        .collect();
    assert_eq!(names, vec![format!("sha256-{}", &manifest_digest[7..])]);
}

#[test]
fn oci_half_unpacked_leftovers_of_dead_processes_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let cache = tmp.path().join("cache");
    write_layout(&layout, "v1", &two_layers(), GZ);
    // A pid that surely is gone: a child we reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = cache.join(format!("oci/.tmp-{dead}-abc123"));
    fs::create_dir_all(stale.join("rootfs/usr")).unwrap();
    let live = cache.join(format!("oci/.tmp-{}-inflight", std::process::id()));
    fs::create_dir_all(&live).unwrap();
    resolve(&oci(&layout, "v1"), &cache).unwrap();
    assert!(!stale.exists(), "leftover of a dead process removed");
    assert!(live.exists(), "a live process's unpack is left alone");
}

#[test]
fn oci_entry_from_an_earlier_boot_is_checked_and_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let cache = tmp.path().join("cache");
    write_layout(&layout, "v1", &two_layers(), GZ);
    let img = resolve(&oci(&layout, "v1"), &cache).unwrap();
    let marker_path = img.rootfs.parent().unwrap().join("liminal-unpacked.json");
    let set_old_boot = || {
        let mut m: serde_json::Value =
            serde_json::from_slice(&fs::read(&marker_path).unwrap()).unwrap();
        assert!(m["tree"].as_str().unwrap().starts_with("blake3:"));
        m["boot_id"] = "an-earlier-boot".into();
        fs::write(&marker_path, m.to_string()).unwrap();
    };
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();

    // Intact after a "reboot": kept, and marked good for this boot.
    set_old_boot();
    let ino = fs::metadata(img.rootfs.join("opt/new")).unwrap().ino();
    assert_eq!(resolve(&oci(&layout, "v1"), &cache).unwrap(), img);
    assert_eq!(fs::metadata(img.rootfs.join("opt/new")).unwrap().ino(), ino);
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&marker_path).unwrap()).unwrap();
    assert_eq!(m["boot_id"].as_str().unwrap(), boot_id.trim());

    // Emptied by a "power loss": unpacked again.
    fs::write(img.rootfs.join("opt/new"), b"").unwrap();
    set_old_boot();
    assert_eq!(resolve(&oci(&layout, "v1"), &cache).unwrap(), img);
    assert_eq!(fs::read(img.rootfs.join("opt/new")).unwrap(), b"new");
    no_oci_leftovers_but(&cache, 1);
}

fn no_oci_leftovers_but(cache: &Path, entries: usize) {
    let names: Vec<_> = fs::read_dir(cache.join("oci"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(".lock-"))
        .collect();
    assert_eq!(names.len(), entries, "{names:?}");
}

#[test]
fn oci_concurrent_resolves_unpack_once() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let cache = tmp.path().join("cache");
    write_layout(&layout, "v1", &two_layers(), GZ);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| resolve(&oci(&layout, "v1"), &cache).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    let entries: Vec<_> = fs::read_dir(cache.join("oci"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(".lock-"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn oci_uncompressed_and_zstd_layers_unpack_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for (i, media) in [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        GZ,
    ]
    .iter()
    .enumerate()
    {
        let layout = tmp.path().join(format!("layout{i}"));
        write_layout(&layout, "t", &two_layers(), media);
        let img = resolve(&oci(&layout, "t"), &tmp.path().join("cache")).unwrap();
        trees.push(tree_digest(&img.rootfs).unwrap());
    }
    assert_eq!(trees[0], trees[1]);
    assert_eq!(trees[1], trees[2]);
}

#[test]
fn oci_tag_not_found_lists_the_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_layout(&layout, "v1", &two_layers(), GZ);
    write_layout(&layout, "v2", &two_layers(), GZ);
    let err = resolve(&oci(&layout, "nope"), &tmp.path().join("cache")).unwrap_err();
    match &err {
        ImageError::TagNotFound { tag, available, .. } => {
            assert_eq!(tag, "nope");
            assert_eq!(available, &["v1".to_owned(), "v2".to_owned()]);
        }
        other => panic!("expected TagNotFound, got {other:?}"),
    }
    assert!(err.to_string().contains("v1, v2"), "{err}");
}

fn flip_byte(path: &Path, at: u64) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut b = [0u8];
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x55]).unwrap();
}

fn no_oci_leftovers(cache: &Path) {
    let left: Vec<_> = fs::read_dir(cache.join("oci"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with(".lock-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "cache has leftovers: {left:?}");
}

#[test]
fn oci_corrupt_layer_is_a_digest_mismatch_and_leaves_nothing() {
    for media in [GZ, "application/vnd.oci.image.layer.v1.tar"] {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("layout");
        let cache = tmp.path().join("cache");
        let (_, layers) = write_layout(&layout, "v1", &two_layers(), media);
        let blob = layout.join("blobs/sha256").join(&layers[1][7..]);
        flip_byte(&blob, 40);
        let err = resolve(&oci(&layout, "v1"), &cache).unwrap_err();
        match &err {
            ImageError::DigestMismatch { expected, .. } => assert_eq!(expected, &layers[1]),
            other => panic!("{media}: expected DigestMismatch, got {other:?}"),
        }
        no_oci_leftovers(&cache);
    }
}

#[test]
fn oci_corrupt_manifest_and_truncated_blob_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let (manifest, layers) = write_layout(&layout, "v1", &two_layers(), GZ);
    let mpath = layout.join("blobs/sha256").join(&manifest[7..]);
    flip_byte(&mpath, 3);
    let err = resolve(&oci(&layout, "v1"), &tmp.path().join("c1")).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");

    let layout2 = tmp.path().join("layout2");
    let (_, layers2) = write_layout(&layout2, "v1", &two_layers(), GZ);
    assert_eq!(layers, layers2);
    let lpath = layout2.join("blobs/sha256").join(&layers2[0][7..]);
    let len = fs::metadata(&lpath).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&lpath)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let err = resolve(&oci(&layout2, "v1"), &tmp.path().join("c2")).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err:?}");
}

#[test]
fn oci_unsafe_layer_paths_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("dotdot", vec![tar_layer(&[E::RawFile(b"../escape", b"x")])]),
        (
            "nested-dotdot",
            vec![tar_layer(&[
                E::Dir("a/", 0o755),
                E::RawFile(b"a/../../escape", b"x"),
            ])],
        ),
        (
            "absolute-dotdot",
            vec![tar_layer(&[E::RawFile(b"/../escape", b"x")])],
        ),
        (
            "through-symlink",
            vec![
                tar_layer(&[E::Symlink("evil", "../../outside")]),
                tar_layer(&[E::RawFile(b"evil/escape", b"x")]),
            ],
        ),
        (
            "hardlink-out",
            vec![tar_layer(&[E::Hardlink("h", "../../etc/passwd")])],
        ),
        (
            "whiteout-dotdot",
            vec![tar_layer(&[E::RawFile(b"../.wh.escape", b"")])],
        ),
    ];
    for (name, layers) in cases {
        let case = tmp.path().join(name);
        let layout = case.join("layout");
        let cache = case.join("cache");
        write_layout(&layout, "t", &layers, GZ);
        let err = resolve(&oci(&layout, "t"), &cache).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafePath { .. }),
            "{name}: {err:?}"
        );
        assert!(!case.join("escape").exists() && !tmp.path().join("escape").exists());
        assert!(!case.join("outside").exists());
        no_oci_leftovers(&cache);
    }
}

#[test]
fn oci_absolute_names_stay_inside_the_rootfs() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let name = format!("{}/abs-escape", tmp.path().display());
    let layer = tar_layer(&[
        E::RawFile(name.as_bytes(), b"x"),
        E::RawFile(b"/etc/motd", b"m"),
    ]);
    write_layout(&layout, "t", &[layer], GZ);
    let img = resolve(&oci(&layout, "t"), &tmp.path().join("cache")).unwrap();
    assert!(
        !tmp.path().join("abs-escape").exists(),
        "written to the host path"
    );
    let inside = img.rootfs.join(name.trim_start_matches('/'));
    assert_eq!(fs::read(inside).unwrap(), b"x");
    assert_eq!(fs::read(img.rootfs.join("etc/motd")).unwrap(), b"m");
}

#[test]
fn oci_layer_without_final_padding_unpacks() {
    // What umoci 0.4.7 writes: the last file's data unpadded, no end blocks.
    let full = tar_layer(&[E::File("etc/motd", b"hi\n", 0o644)]);
    let truncated = full[..512 + 3].to_vec();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_layout(&layout, "t", &[truncated], GZ);
    let img = resolve(&oci(&layout, "t"), &tmp.path().join("cache")).unwrap();
    assert_eq!(fs::read(img.rootfs.join("etc/motd")).unwrap(), b"hi\n");
}

#[test]
fn oci_unsupported_media_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_layout(&layout, "t", &two_layers(), "application/x-weird");
    let err = resolve(&oci(&layout, "t"), &tmp.path().join("cache")).unwrap_err();
    match &err {
        ImageError::UnsupportedMediaType { media_type, .. } => {
            assert_eq!(media_type, "application/x-weird")
        }
        other => panic!("expected UnsupportedMediaType, got {other:?}"),
    }
}

#[test]
fn oci_not_a_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve(&oci(tmp.path(), "t"), &tmp.path().join("cache")).unwrap_err();
    assert!(matches!(err, ImageError::NotALayout { .. }), "{err:?}");
}

#[test]
fn oci_busybox_layout_from_umoci() {
    if Command::new("umoci").arg("--version").output().is_err() {
        eprintln!("SKIP: umoci is not installed (apt-get install umoci)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    // Build the busybox rootfs and its layout inside this test's temp dir.
    let rootfs = tmp.path().join("rootfs");
    let st = Command::new(repo.join("oci/images/busybox.sh"))
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(st.success());
    let layout = tmp.path().join("layout");
    let st = Command::new(repo.join("oci/images/make-oci-layout.sh"))
        .arg(&rootfs)
        .arg(&layout)
        .arg("latest")
        .status()
        .unwrap();
    assert!(st.success());
    let img = resolve(&oci(&layout, "latest"), &tmp.path().join("cache")).unwrap();
    assert!(img.digest.starts_with("sha256:"));
    let r = &img.rootfs;
    assert!(r.join("bin/busybox").is_file());
    assert_eq!(
        fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read(r.join("etc/motd")).unwrap(),
        b"made by make-oci-layout.sh\n"
    );
    assert!(!r.join("etc/group").exists(), "whiteout from umoci applied");
    assert!(r.join("etc/passwd").is_file());
    assert_eq!(fs::metadata(r.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    let st = Command::new(r.join("bin/busybox"))
        .arg("true")
        .status()
        .unwrap();
    assert!(st.success());

    // The same tree as umoci's own unpacker makes (as root: owners too).
    if nix::unistd::geteuid().is_root() {
        let bundle = tmp.path().join("umoci-bundle");
        let st = Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(tree_digest(&bundle).unwrap(), tree_digest(r).unwrap());
    }
}

#[test]
fn rootfs_folder_resolves_to_its_tree_digest() {
    let (tmp, root, cache) = sample_tree_with_cache();
    let img = resolve(&ImageRef::Rootfs { path: root.clone() }, &cache).unwrap();
    assert_eq!(img.digest, tree_digest(&root).unwrap());
    assert_eq!(img.rootfs, fs::canonicalize(&root).unwrap());
    let err = resolve(
        &ImageRef::Rootfs {
            path: tmp.path().join("nope"),
        },
        &cache,
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::MissingRootfs { .. }), "{err:?}");
    let err = resolve(
        &ImageRef::Rootfs {
            path: root.join("etc/conf"),
        },
        &cache,
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::NotADirectory { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------
// Secrets

const SECRET: &[u8] = b"s3cr3t-Zq9-token";

fn secret(name: &str, from: SecretSource) -> Secret {
    Secret {
        name: name.to_owned(),
        from,
    }
}

fn assert_no_leak(err: &SecretError, bytes: &[u8]) {
    let needle = String::from_utf8_lossy(bytes);
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(&*needle), "error leaks the secret: {text}");
    }
}

fn read_all_from(fd: &OwnedFd) -> Vec<u8> {
    let mut f = fs::File::from(fd.try_clone().unwrap());
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn memfd_with(bytes: &[u8]) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"test", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .unwrap();
    let mut f = fs::File::from(fd);
    f.write_all(bytes).unwrap();
    OwnedFd::from(f)
}

#[test]
fn file_secret_is_sealed_rewound_and_cloexec() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("token");
    fs::write(&path, SECRET).unwrap();
    let out = load(
        &[secret("registry_token", SecretSource::File(path))],
        BTreeMap::new(),
        None,
    )
    .unwrap();
    assert_eq!(out.len(), 1);
    let s = &out[0];
    assert_eq!(s.name, "registry_token");
    assert_eq!(s.env_var, "LIMINAL_SECRET_REGISTRY_TOKEN_FD");
    assert_eq!(&s.value[..], SECRET);
    assert!(
        !format!("{s:?}").contains("s3cr3t"),
        "Debug must not show the value"
    );

    let raw = s.fd.as_raw_fd();
    let seals = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
    let want = nix::fcntl::SealFlag::F_SEAL_WRITE
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_SEAL;
    assert_eq!(seals & want.bits(), want.bits());
    let flags = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(flags & nix::libc::FD_CLOEXEC != 0);
    assert_eq!(
        nix::unistd::lseek(raw, 0, nix::unistd::Whence::SeekCur).unwrap(),
        0
    );

    // Writing fails with EPERM: the seal, not a read-only open, stops it.
    let err = nix::unistd::write(&s.fd, b"x").unwrap_err();
    assert_eq!(err, nix::errno::Errno::EPERM);
    let err = nix::unistd::ftruncate(&s.fd, 0).unwrap_err();
    assert_eq!(err, nix::errno::Errno::EPERM);
    // A fresh open through /proc (what a container could try) cannot write either.
    let reopened = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{raw}"));
    if let Ok(mut f) = reopened {
        assert!(f.write_all(b"x").is_err());
    }
    assert_eq!(read_all_from(&s.fd), SECRET);
}

#[test]
fn credential_secret_reads_from_the_credentials_dir() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("db_password"), SECRET).unwrap();
    let out = load(
        &[secret("db", SecretSource::Credential("db_password".into()))],
        BTreeMap::new(),
        Some(tmp.path()),
    )
    .unwrap();
    assert_eq!(&out[0].value[..], SECRET);
    let err = load(
        &[secret("db", SecretSource::Credential("missing".into()))],
        BTreeMap::new(),
        Some(tmp.path()),
    )
    .unwrap_err();
    assert!(matches!(err, SecretError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("\"db\""), "{err}");
    let err = load(
        &[secret("db", SecretSource::Credential("../etc".into()))],
        BTreeMap::new(),
        Some(tmp.path()),
    )
    .unwrap_err();
    assert!(
        matches!(err, SecretError::BadCredentialName { .. }),
        "{err:?}"
    );
    if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
        let err = load(
            &[secret("db", SecretSource::Credential("db_password".into()))],
            BTreeMap::new(),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, SecretError::NoCredentialsDir { .. }),
            "{err:?}"
        );
    }
}

#[test]
fn passed_memfd_regular_file_and_pipe_are_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f");
    fs::write(&path, b"from-a-file").unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&w, b"from-a-pipe").unwrap();
    drop(w);
    let mut passed = BTreeMap::new();
    passed.insert("m".to_owned(), memfd_with(b"from-a-memfd"));
    passed.insert(
        "f".to_owned(),
        OwnedFd::from(fs::File::open(&path).unwrap()),
    );
    passed.insert("p".to_owned(), r);
    let plan = [
        secret("m", SecretSource::Fd),
        secret("f", SecretSource::Fd),
        secret("p", SecretSource::Fd),
    ];
    let out = load(&plan, passed, None).unwrap();
    let got: Vec<(&str, &[u8])> = out
        .iter()
        .map(|s| (s.name.as_str(), &s.value[..]))
        .collect();
    assert_eq!(
        got,
        vec![
            ("m", &b"from-a-memfd"[..]),
            ("f", &b"from-a-file"[..]),
            ("p", &b"from-a-pipe"[..])
        ]
    );
    for s in &out {
        assert_eq!(read_all_from(&s.fd), &s.value[..]);
    }
}

#[test]
fn a_long_secret_name_still_gets_a_memfd() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t");
    fs::write(&path, SECRET).unwrap();
    let name = "n".repeat(300);
    let out = load(
        &[secret(&name, SecretSource::File(path))],
        BTreeMap::new(),
        None,
    )
    .unwrap();
    assert_eq!(read_all_from(&out[0].fd), SECRET);
}

#[test]
fn passed_socket_directory_and_device_are_rejected() {
    let (a, _b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let dir = OwnedFd::from(fs::File::open("/").unwrap());
    let dev = OwnedFd::from(fs::File::open("/dev/null").unwrap());
    for (fd, kind) in [(a, "socket"), (dir, "directory"), (dev, "character device")] {
        let mut passed = BTreeMap::new();
        passed.insert("s".to_owned(), fd);
        let err = load(&[secret("s", SecretSource::Fd)], passed, None).unwrap_err();
        match &err {
            SecretError::WrongType { name, found, .. } => {
                assert_eq!(name, "s");
                assert_eq!(*found, kind);
            }
            other => panic!("expected WrongType for {kind}, got {other:?}"),
        }
    }
}

#[test]
fn file_secret_must_be_a_regular_file_even_a_fifo_does_not_block() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for path in [fifo, PathBuf::from("/dev/null"), tmp.path().to_owned()] {
        let err = load(
            &[secret("x", SecretSource::File(path.clone()))],
            BTreeMap::new(),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, SecretError::WrongType { .. }),
            "{}: {err:?}",
            path.display()
        );
    }
}

#[test]
fn too_big_secrets_are_rejected_without_leaking() {
    let tmp = tempfile::tempdir().unwrap();
    let mut big = SECRET.repeat((MAX_SECRET_BYTES as usize) / SECRET.len() + 2);
    big.truncate(MAX_SECRET_BYTES as usize + 1);
    let path = tmp.path().join("big");
    fs::write(&path, &big).unwrap();
    let err = load(
        &[secret("big", SecretSource::File(path.clone()))],
        BTreeMap::new(),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, SecretError::TooLarge { .. }), "{err:?}");
    assert_no_leak(&err, SECRET);

    // Exactly the limit is fine.
    fs::write(&path, &big[..MAX_SECRET_BYTES as usize]).unwrap();
    let ok = load(
        &[secret("big", SecretSource::File(path))],
        BTreeMap::new(),
        None,
    )
    .unwrap();
    assert_eq!(ok[0].value.len() as u64, MAX_SECRET_BYTES);

    // A pipe that keeps sending.
    let (r, w) = nix::unistd::pipe().unwrap();
    let writer = std::thread::spawn(move || {
        let mut f = fs::File::from(w);
        let _ = f.write_all(&big); // EPIPE once the reader gives up
    });
    let mut passed = BTreeMap::new();
    passed.insert("p".to_owned(), r);
    let err = load(&[secret("p", SecretSource::Fd)], passed, None).unwrap_err();
    assert!(matches!(err, SecretError::TooLarge { .. }), "{err:?}");
    assert_no_leak(&err, SECRET);
    writer.join().unwrap();
}

#[test]
fn a_pipe_that_never_closes_times_out() {
    let (r, w) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&w, SECRET).unwrap();
    let mut passed = BTreeMap::new();
    passed.insert("p".to_owned(), r);
    let started = std::time::Instant::now();
    let err = load(&[secret("p", SecretSource::Fd)], passed, None).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, SecretError::Timeout { .. }), "{err:?}");
    assert!(took < liminal_engine::secrets::PIPE_TIMEOUT + std::time::Duration::from_secs(2));
    assert_no_leak(&err, SECRET);
    drop(w);
}

#[test]
fn declared_and_passed_descriptors_must_match() {
    let err = load(&[secret("tok", SecretSource::Fd)], BTreeMap::new(), None).unwrap_err();
    assert!(
        matches!(&err, SecretError::NotPassed { name } if name == "tok"),
        "{err:?}"
    );

    let mut passed = BTreeMap::new();
    passed.insert("extra".to_owned(), memfd_with(SECRET));
    let err = load(&[], passed, None).unwrap_err();
    assert!(
        matches!(&err, SecretError::Undeclared { name } if name == "extra"),
        "{err:?}"
    );

    // Declared, but as a file secret: a passed fd of that name is undeclared.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t");
    fs::write(&path, SECRET).unwrap();
    let mut passed = BTreeMap::new();
    passed.insert("tok".to_owned(), memfd_with(SECRET));
    let err = load(&[secret("tok", SecretSource::File(path))], passed, None).unwrap_err();
    assert!(matches!(err, SecretError::Undeclared { .. }), "{err:?}");
    assert_no_leak(&err, SECRET);
}

/// Any layout against umoci's unpacker, e.g. the debootstrap one:
/// `LIMINAL_TEST_OCI=$HOME/.cache/liminal/oci-layouts/bookworm-minbase:latest
///  cargo test -p liminal-engine --test inputs -- --ignored same_tree_as_umoci`
#[test]
#[ignore = "needs LIMINAL_TEST_OCI=LAYOUT:TAG, umoci and root"]
fn same_tree_as_umoci_for_a_given_layout() {
    let Some(spec) = std::env::var_os("LIMINAL_TEST_OCI") else {
        eprintln!("SKIP: LIMINAL_TEST_OCI is not set");
        return;
    };
    let spec = spec.into_string().unwrap();
    let (layout, tag) = spec.rsplit_once(':').unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let img = resolve(&oci(Path::new(layout), tag), &tmp.path().join("cache")).unwrap();
    eprintln!("liminal unpack: {:?}", t.elapsed());
    let bundle = tmp.path().join("bundle");
    let t = std::time::Instant::now();
    let st = Command::new("umoci")
        .args(["raw", "unpack", "--image", &spec])
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(st.success());
    eprintln!("umoci raw unpack: {:?}", t.elapsed());
    assert_eq!(
        tree_digest(&bundle).unwrap(),
        tree_digest(&img.rootfs).unwrap()
    );
}
