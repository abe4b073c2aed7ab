//! Byte sizes as people write them in plans: `512M`, `1G`, `64MiB`, `1048576`.

/// Parse a size; suffixes are binary (K = 1024), as in cgroup and systemd
/// settings.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "{text:?} is not a size (write it like \"512M\" or \"2G\")"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is too large"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}
