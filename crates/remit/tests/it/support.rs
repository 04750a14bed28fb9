//! Running the binary: one-shot commands and a `remit serve` process that is killed on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn remit() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_remit"));
    command
        .env_remove("REMIT_CONFIG")
        .env_remove("REMIT_STORE")
        .env_remove("RUST_LOG");
    command
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = remit().current_dir(dir).args(args).output().unwrap();
    Run {
        status: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs and expects success.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let run = run(dir, args);
    assert_eq!(
        run.status, 0,
        "remit {args:?} failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    run.stdout
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `remit serve`, killed when dropped; its log is read after it stops.
pub struct Server {
    child: Option<Child>,
    pub base: String,
    log: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let port = free_port();
        let log = dir.join(format!("serve-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let child = remit()
            .current_dir(dir)
            .env("RUST_LOG", "trace")
            .args(["serve", "--listen", &listen])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let server = Server {
            child: Some(child),
            base: format!("http://{listen}"),
            log,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.base.trim_start_matches("http://")).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("remit serve did not start:\n{}", self.log_text());
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap()
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Kills the server at once (SIGKILL: no shutdown, no flush), as a crash would, and
    /// returns its log.
    pub fn kill_hard(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.log_text()
    }

    /// Stops the server (SIGTERM via kill) and returns its log.
    pub fn stop(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.log_text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Creates the store that `dir`'s configuration names the way an operator does: by starting
/// `remit serve` once (admin commands never create one).
pub fn create_store(dir: &Path) {
    Server::start(dir, &[]).stop();
}
