//! Reads a btree index of the schema directly through the index AM
//! (`index_beginscan` / `index_getnext_tid`), the way an index-only scan
//! does, but without the executor: no per-row slot, projection or qual
//! evaluation, and no planning. Used where the analytics walk millions of
//! index entries (test_stability) or probe an index thousands of times
//! (causality_walk's rarity), which the executor made the bottleneck.
//!
//! Visibility is an index-only scan's: an entry counts when the visibility
//! map says its heap page is all-visible, else when `index_fetch_heap`
//! finds a version of the row visible to the active snapshot.
//!
//! Callers first check with `verified_index` that the index is the one the
//! schema defines (columns, predicate, btree), and fall back to SQL
//! otherwise. Serializable transactions also take the SQL path: this scan
//! takes no predicate locks.

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

/// An open index scan. Dropping it ends the scan and closes the relations
/// (not while unwinding from an error: the transaction's abort releases
/// them then).
pub struct IndexScan {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    scan: pg_sys::IndexScanDesc,
    slot: *mut pg_sys::TupleTableSlot,
    vmbuf: pg_sys::Buffer,
    /// The visibility map block `vmbuf` holds, once known.
    vm_block: Option<u32>,
    natts: usize,
    /// Nominal key capacity the scan was begun with.
    capacity: usize,
    /// Column layout for the in-Rust tuple reader.
    layout: Vec<Col>,
    /// The current entry: its tuple, and each column as (offset, length)
    /// (`fast`), or deformed by PostgreSQL into values/nulls (`!fast`).
    itup: *const u8,
    fast: bool,
    spans: Vec<(usize, usize)>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    keys: Vec<pg_sys::ScanKeyData>,
    since_interrupt_check: u32,
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
    /// caller verified) and its table with AccessShareLock and begins a scan
    /// with room for `nkeys` keys under the active snapshot.
    pub fn open(index_oid: pg_sys::Oid, nkeys: usize, layout: &[Col]) -> Self {
        // SAFETY: plain PostgreSQL calls on a verified btree index; errors
        // are raised as PostgreSQL errors.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let index = pg_sys::index_open(index_oid, lock);
            let heap_oid = (*(*index).rd_index).indrelid;
            let heap = pg_sys::table_open(heap_oid, lock);
            let snapshot = pg_sys::GetActiveSnapshot();
            let scan = pg_sys::index_beginscan(heap, index, snapshot, nkeys as i32, 0);
            (*scan).xs_want_itup = true;
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
                capacity: nkeys,
                layout: layout.to_vec(),
                itup: std::ptr::null(),
                fast: false,
                spans: vec![(0, 0); natts],
                values: vec![pg_sys::Datum::from(0); natts],
                nulls: vec![true; natts],
                keys: Vec::with_capacity(nkeys),
                since_interrupt_check: 0,
            }
        }
    }

    /// The collation of index column `attno` (1-based).
    pub fn collation(&self, attno: usize) -> pg_sys::Oid {
        // SAFETY: attno is within the index's columns (checked).
        unsafe {
            if attno == 0 || attno > self.natts {
                error!("internal: index column {attno} out of range");
            }
            *(*self.index).rd_indcollation.add(attno - 1)
        }
    }

    /// Restarts the scan with `keys`: (column, btree strategy, comparison
    /// function, argument). The arguments must outlive the scan's use of them.
    pub fn rescan(&mut self, keys: &[(usize, u32, u32, pg_sys::Datum)]) {
        self.keys.clear();
        for &(attno, strategy, proc_, arg) in keys {
            let collation = self.collation(attno);
            // SAFETY: an all-zero ScanKeyData is what ScanKeyEntryInitialize fills.
            let mut key: pg_sys::ScanKeyData = unsafe { std::mem::zeroed() };
            unsafe {
                pg_sys::ScanKeyEntryInitialize(
                    &mut key,
                    0,
                    attno as pg_sys::AttrNumber,
                    strategy as pg_sys::StrategyNumber,
                    pg_sys::InvalidOid,
                    collation,
                    pg_sys::Oid::from(proc_),
                    arg,
                );
            }
            self.keys.push(key);
        }
        // SAFETY: the scan was begun with room for `capacity` keys; btree's
        // rescan copies scan->numberOfKeys keys from ours, so that count is
        // set to ours first (a rescan may use fewer keys than the last).
        unsafe {
            if self.keys.len() > self.capacity {
                error!("internal: more scan keys than the scan was begun with");
            }
            (*self.scan).numberOfKeys = self.keys.len() as i32;
            pg_sys::index_rescan(
                self.scan,
                if self.keys.is_empty() {
                    std::ptr::null_mut()
                } else {
                    self.keys.as_mut_ptr()
                },
                self.keys.len() as i32,
                std::ptr::null_mut(),
                0,
            );
        }
    }

    /// Moves to the next index entry in index order (any visibility);
    /// false at the end. Its columns: `row`; whether its row is visible:
    /// `visible` (asked only for the entries the caller wants, so skipped
    /// entries cost no visibility check).
    pub fn advance(&mut self) -> bool {
        // SAFETY: the scan is open; xs_itup describes the entry
        // index_getnext_tid just returned, valid until the next call.
        unsafe {
            self.since_interrupt_check += 1;
            if self.since_interrupt_check >= 65_536 {
                self.since_interrupt_check = 0;
                pg_sys::check_for_interrupts!();
            }
            let tid =
                pg_sys::index_getnext_tid(self.scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tid.is_null() {
                return false;
            }
            let itup = (*self.scan).xs_itup;
            if itup.is_null() {
                error!("internal: the index returned no tuple");
            }
            self.itup = itup as *const u8;
            let t_info = u16::from_ne_bytes([*self.itup.add(6), *self.itup.add(7)]) as usize;
            let size = t_info & pg_sys::INDEX_SIZE_MASK as usize;
            let tup = std::slice::from_raw_parts(self.itup, size);
            self.fast = read_tuple(tup, &self.layout, &mut self.spans);
            if !self.fast {
                pg_sys::index_deform_tuple(
                    itup,
                    (*self.scan).xs_itupdesc,
                    self.values.as_mut_ptr(),
                    self.nulls.as_mut_ptr(),
                );
            }
            true
        }
    }

    /// The current entry's columns (valid until the next `advance`).
    pub fn row(&self) -> Row<'_> {
        Row::new(&self.values, &self.nulls)
    }

    /// Column `i` (0-based) of the current entry as bytes (a Text column).
    #[inline]
    pub fn text(&self, i: usize) -> Option<&[u8]> {
        if self.fast {
            let (off, len) = *self.spans.get(i)?;
            // SAFETY: span checked against the tuple's size in read_tuple;
            // the tuple lives until the next advance (which takes &mut self).
            Some(unsafe { std::slice::from_raw_parts(self.itup.add(off), len) })
        } else {
            self.row().text(i)
        }
    }

    /// Column `i` of the current entry as a str (a Text column).
    pub fn str(&self, i: usize) -> Option<&str> {
        self.text(i).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Whether the current entry's row is visible to the snapshot: its heap
    /// page is all-visible, or a heap fetch finds a visible version.
    pub fn visible(&mut self) -> bool {
        // SAFETY: xs_heaptid is the current entry's heap tid (set by
        // index_getnext_tid); btree keeps the leaf pinned meanwhile
        // (xs_want_itup).
        let tid = unsafe { (*self.scan).xs_heaptid };
        self.tid_visible(tid)
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
                    let t_info = u16::from_ne_bytes([tup[6], tup[7]]);
                    let size = (t_info as u32 & pg_sys::INDEX_SIZE_MASK) as usize;
                    let posid = u16::from_ne_bytes([tup[4], tup[5]]);
                    let posting = t_info & INDEX_ALT_TID_MASK != 0 && posid & BT_IS_POSTING != 0;
                    // A posting list tuple's columns end where its TIDs begin.
                    let (cols_end, ntids, tids_at) = if posting {
                        let at = (u16::from_ne_bytes([tup[0], tup[1]]) as usize) << 16
                            | u16::from_ne_bytes([tup[2], tup[3]]) as usize;
                        (at, (posid & BT_OFFSET_MASK) as usize, at)
                    } else {
                        (size.min(len), 1, 0)
                    };
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
                        let t = if posting {
                            match tup.get(tids_at + 6 * k..tids_at + 6 * k + 6) {
                                Some(t) => t,
                                None => break,
                            }
                        } else {
                            &tup[0..6]
                        };
                        let tid = pg_sys::ItemPointerData {
                            ip_blkid: pg_sys::BlockIdData {
                                bi_hi: u16::from_ne_bytes([t[0], t[1]]),
                                bi_lo: u16::from_ne_bytes([t[2], t[3]]),
                            },
                            ip_posid: u16::from_ne_bytes([t[4], t[5]]),
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

pub const BT_EQ: u32 = pg_sys::BTEqualStrategyNumber;
pub const BT_GE: u32 = pg_sys::BTGreaterEqualStrategyNumber;

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
