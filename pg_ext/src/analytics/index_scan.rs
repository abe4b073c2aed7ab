//! Reads the leaf pages of a btree index of the schema directly, in Rust:
//! what an index-only scan returns, without the executor (slots,
//! projection, quals, planning) and without btree checking every entry of
//! each page against scan keys. Used where the analytics walk millions of
//! index entries (test_stability: `scan_leaves`, from the leftmost leaf) or
//! probe an index a few hundred times per call (causality_walk's rarity:
//! `walk_from`, positioned by btree's own `_bt_search`), which the executor
//! made the bottleneck.
//!
//! Pages are read as a btree forward scan reads them: whole, under a share
//! lock, following right-links (a concurrent split moves entries right, so
//! none is lost or seen twice), deleted and half-dead pages stepped over,
//! killed (LP_DEAD) items skipped, posting lists expanded. Visibility is an
//! index-only scan's: the leaf stays pinned while the visibility map is
//! read; an entry counts when its heap page is all-visible, else when
//! `index_fetch_heap` finds a version of the row visible to the active
//! snapshot.
//!
//! Callers first check with `verified_index` that the index is the one the
//! schema defines (columns, predicate, btree), and fall back to SQL
//! otherwise or when a page holds something unexpected. Serializable
//! transactions also take the SQL path: these reads take no predicate locks.

use super::spi_stream::{stream_cached, Row};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Tests set this to compare the direct scans with the SQL they replace.
pub static FORCE_SQL: AtomicBool = AtomicBool::new(false);
/// Direct reads that completed (tests check the direct path really ran).
pub static DIRECT_READS: AtomicU64 = AtomicU64::new(0);

/// The current-row predicate every analytics index carries, as
/// `pg_get_expr` prints it.
const CURRENT_PREDICATE: &str =
    "((tx_to = 'infinity'::timestamp with time zone) AND (valid_to = 'infinity'::timestamp with time zone))";

/// The oid of `liminal.<index>` when it is a valid btree on
/// `liminal.<table>` over exactly `columns` (name, type as format_type
/// prints it; `nkey` of them key columns)
/// with the current-row predicate, and the transaction is not
/// serializable; None otherwise (the caller then uses SQL).
pub fn verified_index(
    index: &str,
    table: &str,
    columns: &[(&str, &str)],
    nkey: i16,
) -> Option<pg_sys::Oid> {
    let cols: Vec<String> = columns
        .iter()
        .map(|(name, ty)| format!("{name} {ty}"))
        .collect();
    if FORCE_SQL.load(Ordering::Relaxed) {
        return None;
    }
    // Through `stream` (a read-only SPI call), which parallel mode allows.
    let mut found: Option<pg_sys::Oid> = None;
    stream_cached(
        "SELECT i.indexrelid::oid::int8 FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_am am ON am.oid = c.relam
         WHERE n.nspname = 'liminal' AND c.relname = $1 AND am.amname = 'btree'
           AND i.indrelid = ('liminal.' || quote_ident($2))::regclass
           AND i.indisvalid AND i.indisready AND i.indexprs IS NULL
           AND i.indnkeyatts = $4
           AND pg_get_expr(i.indpred, i.indrelid) = $5
           AND (SELECT array_agg(a.attname || ' ' || format_type(a.atttypid, NULL) ORDER BY k.ord)
                FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) = $3
           AND current_setting('transaction_isolation') <> 'serializable'",
        &[
            index.into(),
            table.into(),
            cols.into(),
            nkey.into(),
            CURRENT_PREDICATE.into(),
        ],
        1,
        &mut |row: &Row<'_>| {
            found = row.i64(0).map(|v| pg_sys::Oid::from(v as u32));
        },
    );
    found
}

