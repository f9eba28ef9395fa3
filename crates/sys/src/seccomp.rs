//! The sandbox's seccomp deny-list, compiled to BPF with Firecracker's `seccompiler` (no libseccomp needed).

use std::collections::BTreeMap;
use std::io;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// System calls a sandbox process gets `EPERM` for.
///
/// A deny-list (not an allow-list) because sandboxes run arbitrary programs. Grouped by why:
/// kernel modules and kexec (host takeover), reboot/swap/accounting/clock/syslog (host-global state),
/// the kernel keyring (not namespaced), perf and bpf (kernel attack surface, side channels),
/// raw I/O ports, handle-based opens (the classic container escape), and the whole mount family: DeltaFS owns
/// the sandbox's mount table, and a process that mounted or pivoted on its own would escape re-pointing.
pub const DENIED: &[(&str, i64)] = &[
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("bpf", libc::SYS_bpf),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("quotactl", libc::SYS_quotactl),
    ("uselib", libc::SYS_uselib),
    ("vhangup", libc::SYS_vhangup),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
];

/// Compiles the deny-list for this machine's architecture.
pub fn deny_list_program() -> io::Result<BpfProgram> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED.iter().map(|&(_, nr)| (nr, vec![])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// Installs the deny-list on the calling thread (and so on every later child). Needs `no_new_privs` or
/// `CAP_SYS_ADMIN`; the sandbox init sets `no_new_privs` first.
pub fn apply_deny_list() -> io::Result<()> {
    let prog = deny_list_program()?;
    seccompiler::apply_filter(&prog).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}
