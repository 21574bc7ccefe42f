//! # messenger-testkit
//!
//! Dev-only helpers for the black-box tests in `tests/`: they start the real
//! binaries as child processes and must never leave one running, whether a
//! test passes, fails or panics.
//!
//! * [`ChildGuard`] owns a [`Child`] and kills and reaps it on drop.
//! * [`spawn_and_wait_for_line`] starts a command, waits (with a timeout) for
//!   its ready line, e.g. `listening on 127.0.0.1:40123`, and keeps the rest of
//!   its stdout readable through [`StdoutLines`], e.g. a later
//!   `certificate SHA256:...` line.
//! * [`temp_dir`] makes a private temporary data directory removed on drop.
//! * [`Rendezvous::start`] starts a real `rendezvous` (given the path of the
//!   binary) on a loopback address in a data directory, reads its address
//!   and certificate fingerprint from stdout, and kills it on drop.
//! * [`redb_fault`]: a redb storage backend that fails like a full or
//!   failing disk, for the stores' fault tests.
//!
//! ## What it does not do
//!
//! It is not for production code and has no notion of the messenger
//! protocol. It never retries or sleeps to "let things settle": every wait
//! has an explicit timeout and an error that carries the process's output.
//!
//! ## Example
//!
//! ```
//! # #[cfg(unix)] {
//! use std::process::Command;
//! use std::time::Duration;
//!
//! let mut cmd = Command::new("sh");
//! cmd.args(["-c", "echo listening on 127.0.0.1:1; echo certificate SHA256:x; sleep 30"]);
//! let mut started =
//!     messenger_testkit::spawn_and_wait_for_line(cmd, "listening on ", Duration::from_secs(10))?;
//! assert_eq!(started.line, "listening on 127.0.0.1:1");
//! let cert = started.stdout.wait_for_prefix("certificate ", Duration::from_secs(10))?;
//! assert_eq!(cert, "certificate SHA256:x");
//! drop(started); // kills `sh` and its `sleep`
//! # }
//! # Ok::<(), messenger_testkit::TestkitError>(())
//! ```

#![forbid(unsafe_code)]

pub mod redb_fault;

use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Most stderr kept for error messages, from the end: 64 KiB.
///
/// A server logging for a whole test can write megabytes; the last screenful
/// or so is what explains a failure, and keeping it bounded keeps memory flat.
pub const STDERR_TAIL_MAX: usize = 64 * 1024;

/// How long to wait for an exit status after a child closes its stdout,
/// when explaining why it stopped: 2 seconds.
///
/// Closing stdout and exiting happen a moment apart; a process that closes
/// stdout and keeps running is reported without a status.
const EXIT_STATUS_GRACE: Duration = Duration::from_secs(2);

/// Why starting or watching a child process failed.
///
/// The messages carry the process's stdout and the tail of its stderr, so a
/// failing test shows what the child said.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// The program could not be started.
    #[error("could not start {program}")]
    Spawn {
        /// Program name.
        program: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The child's stdout ended before the awaited line.
    #[error(
        "{program} stopped ({status}) before printing a line starting with {waiting_for:?}\n\
         --- stdout ---\n{stdout}--- stderr (tail) ---\n{stderr}"
    )]
    Exited {
        /// Program name.
        program: String,
        /// Exit status, or a note that none was seen.
        status: String,
        /// Prefix that was awaited.
        waiting_for: String,
        /// Every stdout line seen so far.
        stdout: String,
        /// The last [`STDERR_TAIL_MAX`] bytes of stderr.
        stderr: String,
    },
    /// The awaited line did not come in time.
    #[error(
        "{program} printed no line starting with {waiting_for:?} within {waited:?}\n\
         --- stdout ---\n{stdout}--- stderr (tail) ---\n{stderr}"
    )]
    Timeout {
        /// Program name.
        program: String,
        /// How long was waited.
        waited: Duration,
        /// Prefix that was awaited.
        waiting_for: String,
        /// Every stdout line seen so far.
        stdout: String,
        /// The last [`STDERR_TAIL_MAX`] bytes of stderr.
        stderr: String,
    },
    /// A temporary directory could not be created.
    #[error("could not create a temporary directory")]
    TempDir(#[source] io::Error),
    /// A line did not have the expected form.
    #[error("unexpected output line {0:?}")]
    Unexpected(String),
}

/// Owns a child process and kills and reaps it when dropped.
///
/// If the child was started in its own process group (as
/// [`spawn_and_wait_for_line`] does), the whole group is killed, so helpers
/// a shell script started go too.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    own_group: bool,
}

