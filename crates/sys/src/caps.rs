//! Capability bounding set.

use std::io;

/// Capabilities (name, number from `linux/capability.h`) removed from every sandbox process's bounding set.
///
/// Sandbox processes are root of their own user namespace, so their capabilities only reach the sandbox's own
/// namespaces anyway; dropping these is defence in depth against kernel bugs reachable through them. Kept on
/// purpose: `CAP_SYS_ADMIN` and `CAP_CHECKPOINT_RESTORE` (later steps inject `setns`/`clone3(set_tid)` into
/// sandbox processes, and injected calls run with the target's credentials), and the file/ownership
/// capabilities normal root tooling (pip, chown, tar) expects.
pub const DROPPED: &[(&str, u32)] = &[
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// Drops [`DROPPED`] from the calling thread's bounding set (inherited by every later child).
pub fn drop_bounding_set() -> io::Result<()> {
    for &(_, cap) in DROPPED {
        // SAFETY: PR_CAPBSET_DROP takes an integer capability number and no pointers.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        // EINVAL: the running kernel does not know this capability; nothing to drop.
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether capability number `cap` is still in the calling thread's bounding set.
pub fn in_bounding_set(cap: u32) -> io::Result<bool> {
    // SAFETY: PR_CAPBSET_READ takes an integer and no pointers.
    let r = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r == 1)
}