/// An index opened for direct reading: the relations, and an index scan
/// descriptor for its heap-fetch state (index_fetch_heap) only. Dropping it
/// ends the scan and closes the relations (not while unwinding from an
/// error: the transaction's abort releases them then).
pub struct IndexScan {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    scan: pg_sys::IndexScanDesc,
    slot: *mut pg_sys::TupleTableSlot,
    vmbuf: pg_sys::Buffer,
    /// The visibility map block `vmbuf` holds, once known.
    vm_block: Option<u32>,
    natts: usize,
    /// Column layout for the in-Rust tuple reader.
    layout: Vec<Col>,
}

/// An index column as the tuple reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Col {
    /// A varlena (text): int-aligned unless stored with a 1-byte header.
    Text,
    /// An 8-byte pass-by-value, double-aligned column (timestamptz, int8).
    Int8,
}

impl IndexScan {
    /// Opens the index `index_oid` (columns as `layout` says, which the
    /// caller verified) and its table with AccessShareLock, under the
    /// active snapshot.
    pub fn open(index_oid: pg_sys::Oid, layout: &[Col]) -> Self {
        // SAFETY: plain PostgreSQL calls on a verified btree index; errors
        // are raised as PostgreSQL errors.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let index = pg_sys::index_open(index_oid, lock);
            let heap_oid = (*(*index).rd_index).indrelid;
            let heap = pg_sys::table_open(heap_oid, lock);
            let snapshot = pg_sys::GetActiveSnapshot();
            let scan = pg_sys::index_beginscan(heap, index, snapshot, 0, 0);
            // As every index scan does before fetching: index_beginscan
            // leaves xs_heap_continue uninitialized, and a stale "true"
            // would make the first heap fetch continue a HOT chain that
            // was never started (and miss the row).
            pg_sys::index_rescan(scan, std::ptr::null_mut(), 0, std::ptr::null_mut(), 0);
            let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
            let natts = (*(*index).rd_att).natts as usize;
            if natts != layout.len() {
                error!(
                    "internal: index has {natts} columns, expected {}",
                    layout.len()
                );
            }
            IndexScan {
                heap,
                index,
                scan,
                slot,
                vmbuf: pg_sys::InvalidBuffer as pg_sys::Buffer,
                vm_block: None,
                natts,
                layout: layout.to_vec(),
            }
        }
    }
}

/// Splits an index tuple (`tup`: exactly its bytes) into columns in Rust,
/// as index_deform_tuple would (itup.h, tupmacs.h), when it is the common
/// shape: no NULLs, each varlena inline and uncompressed. `spans` gets
/// (offset, length) per column. False otherwise (PostgreSQL deforms it then).
fn read_tuple(tup: &[u8], layout: &[Col], spans: &mut [(usize, usize)]) -> bool {
    let mut off = 0;
    read_head(tup, &mut off) && read_cols(tup, layout, spans, 0..layout.len(), &mut off)
}

/// Checks the tuple header (no NULLs) and sets `off` to the first column.
fn read_head(tup: &[u8], off: &mut usize) -> bool {
    if tup.len() < 8 {
        return false;
    }
    let t_info = u16::from_ne_bytes([tup[6], tup[7]]) as u32;
    // MAXALIGN(sizeof(IndexTupleData)) without a null bitmap.
    *off = 8;
    t_info & pg_sys::INDEX_NULL_MASK == 0
}