impl ChildGuard {
    /// Takes ownership of `child`; only that process is killed on drop.
    pub fn new(child: Child) -> Self {
        Self {
            child,
            own_group: false,
        }
    }

    /// The child's process id (also its process-group id if it leads one).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, e.g. to write to its stdin.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the child has exited, without blocking.
    ///
    /// # Errors
    ///
    /// As [`Child::try_wait`].
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills the child (and its group, if it leads one) and waits for it.
    ///
    /// Calling it on a child that already exited just returns its status.
    ///
    /// # Errors
    ///
    /// As [`Child::wait`].
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        #[cfg(unix)]
        if self.own_group {
            let group = rustix::process::Pid::from_child(&self.child);
            // The group may already be gone; that is the goal anyway.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        // Fails only if the child was already reaped.
        let _ = self.child.kill();
        self.child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Nothing useful can be done with an error while dropping.
        let _ = self.kill();
    }
}

/// A started process whose ready line has been seen.
///
/// Dropping it kills the process (through [`ChildGuard`]).
#[derive(Debug)]
pub struct Started {
    /// The running process.
    pub child: ChildGuard,
    /// The first stdout line that started with the awaited prefix, without
    /// its line ending.
    pub line: String,
    /// The stdout lines after `line`.
    pub stdout: StdoutLines,
}

/// Starts `cmd` and waits until it prints a stdout line starting with
/// `prefix`.
///
/// stdout and stderr are piped (whatever `cmd` said before) and read on
/// background threads, so the child never blocks on a full pipe; on Unix the
/// child leads a new process group so everything it starts is killed with it.
/// Lines before the ready line are kept for error messages.
///
/// # Errors
///
/// [`TestkitError::Spawn`] if it cannot start, [`TestkitError::Exited`] if
/// its stdout ends first, [`TestkitError::Timeout`] if `timeout` passes; the
/// child is killed in every error case.
pub fn spawn_and_wait_for_line(
    mut cmd: Command,
    prefix: &str,
    timeout: Duration,
) -> Result<Started, TestkitError> {
    let program = program_name(cmd.get_program());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|source| TestkitError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut guard = ChildGuard {
        child,
        own_group: cfg!(unix),
    };
    let mut lines = StdoutLines::start(program, stdout, stderr);
    match lines.wait_for_prefix(prefix, timeout) {
        Ok(line) => Ok(Started {
            child: guard,
            line,
            stdout: lines,
        }),
        Err(TestkitError::Exited {
            program,
            waiting_for,
            stdout,
            ..
        }) => {
            let status = exit_status_within(&mut guard, EXIT_STATUS_GRACE);
            // Stdout closing first says nothing about stderr: let its reader
            // reach end of file before taking the tail.
            lines.wait_stderr_closed(EXIT_STATUS_GRACE);
            Err(TestkitError::Exited {
                program,
                status,
                waiting_for,
                stdout,
                stderr: lines.stderr_tail(),
            })
        }
        Err(other) => Err(other),
    }
}

/// Lines a child prints on stdout, read on a background thread.
///
/// Every line handed out is also kept, so errors can show the whole
/// transcript.
#[derive(Debug)]
pub struct StdoutLines {
    program: String,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_closed: Arc<AtomicBool>,
}

