//! A cluster's certificates for tests, made as an operator makes them: with `fabricctl pki
//! init` (the CA, the controller's certificate and an admin's) and `fabricctl pki issue`
//! (a host's, a user's).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::workspace_bin;

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
}
