//! Streams a query's rows into a Rust closure without materializing them:
//! SPI with a custom `DestReceiver` (PostgreSQL ≥ 14's
//! `SPI_execute_plan_extended`). The bulk scans of the analytics read
//! millions of rows; copying each into an SPI tuple table, then converting
//! every column into an owned Rust value, would cost more than the scan.
//!
//! The closure sees each row as borrowed datums, valid only during the call.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// One row, borrowed from the executor's slot.
pub struct Row<'a> {
    values: &'a [pg_sys::Datum],
    nulls: &'a [bool],
}

impl<'a> Row<'a> {
    fn raw(&self, i: usize) -> Option<pg_sys::Datum> {
        match (self.values.get(i), self.nulls.get(i)) {
            (Some(v), Some(false)) => Some(*v),
            _ => None,
        }
    }

    /// A `text` column's bytes (no copy unless the value is compressed or
    /// out of line, which short names never are).
    pub fn text(&self, i: usize) -> Option<&'a [u8]> {
        let d = self.raw(i)?;
        // SAFETY: the query declares the column as text; the datum points at
        // a varlena that lives for the duration of the receiveSlot call.
        unsafe {
            let p = d.cast_mut_ptr::<pg_sys::varlena>();
            let plain = pg_sys::pg_detoast_datum_packed(p);
            let len = pgrx::varlena::varsize_any_exhdr(plain);
            let data = pgrx::varlena::vardata_any(plain) as *const u8;
            Some(std::slice::from_raw_parts(data, len))
        }
    }

    pub fn str(&self, i: usize) -> Option<&'a str> {
        self.text(i).and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn i64(&self, i: usize) -> Option<i64> {
        self.raw(i).map(|d| d.value() as i64)
    }

    /// A `timestamptz` column as µs since the Unix epoch (±infinity saturate).
    pub fn ts_unix_us(&self, i: usize) -> Option<i64> {
        self.i64(i).map(|v| v.saturating_add(PG_EPOCH_OFFSET_US))
    }
}

#[repr(C)]
struct Receiver<'f> {
    // Must be first: PostgreSQL sees a `DestReceiver*`.
    pub_: pg_sys::DestReceiver,
    natts: usize,
    f: &'f mut dyn FnMut(&Row<'_>),
}

#[pg_guard]
unsafe extern "C-unwind" fn receive_slot(
    slot: *mut pg_sys::TupleTableSlot,
    self_: *mut pg_sys::DestReceiver,
) -> bool {
    let r = &mut *(self_ as *mut Receiver<'_>);
    let natts = r.natts;
    if ((*slot).tts_nvalid as usize) < natts {
        pg_sys::slot_getsomeattrs_int(slot, natts as i32);
    }
    let row = Row {
        values: std::slice::from_raw_parts((*slot).tts_values, natts),
        nulls: std::slice::from_raw_parts((*slot).tts_isnull, natts),
    };
    (r.f)(&row);
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn r_startup(
    self_: *mut pg_sys::DestReceiver,
    _operation: i32,
    typeinfo: pg_sys::TupleDesc,
) {
    let r = &mut *(self_ as *mut Receiver<'_>);
    // Never read past the columns the query really has.
    r.natts = r.natts.min((*typeinfo).natts as usize);
}

#[pg_guard]
unsafe extern "C-unwind" fn r_noop(_self: *mut pg_sys::DestReceiver) {}

/// Runs `sql` (read-only, may use parallel workers) with `args`, calling `f`
/// for each row of its first `natts` columns. Errors are PostgreSQL errors
/// (raised, as everywhere in a function body).
pub fn stream(sql: &str, args: &[DatumWithOid<'_>], natts: usize, f: &mut dyn FnMut(&Row<'_>)) {
    run(sql, None, args, natts, f)
}

/// As `stream`, with the plan prepared once per backend and kept
/// (SPI_keepplan; the plan cache replans it after DDL). For the queries a
/// short function runs on every call, where planning costs as much as
/// executing.
pub fn stream_cached(
    sql: &'static str,
    args: &[DatumWithOid<'_>],
    natts: usize,
    f: &mut dyn FnMut(&Row<'_>),
) {
    run(sql, Some(sql), args, natts, f)
}

/// A kept plan, by query text and argument types.
type PlanKey = (&'static str, Vec<u32>);

thread_local! {
    // SAFETY: backends are single-threaded; the plans live in
    // CacheMemoryContext until the backend exits.
    static KEPT: RefCell<HashMap<PlanKey, usize>> = RefCell::new(HashMap::new());
}

fn run(
    sql: &str,
    keep: Option<&'static str>,
    args: &[DatumWithOid<'_>],
    natts: usize,
    f: &mut dyn FnMut(&Row<'_>),
) {
    let Ok(csql) = CString::new(sql) else {
        error!("internal: query text contains a NUL byte");
    };
    Spi::connect(|_client| unsafe {
        let mut argtypes: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
        let key: Option<PlanKey> =
            keep.map(|sql| (sql, argtypes.iter().map(|o| o.to_u32()).collect()));
        let kept = key
            .as_ref()
            .and_then(|k| KEPT.with(|m| m.borrow().get(k).copied()));
        let plan = match kept {
            Some(p) => p as pg_sys::SPIPlanPtr,
            None => {
                let plan = pg_sys::SPI_prepare_cursor(
                    csql.as_ptr(),
                    args.len() as i32,
                    argtypes.as_mut_ptr(),
                    pg_sys::CURSOR_OPT_PARALLEL_OK as i32,
                );
                if plan.is_null() {
                    let code = std::ptr::addr_of!(pg_sys::SPI_result).read();
                    error!("internal: SPI_prepare failed ({code})");
                }
                if let Some(k) = key.clone() {
                    if pg_sys::SPI_keepplan(plan) != 0 {
                        error!("internal: SPI_keepplan failed");
                    }
                    KEPT.with(|m| m.borrow_mut().insert(k, plan as usize));
                }
                plan
            }
        };
        let params = if args.is_empty() {
            std::ptr::null_mut()
        } else {
            let p = pg_sys::makeParamList(args.len() as i32);
            let slots = (*p).params.as_mut_slice(args.len());
            for (slot, a) in slots.iter_mut().zip(args) {
                let d = a.datum();
                slot.isnull = d.is_none();
                slot.value = d
                    .map(|d| d.sans_lifetime())
                    .unwrap_or(pg_sys::Datum::from(0));
                slot.pflags = pg_sys::PARAM_FLAG_CONST as u16;
                slot.ptype = a.oid();
            }
            (*p).numParams = args.len() as i32;
            p
        };
        let mut recv = Receiver {
            pub_: pg_sys::DestReceiver {
                receiveSlot: Some(receive_slot),
                rStartup: Some(r_startup),
                rShutdown: Some(r_noop),
                rDestroy: Some(r_noop),
                mydest: pg_sys::CommandDest::DestNone,
            },
            natts,
            f,
        };
        let opts = pg_sys::SPIExecuteOptions {
            params,
            read_only: true,
            allow_nonatomic: false,
            must_return_tuples: false,
            tcount: 0,
            dest: &mut recv as *mut Receiver<'_> as *mut pg_sys::DestReceiver,
            owner: std::ptr::null_mut(),
        };
        let rc = pg_sys::SPI_execute_plan_extended(plan, &opts);
        if rc < 0 {
            error!("internal: SPI_execute_plan_extended failed ({rc})");
        }
        if key.is_none() {
            pg_sys::SPI_freeplan(plan);
        }
    })
}
