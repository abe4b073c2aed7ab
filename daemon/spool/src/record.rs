//! On-disk framing of segments and records.
//!
//! A segment file starts with a 16-byte header: the magic `LIMSPL01` and the
//! segment's first seq (u64 LE, equal to the number in the file name). Then
//! records follow back to back:
//!
//! ```text
//! len   u32 LE   bytes after the crc field (9 + kind_len + body_len)
//! crc   u32 LE   CRC32C over the len field and everything after the crc
//! seq   u64 LE
//! klen  u8
//! kind  klen bytes (UTF-8, e.g. "signal")
//! body  the fact's wire JSON (UTF-8)
//! ```
//!
//! The checksum covers `len` too, so a torn or flipped length is caught
//! rather than followed.

use crate::error::SpoolError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) const MAGIC: &[u8; 8] = b"LIMSPL01";
pub(crate) const SEGMENT_HEADER_LEN: u64 = 16;
/// len + crc.
pub(crate) const RECORD_PREFIX_LEN: usize = 8;
/// seq + kind length byte.
const FIXED_PAYLOAD_LEN: usize = 9;
/// The largest record (prefix included) the spool writes or believes on read.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Reads are done in chunks of this size (or a whole record, if larger).
const READ_CHUNK: usize = 256 * 1024;

pub(crate) fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&first_seq.to_le_bytes());
    h
}

/// Validates a header; returns the first seq it names.
pub(crate) fn parse_segment_header(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < SEGMENT_HEADER_LEN as usize {
        return Err(format!(
            "segment header is {} bytes, expected 16",
            bytes.len()
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a liminal spool segment (bad magic)".to_string());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[8..16]);
    Ok(u64::from_le_bytes(seq))
}

/// A record encoded with a placeholder seq; [`EncodedRecord::seal`] sets the
/// seq and checksum once the spool has assigned one (under its lock), so the
/// JSON work happens outside the lock.
pub(crate) struct EncodedRecord {
    pub bytes: Vec<u8>,
}

impl EncodedRecord {
    pub fn new(kind: &str, body: &str) -> Result<Self, SpoolError> {
        if kind.is_empty() || kind.len() > 255 {
            return Err(SpoolError::InvalidKind {
                kind: kind.chars().take(64).collect(),
            });
        }
        let payload = FIXED_PAYLOAD_LEN + kind.len() + body.len();
        let total = RECORD_PREFIX_LEN + payload;
        if total > MAX_RECORD_BYTES {
            return Err(SpoolError::RecordTooLarge {
                kind: kind.to_string(),
                bytes: total,
                max: MAX_RECORD_BYTES,
            });
        }
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&(payload as u32).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]); // crc, set by seal
        bytes.extend_from_slice(&[0u8; 8]); // seq, set by seal
        bytes.push(kind.len() as u8);
        bytes.extend_from_slice(kind.as_bytes());
        bytes.extend_from_slice(body.as_bytes());
        Ok(EncodedRecord { bytes })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn seal(&mut self, seq: u64) {
        self.bytes[8..16].copy_from_slice(&seq.to_le_bytes());
        let crc = checksum(&self.bytes);
        self.bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

fn checksum(record: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&record[..4]);
    crc32c::crc32c_append(crc, &record[RECORD_PREFIX_LEN..])
}

/// One record as found in a segment.
pub(crate) struct RawRecord<'a> {
    pub seq: u64,
    pub offset: u64,
    pub kind: &'a [u8],
    pub body: &'a [u8],
}

/// Why a scan stopped before the end it was given.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    pub offset: u64,
    pub reason: String,
}

/// Where a scan ended.
pub(crate) struct ScanEnd {
    /// Offset just past the last intact record visited.
    pub end: u64,
    /// Seq the next record would carry.
    pub next_seq: u64,
    /// Set when the bytes at `end` are not an intact, in-sequence record.
    pub stop: Option<Stop>,
}

enum Parsed<'a> {
    Record(RawRecord<'a>, usize),
    /// More bytes are needed to see the whole record (its total length).
    Incomplete(usize),
    Bad(String),
}

fn parse(buf: &[u8], offset: u64) -> Parsed<'_> {
    if buf.len() < RECORD_PREFIX_LEN {
        return Parsed::Incomplete(RECORD_PREFIX_LEN);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let total = RECORD_PREFIX_LEN + len;
    if len < FIXED_PAYLOAD_LEN + 1 || total > MAX_RECORD_BYTES {
        return Parsed::Bad(format!("implausible record length {len}"));
    }
    if buf.len() < total {
        return Parsed::Incomplete(total);
    }
    let rec = &buf[..total];
    let stored = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let actual = checksum(rec);
    if stored != actual {
        return Parsed::Bad(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        ));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&rec[8..16]);
    let klen = rec[16] as usize;
    if klen == 0 || 17 + klen > total {
        return Parsed::Bad(format!("bad kind length {klen}"));
    }
    Parsed::Record(
        RawRecord {
            seq: u64::from_le_bytes(seq),
            offset,
            kind: &rec[17..17 + klen],
            body: &rec[17 + klen..],
        },
        total,
    )
}

