//! The threads of a running process as the kernel shows them in `/proc/PID/task`: name,
//! scheduling policy and nice value, for the tests of the pipeline's priority.

use anyhow::{Context as _, Result};

/// `SCHED_OTHER`, the default policy.
pub const SCHED_OTHER: u32 = 0;
/// `SCHED_IDLE`.
pub const SCHED_IDLE: u32 = 5;

/// One thread of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    pub tid: u32,
    /// Its name (`comm`), at most 15 bytes.
    pub name: String,
    /// `SCHED_OTHER`, `SCHED_IDLE`, …
    pub policy: u32,
    pub nice: i32,
}

/// Every thread of `pid` now; a thread that ends while it is read is left out.
pub fn of(pid: u32) -> Result<Vec<ThreadInfo>> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("process {pid}"))? {
        let entry = entry?;
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `tid (name) state …`: the name may hold spaces and parentheses, so fields are
        // counted after its last `)`; field 3 (state) is the first of them.
        let open = stat.find('(').context("stat format")?;
        let close = stat.rfind(')').context("stat format")?;
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let field = |number: usize| fields.get(number - 3).copied().context("a short stat line");
        threads.push(ThreadInfo {
            tid: stat[..open].trim().parse()?,
            name: stat[open + 1..close].to_owned(),
            nice: field(19)?.parse()?,
            policy: field(41)?.parse()?,
        });
    }
    Ok(threads)
}
