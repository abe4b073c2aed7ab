//! Bench of the run inputs against their command-line peers, in one run.
//!
//!     cargo run --release -p liminal-engine --example inputs_bench -- \
//!         [--rootfs DIR]... [--oci LAYOUT:TAG]... [--rounds N]
//!
//! Defaults: the busybox rootfs and its OCI layout (oci/images/busybox.sh,
//! oci/images/make-oci-layout.sh), plus the debootstrap rootfs if it exists.
//! Page cache warm (no cache dropping: the machine is shared). Peers:
//! `b3sum` over every file (one process, its own threads) and
//! `tar -c | b3sum` for tree hashing; `umoci raw unpack` for OCI unpacking.

use liminal_engine::digest::{tree_digest, tree_digest_cached};
use liminal_engine::image::resolve;
use liminal_plan::ImageRef;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

fn sh(script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn tree_bytes(root: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    for e in walkdir::WalkDir::new(root).into_iter().flatten() {
        if e.file_type().is_file() {
            files += 1;
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (bytes, files)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rootfses: Vec<PathBuf> = Vec::new();
    let mut layouts: Vec<(PathBuf, String)> = Vec::new();
    let mut rounds = 5usize;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--rootfs" => {
                rootfses.push(PathBuf::from(&args[i + 1]));
                i += 1;
            }
            "--oci" => {
                let (l, t) = args[i + 1].rsplit_once(':').expect("--oci LAYOUT:TAG");
                layouts.push((PathBuf::from(l), t.to_owned()));
                i += 1;
            }
            "--rounds" => {
                rounds = args[i + 1].parse().expect("--rounds N");
                i += 1;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("LIMINAL_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/liminal"));
    if rootfses.is_empty() {
        let out = Command::new(repo.join("oci/images/busybox.sh"))
            .output()
            .unwrap();
        rootfses.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        let deb = cache.join("rootfs/bookworm-minbase");
        if deb.join(".liminal-rootfs").exists() {
            rootfses.push(deb);
        }
    }
    if layouts.is_empty() {
        let out = Command::new(repo.join("oci/images/make-oci-layout.sh"))
            .output()
            .unwrap();
        layouts.push((
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            "latest".into(),
        ));
    }
    let work = tempfile::tempdir().unwrap();
    println!(
        "rounds per figure: {rounds} (median), page cache warm, {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    for root in &rootfses {
        let (bytes, files) = tree_bytes(root);
        let mb = bytes as f64 / 1e6;
        println!(
            "\n== tree digest of {} ({mb:.1} MB in {files} files)",
            root.display()
        );
        let ours = time(rounds, || tree_digest(root).unwrap());
        let dc = work.path().join("digest-cache");
        tree_digest_cached(root, &dc).unwrap();
        let hit = time(rounds, || tree_digest_cached(root, &dc).unwrap());
        let q = root.display().to_string().replace('\'', "'\\''");
        let b3 = time(rounds, || {
            sh(&format!(
                "find '{q}' -type f -print0 | xargs -0 -r b3sum >/dev/null"
            ))
        });
        let tarb3 = time(rounds, || {
            sh(&format!("tar -C '{q}' -cf - . | b3sum >/dev/null"))
        });
        let tarsha = time(rounds, || {
            sh(&format!("tar -C '{q}' -cf - . | sha256sum >/dev/null"))
        });
        println!(
            "  liminal tree_digest        {:8.1} ms  {:7.0} MB/s",
            ms(ours),
            mb / ours.as_secs_f64()
        );
        println!(
            "  liminal cached (stat walk) {:8.1} ms  ({:.1}x faster than hashing)",
            ms(hit),
            ours.as_secs_f64() / hit.as_secs_f64()
        );
        println!(
            "  peer find | xargs b3sum    {:8.1} ms  {:7.0} MB/s  (ours {:.2}x)",
            ms(b3),
            mb / b3.as_secs_f64(),
            b3.as_secs_f64() / ours.as_secs_f64()
        );
        println!(
            "  peer tar -c | b3sum        {:8.1} ms  {:7.0} MB/s  (ours {:.2}x)",
            ms(tarb3),
            mb / tarb3.as_secs_f64(),
            tarb3.as_secs_f64() / ours.as_secs_f64()
        );
        println!(
            "  peer tar -c | sha256sum    {:8.1} ms  {:7.0} MB/s  (ours {:.2}x)",
            ms(tarsha),
            mb / tarsha.as_secs_f64(),
            tarsha.as_secs_f64() / ours.as_secs_f64()
        );
    }

    for (layout, tag) in &layouts {
        println!("\n== OCI {}:{tag}", layout.display());
        let mut n = 0;
        let cold = time(rounds, || {
            n += 1;
            let c = work.path().join(format!("oci-cache-{n}"));
            let img = resolve(
                &ImageRef::Oci {
                    layout: layout.clone(),
                    tag: tag.clone(),
                },
                &c,
            )
            .unwrap();
            let _ = std::fs::remove_dir_all(&c);
            img
        });
        let c = work.path().join("oci-cache-hit");
        let img = resolve(
            &ImageRef::Oci {
                layout: layout.clone(),
                tag: tag.clone(),
            },
            &c,
        )
        .unwrap();
        let (bytes, files) = tree_bytes(&img.rootfs);
        let hit = time(rounds.max(20), || {
            resolve(
                &ImageRef::Oci {
                    layout: layout.clone(),
                    tag: tag.clone(),
                },
                &c,
            )
            .unwrap()
        });
        let lq = layout.display().to_string();
        let umoci = time(rounds, || {
            n += 1;
            let b = work.path().join(format!("umoci-{n}"));
            let ok = sh(&format!(
                "umoci raw unpack --image '{lq}:{tag}' '{}'",
                b.display()
            ));
            let _ = std::fs::remove_dir_all(&b);
            ok
        });
        println!(
            "  unpacked: {:.1} MB in {files} files, digest {}",
            bytes as f64 / 1e6,
            img.digest
        );
        println!("  liminal resolve, cold      {:8.1} ms", ms(cold));
        println!("  liminal resolve, cache hit {:8.3} ms", ms(hit));
        println!(
            "  peer umoci raw unpack      {:8.1} ms  (ours {:.2}x)",
            ms(umoci),
            umoci.as_secs_f64() / cold.as_secs_f64()
        );
    }
}