impl StdoutLines {
    /// The next stdout line, without its line ending.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Exited`] if stdout has ended, [`TestkitError::Timeout`]
    /// if no line comes within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String, TestkitError> {
        self.wait_for_prefix("", timeout)
    }

    /// Skips lines until one starts with `prefix` and returns it.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Exited`] if stdout ends first (status not known
    /// here), [`TestkitError::Timeout`] if `timeout` passes.
    pub fn wait_for_prefix(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<String, TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(TestkitError::Timeout {
                        program: self.program.clone(),
                        waited: timeout,
                        waiting_for: prefix.to_owned(),
                        stdout: self.transcript(),
                        stderr: self.stderr_tail(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TestkitError::Exited {
                        program: self.program.clone(),
                        status: "stdout closed".to_owned(),
                        waiting_for: prefix.to_owned(),
                        stdout: self.transcript(),
                        stderr: self.stderr_tail(),
                    });
                }
            }
        }
    }

    /// Every stdout line handed out so far, each ending in `\n`.
    pub fn transcript(&self) -> String {
        self.seen.iter().map(|line| format!("{line}\n")).collect()
    }

    /// Waits, at most `grace`, until the child's stderr reached end of file.
    fn wait_stderr_closed(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while !self.stderr_closed.load(Ordering::Acquire) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last [`STDERR_TAIL_MAX`] bytes the child wrote to stderr so far.
    pub fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn start(
        program: String,
        stdout: Option<impl Read + Send + 'static>,
        stderr: Option<impl Read + Send + 'static>,
    ) -> Self {
        let (sender, lines) = mpsc::channel();
        if let Some(stdout) = stdout {
            thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut buf = Vec::new();
                // Keep draining after the receiver is gone so the child never
                // blocks on a full pipe.
                let mut receiver_alive = true;
                while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    buf.clear();
                    if receiver_alive && sender.send(line).is_err() {
                        receiver_alive = false;
                    }
                }
            });
        }
        let tail = Arc::new(Mutex::new(String::new()));
        let stderr_closed = Arc::new(AtomicBool::new(stderr.is_none()));
        if let Some(stderr) = stderr {
            let tail = Arc::clone(&tail);
            let closed = Arc::clone(&stderr_closed);
            thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut buf = Vec::new();
                while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let mut kept = tail.lock().unwrap_or_else(PoisonError::into_inner);
                    kept.push_str(&String::from_utf8_lossy(&buf));
                    if kept.len() > STDERR_TAIL_MAX {
                        let mut cut = kept.len() - STDERR_TAIL_MAX;
                        while !kept.is_char_boundary(cut) {
                            cut += 1;
                        }
                        kept.drain(..cut);
                    }
                    buf.clear();
                }
                closed.store(true, Ordering::Release);
            });
        }
        Self {
            program,
            lines,
            seen: Vec::new(),
            stderr: tail,
            stderr_closed,
        }
    }
}

/// A running `rendezvous` server, killed on drop.
#[derive(Debug)]
pub struct Rendezvous {
    /// The process and its output.
    pub started: Started,
    /// The address it listens on, from its `listening on` line.
    pub addr: std::net::SocketAddr,
    /// Its certificate fingerprint, `SHA256:...`, from its
    /// `certificate` line.
    pub fingerprint: String,
}

/// How long a server gets to print its start-up lines: 30 s (a debug build
/// on a loaded CI machine creates its certificate and database in well
/// under a second; the margin is for the machine, not the server).
pub const SERVER_START: Duration = Duration::from_secs(30);

