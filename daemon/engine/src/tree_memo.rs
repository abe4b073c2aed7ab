//! In-process memo of tree digests, kept true by inotify.
//!
//! [`crate::digest::tree_digest_cached`] proves a tree unchanged with a
//! stat-only walk: one `fstatat` per entry, about 1 ms per run for the
//! 285-entry busybox rootfs on this machine kind and tens of ms for a
//! debootstrap image, on the path of every run. A long-lived engine
//! (liminald) need not repeat it: while walking, it watches every folder of
//! the tree (and every regular file with more than one link, which can be
//! written through a name outside the tree), and the digest stays good until
//! one of those watches reports a change.
//!
//! What inotify does not report, the walk still catches, at most [`TTL`]
//! late: writes through a shared mmap, writes through a hard link made
//! after the walk from outside the tree (the link itself is not reported to
//! the file's folder), mounts made inside the tree, changes made by another
//! host on a network filesystem. A memo entry is trusted for
//! `TTL` after its walk; then the next run walks again (and finds the same
//! stamp, or not).
//!
//! Concurrency: runs ask from several threads. The lock is held for the
//! bookkeeping only, never for a walk or for hashing; a tree whose watches
//! reported anything while it was being walked is not memoized, so a memo
//! entry never predates a change it missed.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a memoized digest is trusted without a walk.
pub const TTL: Duration = Duration::from_secs(1);
/// Watches this process may hold at most (the per-user limit,
/// fs.inotify.max_user_watches, is shared with everything else root runs).
const MAX_WATCHES: usize = 65_536;
/// Trees memoized at most; the least recently used one goes first.
const MAX_TREES: usize = 64;

/// What a folder's watch reports: anything that changes a name, a type, a
/// mode or a content below it (children included), or the folder itself
/// going away. Not reads, not opens.
fn dir_mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

fn file_mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_DONT_FOLLOW
}

/// One memoized tree.
struct Tree {
    digest: String,
    /// Device and inode of the root when walked: the same path naming
    /// another folder (a parent renamed, a new one made) is another tree.
    root: (u64, u64),
    walked: Instant,
    last_used: Instant,
}

struct State {
    inotify: Inotify,
    trees: HashMap<PathBuf, Tree>,
    /// Which trees each watch belongs to (trees can share folders).
    wd_trees: HashMap<WatchDescriptor, Vec<PathBuf>>,
    /// The watches each tree holds, whether memoized yet or still walking.
    tree_wds: HashMap<PathBuf, Vec<WatchDescriptor>>,
    /// Trees being walked: how many walks, and whether the tree was dropped
    /// (a change reported) since the first of them began.
    walking: HashMap<PathBuf, (usize, bool)>,
}

pub struct TreeMemo {
    state: Mutex<State>,
    ttl: Duration,
}

/// A walk in progress: adds watches for one tree as the walk opens folders.
pub struct Watcher<'a> {
    memo: &'a TreeMemo,
    key: &'a Path,
    /// False once a watch could not be added: the tree is then not memoized.
    complete: bool,
}