/// Reads columns `cols` of `layout` from `off` on (see `read_tuple`).
fn read_cols(
    tup: &[u8],
    layout: &[Col],
    spans: &mut [(usize, usize)],
    cols: std::ops::Range<usize>,
    at: &mut usize,
) -> bool {
    let size = tup.len();
    let mut off = *at;
    for i in cols {
        let Some(col) = layout.get(i) else {
            return false;
        };
        match col {
            Col::Int8 => {
                off = (off + 7) & !7;
                if off + 8 > size {
                    return false;
                }
                spans[i] = (off, 8);
                off += 8;
            }
            Col::Text => {
                let Some(&b0) = tup.get(off) else {
                    return false;
                };
                if b0 == 0 {
                    // Padding before a 4-byte header.
                    off = (off + 3) & !3;
                }
                let Some(&b) = tup.get(off) else {
                    return false;
                };
                if b == 0x01 {
                    return false; // external (toast pointer)
                } else if b & 0x01 == 0x01 {
                    let total = ((b >> 1) & 0x7F) as usize;
                    if total < 1 || off + total > size {
                        return false;
                    }
                    spans[i] = (off + 1, total - 1);
                    off += total;
                } else {
                    if b & 0x03 != 0 || off + 4 > size {
                        return false; // compressed
                    }
                    let h =
                        u32::from_ne_bytes([tup[off], tup[off + 1], tup[off + 2], tup[off + 3]]);
                    let total = ((h >> 2) & 0x3FFF_FFFF) as usize;
                    if total < 4 || off + total > size {
                        return false;
                    }
                    spans[i] = (off + 4, total - 4);
                    off += total;
                }
            }
        }
    }
    *at = off;
    true
}

/// One leaf entry read by `IndexScan::scan_leaves`: its columns.
pub struct Entry<'a> {
    tup: &'a [u8],
    spans: &'a [(usize, usize)],
}

impl<'a> Entry<'a> {
    #[inline]
    pub fn text(&self, i: usize) -> Option<&'a [u8]> {
        let (off, len) = *self.spans.get(i)?;
        self.tup.get(off..off + len)
    }

    #[inline]
    pub fn i64(&self, i: usize) -> Option<i64> {
        let (off, _) = *self.spans.get(i)?;
        Some(i64::from_ne_bytes(
            self.tup.get(off..off + 8)?.try_into().ok()?,
        ))
    }
}

