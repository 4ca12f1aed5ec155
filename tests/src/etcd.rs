//! Real etcd for the tests: one member or a cluster of three, on loopback
//! ports, each member with its data directory in a temporary folder; every
//! member is killed when the [`Etcd`] is dropped. The `etcd` binary comes
//! from Debian's `etcd-server` (installed by `.ci/run`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::pki::ZoneCert;
use crate::{free_tcp_addr, wait_for};

/// The etcd binary, if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// Whether etcd tests can run here. Under `CI` a missing binary is a
/// failure, not a skip.
pub fn etcd_available() -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "etcd tests need the etcd binary (Debian etcd-server), and CI is set"
    );
    eprintln!("skipping: no etcd binary (apt-get install etcd-server; set CI to make this a failure)");
    false
}

/// One member.
#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members.
#[derive(Debug)]
pub struct Etcd {
    dir: tempfile::TempDir,
    cluster: String,
    token: String,
    members: Vec<Member>,
    /// The member's certificate, when clients must speak TLS and present
    /// a certificate of the same CA.
    tls: Option<ZoneCert>,
}

impl Etcd {
    /// One member, started and answering.
    pub fn single() -> Self {
        Self::start(1, None)
    }

    /// Three members, started and with a leader.
    pub fn cluster() -> Self {
        Self::start(3, None)
    }

    /// One member whose clients speak TLS and must present a certificate
    /// signed by the CA of `server` (which the member presents).
    pub fn single_tls(server: ZoneCert) -> Self {
        Self::start(1, Some(server))
    }

    fn start(n: usize, tls: Option<ZoneCert>) -> Self {
        let dir = tempfile::Builder::new().prefix("kmsd-etcd-").tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_tcp_addr(),
                peer: free_tcp_addr(),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("kmsd-test-{}", uuid::Uuid::new_v4());
        let mut etcd = Self {
            dir,
            cluster,
            token,
            members,
            tls,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let client = format!("{}://{}", self.scheme(), m.client);
        let peer = format!("http://{}", m.peer);
        let mut cmd = Command::new(etcd_binary().expect("etcd binary"));
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // A test process killed before its drop takes etcd along.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args([
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-token",
                &self.token,
            ])
            .args([
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .args(self.tls_args())
            .env_remove("ETCD_UNSUPPORTED_ARCH")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Serve clients with the member's certificate; ask theirs.
    fn tls_args(&self) -> Vec<std::ffi::OsString> {
        let Some(t) = &self.tls else { return Vec::new() };
        [
            ("--cert-file", &t.cert),
            ("--key-file", &t.key),
            ("--trusted-ca-file", &t.ca),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.into(), path.into()])
        .chain(["--client-cert-auth".into()])
        .collect()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    /// Every member's log, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- etcd {} ---\n{}", self.members[i].name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://{}", self.scheme(), m.client))
            .collect()
    }

    /// The `[store]` section of a kmsd configuration on this etcd.
    pub fn store_toml(&self, prefix: Option<&str>) -> String {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let mut toml = format!(
            "\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nrequest_timeout_secs = 8\n",
            endpoints.join(", ")
        );
        if let Some(p) = prefix {
            toml.push_str(&format!("prefix = {p:?}\n"));
        }
        toml
    }

    /// Waits until every running member reports itself healthy (the
    /// cluster has a leader).
    ///
    /// # Panics
    /// Not within `timeout`, with the members' logs.
    pub fn wait_healthy(&self, timeout: Duration) {
        let ok = wait_for(timeout, || {
            (self.members.iter().enumerate())
                .filter(|(_, m)| m.child.is_some())
                .all(|(i, m)| match self.tls {
                    // The gateway wants a client certificate: read the log.
                    Some(_) => std::fs::read_to_string(self.log_path(i))
                        .is_ok_and(|l| l.contains("serving client traffic securely")),
                    None => health(m.client),
                })
                .then_some(())
        });
        assert!(ok.is_some(), "etcd not healthy within {timeout:?}\n{}", self.logs());
    }

    /// The index of the member that leads, as the running members see it.
    pub fn leader(&self) -> Option<usize> {
        let statuses: Vec<(usize, String, String)> = (self.members.iter().enumerate())
            .filter(|(_, m)| m.child.is_some())
            .filter_map(|(i, m)| status(m.client).map(|(me, leader)| (i, me, leader)))
            .collect();
        let leader = &statuses.first()?.2;
        statuses.iter().find(|(_, me, _)| me == leader).map(|(i, ..)| *i)
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM member `i` and wait for it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_for(Duration::from_secs(10), || c.try_wait().unwrap()).is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "stop it first");
        self.spawn(i);
    }

    /// Compacts etcd's history up to its current revision (what the
    /// cluster's auto-compaction would do), through the JSON gateway.
    pub fn compact(&self) {
        let m = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .expect("a running member");
        let (_, body) = http(m.client, "/v3/kv/range", r#"{"key":"AA=="}"#).expect("range");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rev = v["header"]["revision"].as_str().expect("a revision").to_string();
        let req = format!(r#"{{"revision":"{rev}","physical":true}}"#);
        let (code, body) = http(m.client, "/v3/kv/compaction", &req).expect("compaction");
        assert_eq!(code, 200, "compaction: {body}");
    }

    /// Every key under `prefix` with its value, read through the JSON
    /// gateway (what anyone with access to etcd sees).
    pub fn dump(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let m = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .expect("a running member");
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a prefix") += 1;
        let req = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64.encode(prefix),
            b64.encode(&end)
        );
        let (code, body) = http(m.client, "/v3/kv/range", &req).expect("range");
        assert_eq!(code, 200, "range: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        kvs.iter()
            .map(|kv| {
                let key = b64.decode(kv["key"].as_str().unwrap()).unwrap();
                let value = b64.decode(kv["value"].as_str().unwrap_or("")).unwrap();
                (String::from_utf8(key).unwrap(), value)
            })
            .collect()
    }

    /// Writes `key` = `value` (as any etcd client may), through the JSON
    /// gateway.
    pub fn put(&self, key: &str, value: &[u8]) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let m = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .expect("a running member");
        let req = format!(r#"{{"key":"{}","value":"{}"}}"#, b64.encode(key), b64.encode(value));
        let (code, body) = http(m.client, "/v3/kv/put", &req).expect("put");
        assert_eq!(code, 200, "put: {body}");
    }

    /// Deletes every key under `prefix` (wipes a store), through the JSON
    /// gateway.
    pub fn delete_prefix(&self, prefix: &str) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let m = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .expect("a running member");
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a prefix") += 1;
        let req = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64.encode(prefix),
            b64.encode(&end)
        );
        let (code, body) = http(m.client, "/v3/kv/deleterange", &req).expect("deleterange");
        assert_eq!(code, 200, "deleterange: {body}");
    }

    /// The folder of the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut raw = String::new();
    s.write_all(req.as_bytes()).is_ok() && s.read_to_string(&mut raw).is_ok() && raw.contains(r#""health":"true""#)
}

/// (this member's id, the leader's id), from the member's status.
fn status(addr: SocketAddr) -> Option<(String, String)> {
    let (_, body) = http(addr, "/v3/maintenance/status", "{}").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let me = v["header"]["member_id"].as_str()?.to_string();
    let leader = v["leader"].as_str()?.to_string();
    Some((me, leader))
}

/// POST `body` (JSON) to etcd's gRPC gateway: status code and body.
fn http(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    Ok((code, body.to_string()))
}