impl TreeMemo {
    pub fn new(ttl: Duration) -> std::io::Result<TreeMemo> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(TreeMemo {
            state: Mutex::new(State {
                inotify,
                trees: HashMap::new(),
                wd_trees: HashMap::new(),
                tree_wds: HashMap::new(),
                walking: HashMap::new(),
            }),
            ttl,
        })
    }

    /// The process's memo; `None` if inotify is unavailable (the walk then
    /// runs every time, as without a memo).
    pub fn global() -> Option<&'static TreeMemo> {
        static MEMO: OnceLock<Option<TreeMemo>> = OnceLock::new();
        MEMO.get_or_init(|| match TreeMemo::new(TTL) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify: tree digests are walked on every run");
                None
            }
        })
        .as_ref()
    }

    /// The state with every pending event applied.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock_undrained();
        st.drain();
        st
    }

    /// The state as it is: for adding watches during a walk, where events
    /// can wait for [`TreeMemo::finish`] (one read less per folder).
    fn lock_undrained(&self) -> MutexGuard<'_, State> {
        // A thread that panicked mid-update can at worst leave a tree
        // un-memoized or a watch unowned; both only cost a walk.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The memoized digest of the tree at `canonical`, if it is still good:
    /// no watch of it reported anything, it was walked less than the TTL ago,
    /// and the path still names the folder that was walked.
    pub fn get(&self, canonical: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata(canonical)
            .ok()
            .map(|m| (m.dev(), m.ino()))?;
        let mut st = self.lock();
        let t = st.trees.get_mut(canonical)?;
        if t.root != root || t.walked.elapsed() >= self.ttl {
            return None;
        }
        t.last_used = Instant::now();
        Some(t.digest.clone())
    }

    /// Starts watching a walk of `canonical`; hand the result to
    /// [`TreeMemo::finish`] with the digest the walk produced.
    pub fn watcher<'a>(&'a self, canonical: &'a Path) -> Watcher<'a> {
        self.lock()
            .walking
            .entry(canonical.to_owned())
            .or_insert((0, false))
            .0 += 1;
        Watcher {
            memo: self,
            key: canonical,
            complete: true,
        }
    }

    /// Memoizes the digest of a finished walk, unless a watch of the tree
    /// reported something since the walk began (the digest may then predate
    /// a change) or a watch could not be added.
    pub fn finish(&self, w: Watcher<'_>, root: (u64, u64), digest: &str) {
        let mut st = self.lock();
        let key = w.key.to_owned();
        let dropped = st.walking.get(&key).is_none_or(|&(_, dropped)| dropped);
        if !w.complete || dropped {
            st.drop_tree(&key);
            return;
        }
        while st.trees.len() >= MAX_TREES && !st.trees.contains_key(&key) {
            let Some(oldest) = st
                .trees
                .iter()
                .min_by_key(|(_, t)| t.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            st.drop_tree(&oldest);
        }
        let now = Instant::now();
        st.trees.insert(
            key,
            Tree {
                digest: digest.to_owned(),
                root,
                walked: now,
                last_used: now,
            },
        );
    }

    /// Watches currently held (for tests and diagnostics).
    pub fn watch_count(&self) -> usize {
        self.lock().wd_trees.len()
    }
}

impl Drop for Watcher<'_> {
    fn drop(&mut self) {
        let mut st = self.memo.lock_undrained();
        if let Some(w) = st.walking.get_mut(self.key) {
            w.0 -= 1;
            if w.0 == 0 {
                st.walking.remove(self.key);
            }
        }
    }
}

impl Watcher<'_> {
    /// A folder the walk opened, before it lists it.
    pub fn dir(&mut self, fd: RawFd) {
        self.add(Path::new(&format!("/proc/self/fd/{fd}")), dir_mask());
    }

    /// A file whose changes a folder's watch would not report: one with
    /// more than one link (after its folder is watched), or a tree that is
    /// a single file.
    pub fn file(&mut self, path: &Path) {
        self.add(path, file_mask());
    }

    fn add(&mut self, path: &Path, mask: AddWatchFlags) {
        if !self.complete {
            return;
        }
        let mut st = self.memo.lock_undrained();
        if st.wd_trees.len() >= MAX_WATCHES {
            self.complete = false;
            return;
        }
        match st.inotify.add_watch(path, mask) {
            Ok(wd) => {
                let trees = st.wd_trees.entry(wd).or_default();
                if !trees.iter().any(|k| k == self.key) {
                    trees.push(self.key.to_owned());
                }
                let wds = st.tree_wds.entry(self.key.to_owned()).or_default();
                if !wds.contains(&wd) {
                    wds.push(wd);
                }
            }
            Err(e) => {
                tracing::debug!(tree = %self.key.display(), error = %e, "cannot watch; not memoizing this tree");
                self.complete = false;
            }
        }
    }
}

