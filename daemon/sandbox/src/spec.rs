//! The OCI runtime spec for a job: the project's defaults (`oci/runtime/`)
//! plus the job's parts; the root filesystem view; the landlock ruleset.

use crate::job::Job;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Default runtime spec: namespaces, masked and read-only /proc paths, no
/// capabilities, no_new_privs, device cgroup denying all.
const BASE_CONFIG: &str = include_str!("../../../oci/runtime/config.json");
/// Default seccomp profile (see oci/runtime/README.md).
const SECCOMP: &str = include_str!("../../../oci/runtime/seccomp.json");

/// Where the container's root and bind sources come from, staged under the
/// bundle by bind mounts in the helper's private mount namespace.
///
/// Staging matters because libcontainer opens the rootfs and bind sources
/// from inside the user namespace (as host uid 100000): a source below a
/// 0700 folder such as `/root/.cache` would fail with EACCES. The mounts
/// vanish with the helper's mount namespace, even if the helper is killed.
///
/// The image folder is used as is when every mount point exists in it;
/// otherwise an overlay adds the missing mount points without ever writing
/// to the image.
pub struct Staged {
    pub rootfs: PathBuf,
    /// Staged source of each `job.mounts` entry, in order.
    pub sources: Vec<PathBuf>,
}

pub fn prepare_rootfs(job: &Job) -> Result<Staged> {
    let rootfs = &job.rootfs;
    if !rootfs.is_dir() {
        bail!("rootfs {} is not a folder", rootfs.display());
    }
    let mut needed: Vec<(String, bool)> = vec![
        ("/proc".into(), true),
        ("/dev".into(), true),
        ("/sys".into(), true),
        (job.cwd.clone(), true),
    ];
    for m in &job.mounts {
        needed.push((m.target.clone(), m.source.is_dir()));
    }
    let missing: Vec<&(String, bool)> = needed
        .iter()
        .filter(|(t, _)| inside(rootfs, t).symlink_metadata().is_err())
        .collect();
    // A root folder the mapped ids cannot traverse (mktemp's 0700, say) would
    // lock the container out of its own "/": the overlay's root takes its
    // mode from the upper folder (0755) instead.
    let traversable = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(rootfs)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    };
    let staged_root = if missing.is_empty() && traversable {
        let r = job.bundle.join("rootfs");
        std::fs::create_dir_all(&r).with_context(|| format!("creating {}", r.display()))?;
        bind(rootfs, &r)?;
        r
    } else {
        overlay(job, &missing)?
    };
    let mut sources = Vec::new();
    for (i, m) in job.mounts.iter().enumerate() {
        let meta = std::fs::metadata(&m.source)
            .with_context(|| format!("mount source {}", m.source.display()))?;
        let p = job.bundle.join("mnt").join(i.to_string());
        if meta.is_dir() {
            std::fs::create_dir_all(&p)
        } else {
            std::fs::create_dir_all(job.bundle.join("mnt"))
                .and_then(|_| std::fs::File::create(&p).map(|_| ()))
        }
        .with_context(|| format!("creating {}", p.display()))?;
        bind(&m.source, &p)?;
        sources.push(p);
    }
    Ok(Staged {
        rootfs: staged_root,
        sources,
    })
}

fn bind(src: &Path, dst: &Path) -> Result<()> {
    nix::mount::mount(
        Some(src),
        dst,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} at {}", src.display(), dst.display()))
}