/// Walks the records of `file` from `from` up to `end`, expecting
/// consecutive seqs starting at `expect_seq`, and calls `visit` for each
/// intact one (`visit` returns `false` to stop early). A torn, corrupt or
/// out-of-sequence record ends the scan with `stop` set; deciding whether
/// that is a torn tail or a hard error is the caller's business.
pub(crate) fn scan(
    file: &File,
    path: &Path,
    from: u64,
    end: u64,
    expect_seq: u64,
    visit: &mut dyn FnMut(RawRecord<'_>) -> Result<bool, SpoolError>,
) -> Result<ScanEnd, SpoolError> {
    let mut pos = from;
    let mut next_seq = expect_seq;
    let mut buf: Vec<u8> = Vec::new();
    while pos < end {
        let want = READ_CHUNK.min((end - pos) as usize);
        buf.resize(want, 0);
        read_exact_at(file, path, &mut buf, pos)?;
        let mut i = 0usize;
        loop {
            match parse(&buf[i..], pos + i as u64) {
                Parsed::Record(rec, total) => {
                    if rec.seq != next_seq {
                        return Ok(ScanEnd {
                            end: pos + i as u64,
                            next_seq,
                            stop: Some(Stop {
                                offset: pos + i as u64,
                                reason: format!("expected seq {next_seq}, found {}", rec.seq),
                            }),
                        });
                    }
                    next_seq += 1;
                    i += total;
                    if !visit(rec)? {
                        return Ok(ScanEnd {
                            end: pos + i as u64,
                            next_seq,
                            stop: None,
                        });
                    }
                }
                Parsed::Incomplete(total) => {
                    let at = pos + i as u64;
                    if at + total as u64 > end {
                        if at == end {
                            return Ok(ScanEnd {
                                end,
                                next_seq,
                                stop: None,
                            });
                        }
                        return Ok(ScanEnd {
                            end: at,
                            next_seq,
                            stop: Some(Stop {
                                offset: at,
                                reason: format!(
                                    "record of {total} bytes is cut off by the end at {end}"
                                ),
                            }),
                        });
                    }
                    // Refill from this record's start; grow the buffer for
                    // records larger than a chunk.
                    if total > READ_CHUNK {
                        buf.resize(total, 0);
                        read_exact_at(file, path, &mut buf, at)?;
                        pos = at;
                        i = 0;
                        continue;
                    }
                    pos = at;
                    break;
                }
                Parsed::Bad(reason) => {
                    let at = pos + i as u64;
                    return Ok(ScanEnd {
                        end: at,
                        next_seq,
                        stop: Some(Stop { offset: at, reason }),
                    });
                }
            }
            if i == buf.len() {
                pos += i as u64;
                break;
            }
        }
    }
    Ok(ScanEnd {
        end: pos,
        next_seq,
        stop: None,
    })
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<(), SpoolError> {
    file.read_exact_at(buf, at)
        .map_err(|e| SpoolError::io("reading segment", path, e))
}