impl State {
    /// Reads every pending event and drops the trees they concern.
    fn drain(&mut self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) if !ev.is_empty() => ev,
                // EAGAIN: nothing pending. Any other error: the queue can no
                // longer be trusted, so nothing memoized can either.
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "reading inotify events; dropping every memoized tree digest");
                    self.drop_all();
                    return;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.drop_all();
                    continue;
                }
                for key in self.wd_trees.get(&ev.wd).cloned().unwrap_or_default() {
                    self.drop_tree(&key);
                }
            }
        }
    }

    fn drop_all(&mut self) {
        let keys: std::collections::BTreeSet<PathBuf> = self
            .tree_wds
            .keys()
            .chain(self.trees.keys())
            .chain(self.walking.keys())
            .cloned()
            .collect();
        for k in keys {
            self.drop_tree(&k);
        }
    }

    /// Forgets a tree's digest and its watches (those no other tree shares),
    /// and marks a walk of it in progress as not to be memoized.
    fn drop_tree(&mut self, key: &Path) {
        self.trees.remove(key);
        if let Some(w) = self.walking.get_mut(key) {
            w.1 = true;
        }
        for wd in self.tree_wds.remove(key).unwrap_or_default() {
            let Some(trees) = self.wd_trees.get_mut(&wd) else {
                continue;
            };
            trees.retain(|k| k != key);
            if trees.is_empty() {
                self.wd_trees.remove(&wd);
                // Fails harmlessly if the kernel already removed it (the
                // folder was deleted).
                let _ = self.inotify.rm_watch(wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    fn walk_root<'a>(memo: &'a TreeMemo, root: &'a Path) -> Watcher<'a> {
        let mut w = memo.watcher(root);
        let dir = std::fs::File::open(root).unwrap();
        w.dir(dir.as_raw_fd());
        w
    }

    fn id(root: &Path) -> (u64, u64) {
        let m = std::fs::metadata(root).unwrap();
        (m.dev(), m.ino())
    }

    /// A walk of `root` that saw nothing change, finished with `digest`.
    fn memoize(memo: &TreeMemo, root: &Path, digest: &str) {
        let w = walk_root(memo, root);
        memo.finish(w, id(root), digest);
    }

    /// An empty folder (its canonical path) and a memo with this TTL.
    fn fixture(ttl: Duration) -> (tempfile::TempDir, PathBuf, TreeMemo) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        (tmp, root, TreeMemo::new(ttl).unwrap())
    }

    #[test]
    fn a_change_drops_the_digest_and_its_watches() {
        let (_tmp, root, memo) = fixture(Duration::from_secs(3600));
        memoize(&memo, &root, "d1");
        assert_eq!(memo.get(&root).as_deref(), Some("d1"));
        assert_eq!(memo.watch_count(), 1);
        std::fs::write(root.join("f"), b"x").unwrap();
        assert_eq!(memo.get(&root), None);
        assert_eq!(memo.watch_count(), 0, "the dropped tree's watch is removed");
    }

    #[test]
    fn a_change_during_the_walk_is_not_memoized() {
        let (_tmp, root, memo) = fixture(Duration::from_secs(3600));
        let w = walk_root(&memo, &root);
        std::fs::write(root.join("f"), b"x").unwrap();
        // Another thread's bookkeeping reads the event before this walk ends.
        assert_eq!(memo.watch_count(), 0);
        memo.finish(w, id(&root), "stale");
        assert_eq!(memo.get(&root), None);
        // The next walk, with nothing changing, is memoized.
        memoize(&memo, &root, "d2");
        assert_eq!(memo.get(&root).as_deref(), Some("d2"));
    }

    #[test]
    fn a_change_seen_only_when_the_walk_finishes_is_not_memoized() {
        let (_tmp, root, memo) = fixture(Duration::from_secs(3600));
        let w = walk_root(&memo, &root);
        std::fs::write(root.join("f"), b"x").unwrap();
        memo.finish(w, id(&root), "stale");
        assert_eq!(memo.get(&root), None);
        assert_eq!(memo.watch_count(), 0);
    }

    #[test]
    fn the_digest_is_trusted_for_its_ttl_only() {
        let (_tmp, root, memo) = fixture(Duration::from_millis(30));
        memoize(&memo, &root, "d");
        assert_eq!(memo.get(&root).as_deref(), Some("d"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(memo.get(&root), None);
    }

    #[test]
    fn another_folder_at_the_same_path_is_another_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap().join("root");
        std::fs::create_dir(&root).unwrap();
        let memo = TreeMemo::new(Duration::from_secs(3600)).unwrap();
        memoize(&memo, &root, "d");
        // Renaming the parent moves nothing the root's own watch reports.
        std::fs::rename(tmp.path(), tmp.path().with_extension("old")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(memo.get(&root), None);
        std::fs::remove_dir_all(tmp.path()).unwrap();
        std::fs::rename(tmp.path().with_extension("old"), tmp.path()).unwrap();
    }
}
