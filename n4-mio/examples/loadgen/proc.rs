//! What the kernel says about the server and the generator: memory from `/proc/PID/status`, CPU
//! time from `/proc/PID/stat` and `getrusage`. Linux only; it never changes either process.

use std::io::{self, Read, Seek};
use std::time::Duration;

/// `/proc/PID/status` and `/proc/PID/stat` of the server, opened once at the start: by the time
/// they are read the generator may have used up its descriptors.
pub struct ProcFiles {
    status: std::fs::File,
    stat: std::fs::File,
}

/// A process's memory, in KiB.
#[derive(Clone, Copy)]
pub struct Memory {
    /// Resident now (`VmRSS`).
    pub rss_kib: u64,
    /// Resident at most so far (`VmHWM`).
    pub peak_kib: u64,
}

impl ProcFiles {
    /// The files of the server `pid`, if known; says so on stderr when they cannot be opened.
    pub fn of(pid: Option<u32>) -> Option<Self> {
        let pid = pid?;
        let files = Self::open(pid);
        if files.is_none() {
            eprintln!("cannot read /proc/{pid}: no RSS or CPU figures");
        }
        files
    }

    fn open(pid: u32) -> Option<Self> {
        Some(Self {
            status: std::fs::File::open(format!("/proc/{pid}/status")).ok()?,
            stat: std::fs::File::open(format!("/proc/{pid}/stat")).ok()?,
        })
    }

    /// VmRSS and VmHWM of the process.
    pub fn memory(&self) -> Option<Memory> {
        let status = read_again(&self.status)?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        Some(Memory {
            rss_kib: field("VmRSS:")?,
            peak_kib: field("VmHWM:")?,
        })
    }

    /// CPU time (user + system) the process has used.
    pub fn cpu(&self) -> Option<Duration> {
        let stat = read_again(&self.stat)?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_micros(ticks * 1_000_000 / hz))
    }
}

fn read_again(mut file: &std::fs::File) -> Option<String> {
    file.seek(io::SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// CPU time this process has used.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
