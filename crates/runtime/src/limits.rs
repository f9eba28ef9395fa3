//! Resource limits of a sandbox, and the size syntax users type (`512M`, `2G`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Per-sandbox resource limits, enforced by the sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (anonymous + page cache + tmpfs) in bytes; the sandbox's processes are OOM-killed above it.
    pub memory_bytes: Option<u64>,
    /// Most processes and threads at once (a fork bomb stops here).
    pub pids: Option<u64>,
    /// CPU bandwidth in cores (1.5 = one and a half cores).
    pub cpus: Option<f64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: Some(2 << 30),
            pids: Some(512),
            cpus: None,
        }
    }
}

/// The kernel's largest pid range (`PID_MAX_LIMIT` on 64-bit).
const MAX_PIDS: u64 = 4 << 20;
/// Larger memory limits than any machine has.
const MAX_MEMORY: u64 = 1 << 50;

impl Limits {
    /// Rejects values the kernel would refuse or that could not run anything.
    pub fn validate(&self) -> Result<()> {
        if self.memory_bytes.is_some_and(|m| m < 16 << 20) {
            return Err(Error::Invalid("memory limit must be at least 16M".into()));
        }
        // (Found by fuzzing the API: larger values made the cgroup write fail with ERANGE, a server error.)
        if self.memory_bytes.is_some_and(|m| m > MAX_MEMORY) {
            return Err(Error::Invalid(
                "memory limit must be at most 1P (or max)".into(),
            ));
        }
        if self.pids.is_some_and(|p| p < 4) {
            return Err(Error::Invalid("pids limit must be at least 4".into()));
        }
        if self.pids.is_some_and(|p| p > MAX_PIDS) {
            return Err(Error::Invalid(format!(
                "pids limit must be at most {MAX_PIDS} (the kernel's pid range)"
            )));
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && (0.01..=1024.0).contains(&c)) {
                return Err(Error::Invalid("cpus must be between 0.01 and 1024".into()));
            }
        }
        Ok(())
    }
}

/// Parses `2G`, `512M`, `64k`, `1024` (bytes) and `max`/`none` (no limit).
pub fn parse_size(s: &str) -> Result<Option<u64>> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("max")
        || t.eq_ignore_ascii_case("none")
        || t.eq_ignore_ascii_case("unlimited")
    {
        return Ok(None);
    }
    let bad = || Error::Invalid(format!("bad size {s:?} (try 512M or 2G)"));
    let lower = t.to_ascii_lowercase();
    let lower = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match lower.chars().last().ok_or_else(bad)? {
        'k' => (&lower[..lower.len() - 1], 1u64 << 10),
        'm' => (&lower[..lower.len() - 1], 1 << 20),
        'g' => (&lower[..lower.len() - 1], 1 << 30),
        't' => (&lower[..lower.len() - 1], 1 << 40),
        _ => (lower, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(Some((v * mult as f64) as u64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), Some(2 << 30));
        assert_eq!(parse_size("512m").unwrap(), Some(512 << 20));
        assert_eq!(parse_size("1.5GiB").unwrap(), Some(3 << 29));
        assert_eq!(parse_size("4096").unwrap(), Some(4096));
        assert_eq!(parse_size("max").unwrap(), None);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(Limits {
            memory_bytes: Some(1),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Limits {
            cpus: Some(f64::NAN),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Limits::default().validate().is_ok());
    }
}
