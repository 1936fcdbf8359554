//! The demo's child processes: started with their output in log files, in their own
//! process group (so a terminal's Ctrl-C reaches ternctl only, which then stops them in
//! order), with PR_SET_PDEATHSIG so they also die if ternctl is killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

/// Every process the demo started. Dropping it kills whatever still runs (the orderly way is
/// [`Procs::shutdown`]).
#[derive(Default)]
pub struct Procs {
    procs: Vec<Proc>,
}

impl Procs {
    /// Starts `program args` with stdout and stderr appended to `log_dir/name.log`.
    ///
    /// Call this from the thread that will outlive the child (the runtime's `block_on`
    /// thread): PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> anyhow::Result<()> {
        let log = log_path(log_dir, name);
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating log file {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, getppid, _exit): no allocation, no locks.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // ternctl may have died between fork and prctl: then nobody would signal us.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        self.procs.push(Proc {
            name: name.to_string(),
            log,
            child,
            exited: None,
        });
        Ok(())
    }

    /// The first child that has exited since the last call, if any.
    pub fn check_exited(&mut self) -> Option<(&Proc, ExitStatus)> {
        let idx = self.procs.iter_mut().position(|p| {
            if p.exited.is_none()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                p.exited = Some(status);
                return true;
            }
            false
        })?;
        let p = &self.procs[idx];
        Some((p, p.exited.expect("just set")))
    }

    /// Sends SIGTERM to every running child, waits up to `grace` for all of them, then
    /// kills the rest and reaps them.
    pub async fn shutdown(&mut self, grace: Duration) {
        for p in &self.procs {
            if p.exited.is_none()
                && let Some(pid) = p.child.id()
            {
                terminate(pid);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for p in &mut self.procs {
            if p.exited.is_some() {
                continue;
            }
            match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(Ok(status)) => p.exited = Some(status),
                _ => {
                    let _ = p.child.start_kill();
                    if let Ok(status) = p.child.wait().await {
                        p.exited = Some(status);
                    }
                }
            }
        }
    }
}

/// Where [`Procs::spawn`] writes the output of the process called `name`.
pub fn log_path(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(format!("{name}.log"))
}

fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a pid of a child we have not reaped yet (so it cannot have been
    // reused) and a valid signal number; it touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// The last `lines` lines of a log file, for reporting a child that died.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                "(log is empty)".to_string()
            } else {
                all[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
