//! The real binaries as child processes, for tests that need real signals (`kill -9`, SIGTERM)
//! and restarts on the same data directory.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::{connect, eventually};

/// The path of a workspace binary: next to the test executable (target/<profile>/), or in
/// `HITCOUNTER_BIN_DIR`. Build them first with `cargo build --workspace --bins`.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("HITCOUNTER_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        // target/<profile>/deps/<test> → target/<profile>
        None => std::env::current_exe()?
            .parent()
            .and_then(|deps| deps.parent())
            .ok_or_else(|| anyhow::anyhow!("unexpected test executable location"))?
            .to_path_buf(),
    };
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    Ok(path)
}

/// A loopback address on which nothing listens, for "cannot reach" tests.
///
/// The port stays bound (but not listening) for as long as the value lives, so no other process
/// or test can take it in the meantime: a connection to it is refused, every time. (Binding a
/// port and releasing it, then hoping it stays free, races with every other process on the
/// machine that binds an ephemeral port.)
pub struct ClosedPort {
    /// Bound without `listen()`: connections are refused, and nobody else can bind the port.
    _socket: tokio::net::TcpSocket,
    /// The address.
    pub addr: SocketAddr,
}

impl ClosedPort {
    /// Binds a loopback port without listening on it.
    ///
    /// # Errors
    /// When no socket can be created or bound.
    pub fn bind() -> anyhow::Result<Self> {
        // No SO_REUSEADDR (`TcpSocket::new_v4` sets none), so another socket cannot bind the
        // port while we hold it.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let addr = socket.local_addr()?;
        Ok(Self {
            _socket: socket,
            addr,
        })
    }
}

/// A service binary that can be started, killed and started again with the same arguments.
///
/// It listens on `127.0.0.1:0` and the harness reads the address it bound from its start-up log
/// line (`... serving addr=Some(127.0.0.1:PORT)`), so no port is ever chosen by the test and
/// released for the child to bind again (which races with every other process binding ephemeral
/// ports). A restart gets a new address: put a [`crate::LinkProxy`] in front of a service whose
/// peers need one stable address across restarts, and [`crate::LinkProxy::retarget`] it.
pub struct Service {
    name: &'static str,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    addr: Option<SocketAddr>,
    /// The exit code of a start that ended before serving.
    exited: Option<i32>,
}

impl Service {
    /// A service `name` run in `dir` with `args` (plus `--listen 127.0.0.1:0`, no metrics
    /// endpoint and text logs). Not started yet.
    pub fn new(name: &'static str, dir: &Path, args: &[String]) -> Self {
        let mut all = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--metrics-listen".to_owned(),
            "off".to_owned(),
            "--log-format".to_owned(),
            "text".to_owned(),
        ];
        all.extend_from_slice(args);
        Self {
            name,
            args: all,
            dir: dir.to_owned(),
            child: None,
            addr: None,
            exited: None,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Starts the process and waits for its start-up log line; returns the gRPC address it
    /// bound. Its stderr goes to `<dir>/<name>.log` (appended across restarts).
    ///
    /// # Errors
    /// When the process cannot be spawned, exits before serving (the error holds its log), or
    /// logs no address within a minute (a hang guard, not a timing goal).
    pub async fn start(&mut self) -> anyhow::Result<SocketAddr> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // Only lines written by this start count.
        let from = log.metadata()?.len();
        // The start-up line is logged at info: make sure a RUST_LOG of the caller keeps it.
        let crate_target = self.name.replace('-', "_");
        let filter = match std::env::var("RUST_LOG") {
            Ok(filter) => format!("{filter},{crate_target}=info"),
            Err(_) => "info".to_owned(),
        };
        let child = Command::new(binary(self.name)?)
            .args(&self.args)
            .current_dir(&self.dir)
            // Tests read the error a service exits with from the end of its log: with the
            // caller's RUST_BACKTRACE=1, anyhow would print a backtrace after it and push it
            // out of the tail. Panics keep their backtraces (RUST_BACKTRACE still applies).
            .env("RUST_LIB_BACKTRACE", "0")
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.addr = None;
        self.exited = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read(self.log_path())?;
            let new = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
            if let Some(addr) = new.lines().find_map(bound_address) {
                self.addr = Some(addr);
                return Ok(addr);
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    self.exited = status.code();
                    anyhow::bail!(
                        "{} exited with {status} before serving:\n{}",
                        self.name,
                        self.log_tail(30)
                    );
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} logged no listen address within a minute:\n{}",
                self.name,
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The gRPC address of the running process.
    ///
    /// # Errors
    /// When the service is not running.
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        self.addr
            .ok_or_else(|| anyhow::anyhow!("{} is not running", self.name))
    }

    /// `kill -9`: no chance to drain or write anything.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.addr = None;
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit code.
    pub fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        self.addr = None;
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill failed");
        // A process that ignores SIGTERM hangs the test otherwise; this is a hang guard.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!("{} did not exit 60 s after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit code of the last start that ended before serving (see [`Service::start`]).
    pub fn last_exit_code(&self) -> Option<i32> {
        self.exited
    }

    /// The service's log so far, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The address in a service's start-up line, `... serving addr=Some(127.0.0.1:PORT) ...`.
fn bound_address(line: &str) -> Option<SocketAddr> {
    if !line.contains(" serving ") {
        return None;
    }
    let (_, rest) = line.split_once("addr=Some(")?;
    let (addr, _) = rest.split_once(')')?;
    addr.parse().ok()
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Waits until `addr` reports SERVING.
pub async fn serving(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    eventually(within, &format!("{addr} to be SERVING"), || async move {
        let mut health = HealthClient::new(connect(addr).await.ok()?);
        let response = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        (response.into_inner().status == ServingStatus::Serving as i32).then_some(())
    })
    .await
}