fn overlay(job: &Job, missing: &[&(String, bool)]) -> Result<PathBuf> {
    let rootfs = &job.rootfs;
    let ovl = job.bundle.join("overlay");
    let (upper, work, merged) = (ovl.join("upper"), ovl.join("work"), ovl.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        escape_overlay(rootfs),
        escape_overlay(&upper),
        escape_overlay(&work)
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .context("mounting the rootfs overlay")?;
    for (target, is_dir) in missing {
        let p = inside(&merged, target);
        if *is_dir {
            std::fs::create_dir_all(&p)
        } else {
            p.parent()
                .map(std::fs::create_dir_all)
                .transpose()
                .map(|_| ())?;
            std::fs::File::create(&p).map(|_| ())
        }
        .with_context(|| format!("creating mount point {target}"))?;
    }
    Ok(merged)
}

fn inside(root: &Path, target: &str) -> PathBuf {
    root.join(target.trim_start_matches('/'))
}

fn escape_overlay(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

/// The complete config.json for the job.
pub fn build(job: &Job, staged: &Staged) -> Result<Value> {
    let mut c: Value = serde_json::from_str(BASE_CONFIG).context("oci/runtime/config.json")?;
    let seccomp: Value = serde_json::from_str(SECCOMP).context("oci/runtime/seccomp.json")?;

    c["root"]["path"] = json!(staged.rootfs);
    c["hostname"] = json!(job.hostname);
    c["domainname"] = json!(job.domainname);

    let p = &mut c["process"];
    p["args"] = json!(job.args);
    p["env"] = json!(job
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>());
    p["cwd"] = json!(job.cwd);
    p["user"]["umask"] = json!(job.umask);
    p["user"]["uid"] = json!(job.uid);
    p["user"]["gid"] = json!(job.gid);
    p["rlimits"] = json!(job
        .rlimits
        .iter()
        .map(|r| json!({"type": r.kind, "soft": r.soft, "hard": r.hard}))
        .collect::<Vec<_>>());
    // CPU affinity: libcontainer 0.7 applies execCPUAffinity only to exec'd
    // (tenant) processes, so the executor pins the workload itself.

    let mounts = c["mounts"].as_array_mut().context("base mounts")?;
    for (m, source) in job.mounts.iter().zip(&staged.sources) {
        let mut options = vec!["rbind", "nosuid", "nodev"];
        options.push(if m.readonly { "ro" } else { "rw" });
        mounts.push(json!({
            "destination": m.target,
            "type": "bind",
            "source": source,
            "options": options,
        }));
    }

    let l = &mut c["linux"];
    let map = json!([{ "containerID": 0, "hostID": job.id_map.host_id, "size": job.id_map.size }]);
    l["uidMappings"] = map.clone();
    l["gidMappings"] = map;
    l["cgroupsPath"] = json!(job.cgroup_path);
    let quota = i64::from(job.resources.cpus) * 100_000;
    l["resources"]["memory"] = json!({ "limit": job.resources.memory_bytes });
    if memsw_available() {
        // Equal limits: no swapping out of an OOM kill.
        l["resources"]["memory"]["swap"] = json!(job.resources.memory_bytes);
    }
    l["resources"]["pids"] = json!({ "limit": job.resources.pids });
    l["resources"]["cpu"] = json!({ "quota": quota, "period": 100_000 });
    l["seccomp"] = seccomp;
    if job.reset_clocks {
        l["namespaces"]
            .as_array_mut()
            .context("base namespaces")?
            .push(json!({ "type": "time" }));
        let mono = clock_secs(nix::time::ClockId::CLOCK_MONOTONIC)?;
        let boot = clock_secs(nix::time::ClockId::CLOCK_BOOTTIME)?;
        // Whole seconds: the clocks inside start in [0, 1) s (the kernel
        // refuses offsets that would make a clock negative).
        l["timeOffsets"] = json!({
            "monotonic": { "secs": -mono + job.clock_offset_secs, "nanosecs": 0 },
            "boottime": { "secs": -boot + job.clock_offset_secs, "nanosecs": 0 },
        });
    }
    // Both network modes get a fresh network namespace (in the base list);
    // `loopback` only differs in `lo` being brought up by the helper.
    Ok(c)
}

fn clock_secs(id: nix::time::ClockId) -> Result<i64> {
    Ok(nix::time::clock_gettime(id)
        .context("clock_gettime")?
        .tv_sec())
}

fn memsw_available() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
}

/// The first `n` CPUs this helper may run on.
pub fn first_cpus(n: u32) -> Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .context("sched_getaffinity")?;
    let mut cpus = Vec::new();
    for i in 0..nix::sched::CpuSet::count() {
        if set.is_set(i).unwrap_or(false) {
            cpus.push(i);
            if cpus.len() == n as usize {
                break;
            }
        }
    }
    if cpus.is_empty() {
        bail!("no CPU available");
    }
    Ok(cpus)
}

/// Landlock, applied in the container just before exec: read and execute
/// anywhere, write (create, remove, truncate, ...) only beneath `writable`,
/// and write to existing files under /dev (/dev/null, /dev/stderr).
pub fn restrict_writes(writable: &[String]) -> Result<()> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let read = AccessFs::from_read(abi) | AccessFs::IoctlDev;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(["/"], read))?
        .add_rules(path_beneath_rules(["/dev"], read | AccessFs::WriteFile))?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))?
        .restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        // Claiming a write restriction we do not have would be worse than failing.
        bail!("the kernel does not enforce landlock");
    }
    Ok(())
}
