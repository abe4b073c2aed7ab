//! A disk that fills up under the spool (a real, tiny tmpfs): the failed
//! append is an error naming the file, later appends are refused (the tail
//! is unknown) until the spool is reopened, and reopening recovers every
//! fact that was acknowledged as durable. Needs root (mount); skipped
//! otherwise.

mod common;

use common::{signal, tag_of};
use liminal_spool::{Spool, SpoolConfig, SpoolError};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "liminal-spool-test",
            ])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

#[test]
fn full_disk_poisons_appends_and_reopen_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(_mnt) = Tmpfs::mount(tmp.path(), "256k") else {
        panic!("mount -t tmpfs failed although running as root");
    };
    let dir = tmp.path().join("spool");
    let cfg = SpoolConfig {
        segment_bytes: 32 * 1024,
        quota_bytes: 64 * 1024 * 1024, // far above the disk: the disk fills first
        ..SpoolConfig::default()
    };
    let (spool, _) = Spool::open(&dir, cfg.clone()).unwrap();
    let mut last_ok = 0;
    let err = loop {
        let batch: Vec<_> = (0..5).map(|k| signal(&format!("e{last_ok}-{k}"))).collect();
        match spool.append(&batch) {
            Ok(r) => last_ok = r.last_seq,
            Err(e) => break e,
        }
        assert!(last_ok < 100_000, "the tmpfs never filled");
    };
    match &err {
        SpoolError::Io { path, source, .. } => {
            assert!(path.starts_with(&dir), "{err}");
            assert_eq!(source.raw_os_error(), Some(28), "ENOSPC expected: {err}");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(spool.last_seq(), last_ok);
    assert!(matches!(
        spool.append([signal("refused")]),
        Err(SpoolError::Poisoned { .. })
    ));
    // Reads and acks still work; acking everything frees sealed segments.
    assert_eq!(
        spool.read_since(0, usize::MAX).unwrap().len() as u64,
        last_ok
    );
    spool.ack(last_ok).unwrap();
    drop(spool);

    let (spool, report) = Spool::open(&dir, cfg).unwrap();
    // The failed batch was undone: exactly the durable facts remain.
    assert_eq!(report.last_seq, last_ok);
    assert!(report.torn_tail.is_none(), "{report:?}");
    assert_eq!(report.acked_seq, last_ok);
    let r = spool.append([signal("after-reopen")]).unwrap();
    assert_eq!(r.first_seq, last_ok + 1);
    assert_eq!(
        tag_of(&spool.read_since(last_ok, 1).unwrap()[0].2),
        "after-reopen"
    );
    drop(spool);
}
