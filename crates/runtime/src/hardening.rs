//! Hardening applied by the sandbox's init to itself before it starts anything, so every process inherits it.

use std::io;

/// no_new_privs, a reduced capability bounding set, the seccomp deny-list, and a non-dumpable init.
///
/// Non-dumpable matters: init is a fork of the host-side zygote (never exec'd), so its memory belongs to the host
/// user namespace; with dumpable off, sandbox processes cannot ptrace it or open `/proc/1/mem` or `/proc/1/exe`
/// even though they are root of the sandbox's user namespace.
pub fn apply() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| io::Error::other(format!("set non-dumpable: {e}")))?;
    deltabox_sys::caps::drop_bounding_set()
        .map_err(|e| io::Error::other(format!("drop capabilities: {e}")))?;
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| io::Error::other(format!("no_new_privs: {e}")))?;
    deltabox_sys::seccomp::apply_deny_list()
}
