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
use std::sync::atomic::{AtomicBool, Ordering};

/// Tests set this to compare the direct scans with the SQL they replace.
pub static FORCE_SQL: AtomicBool = AtomicBool::new(false);

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
            self.fast = self.read_tuple();
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

    /// Splits the current tuple into columns in Rust, as
    /// index_deform_tuple would (itup.h, tupmacs.h), when it is the common
    /// shape: no NULLs, each varlena inline and uncompressed. False
    /// otherwise (PostgreSQL deforms it then).
    fn read_tuple(&mut self) -> bool {
        // SAFETY: itup points at a whole index tuple; every read below is
        // bounds-checked against its size from t_info.
        unsafe {
            let t_info = u16::from_ne_bytes([*self.itup.add(6), *self.itup.add(7)]) as u32;
            if t_info & pg_sys::INDEX_NULL_MASK != 0 {
                return false;
            }
            let size = (t_info & pg_sys::INDEX_SIZE_MASK) as usize;
            let tup = std::slice::from_raw_parts(self.itup, size);
            // MAXALIGN(sizeof(IndexTupleData)) without a null bitmap.
            let mut off = 8usize;
            for (i, col) in self.layout.iter().enumerate() {
                match col {
                    Col::Int8 => {
                        off = (off + 7) & !7;
                        if off + 8 > size {
                            return false;
                        }
                        self.spans[i] = (off, 8);
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
                        let Some(&b) = tup.get(off) else { return false };
                        if b == 0x01 {
                            return false; // external (toast pointer)
                        } else if b & 0x01 == 0x01 {
                            let total = ((b >> 1) & 0x7F) as usize;
                            if total < 1 || off + total > size {
                                return false;
                            }
                            self.spans[i] = (off + 1, total - 1);
                            off += total;
                        } else {
                            if b & 0x03 != 0 || off + 4 > size {
                                return false; // compressed
                            }
                            let h = u32::from_ne_bytes([
                                tup[off],
                                tup[off + 1],
                                tup[off + 2],
                                tup[off + 3],
                            ]);
                            let total = ((h >> 2) & 0x3FFF_FFFF) as usize;
                            if total < 4 || off + total > size {
                                return false;
                            }
                            self.spans[i] = (off + 4, total - 4);
                            off += total;
                        }
                    }
                }
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

    /// Column `i` of the current entry as an i64 (an Int8 column).
    #[inline]
    pub fn i64(&self, i: usize) -> Option<i64> {
        if self.fast {
            let (off, _) = *self.spans.get(i)?;
            // SAFETY: 8 bytes at off checked in read_tuple.
            let b = unsafe { std::slice::from_raw_parts(self.itup.add(off), 8) };
            Some(i64::from_ne_bytes(b.try_into().ok()?))
        } else {
            self.row().i64(i)
        }
    }

    /// Whether the current entry's row is visible to the snapshot: its heap
    /// page is all-visible, or a heap fetch finds a visible version.
    pub fn visible(&mut self) -> bool {
        // SAFETY: xs_heaptid is the current entry's heap tid (set by
        // index_getnext_tid); the slot belongs to the heap relation.
        unsafe {
            let tid = (*self.scan).xs_heaptid;
            let blk = (tid.ip_blkid.bi_hi as u32) << 16 | tid.ip_blkid.bi_lo as u32;
            let status = pg_sys::visibilitymap_get_status(self.heap, blk, &mut self.vmbuf) as u32;
            status & pg_sys::VISIBILITYMAP_ALL_VISIBLE != 0
                || pg_sys::index_fetch_heap(self.scan, self.slot)
        }
    }
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
pub const BT_GT: u32 = pg_sys::BTGreaterStrategyNumber;

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
