//! A cluster's certificates for tests, made as an operator makes them: with `fabricctl pki
//! init` (the CA, the controller's certificate and an admin's) and `fabricctl pki issue`
//! (a host's, a user's).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::{controller_command, path_appears, workspace_bin, Process};

/// The directory `fabricctl pki init` made: the CA (with its key), `controller.pem` and
/// `admin.pem`, each with its key.
pub struct Pki {
    pub dir: PathBuf,
    pub cluster: String,
}

fn fabricctl(args: &[&str]) {
    let out = Command::new(workspace_bin("fabricctl"))
        .args(args)
        .output()
        .expect("run fabricctl");
    assert!(
        out.status.success(),
        "fabricctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA for `cluster` in `dir`, whose controller is reached at `controller_ips`.
    pub fn init(dir: &Path, cluster: &str, controller_ips: &[&str]) -> Pki {
        let out = dir.to_str().expect("a UTF-8 path");
        let mut args = vec!["pki", "init", "--cluster", cluster, "--out", out];
        for ip in controller_ips {
            args.extend(["--controller-ip", ip]);
        }
        fabricctl(&args);
        Pki {
            dir: dir.to_owned(),
            cluster: cluster.to_string(),
        }
    }

    /// A directory with host `name`'s certificate (`ca.pem`, `host.pem`, `host-key.pem`).
    pub fn host(&self, name: &str, out: &Path) -> PathBuf {
        self.issue(&["--host", name], out, "24h")
    }

    /// A directory with user `name`'s certificate (`ca.pem`, `NAME.pem`, `NAME-key.pem`),
    /// valid for `ttl` (`24h`, `30s`, ...).
    pub fn user(&self, name: &str, out: &Path, ttl: &str) -> PathBuf {
        self.issue(&["--user", name], out, ttl)
    }

    fn issue(&self, who: &[&str], out: &Path, ttl: &str) -> PathBuf {
        let ca = self.dir.to_str().expect("a UTF-8 path");
        let dir = out.to_str().expect("a UTF-8 path");
        let mut args = vec!["pki", "issue", "--ca-dir", ca, "--out", dir, "--ttl", ttl];
        args.extend(who);
        fabricctl(&args);
        out.to_owned()
    }

    /// A fabric-controller with this CA's controller certificate, serving mutual TLS on
    /// 127.0.0.1:`port` and root on `dir/controller.sock`, its store in `dir/data`, the
    /// admin of `pki init` bound at start, and `extra` flags; started once its socket is.
    pub fn controller(&self, dir: &Path, port: u16, extra: &[&str]) -> (Process, PathBuf) {
        let socket = dir.join("controller.sock");
        let mut command = controller_command(
            &workspace_bin("fabric-controller"),
            &socket,
            &dir.join("data"),
        );
        command
            .args(["--listen", &format!("127.0.0.1:{port}"), "--tls-dir"])
            .arg(&self.dir)
            .args(["--bootstrap-admin", "admin"])
            .args(extra);
        let process = Process::spawn("fabric-controller", command, dir.join("c.log"));
        assert!(
            path_appears(&socket, std::time::Duration::from_secs(30)),
            "the controller did not start:\n{}",
            process.log_tail(20)
        );
        // The Unix socket is bound before the TCP listener: wait for that too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the controller does not listen on {port}:\n{}",
                process.log_tail(20)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        (process, socket)
    }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