/// Why the leaf reader gave up (the caller then uses SQL).
#[derive(Debug)]
pub struct Unreadable(pub &'static str);

// nbtree.h (PostgreSQL 14 and later): the special space of a btree page,
// and the metapage.
#[repr(C)]
#[derive(Clone, Copy)]
struct BtPageOpaque {
    btpo_prev: u32,
    btpo_next: u32,
    btpo_level: u32,
    btpo_flags: u16,
    btpo_cycleid: u16,
}
const BTP_DELETED: u16 = 1 << 2;
const BTP_HALF_DEAD: u16 = 1 << 4;
const BTREE_MAGIC: u32 = 0x053162;
const P_NONE: u32 = 0;
/// Flags of t_tid's offset in a posting list tuple (nbtree.h).
const INDEX_ALT_TID_MASK: u16 = 0x2000;
const BT_IS_POSTING: u16 = 0x2000;
const BT_OFFSET_MASK: u16 = 0x0FFF;
const SIZE_OF_PAGE_HEADER: usize = 24;
/// Heap blocks per visibility map page: (BLCKSZ - page header) bytes of
/// 2 bits per heap block (visibilitymap.c).
const HEAPBLOCKS_PER_VM_PAGE: u32 = (pg_sys::BLCKSZ - SIZE_OF_PAGE_HEADER as u32) * 4;
const LP_NORMAL: u32 = 1;

impl IndexScan {
    /// Reads a page of the index into `page` (a copy made under a share
    /// lock; the buffer stays pinned, as an index-only scan keeps its leaf
    /// pinned while it checks the visibility map: see nbtree's README).
    /// Returns the pinned buffer, which the caller releases.
    fn read_page(&self, blk: u32, page: &mut [u8; pg_sys::BLCKSZ as usize]) -> pg_sys::Buffer {
        // SAFETY: standard buffer manager calls on a permanent index; the
        // copy is taken while the share lock is held.
        unsafe {
            let buf = pg_sys::ReadBufferExtended(
                self.index,
                pg_sys::ForkNumber::MAIN_FORKNUM,
                blk,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            if buf <= 0 {
                error!("internal: unexpected local buffer for an index");
            }
            pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_SHARE as i32);
            let p = pg_sys::BufferGetPage(buf) as *const u8;
            std::ptr::copy_nonoverlapping(p, page.as_mut_ptr(), page.len());
            pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_UNLOCK as i32);
            buf
        }
    }

    fn opaque(page: &[u8]) -> Option<BtPageOpaque> {
        let special = u16::from_ne_bytes([page[16], page[17]]) as usize;
        let b = page.get(special..special + std::mem::size_of::<BtPageOpaque>())?;
        // SAFETY: BtPageOpaque is plain old data of exactly b's length.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const BtPageOpaque) })
    }

    /// The leftmost leaf page, by descending from the (fast) root along
    /// each level's first downlink, as _bt_get_endpoint does.
    fn leftmost_leaf(&self, page: &mut [u8; pg_sys::BLCKSZ as usize]) -> Result<u32, Unreadable> {
        let buf = self.read_page(0, page);
        // SAFETY: releasing the pin read_page took.
        unsafe { pg_sys::ReleaseBuffer(buf) };
        let meta = &page[SIZE_OF_PAGE_HEADER..SIZE_OF_PAGE_HEADER + 24];
        let word = |i: usize| u32::from_ne_bytes([meta[i], meta[i + 1], meta[i + 2], meta[i + 3]]);
        let (magic, version, fastroot) = (word(0), word(4), word(16));
        if magic != BTREE_MAGIC || !(2..=4).contains(&version) {
            return Err(Unreadable("not a btree metapage of a known version"));
        }
        if fastroot == P_NONE {
            return Ok(P_NONE); // empty index
        }
        let mut blk = fastroot;
        for _ in 0..10_000 {
            let buf = self.read_page(blk, page);
            // SAFETY: releasing the pin read_page took.
            unsafe { pg_sys::ReleaseBuffer(buf) };
            let o = Self::opaque(page).ok_or(Unreadable("bad special space"))?;
            if o.btpo_flags & (BTP_DELETED | BTP_HALF_DEAD) != 0 {
                if o.btpo_next == P_NONE {
                    return Err(Unreadable("fell off the end of a level"));
                }
                blk = o.btpo_next;
                continue;
            }
            if o.btpo_level == 0 {
                return Ok(blk);
            }
            // First data item: 1 on a rightmost page, else 2 (1 = high key).
            let first = if o.btpo_next == P_NONE { 1 } else { 2 };
            let (off, _len) = line_pointer(page, first).ok_or(Unreadable("empty internal page"))?;
            let t = page.get(off..off + 6).ok_or(Unreadable("bad downlink"))?;
            blk = (u16::from_ne_bytes([t[0], t[1]]) as u32) << 16
                | u16::from_ne_bytes([t[2], t[3]]) as u32;
        }
        Err(Unreadable("no leaf level"))
    }

    /// Reads every leaf entry in index order straight from the pages: the
    /// executor-free equivalent of an unqualified index-only scan, without
    /// per-entry calls into the btree code. `want` decides from the first
    /// `want_cols` columns whether an entry matters (the others are read
    /// only for the entries it wants); `take` gets each wanted entry whose row is
    /// visible (once per heap row, posting lists included).
    ///
    /// Concurrency as in a btree forward scan: each page is read whole
    /// under a share lock and the walk follows its right-link, so a
    /// concurrent split (which moves entries right) neither loses nor
    /// repeats entries; deleted and half-dead pages are stepped over.
    pub fn scan_leaves(
        &mut self,
        want_cols: usize,
        mut want: impl FnMut(&Entry<'_>) -> bool,
        mut take: impl FnMut(&Entry<'_>),
    ) -> Result<(), Unreadable> {
        let mut page = Box::new([0u8; pg_sys::BLCKSZ as usize]);
        let mut spans = vec![(0usize, 0usize); self.natts];
        let mut blk = self.leftmost_leaf(&mut page)?;
        let mut pages = 0u64;
        while blk != P_NONE {
            pages += 1;
            if pages > u32::MAX as u64 {
                return Err(Unreadable("right-links loop"));
            }
            pg_sys::check_for_interrupts!();
            let buf = self.read_page(blk, &mut page);
            let o = match Self::opaque(&page[..]) {
                Some(o) => o,
                None => {
                    // SAFETY: releasing the pin read_page took.
                    unsafe { pg_sys::ReleaseBuffer(buf) };
                    return Err(Unreadable("bad special space"));
                }
            };
            let next = o.btpo_next;
            if o.btpo_flags & (BTP_DELETED | BTP_HALF_DEAD) == 0 {
                if o.btpo_level != 0 {
                    // SAFETY: as above.
                    unsafe { pg_sys::ReleaseBuffer(buf) };
                    return Err(Unreadable("right-link left the leaf level"));
                }
                let first = if next == P_NONE { 1 } else { 2 };
                let n = (u16::from_ne_bytes([page[12], page[13]]) as usize)
                    .saturating_sub(SIZE_OF_PAGE_HEADER)
                    / 4;
                for item in first..=n {
                    let Some((off, len)) = line_pointer(&page[..], item) else {
                        continue; // unused or killed (LP_DEAD): skipped as btree does
                    };
                    let Some(tup) = page.get(off..off + len) else {
                        continue;
                    };
                    // A posting list tuple's columns end where its TIDs begin.
                    let (cols_end, ntids, tids_at, posting) = tuple_shape(tup, len);
                    let Some(cols) = tup.get(..cols_end) else {
                        continue;
                    };
                    let natts = self.layout.len();
                    let mut off = 0;
                    let first = want_cols.min(natts);
                    if !(read_head(cols, &mut off)
                        && read_cols(cols, &self.layout, &mut spans, 0..first, &mut off))
                    {
                        // SAFETY: as above.
                        unsafe { pg_sys::ReleaseBuffer(buf) };
                        return Err(Unreadable("an entry in an unusual form"));
                    }
                    if !want(&Entry {
                        tup: cols,
                        spans: &spans,
                    }) {
                        continue;
                    }
                    if !read_cols(cols, &self.layout, &mut spans, first..natts, &mut off) {
                        // SAFETY: as above.
                        unsafe { pg_sys::ReleaseBuffer(buf) };
                        return Err(Unreadable("an entry in an unusual form"));
                    }
                    let entry = Entry {
                        tup: cols,
                        spans: &spans,
                    };
                    for k in 0..ntids {
                        let Some(tid) = heap_tid(tup, posting, tids_at, k) else {
                            break;
                        };
                        if self.tid_visible(tid) {
                            take(&entry);
                        }
                    }
                }
            }
            // SAFETY: the leaf's pin is released once its entries are checked.
            unsafe { pg_sys::ReleaseBuffer(buf) };
            blk = next;
        }
        DIRECT_READS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the heap row `tid` points at is visible: all-visible page,
    /// else a heap fetch (HOT chains followed) under the snapshot.
    fn tid_visible(&mut self, tid: pg_sys::ItemPointerData) -> bool {
        // SAFETY: the scan's heap fetch state belongs to the heap relation;
        // xs_heaptid is only read by index_fetch_heap.
        unsafe {
            let blk = (tid.ip_blkid.bi_hi as u32) << 16 | tid.ip_blkid.bi_lo as u32;
            let map_block = blk / HEAPBLOCKS_PER_VM_PAGE;
            let all_visible = if self.vm_block == Some(map_block) {
                // The bits of a visibility map page we hold pinned, read the
                // way visibilitymap_get_status reads them (one byte, no
                // lock: a byte read is atomic), without a call per entry.
                let map = (pg_sys::BufferGetPage(self.vmbuf) as *const u8).add(SIZE_OF_PAGE_HEADER);
                let i = blk % HEAPBLOCKS_PER_VM_PAGE;
                let byte = std::ptr::read_volatile(map.add((i / 4) as usize));
                (byte >> ((i % 4) * 2)) & pg_sys::VISIBILITYMAP_ALL_VISIBLE as u8 != 0
            } else {
                let status =
                    pg_sys::visibilitymap_get_status(self.heap, blk, &mut self.vmbuf) as u32;
                // Afterwards vmbuf holds map_block's page, or nothing (no map yet).
                self.vm_block =
                    (self.vmbuf != pg_sys::InvalidBuffer as pg_sys::Buffer).then_some(map_block);
                status & pg_sys::VISIBILITYMAP_ALL_VISIBLE != 0
            };
            if all_visible {
                return true;
            }
            (*self.scan).xs_heaptid = tid;
            pg_sys::index_fetch_heap(self.scan, self.slot)
        }
    }
}

// nbtree's search entry points (PostgreSQL 15 signatures; exported by the
// server, not in pgrx's bindings). BTScanInsert and BTStack stay opaque.
// Called through pgrx's FFI guard, so an ERROR inside unwinds as usual.
mod raw {
    use pgrx::pg_sys;
    use std::ffi::c_void;
    unsafe extern "C-unwind" {
        pub fn _bt_mkscankey(rel: pg_sys::Relation, itup: pg_sys::IndexTuple) -> *mut c_void;
        pub fn _bt_search(
            rel: pg_sys::Relation,
            key: *mut c_void,
            buf: *mut pg_sys::Buffer,
            access: i32,
            snapshot: pg_sys::Snapshot,
        ) -> *mut c_void;
        pub fn _bt_compare(
            rel: pg_sys::Relation,
            key: *mut c_void,
            page: pg_sys::Page,
            offnum: pg_sys::OffsetNumber,
        ) -> i32;
        pub fn _bt_freestack(stack: *mut c_void);
    }
}

unsafe fn _bt_mkscankey(rel: pg_sys::Relation, itup: pg_sys::IndexTuple) -> *mut std::ffi::c_void {
    pg_sys::ffi::pg_guard_ffi_boundary(|| raw::_bt_mkscankey(rel, itup))
}

unsafe fn _bt_search(
    rel: pg_sys::Relation,
    key: *mut std::ffi::c_void,
    buf: *mut pg_sys::Buffer,
    access: i32,
    snapshot: pg_sys::Snapshot,
) -> *mut std::ffi::c_void {
    pg_sys::ffi::pg_guard_ffi_boundary(|| raw::_bt_search(rel, key, buf, access, snapshot))
}

unsafe fn _bt_compare(
    rel: pg_sys::Relation,
    key: *mut std::ffi::c_void,
    page: pg_sys::Page,
    offnum: pg_sys::OffsetNumber,
) -> i32 {
    pg_sys::ffi::pg_guard_ffi_boundary(|| raw::_bt_compare(rel, key, page, offnum))
}

unsafe fn _bt_freestack(stack: *mut std::ffi::c_void) {
    pg_sys::ffi::pg_guard_ffi_boundary(|| raw::_bt_freestack(stack))
}

/// What a `walk_from` visitor tells the walk.
pub enum Step {
    Continue,
    Stop,
}

impl IndexScan {
    /// Visits the index entries from the first one >= `key` (a value for
    /// every key column) in index order: btree's own descent finds the leaf
    /// (`_bt_search`, moving right past concurrent splits, and `_bt_compare`
    /// for the position on it), then the leaves are read in Rust as in
    /// `scan_leaves` (without btree checking every entry of each page
    /// against scan keys, which is what made a probe cost). `f` gets each
    /// entry and a visibility check for its heap rows (`vis(k)` for the
    /// k-th of `ntids`); it returns whether to go on.
    pub fn walk_from(
        &mut self,
        key: &[pg_sys::Datum],
        mut f: impl FnMut(&Entry<'_>, usize, &mut dyn FnMut(usize) -> bool) -> Step,
    ) -> Result<(), Unreadable> {
        let layout = self.layout.clone();
        let mut spans = vec![(0usize, 0usize); self.natts];
        let mut page = Box::new([0u8; pg_sys::BLCKSZ as usize]);
        // SAFETY: an index tuple of the key columns formed by PostgreSQL;
        // _bt_search returns the leaf share-locked and pinned (or no buffer
        // for an empty index), released below.
        let (mut buf, start) = unsafe {
            let nkey = key.len();
            let mut nulls = vec![false; nkey];
            let mut vals = key.to_vec();
            // The insertion key covers the key columns; a tuple descriptor
            // of the index is fine (extra columns are not read).
            if nkey > self.natts {
                error!("internal: more key values than index columns");
            }
            vals.resize(self.natts, pg_sys::Datum::from(0));
            nulls.resize(self.natts, true);
            let itup = pg_sys::index_form_tuple(
                (*self.index).rd_att,
                vals.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            let skey = _bt_mkscankey(self.index, itup);
            let mut buf: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
            let stack = _bt_search(
                self.index,
                skey,
                &mut buf,
                pg_sys::BUFFER_LOCK_SHARE as i32,
                pg_sys::GetActiveSnapshot(),
            );
            _bt_freestack(stack);
            if buf == pg_sys::InvalidBuffer as pg_sys::Buffer {
                return Ok(()); // empty index
            }
            let p = pg_sys::BufferGetPage(buf);
            let bytes = std::slice::from_raw_parts(p as *const u8, pg_sys::BLCKSZ as usize);
            let o = Self::opaque(bytes);
            let maxoff = (u16::from_ne_bytes([bytes[12], bytes[13]]) as usize)
                .saturating_sub(SIZE_OF_PAGE_HEADER)
                / 4;
            let first = match o {
                Some(o) if o.btpo_next != P_NONE => 2,
                _ => 1,
            };
            // First item >= key (as _bt_binsrch on a leaf).
            let (mut lo, mut hi) = (first, maxoff + 1);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if _bt_compare(self.index, skey, p, mid as pg_sys::OffsetNumber) > 0 {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            page.copy_from_slice(bytes);
            pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_UNLOCK as i32);
            pg_sys::pfree(itup as *mut std::ffi::c_void);
            pg_sys::pfree(skey);
            (buf, lo)
        };
        let mut from = start;
        let mut pages = 0u32;
        loop {
            pages += 1;
            if pages % 64 == 0 {
                pg_sys::check_for_interrupts!();
            }
            let o = match Self::opaque(&page[..]) {
                Some(o) => o,
                None => {
                    // SAFETY: releasing the pin taken for this page.
                    unsafe { pg_sys::ReleaseBuffer(buf) };
                    return Err(Unreadable("bad special space"));
                }
            };
            let next = o.btpo_next;
            let mut stop = false;
            if o.btpo_flags & (BTP_DELETED | BTP_HALF_DEAD) == 0 {
                if o.btpo_level != 0 {
                    // SAFETY: as above.
                    unsafe { pg_sys::ReleaseBuffer(buf) };
                    return Err(Unreadable("right-link left the leaf level"));
                }
                let first = if next == P_NONE { 1 } else { 2 };
                let n = (u16::from_ne_bytes([page[12], page[13]]) as usize)
                    .saturating_sub(SIZE_OF_PAGE_HEADER)
                    / 4;
                for item in from.max(first)..=n {
                    let Some((off, len)) = line_pointer(&page[..], item) else {
                        continue;
                    };
                    let Some(tup) = page.get(off..off + len) else {
                        continue;
                    };
                    let (cols_end, ntids, tids_at, posting) = tuple_shape(tup, len);
                    let Some(cols) = tup.get(..cols_end) else {
                        continue;
                    };
                    if !read_tuple(cols, &layout, &mut spans) {
                        // SAFETY: as above.
                        unsafe { pg_sys::ReleaseBuffer(buf) };
                        return Err(Unreadable("an entry in an unusual form"));
                    }
                    let entry = Entry {
                        tup: cols,
                        spans: &spans,
                    };
                    let mut vis = |k: usize| -> bool {
                        match heap_tid(tup, posting, tids_at, k) {
                            Some(tid) => self.tid_visible(tid),
                            None => false,
                        }
                    };
                    if let Step::Stop = f(&entry, ntids, &mut vis) {
                        stop = true;
                        break;
                    }
                }
            }
            // SAFETY: the page's pin is released once its entries are checked.
            unsafe { pg_sys::ReleaseBuffer(buf) };
            if stop || next == P_NONE {
                return Ok(());
            }
            buf = self.read_page(next, &mut page);
            from = 1;
        }
    }
}

/// (end of the key columns, number of heap TIDs, where the posting list
/// starts, is a posting list) of a leaf tuple of `len` bytes.
fn tuple_shape(tup: &[u8], len: usize) -> (usize, usize, usize, bool) {
    let t_info = u16::from_ne_bytes([tup[6], tup[7]]);
    let size = (t_info as u32 & pg_sys::INDEX_SIZE_MASK) as usize;
    let posid = u16::from_ne_bytes([tup[4], tup[5]]);
    if t_info & INDEX_ALT_TID_MASK != 0 && posid & BT_IS_POSTING != 0 {
        let at = (u16::from_ne_bytes([tup[0], tup[1]]) as usize) << 16
            | u16::from_ne_bytes([tup[2], tup[3]]) as usize;
        (at, (posid & BT_OFFSET_MASK) as usize, at, true)
    } else {
        (size.min(len), 1, 0, false)
    }
}

/// The k-th heap TID of a leaf tuple.
fn heap_tid(
    tup: &[u8],
    posting: bool,
    tids_at: usize,
    k: usize,
) -> Option<pg_sys::ItemPointerData> {
    let t = if posting {
        tup.get(tids_at + 6 * k..tids_at + 6 * k + 6)?
    } else if k == 0 {
        tup.get(0..6)?
    } else {
        return None;
    };
    Some(pg_sys::ItemPointerData {
        ip_blkid: pg_sys::BlockIdData {
            bi_hi: u16::from_ne_bytes([t[0], t[1]]),
            bi_lo: u16::from_ne_bytes([t[2], t[3]]),
        },
        ip_posid: u16::from_ne_bytes([t[4], t[5]]),
    })
}

/// Item `n` (1-based) of a page: (offset, length) when it is LP_NORMAL.
fn line_pointer(page: &[u8], n: usize) -> Option<(usize, usize)> {
    let at = SIZE_OF_PAGE_HEADER + 4 * (n - 1);
    let w = u32::from_ne_bytes(page.get(at..at + 4)?.try_into().ok()?);
    // ItemIdData bit fields: lp_off:15, lp_flags:2, lp_len:15.
    let (off, flags, len) = ((w & 0x7FFF) as usize, (w >> 15) & 0x3, (w >> 17) as usize);
    (flags == LP_NORMAL && len >= 8).then_some((off, len))
}

impl Drop for IndexScan {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: each resource was acquired in `open` and is released once.
        unsafe {
            if self.vmbuf != pg_sys::InvalidBuffer as pg_sys::Buffer {
                pg_sys::ReleaseBuffer(self.vmbuf);
            }
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            pg_sys::index_endscan(self.scan);
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            pg_sys::index_close(self.index, lock);
            pg_sys::table_close(self.heap, lock);
        }
    }
}

/// A `text` datum for a scan key, palloc'd in the current memory context.
pub fn text_datum(s: &str) -> pg_sys::Datum {
    text_datum_bytes(s.as_bytes())
}

/// A `text` datum of raw bytes (as read from a text column).
pub fn text_datum_bytes(b: &[u8]) -> pg_sys::Datum {
    // SAFETY: cstring_to_text_with_len copies `len` bytes into a new varlena.
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            b.as_ptr() as *const std::ffi::c_char,
            b.len() as i32,
        ))
    }
}