impl Rendezvous {
    /// Starts `binary` with `--listen LISTEN --data-dir DATA` and `args`,
    /// with `env` added to its environment, and waits for its start-up
    /// lines.
    ///
    /// # Errors
    ///
    /// As [`spawn_and_wait_for_line`]; [`TestkitError::Unexpected`] if the
    /// lines cannot be read.
    pub fn start(
        binary: &std::path::Path,
        listen: &str,
        data: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, TestkitError> {
        let mut cmd = Command::new(binary);
        cmd.args(["--listen", listen, "--data-dir"])
            .arg(data)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut started = spawn_and_wait_for_line(cmd, "listening on ", SERVER_START)?;
        let addr = started
            .line
            .trim_start_matches("listening on ")
            .parse()
            .map_err(|_| TestkitError::Unexpected(started.line.clone()))?;
        let cert = started
            .stdout
            .wait_for_prefix("certificate SHA256:", SERVER_START)?;
        let fingerprint = cert.trim_start_matches("certificate ").to_owned();
        Ok(Self {
            started,
            addr,
            fingerprint,
        })
    }
}

/// Creates a private (mode 0700 on Unix) temporary directory named
/// `messenger-<label>-XXXXXX`, removed with everything in it when the
/// returned [`TempDir`] drops.
///
/// # Errors
///
/// [`TestkitError::TempDir`] if it cannot be created.
pub fn temp_dir(label: &str) -> Result<TempDir, TestkitError> {
    let prefix = format!("messenger-{label}-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
    builder.tempdir().map_err(TestkitError::TempDir)
}

fn program_name(program: &OsStr) -> String {
    program.to_string_lossy().into_owned()
}

/// Polls for the child's exit status for up to `grace`.
fn exit_status_within(guard: &mut ChildGuard, grace: Duration) -> String {
    let deadline = Instant::now() + grace;
    loop {
        match guard.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => return "stdout closed, still running".to_owned(),
            Err(error) => return format!("exit status unknown: {error}"),
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    const READY_SCRIPT: &str = "echo listening on 127.0.0.1:1; echo certificate SHA256:x; sleep 30";

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    /// Whether `pid` names a live (not zombie) process.
    fn alive(pid: u32) -> bool {
        let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
            return false;
        };
        if rustix::process::test_kill_process(pid).is_err() {
            return false;
        }
        // A killed process whose parent has not reaped it yet is a zombie
        // ("Z" in /proc/PID/stat); it runs no code.
        match std::fs::read_to_string(format!("/proc/{pid}/stat", pid = pid.as_raw_pid())) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => cfg!(not(target_os = "linux")),
        }
    }

    fn eventually_dead(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !alive(pid) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn ready_line_found_next_line_readable_and_drop_kills() {
        let started =
            spawn_and_wait_for_line(sh(READY_SCRIPT), "listening on ", Duration::from_secs(10))
                .unwrap();
        let Started {
            child,
            line,
            mut stdout,
        } = started;
        assert_eq!(line, "listening on 127.0.0.1:1");
        assert_eq!(
            stdout.next_line(Duration::from_secs(10)).unwrap(),
            "certificate SHA256:x"
        );
        let pid = child.id();
        assert!(alive(pid));
        drop(child);
        assert!(!alive(pid), "pid {pid} still running after drop");
    }

    #[test]
    fn drop_kills_the_whole_process_group() {
        let script = "sleep 30 & echo sleeper $!; echo ready; wait";
        let Started {
            child, mut stdout, ..
        } = spawn_and_wait_for_line(sh(script), "ready", Duration::from_secs(10)).unwrap();
        let sleeper: u32 = stdout.transcript().lines().next().unwrap()["sleeper ".len()..]
            .parse()
            .unwrap();
        assert!(alive(sleeper));
        drop(child);
        assert!(eventually_dead(sleeper), "grandchild {sleeper} survived");
        // stdout ends once every writer is dead.
        assert!(matches!(
            stdout.next_line(Duration::from_secs(5)),
            Err(TestkitError::Exited { .. })
        ));
    }

    #[test]
    fn skipped_lines_are_kept_and_later_prefix_found() {
        let script =
            "echo one; echo two; echo ready now; echo x; echo certificate SHA256:abc; sleep 30";
        let mut started =
            spawn_and_wait_for_line(sh(script), "ready", Duration::from_secs(10)).unwrap();
        assert_eq!(started.line, "ready now");
        assert_eq!(started.stdout.transcript(), "one\ntwo\nready now\n");
        let cert = started
            .stdout
            .wait_for_prefix("certificate ", Duration::from_secs(10))
            .unwrap();
        assert_eq!(cert, "certificate SHA256:abc");
    }

    #[test]
    fn early_exit_reports_status_and_output() {
        let script = "echo starting up; echo bad config >&2; exit 3";
        let err = spawn_and_wait_for_line(sh(script), "listening on ", Duration::from_secs(10))
            .unwrap_err();
        let TestkitError::Exited { ref status, .. } = err else {
            panic!("expected Exited, got {err:?}");
        };
        assert!(status.contains('3'), "{status}");
        let message = err.to_string();
        assert!(message.contains("starting up"), "{message}");
        assert!(message.contains("bad config"), "{message}");
        assert!(message.contains("\"listening on \""), "{message}");
    }

    #[test]
    fn timeout_reports_output_and_kills_child() {
        let script = "echo pid $$; echo still booting; sleep 30";
        let began = Instant::now();
        let err = spawn_and_wait_for_line(sh(script), "listening on ", Duration::from_millis(300))
            .unwrap_err();
        assert!(began.elapsed() < Duration::from_secs(10));
        let TestkitError::Timeout { ref stdout, .. } = err else {
            panic!("expected Timeout, got {err:?}");
        };
        let pid: u32 = stdout.lines().next().unwrap()["pid ".len()..]
            .parse()
            .unwrap();
        assert!(err.to_string().contains("still booting"));
        assert!(!alive(pid), "timed-out child {pid} left running");
    }

    #[test]
    fn spawn_failure_names_the_program() {
        let err = spawn_and_wait_for_line(
            Command::new("/nonexistent/messenger-testkit-no-such-program"),
            "x",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, TestkitError::Spawn { .. }));
        assert!(err.to_string().contains("no-such-program"));
    }

    #[test]
    fn guard_of_plain_child_kills_it() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let mut guard = ChildGuard::new(child);
        assert!(guard.try_wait().unwrap().is_none());
        drop(guard);
        assert!(!alive(pid));
    }

    #[test]
    fn temp_dir_is_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;

        let dir = temp_dir("kit").unwrap();
        let path = dir.path().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("messenger-kit-"), "{name}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(path.join("f"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
