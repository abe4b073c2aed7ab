//! BLAKE3 of files with `liminal_engine::artifacts::hash_file`, printed like
//! `b3sum` (`<hex>  <path>`), for the `benches/hashing` harness.
//!
//! `hash_file --threshold-scan DIR` measures where memory-mapped, multi-
//! threaded hashing starts to beat plain reads on this machine (the value
//! behind `artifacts::MMAP_THRESHOLD`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

// No anyhow here: the engine has no dev-dependencies to lean on.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--threshold-scan") => {
            let dir = args.get(1).ok_or("usage: hash_file --threshold-scan DIR")?;
            threshold_scan(Path::new(dir))
        }
        Some(_) => {
            let mut out = std::io::stdout().lock();
            for a in &args {
                let (hash, _) = liminal_engine::artifacts::hash_file(Path::new(a))
                    .map_err(|e| format!("hashing {a}: {e}"))?;
                writeln!(out, "{}  {a}", hash.to_hex())?;
            }
            Ok(())
        }
        None => Err("usage: hash_file FILE... | hash_file --threshold-scan DIR".into()),
    }
}

fn by_reads(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?)?;
    Ok(h.finalize())
}

fn by_mmap_rayon(path: &Path) -> Result<blake3::Hash> {
    let f = File::open(path)?;
    // SAFETY: a private benchmark file nobody else writes.
    let map = unsafe { memmap2::Mmap::map(&f)? };
    let mut h = blake3::Hasher::new();
    h.update_rayon(&map);
    Ok(h.finalize())
}

/// Best-of-N time per call, in microseconds.
fn best_us(iters: usize, mut f: impl FnMut() -> Result<blake3::Hash>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(f()?);
        best = best.min(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(best)
}

fn threshold_scan(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    println!(
        "{:>10} {:>12} {:>12} {:>8}",
        "size", "reads_us", "mmap_rayon_us", "ratio"
    );
    for kib in [16u64, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536] {
        let path: PathBuf = dir.join(format!("scan-{kib}k.bin"));
        let data: Vec<u8> = (0..kib * 1024).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data)?;
        let iters = (200_000 / kib).clamp(5, 2000) as usize;
        // Warm the page cache and the rayon pool.
        by_reads(&path)?;
        by_mmap_rayon(&path)?;
        let r = best_us(iters, || by_reads(&path))?;
        let m = best_us(iters, || by_mmap_rayon(&path))?;
        println!("{:>9}K {:>12.1} {:>12.1} {:>8.2}", kib, r, m, r / m);
        std::fs::remove_file(&path)?;
    }
    Ok(())
}
