//! What the process keeps resident. A sidecar runs in every pod, so its resident set is
//! paid for pod by pod: glibc's heap trimming is tuned so that steady load does not fault
//! pages in and out, and the code that ran only at start-up is let go once it has run.
//!
//! Linux with glibc only; elsewhere both are no-ops.

/// glibc hands the free top of a thread's heap back to the kernel (`madvise`) as soon as
/// 128 KiB of it is free, and the next requests fault the same pages in again. Under
/// steady load that cycle cost one page fault per six requests (perf stat, 64
/// connections); nginx, with its own pools, takes none. Trimming now leaves 256 KiB free
/// at the top (perf stat: no faults left), so at most that much more stays resident.
/// Allocations up to 1 MiB come from the heap (setting one parameter fixes the mmap
/// threshold, which glibc would otherwise raise on its own).
///
/// Call first thing in `main`, before any other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; the caller runs it before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 256 << 10);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Unmaps the code pages this process has mapped so far (flag parsing, YAML decoding,
/// config compilation, TLS and runtime set-up ran once) from its page tables, and returns
/// how many bytes of code were let go.
///
/// The kernel maps code 64 KiB around each page that faults, and keeps it mapped: at start
/// 3.3 MiB of tern-proxy's code and 1 MiB of libc's were resident, most of it never run
/// again. The pages stay in the page cache: what runs next maps them back with a minor
/// fault (no disk read), so the resident set holds the code that serves requests.
///
/// Only executable, file-backed mappings with no private (copied-on-write) page are
/// touched, and those always read back exactly as they were.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn release_code() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut released = 0;
    for (start, end) in unmodified_code(&smaps) {
        // SAFETY: [start, end) is a whole mapping of this process, read-only and backed by
        // an unmodified file (no private page): MADV_DONTNEED only drops its page table
        // entries, and the next access maps the same file contents back in. (The kernel
        // may drop these clean pages under memory pressure at any time anyway.)
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if rc == 0 {
            released += end - start;
        }
    }
    released
}

#[cfg(not(target_os = "linux"))]
pub fn release_code() -> usize {
    0
}

/// The (start, end) of each mapping in `smaps` that is executable, not writable, private,
/// backed by a file, and has no anonymous (copied-on-write) page.
fn unmodified_code(smaps: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Anonymous:") {
            let anonymous_kb = rest.trim().trim_end_matches("kB").trim();
            if let Some(range) = current.take()
                && anonymous_kb == "0"
            {
                found.push(range);
            }
            continue;
        }
        // A mapping's first line: "start-end perms offset dev inode [path]".
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let path = fields.nth(3);
        current = (perms == "r-xp" && path.is_some_and(|p| p.starts_with('/')) && end > start)
            .then_some((start, end));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unmodified_file_backed_code_is_chosen() {
        let smaps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 123 /usr/bin/tern-proxy
Rss:                 400 kB
Anonymous:             0 kB
55d0c0100000-55d0c0800000 r-xp 00100000 fd:01 123 /usr/bin/tern-proxy
Rss:                3300 kB
Anonymous:             0 kB
55d0c0800000-55d0c0900000 r-xp 00800000 fd:01 124 /usr/lib/patched.so
Rss:                   8 kB
Anonymous:             4 kB
55d0c0900000-55d0c0a00000 rw-p 00900000 fd:01 123 /usr/bin/tern-proxy
Anonymous:            64 kB
7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
7ffc00010000-7ffc00020000 r-xp 00000000 00:00 0
Anonymous:             0 kB
";
        assert_eq!(
            unmodified_code(smaps),
            vec![(0x55d0c0100000, 0x55d0c0800000)]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn released_code_runs_again() {
        let resident_file_kb = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("RssFile:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
        };
        let before = resident_file_kb();
        assert!(release_code() > 0, "this test binary has code to let go");
        // Code runs again (this very test), and less of it is resident than before.
        assert!(resident_file_kb() < before);
    }
}
