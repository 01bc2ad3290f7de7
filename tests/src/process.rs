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

/// A free loopback port (bound and released; the service binds it again).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A service binary that can be started, killed and started again with the same arguments.
pub struct Service {
    name: &'static str,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    /// Its gRPC address.
    pub addr: SocketAddr,
}

impl Service {
    /// A service `name` listening on `addr`, run in `dir` with `args` (plus `--listen` and no
    /// metrics endpoint). Not started yet.
    pub fn new(name: &'static str, addr: SocketAddr, dir: &Path, args: &[String]) -> Self {
        let mut all = vec![
            "--listen".to_owned(),
            addr.to_string(),
            "--metrics-listen".to_owned(),
            "off".to_owned(),
        ];
        all.extend_from_slice(args);
        Self {
            name,
            args: all,
            dir: dir.to_owned(),
            child: None,
            addr,
        }
    }

    /// Starts the process; its stderr goes to `<dir>/<name>.log` (appended across restarts).
    pub fn start(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.name)))?;
        let child = Command::new(binary(self.name)?)
            .args(&self.args)
            .current_dir(&self.dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`: no chance to drain or write anything.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit code.
    pub fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill failed");
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

    /// The service's log so far, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{}.log", self.name)))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
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
